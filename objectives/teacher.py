"""The teacher (and the donor): trained on the source once, cached on disk under a key that hashes everything
that determines it, and loaded instantly by every later trial or worker with the same key.

Several workers starting together (threads, processes, or machines sharing `cache_dir`) serialise on a lock
file: exactly one trains, the others wait and then load its result.

Each entry is `<role>-<key>.pt` (the weights) beside `<role>-<key>.json` (its TeacherInfo plus the weights file's
size and sha256). An entry whose file does not match them, or does not load (truncated, overwritten, a half copy),
is corrupt: a warning names the file and it is retrained under the same lock and replaced atomically.

What happens is logged on the `objectives.teacher` logger (objectives know nothing of the CLI's progress bar): an
INFO line when a teacher is being trained and when one is first loaded from the cache in this process, a WARNING
for a corrupt entry and for a teacher near chance on its own source (see `NEAR_CHANCE`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from filelock import FileLock

from models import GroupedModel, UserError, create_model, derive_seed, seeded_init
from models.errors import first_line
from models.registry import arch_fingerprint

from .checkpoints import atomic_save, atomic_write
from .device import place
from .keys import stable_hash
from .settings import ModelSettings, PipelineSettings
from .tasks import TaskData
from .train import DataSource, LoopContext, StageSpec, accuracy, train_stage
from .version import code_version

log = logging.getLogger(__name__)

# A teacher whose source validation accuracy is below NEAR_CHANCE / num_classes (1.5x chance: 15% for 10 classes,
# 75% for 2) has learned little of the source; distilling from it passes on noise. Warned about, not refused: a
# weak teacher is a legitimate thing to study.
NEAR_CHANCE = 1.5

_announced: set[str] = set()  # cache entries this process has already reported loading (one line each, not per trial)
_announced_lock = threading.Lock()


@dataclass
class TeacherInfo:
    """Where a teacher came from and how good it is on each domain."""

    role: str  # teacher | donor
    key: str
    cache: str  # hit | miss
    path: str
    epochs: int
    seconds: float
    source_val_acc: float
    target_val_acc: float


def cache_key(role: str, arch: str, width: float, task: TaskData, model: ModelSettings,
              pipeline: PipelineSettings, seed: int | None = None) -> str:
    """Hash of everything that determines a teacher: task data, architecture, training settings, seed, code.
    `seed` is the data seed the teacher's split, initialisation and batch order come from (default `pipeline.seed`)."""
    seed = pipeline.seed if seed is None else seed
    parts = {
        "role": role, "arch": arch, "arch_source": arch_fingerprint(arch), "groups": model.groups,
        "width": width, "task": task.name, "data": task.fingerprint,
        "source": model.teacher if role == "teacher" else "train",
        "checkpoint": _file_hash(model.checkpoint) if role == "teacher" and model.teacher == "checkpoint" else "",
        "epochs": pipeline.teacher_epochs, "lr": pipeline.teacher_lr, "batch_size": pipeline.batch_size,
        "weight_decay": pipeline.weight_decay, "seed": seed, "code": code_version(),
    }
    return stable_hash(parts, length=20)


def get_teacher(role: str, arch: str, width: float, task: TaskData, model: ModelSettings,
                pipeline: PipelineSettings, device: torch.device,
                seed: int | None = None) -> tuple[GroupedModel, TeacherInfo]:
    """Load the cached teacher (or donor) for this key, or build and train it and cache it. `seed`: the data seed
    `task` was split with, which also seeds the teacher's initialisation and batch order (default `pipeline.seed`);
    every trial with the same data seed shares one teacher."""
    seed = pipeline.seed if seed is None else seed
    key = cache_key(role, arch, width, task, model, pipeline, seed)
    cache_dir = Path(os.path.expanduser(pipeline.cache_dir))
    cache_dir.mkdir(parents=True, exist_ok=True)
    weights, meta = cache_dir / f"{role}-{key}.pt", cache_dir / f"{role}-{key}.json"
    # Seed the initialisation as well as the training: a teacher must depend on its key alone, not on what this
    # process or its other trial threads drew, or the same key would give different teachers in different workers.
    with seeded_init(derive_seed(seed, role, "init")):
        net = _fresh(role, arch, width, task, model)
    with FileLock(cache_dir / f"{role}-{key}.lock"):  # one trainer per key; the rest block here, then find the file
        info = _load_cached(net, weights, meta)
        if info is not None:
            if _first_time(str(weights)):
                log.info("%s loaded from cache %s (source val acc %.4f)", role, weights, info.source_val_acc)
                _warn_if_near_chance(info, task.num_classes)
            return place(net, device), info
        net = place(net, device)
        if role == "teacher" and model.teacher == "checkpoint":
            log.info("evaluating the teacher from %s (cached as %s)", model.checkpoint, weights)
        else:
            log.info("training the %s (%s, %d epochs on the source of %s; other workers wait for it): %s", role,
                     arch, pipeline.teacher_epochs, task.name, weights)
        info = _train(role, net, key, task, model, pipeline, device, seed)
        info.path = str(weights)
        atomic_save(net.state_dict(), weights)
        # The meta file is the entry's seal: written (atomically) after the weights, with their size and hash.
        atomic_write(meta, lambda tmp: tmp.write_text(json.dumps({**asdict(info), "file": _file_stamp(weights)})))
        _first_time(str(weights))
        _warn_if_near_chance(info, task.num_classes)
    return net, info


