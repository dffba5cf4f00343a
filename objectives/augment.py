"""Augmentation of whole training batches as tensors (no per-sample Python): one grid_sample for translation and
flips, then brightness/contrast jitter and noise. Runs on whatever device the batch is on."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .settings import AugmentSettings


def augment_batch(x: torch.Tensor, cfg: AugmentSettings, allow_flip: bool, g: torch.Generator) -> torch.Tensor:
    """Randomly translate (and flip, where the task allows), jitter and add noise to a batch in [0, 1]."""
    n, dev = x.shape[0], x.device

    def uniform(*shape):
        return torch.rand(*shape, generator=g, device=dev) * 2 - 1

    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    if allow_flip and cfg.flip:
        theta[:, 0, 0] = torch.where(torch.rand(n, generator=g, device=dev) < 0.5, -1.0, 1.0)
    # affine_grid works in [-1, 1] coordinates, so a shift of `translate` of the side is 2 * translate.
    theta[:, :, 2] = uniform(n, 2) * 2 * cfg.translate
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (1 + cfg.contrast * uniform(n, 1, 1, 1)) + mean + cfg.brightness * uniform(n, 1, 1, 1)
    if cfg.noise > 0:
        x = x + cfg.noise * torch.randn(x.shape, generator=g, device=dev)
    return x.clamp(0, 1)
