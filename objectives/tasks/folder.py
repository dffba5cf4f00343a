"""Image-folder data read lazily: file names and labels live in memory, pixels are decoded batch by batch by a
`torch.utils.data.DataLoader` (worker processes, pinned memory on CUDA) and moved to the device as they arrive.

Every other task fits in memory as device tensors (`LabeledImages`); a user's image folders may not, and decoding
JPEGs is CPU work that worker processes overlap with training. The pixels are exactly those of an eager decode:
torchvision's ImageFolder loader (PIL, RGB), then `resize_images` to size x size, float32 in [0, 1].

torchvision is imported inside the decoding functions only: `objectives.train` imports this module, and importing
torchvision costs seconds in every process that never reads a folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

import torch
from torch.utils.data import DataLoader, Dataset

from models.errors import UserError

from .base import LabeledImages, one_line, resize_images


def decode_image(path: str, size: int) -> torch.Tensor:
    """One image file -> (3, size, size) float32 in [0, 1]: PIL through torchvision's ImageFolder loader (RGB),
    then antialiased bilinear resizing. Raises OSError for a file PIL cannot read."""
    from torchvision.datasets.folder import default_loader
    from torchvision.transforms.functional import pil_to_tensor

    return resize_images(pil_to_tensor(default_loader(path)).unsqueeze(0).float() / 255, size)[0]


def unreadable(path: str, error: BaseException) -> str:
    """The one-line message for an image that cannot be read (raised as a UserError in the main process)."""
    return f"task 'imagefolder': cannot read image {path}: {one_line(error)}"


def check_readable(paths: Iterable[str]) -> None:
    """Fail before any training on files PIL cannot identify: opening reads only the header, not the pixels.
    (A file damaged past its header is still caught when its batch is decoded.)"""
    from PIL import Image

    for path in paths:
        try:
            with Image.open(path):
                pass
        except OSError as e:  # PIL's UnidentifiedImageError is an OSError
            raise UserError(unreadable(path, e)) from None


class _Decoder(Dataset):
    """What runs in the workers: index -> (image, label), or the error message for an unreadable file, so the
    main process raises a one-line UserError rather than re-raising a worker's traceback."""

    def __init__(self, paths: list[str], labels: list[int], size: int):
        self.paths, self.labels, self.size = paths, labels, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return decode_image(self.paths[i], self.size), self.labels[i]
        except OSError as e:
            return unreadable(self.paths[i], e)


def _collate(samples: list):
    for s in samples:
        if isinstance(s, str):
            return s
    images, labels = zip(*samples)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


@dataclass
class FolderImages:
    """Images of a class-per-folder directory, read lazily: `files` relative to `root`, labels `y` (N,) int64,
    every image decoded to (3, size, size). `device` is where batches go; nothing is read before iterating."""

    root: str
    files: list[str] = field(repr=False)  # thousands of names would drown any repr
    y: torch.Tensor
    size: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __len__(self) -> int:
        return len(self.files)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.size, self.size)

    def paths(self) -> list[str]:
        return [os.path.join(self.root, f) for f in self.files]

    def subset(self, index: torch.Tensor) -> FolderImages:
        return replace(self, files=[self.files[i] for i in index.tolist()], y=self.y[index])

    def to(self, device) -> FolderImages:
        """The same files with batches delivered to `device` (nothing is read or moved now)."""
        return replace(self, device=torch.device(device))

    def update_hash(self, h) -> None:
        """Feed hashlib object `h` the files' names, sizes and modification times, the labels and the image size,
        not pixels: cheap, and a changed folder still means a new fingerprint (and so a new teacher)."""
        h.update(f"folder:{self.size}".encode())
        for name in self.files:
            st = os.stat(os.path.join(self.root, name))
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        h.update(self.y.contiguous().numpy().tobytes())

    def batches(self, batch_size: int, num_workers: int,
                batch_sampler: Iterable[list[int]] | None = None) -> Iterator[LabeledImages]:
        """Decoded batches on `device`, in file order (or in the order of `batch_sampler`'s index lists), read by
        `num_workers` worker processes (0 = in this process). Closing the iterator stops the workers.

        A caller that needs many passes keeps one iterator over an endless `batch_sampler` rather than
        re-iterating: the workers then start once, which is what `persistent_workers` would buy, without a
        re-fork per epoch."""
        cuda = self.device.type == "cuda"
        dataset = _Decoder(self.paths(), self.y.tolist(), self.size)
        if batch_sampler is None:
            # A worker per batch at most, and none for a single batch: the main process would only wait for it,
            # and starting workers costs tens of milliseconds per pass.
            batches = -(-len(self) // batch_size)
            workers = min(num_workers, batches) if batches > 1 else 0
            loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                                pin_memory=cuda)
        else:
            loader = DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=_collate,
                                pin_memory=cuda)
        fmt = torch.channels_last if cuda else torch.contiguous_format
        for batch in loader:
            if isinstance(batch, str):
                raise UserError(batch)
            x, y = batch
            # Pinned memory + non_blocking: the copy overlaps the previous step's compute on the GPU.
            yield LabeledImages(x.to(self.device, non_blocking=True).contiguous(memory_format=fmt),
                                y.to(self.device, non_blocking=True))

    def load(self, num_workers: int = 0, batch_size: int = 256) -> LabeledImages:
        """Every image decoded, as in-memory tensors on `device` (for tests and small checks)."""
        parts = list(self.batches(batch_size, num_workers))
        if not parts:
            return LabeledImages(torch.zeros(0, *self.image_shape, device=self.device),
                                 torch.zeros(0, dtype=torch.int64, device=self.device))
        return LabeledImages(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))


# Either kind of task data; code that needs only `y`, `len`, `subset` and `image_shape` takes both.
Images = LabeledImages | FolderImages


class ShuffledBatches:
    """An endless `batch_sampler`: index lists of `batch_size` from a fresh permutation each pass, dropping the
    remainder, like the in-memory `_IndexStream`. Seeded, so the order never depends on the number of workers."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, min(batch_size, n), seed

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed)
        while True:
            perm = torch.randperm(self.n, generator=g).tolist()
            for start in range(0, self.n - self.batch_size + 1, self.batch_size):
                yield perm[start:start + self.batch_size]
