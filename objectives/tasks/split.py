"""Turn a task's two raw domain pools into seeded train/val/test splits and the target's labelled subset."""

from __future__ import annotations

import hashlib

import torch

from models.errors import UserError

from .base import DomainPool, LabeledImages, TaskData, TaskInfo, TaskOptions
from .folder import FolderImages, Images


def _stratified_split(data: Images, fractions: list[float], g: torch.Generator) -> list[Images]:
    """Split into len(fractions)+1 parts: each class is cut in the given fractions, the rest goes last."""
    parts: list[list[torch.Tensor]] = [[] for _ in range(len(fractions) + 1)]
    for c in torch.unique(data.y).tolist():
        idx = torch.nonzero(data.y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        start = 0
        for i, f in enumerate(fractions):
            n = int(round(f * len(idx)))
            parts[i].append(idx[start:start + n])
            start += n
        parts[-1].append(idx[start:])
    return [data.subset(torch.sort(torch.cat(p)).values) for p in parts]


def _cap(data: Images, cap: int, g: torch.Generator) -> Images:
    if cap <= 0 or len(data) <= cap:
        return data
    return data.subset(torch.sort(torch.randperm(len(data), generator=g)[:cap]).values)


def _split_domain(pool: DomainPool, options: TaskOptions, g: torch.Generator):
    train = _cap(pool.train, options.max_per_domain, g)
    if pool.test is not None:
        test = _cap(pool.test, max(1, int(options.max_per_domain * options.test_fraction)), g) \
            if options.max_per_domain else pool.test
        val, train = _stratified_split(train, [options.val_fraction], g)
    else:
        val, test, train = _stratified_split(train, [options.val_fraction, options.test_fraction], g)
    return train, val, test


def min_per_class(options: TaskOptions, official_test: bool) -> int:
    """The fewest images a class needs so that `_stratified_split` gives it at least one image in every split it
    cuts (validation, test unless the dataset has its own, and training). Python rounds half to even, as the split
    does, so this is searched, not solved."""
    fractions = [options.val_fraction] if official_test else [options.val_fraction, options.test_fraction]
    n = 1
    while any(round(f * n) < 1 for f in fractions) or n - sum(round(f * n) for f in fractions) < 1:
        n += 1
    return n


def _check_splits(info: TaskInfo, domain: str, pool: DomainPool, splits, options: TaskOptions,
                  num_classes: int) -> None:
    """An empty split would train a teacher on nothing or score accuracies of 0/0 (NaN): refuse it, saying how
    many images the split fractions need."""
    empty = [name for name, part in zip(("training", "validation", "test"), splits) if len(part) == 0]
    if not empty:
        return
    per_class = min_per_class(options, official_test=pool.test is not None)
    size, capped = len(pool.train), ""
    if 0 < options.max_per_domain < size:
        size, capped = options.max_per_domain, f" after task.max_per_domain={options.max_per_domain}"
    which = f"{', '.join(empty[:-1])} and {empty[-1]} splits are" if len(empty) > 1 else f"{empty[0]} split is"
    raise UserError(f"task '{info.name}': the {domain} {which} empty ({size} images in its pool{capped}); "
                    f"with task.val_fraction={options.val_fraction} and "
                    f"task.test_fraction={options.test_fraction} each class needs at least {per_class} images, "
                    f"{per_class * num_classes} for {num_classes} classes")


def _labeled_subset(train: Images, per_class: int, g: torch.Generator):
    labeled, unlabeled = [], []
    for c in torch.unique(train.y).tolist():
        idx = torch.nonzero(train.y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        labeled.append(idx[:per_class])
        unlabeled.append(idx[per_class:])
    return (train.subset(torch.sort(torch.cat(labeled)).values),
            train.subset(torch.sort(torch.cat(unlabeled)).values))


def fingerprint(*parts: Images, extra: str = "") -> str:
    """A short hash of the data: part of the teacher cache key, so new data means a new teacher. In-memory
    images hash their pixels; folder data its files' names, sizes and times (`FolderImages.update_hash`)."""
    h = hashlib.sha256(extra.encode())
    for p in parts:
        if isinstance(p, FolderImages):
            p.update_hash(h)
            continue
        h.update(p.x.contiguous().numpy().tobytes())
        h.update(p.y.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def split_task(info: TaskInfo, source: DomainPool, target: DomainPool, class_names: list[str],
               options: TaskOptions, seed: int) -> TaskData:
    """Seeded, class-stratified splits of both domains; target train -> labelled subset + unlabelled pool."""
    if source.train.image_shape != target.train.image_shape:
        raise UserError(f"task '{info.name}': source images {source.train.image_shape} and target images "
                        f"{target.train.image_shape} differ in shape")
    g = torch.Generator().manual_seed(seed)
    s_train, s_val, s_test = _split_domain(source, options, g)
    t_train, t_val, t_test = _split_domain(target, options, g)
    _check_splits(info, "source", source, (s_train, s_val, s_test), options, len(class_names))
    _check_splits(info, "target", target, (t_train, t_val, t_test), options, len(class_names))
    labeled, unlabeled = _labeled_subset(t_train, options.target_labeled_per_class, g)
    if target.unlabeled is not None:  # a task's own unlabelled target images join the pool
        extra = _cap(target.unlabeled, options.max_per_domain, g)
        if extra.image_shape != unlabeled.image_shape:
            raise UserError(f"task '{info.name}': unlabelled images {extra.image_shape} and target images "
                            f"{unlabeled.image_shape} differ in shape")
        unlabeled = LabeledImages(torch.cat([unlabeled.x, extra.x]), torch.cat([unlabeled.y, extra.y]))
    parts = (s_train, s_val, s_test, labeled, unlabeled, t_val, t_test)
    return TaskData(info.name, info.shift, class_names, *parts, allow_flip=info.allow_flip,
                    fingerprint=fingerprint(*parts, extra=info.name))


def load_task(options: TaskOptions, seed: int) -> TaskData:
    """Build task `options.name` from its registry entry and split it with `seed` (data stays on the CPU)."""
    from .base import get_task_info

    info = get_task_info(options.name)
    source, target, class_names = info.builder(options)
    return split_task(info, source, target, class_names, options, seed)
