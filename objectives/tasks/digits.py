"""Offline tasks built from scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download).

The images are split into two disjoint halves, stratified by class: the source half stays clean, the target half
gets the task's shift. Shifts are deterministic (fixed generator), so a task's data never depends on the trial seed.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .base import DomainPool, LabeledImages, TaskOptions, register_task

# Fixed, so every run (and every machine) sees the same shifted target domain.
_SHIFT_SEED = 1234
# digits-permute: class c of the target is labelled _PERMUTATION[c] (a derangement: no class keeps its label).
_PERMUTATION = [3, 7, 0, 9, 1, 8, 2, 5, 4, 6]


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (the file `load_digits` reads), without importing sklearn.datasets, which
    costs seconds of start-up in every worker process."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    data = np.loadtxt(path, delimiter=",", dtype=np.float32)  # 64 pixels, then the label, per row
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


def _load_halves() -> tuple[LabeledImages, LabeledImages]:
    images, labels = _read_digits()
    x = torch.from_numpy(images).unsqueeze(1) / 16.0  # pixel values are 0..16
    y = torch.from_numpy(labels)
    g = torch.Generator().manual_seed(_SHIFT_SEED)
    source_idx, target_idx = [], []
    for c in range(10):  # stratified halves, so both domains see every class equally often
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        source_idx.append(idx[: len(idx) // 2])
        target_idx.append(idx[len(idx) // 2:])
    s, t = torch.cat(source_idx), torch.cat(target_idx)
    return LabeledImages(x[s], y[s]), LabeledImages(x[t], y[t])


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(2 * sigma))
    k = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2 / (2 * sigma**2))
    k = (k / k.sum()).view(1, 1, 1, -1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.transpose(2, 3))


def _rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]]).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)


def _names() -> list[str]:
    return [str(c) for c in range(10)]


@register_task("digits-invert", shift="input", offline=True,
               description="source: clean digits; target: intensity-inverted digits (input-level shift)")
def digits_invert(options: TaskOptions):
    """Target pixels are 1 - x: same shapes, opposite contrast."""
    source, target = _load_halves()
    return DomainPool(source), DomainPool(LabeledImages(1.0 - target.x, target.y)), _names()


@register_task("digits-noise", shift="input", offline=True,
               description="source: clean digits; target: blurred digits under heavy Gaussian noise")
def digits_noise(options: TaskOptions):
    """Blur (sigma 0.7) then Gaussian noise (std 0.38), clipped to [0, 1]: at this severity a source-trained
    teacher falls well below 60% while a model trained on the target still learns it."""
    source, target = _load_halves()
    g = torch.Generator().manual_seed(_SHIFT_SEED)
    noisy = _blur(target.x, 0.7) + 0.38 * torch.randn(target.x.shape, generator=g)
    return DomainPool(source), DomainPool(LabeledImages(noisy.clamp(0, 1), target.y)), _names()


@register_task("digits-permute", shift="output", offline=True,
               description="source: clean digits; target: same images, labels remapped by a fixed permutation")
def digits_permute(options: TaskOptions):
    """Images unchanged, label c becomes _PERMUTATION[c]: only the output layer's mapping has to change."""
    source, target = _load_halves()
    perm = torch.tensor(_PERMUTATION)
    return DomainPool(source), DomainPool(LabeledImages(target.x, perm[target.y])), _names()


@register_task("digits-stroke", shift="feature", offline=True,
               description="source: clean digits; target: thick strokes rotated by 60 degrees (feature-level shift)")
def digits_stroke(options: TaskOptions):
    """Strokes dilated (3x3 max filter) then rotated 60 degrees: the local features (edges, stroke widths and
    orientations) change, not just pixel intensities or labels."""
    source, target = _load_halves()
    thick = F.max_pool2d(target.x, 3, stride=1, padding=1)
    return DomainPool(source), DomainPool(LabeledImages(_rotate(thick, 60.0).clamp(0, 1), target.y)), _names()
