"""Your own model and data, as distillstudy takes them (see README, "Your own model and data").

    model.arch: examples.own_model:build       # called as build(num_classes=..., in_channels=...)
    task.name:  examples.own_model:lit_digits  # returns (source, target, unlabeled) torch Datasets

Run from the repository root (the working directory is searched for `examples.own_model`), e.g.
`distillstudy trial run --config examples/own_model.yaml`. Nothing here imports distillstudy: a module of your own
repository works the same way, from the working directory or PYTHONPATH.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset


class SmallCNN(nn.Module):
    """A CNN with named children; `examples/own_model.yaml` groups them as stem [conv1, bn1], block1, block2 and
    head [classifier]. `width` scales the hidden channels inside each block (16 and 32 at width 1) while the
    channels between blocks stay fixed, so a slimmer block fits in place (`pipeline.replace_with: slim`)."""

    def __init__(self, num_classes: int, in_channels: int, width: float = 1.0):
        super().__init__()
        hidden1, hidden2 = max(1, round(16 * width)), max(1, round(32 * width))
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.block1 = nn.Sequential(
            nn.Conv2d(16, hidden1, 3, padding=1, bias=False), nn.BatchNorm2d(hidden1), nn.ReLU(),
            nn.Conv2d(hidden1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(
            nn.Conv2d(32, hidden2, 3, padding=1, bias=False), nn.BatchNorm2d(hidden2), nn.ReLU(),
            nn.Conv2d(hidden2, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.block2(self.block1(x))
        return self.classifier(x.mean(dim=(2, 3)))


def build(num_classes: int, in_channels: int, width: float = 1.0) -> nn.Module:
    """The builder `model.arch` names: the task's classes and input channels in, a network out."""
    return SmallCNN(num_classes, in_channels, width)


def lit_digits():
    """Digits under uneven lighting: the source is scikit-learn's 8x8 digits, the target the same kind of digits
    lit from the left (a brightness ramp) with sensor noise; a third set of target images comes without labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16  # (N, 1, 8, 8) in [0, 1]
    y = torch.tensor(digits.target, dtype=torch.int64)
    generator = torch.Generator().manual_seed(0)
    ramp = torch.linspace(1.0, 0.2, 8).view(1, 1, 1, 8)  # bright on the left, dim on the right
    lit = (x * ramp + 0.15 + 0.05 * torch.randn(x.shape, generator=generator)).clamp(0, 1)
    source = TensorDataset(x[0::2], y[0::2])
    target = TensorDataset(lit[1::4], y[1::4])
    unlabeled = TensorDataset(lit[3::4])  # images only: used by the KD terms, never as labels
    return source, target, unlabeled