def _load_cached(net: GroupedModel, weights: Path, meta: Path) -> TeacherInfo | None:
    """Load a cache entry into `net`; None when there is none, or when it is corrupt (a warning says which file)."""
    if not (weights.exists() and meta.exists()):
        return None
    try:
        recorded = json.loads(meta.read_text())
        stamp = recorded.pop("file", None)  # absent in entries written before stamps: the load check still applies
        if stamp is not None and _file_stamp(weights, stamp["size"]) != stamp:
            raise ValueError(f"size or sha256 differs from {meta.name}")
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return TeacherInfo(**{**recorded, "cache": "hit", "path": str(weights)})
    except Exception as exc:  # noqa: BLE001 - whatever is wrong with the entry, training it again repairs it
        log.warning("warning: cache file %s is corrupt (%s); training it again and replacing it", weights,
                    first_line(exc, 200))
        return None


def _file_stamp(path: Path, expected_size: int | None = None) -> dict:
    """{"size", "sha256"} of a file; the hash is skipped (None) when the size already differs from `expected_size`."""
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        return {"size": size, "sha256": None}
    return {"size": size, "sha256": _sha256(path)}


def _first_time(entry: str) -> bool:
    with _announced_lock:
        new = entry not in _announced
        _announced.add(entry)
    return new


def _warn_if_near_chance(info: TeacherInfo, num_classes: int) -> None:
    chance = 1.0 / num_classes
    if info.source_val_acc < NEAR_CHANCE * chance:
        log.warning("warning: the %s's source val acc %.4f is near chance (1/%d = %.4f; warned below %.1fx chance): "
                    "it has learned little of the source, so its soft labels carry little; give it more source data "
                    "or pipeline.teacher_epochs", info.role, info.source_val_acc, num_classes, chance, NEAR_CHANCE)


def _fresh(role: str, arch: str, width: float, task: TaskData, model: ModelSettings) -> GroupedModel:
    in_channels = task.image_shape[0]
    pretrained = role == "teacher" and model.teacher == "pretrained"
    net = create_model(arch, task.num_classes, in_channels, width=width, pretrained=pretrained,
                       groups=model.groups or None)
    if role == "teacher" and model.teacher == "checkpoint":
        load_checkpoint(net, model.checkpoint)
    return net


def load_checkpoint(net: GroupedModel, path: str) -> None:
    """Load a state_dict file into `net` with `weights_only=True` (refusing pickled code); one-line errors."""
    path = os.path.expanduser(path)
    if not path or not os.path.isfile(path):
        raise UserError(f"teacher checkpoint '{path}' not found (set model.checkpoint to a state_dict file)")
    if not _looks_like_torch_save(path):
        raise UserError(f"not a torch checkpoint: '{path}' (model.checkpoint must be a file written by "
                        "torch.save(model.state_dict(), path))")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling/format failure is the user's file
        raise UserError(f"teacher checkpoint '{path}' cannot be loaded safely (weights_only=True): "
                        f"{first_line(exc)}") from None
    if not isinstance(state, dict):
        raise UserError(f"teacher checkpoint '{path}' is not a state_dict")
    target = net
    if hasattr(net, "group_spec") and not any(k.startswith("net.") for k in state):
        target = net.net  # a state_dict of the bare network (torch.save(my_net.state_dict())), not of the wrapper
    try:
        target.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"teacher checkpoint '{path}' does not fit {net.arch}: "
                        f"{str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else exc}") from None


def _looks_like_torch_save(path: str) -> bool:
    """torch.save writes a zip archive (since torch 1.6) or, in the legacy format, a pickle (first byte 0x80).
    Anything else (a text file, an image) would fail inside torch.load with a bare `KeyError: 101`."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def _train(role, net, key, task: TaskData, model: ModelSettings, pipeline: PipelineSettings, device,
           seed: int) -> TeacherInfo:
    started = time.perf_counter()
    # A checkpoint is used as given; trained and pretrained teachers learn the source.
    epochs = 0 if (role == "teacher" and model.teacher == "checkpoint") else pipeline.teacher_epochs
    ctx = LoopContext(device=device, batch_size=pipeline.batch_size, eval_batch_size=pipeline.eval_batch_size,
                      augment=pipeline.augment, allow_flip=task.allow_flip, target_val=task.source_val,
                      generator=torch.Generator(device=device).manual_seed(derive_seed(seed, role, "batches")),
                      num_workers=pipeline.num_workers)
    spec = StageSpec(name=role, epochs=epochs, sources=[DataSource("source", task.source_train, 1.0)],
                     params=list(net.parameters()), lr=pipeline.teacher_lr, weight_decay=pipeline.weight_decay)
    train_stage(net, spec, ctx)
    return TeacherInfo(role=role, key=key, cache="miss", path="", epochs=epochs,
                       seconds=time.perf_counter() - started,
                       source_val_acc=accuracy(net, task.source_val, pipeline.eval_batch_size, pipeline.num_workers),
                       target_val_acc=accuracy(net, task.target_val, pipeline.eval_batch_size, pipeline.num_workers))


def _file_hash(path: str) -> str:
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        return "missing"
    return _sha256(Path(path))[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
