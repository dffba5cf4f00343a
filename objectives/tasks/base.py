"""What a task is: a source domain and a target domain of labelled images, split for transfer.

A task builder returns the two domains' raw pools (`DomainPool`); `split_task` turns them into the fixed
train/val/test splits plus the target's labelled subset and unlabelled pool, seeded, so every task is split
the same way. Images are float32 tensors (N, C, H, W) in [0, 1]; labels int64 (N,). In-memory tasks hold them as
`LabeledImages`; the `imagefolder` task streams them from disk (`folder.FolderImages`: the same interface, less `x`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pydantic
import torch
import torch.nn.functional as F

from models.named import Registry

from ..fields import SETTINGS, Bool, Float, Int, Text, in_open_range, in_range

if TYPE_CHECKING:
    from .folder import FolderImages


@dataclass
class LabeledImages:
    """Images (N, C, H, W) float32 in [0, 1] and labels (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])

    def subset(self, index: torch.Tensor) -> LabeledImages:
        return LabeledImages(self.x[index], self.y[index])

    def to(self, device) -> LabeledImages:
        """Both tensors on `device`; on CUDA the images go channels_last (what cuDNN's fast kernels want)."""
        device = torch.device(device)
        fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        return LabeledImages(self.x.to(device, memory_format=fmt), self.y.to(device))


def resize_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> (N, C, size, size), antialiased bilinear (the one resize every task uses)."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)


def one_line(error: BaseException, limit: int = 200) -> str:
    """An exception's message on one line, cut to `limit` characters (for UserErrors quoting library errors)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass
class DomainPool:
    """One domain as a builder returns it: everything in `train` (split further), plus an official `test` set
    when the dataset has one (then only `train` is split into train/val)."""

    train: LabeledImages | FolderImages
    test: LabeledImages | FolderImages | None = None
    unlabeled: LabeledImages | None = None  # extra unlabelled images (target only), added to its unlabelled pool


@pydantic.dataclasses.dataclass(config=SETTINGS)
class TaskOptions:
    """Settings a task builder may read (the config's `task` section)."""

    name: Text = "digits-invert"
    data_root: Text = "~/.cache/distillstudy/data"  # where torchvision-backed tasks look for / download files
    download: Bool = True  # try to download missing files (falls back to a clear error offline)
    # labelled target examples per class; 0 = unsupervised target
    target_labeled_per_class: Int = in_range(5, 0, 10**6)
    # Shares of each domain's pool held out for validation and test: never empty, never all of it (study.config.config
    # also checks that together they leave a training split).
    val_fraction: Float = in_open_range(0.15, 0.0, 1.0)
    # used only when the dataset has no official test split
    test_fraction: Float = in_open_range(0.15, 0.0, 1.0)
    # cap on each domain's pool, so big datasets stay quick; 0 = no cap
    max_per_domain: Int = in_range(6000, 0, 10**9)
    image_size: Int = in_range(0, 0, 4096)  # image-folder side (0 = task default)
    source_dir: Text = ""  # imagefolder: class-per-folder directory of the source domain
    target_dir: Text = ""  # imagefolder: class-per-folder directory of the target domain


@dataclass
class TaskInfo:
    """Registry entry for a task."""

    name: str
    shift: str  # input | output | feature | dataset
    description: str
    builder: Callable[[TaskOptions], tuple[DomainPool, DomainPool, list[str]]]
    allow_flip: bool = False  # horizontal flips are label-preserving (never for digits)
    offline: bool = False  # needs no files from the user


@dataclass
class TaskData:
    """A task, split and ready: every tensor on one device (folder data: every batch delivered to it)."""

    name: str
    shift: str
    class_names: list[str]
    source_train: LabeledImages | FolderImages
    source_val: LabeledImages | FolderImages
    source_test: LabeledImages | FolderImages
    target_labeled: LabeledImages | FolderImages
    target_unlabeled: LabeledImages | FolderImages  # labels kept only for diagnostics; training never reads them
    target_val: LabeledImages | FolderImages
    target_test: LabeledImages | FolderImages
    allow_flip: bool = False
    fingerprint: str = ""  # hash of the data, part of the teacher cache key
    extras: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.source_train.image_shape

    def sizes(self) -> dict[str, int]:
        return {k: len(getattr(self, k)) for k in ("source_train", "source_val", "source_test", "target_labeled",
                                                   "target_unlabeled", "target_val", "target_test")}


_TASKS: Registry[TaskInfo] = Registry(
    "task", loaders=(lambda: _load_builtins(torchvision=False), lambda: _load_builtins(torchvision=True)))


def register_task(name: str, shift: str, description: str, allow_flip: bool = False, offline: bool = False):
    """Decorator registering `builder(options) -> (source_pool, target_pool, class_names)` as task `name`."""

    def wrap(builder):
        _TASKS.add(name, TaskInfo(name, shift, description, builder, allow_flip, offline))
        return builder

    return wrap


def unregister_task(name: str) -> None:
    """Remove task `name` (tests that register their own task clean up with this)."""
    _TASKS.remove(name)


def get_task_info(name: str) -> TaskInfo:
    """The registry entry of task `name` (or of a user's `package.module:function`, see `tasks.user`), or a
    UserError naming the valid tasks."""
    from models.imports import is_import_path

    if is_import_path(name):
        from .user import user_task_info

        return user_task_info(name)
    return _TASKS.get(name)


def list_tasks() -> list[TaskInfo]:
    """All registered tasks, sorted by name."""
    return [_TASKS.get(k) for k in sorted(_TASKS.names())]


def _load_builtins(torchvision: bool) -> None:
    # The torchvision-backed tasks only when asked for: importing torchvision costs seconds per process.
    from . import digits, mnist_digits  # noqa: F401

    if torchvision:
        from . import torchvision_tasks  # noqa: F401
