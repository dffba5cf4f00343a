"""A user's task: `task.name: package.module:function`, a function of no arguments returning

    (source, target)  or  (source, target, unlabeled)

as `torch.utils.data.Dataset`s whose items are (image tensor (C, H, W), integer label); the optional third set is
unlabelled target images (items an image, or (image, anything)), added to the target's unlabelled pool. Images are
float in [0, 1] (uint8 images are divided by 255). The datasets are read once into memory and then split,
fingerprinted and cached like a built-in task (`split.split_task`); any problem with the return value is one line.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch

from models.errors import UserError, first_line
from models.imports import load_callable

from .base import DomainPool, LabeledImages, TaskInfo, TaskOptions

NO_LABEL = -1  # label of the unlabelled images (training never reads it)


def user_task_info(name: str) -> TaskInfo:
    """The TaskInfo of `name` = `package.module:function` (the function is imported now, so a typo fails at
    config validation)."""
    fn = load_callable(name, "task.name")
    lines = (fn.__doc__ or "").strip().splitlines()
    description = lines[0] if lines else f"user dataset {name}"
    return TaskInfo(name, "dataset", description, _builder(name, fn))


def _builder(name: str, fn: Callable) -> Callable[[TaskOptions], tuple[DomainPool, DomainPool, list[str]]]:
    def build(options: TaskOptions):
        try:
            value = fn()
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's code failed: one line, not their traceback
            raise UserError(f"task '{name}': {name}() failed: {type(exc).__name__}: {first_line(exc)}") from None
        if not isinstance(value, (tuple, list)) or len(value) not in (2, 3):
            raise UserError(f"task '{name}': {name}() must return (source, target) or (source, target, unlabeled) "
                            f"datasets, got {_describe(value)}")
        source = _read(name, "source", value[0], labeled=True)
        target = _read(name, "target", value[1], labeled=True)
        unlabeled = _read(name, "unlabeled", value[2], labeled=False) if len(value) == 3 else None
        num_classes = int(max(source.y.max(), target.y.max())) + 1
        classes = getattr(value[0], "classes", None)
        names = [str(c) for c in classes] if isinstance(classes, (list, tuple)) and len(classes) == num_classes \
            else [str(c) for c in range(num_classes)]
        return DomainPool(source), DomainPool(target, unlabeled=unlabeled), names

    return build


def _describe(value) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return type(value).__name__


def _read(name: str, role: str, dataset, labeled: bool) -> LabeledImages:
    """Every item of `dataset` into one LabeledImages (images stacked as float32, labels int64)."""
    where = f"task '{name}': the {role} dataset"
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise UserError(f"{where} is a {type(dataset).__name__}, not a torch.utils.data.Dataset with a length")
    if len(dataset) == 0:
        raise UserError(f"{where} is empty")
    images, labels = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        if isinstance(item, (tuple, list)):  # (image, label), or (image,) from a one-tensor TensorDataset
            image, label = item[0] if item else None, item[1] if len(item) > 1 else None
        else:
            image, label = item, None
        images.append(_image(where, i, image, images[0].shape if images else None))
        labels.append(_label(where, i, label) if labeled else NO_LABEL)
    return LabeledImages(torch.stack(images), torch.tensor(labels, dtype=torch.int64))


def _image(where: str, i: int, image, shape) -> torch.Tensor:
    if not torch.is_tensor(image):
        raise UserError(f"{where}: item {i} is {type(image).__name__}, expected (image tensor, label)")
    if image.dim() == 2:  # (H, W): one channel
        image = image.unsqueeze(0)
    if image.dim() != 3:
        raise UserError(f"{where}: item {i} has an image of shape {tuple(image.shape)}, expected (C, H, W)")
    if image.dtype == torch.uint8:
        image = image.float() / 255
    elif not image.is_floating_point():
        raise UserError(f"{where}: item {i} has a {image.dtype} image, expected float in [0, 1] or uint8")
    if not torch.isfinite(image).all():  # one NaN pixel turns every loss and accuracy into NaN, far from here
        raise UserError(f"{where}: item {i} has NaN or infinite pixel values")
    if shape is not None and image.shape != shape:
        raise UserError(f"{where}: item {i} has shape {tuple(image.shape)}, item 0 {tuple(shape)}: resize them "
                        "to one size")
    return image.float().cpu()


def _label(where: str, i: int, label) -> int:
    if torch.is_tensor(label) and label.numel() == 1:
        label = label.item()
    if isinstance(label, bool) or not isinstance(label, numbers.Integral) or label < 0:
        raise UserError(f"{where}: item {i} has label {label!r}, expected an integer class index >= 0")
    return int(label)
