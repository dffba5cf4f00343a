"""The teacher (and the donor): trained on the source once, cached on disk under a key that hashes everything
that determines it, and loaded instantly by every later trial or worker with the same key.

Several workers starting together (threads, processes, or machines sharing `cache_dir`) serialise on a lock
file: exactly one trains, the others wait and then load its result.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from models import GroupedModel, UserError, create_model, derive_seed, seeded_init
from models.errors import first_line
from models.registry import arch_fingerprint

from .checkpoints import atomic_save
from .device import place
from .settings import ModelSettings, PipelineSettings
from .tasks import TaskData
from .train import DataSource, LoopContext, StageSpec, accuracy, train_stage
from .version import code_version


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
              pipeline: PipelineSettings) -> str:
    """Hash of everything that determines a teacher: task data, architecture, training settings, seed, code."""
    parts = {
        "role": role, "arch": arch, "arch_source": arch_fingerprint(arch), "groups": model.groups,
        "width": width, "task": task.name, "data": task.fingerprint,
        "source": model.teacher if role == "teacher" else "train",
        "checkpoint": _file_hash(model.checkpoint) if role == "teacher" and model.teacher == "checkpoint" else "",
        "epochs": pipeline.teacher_epochs, "lr": pipeline.teacher_lr, "batch_size": pipeline.batch_size,
        "weight_decay": pipeline.weight_decay, "seed": pipeline.seed, "code": code_version(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def get_teacher(role: str, arch: str, width: float, task: TaskData, model: ModelSettings,
                pipeline: PipelineSettings, device: torch.device) -> tuple[GroupedModel, TeacherInfo]:
    """Load the cached teacher (or donor) for this key, or build and train it and cache it."""
    key = cache_key(role, arch, width, task, model, pipeline)
    cache_dir = Path(os.path.expanduser(pipeline.cache_dir))
    cache_dir.mkdir(parents=True, exist_ok=True)
    weights, meta = cache_dir / f"{role}-{key}.pt", cache_dir / f"{role}-{key}.json"
    # Seed the initialisation as well as the training: a teacher must depend on its key alone, not on what this
    # process or its other trial threads drew, or the same key would give different teachers in different workers.
    with seeded_init(derive_seed(pipeline.seed, role, "init")):
        net = _fresh(role, arch, width, task, model)
    with open(cache_dir / f"{role}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one trainer per key; the rest block here, then find the file
        if weights.exists() and meta.exists():
            net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            info = TeacherInfo(**{**json.loads(meta.read_text()), "cache": "hit", "path": str(weights)})
            return place(net, device), info
        net = place(net, device)
        info = _train(role, net, key, task, model, pipeline, device)
        info.path = str(weights)
        atomic_save(net.state_dict(), weights)
        meta.write_text(json.dumps(asdict(info)))
    return net, info


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


def _train(role, net, key, task: TaskData, model: ModelSettings, pipeline: PipelineSettings, device) -> TeacherInfo:
    started = time.perf_counter()
    # A checkpoint is used as given; trained and pretrained teachers learn the source.
    epochs = 0 if (role == "teacher" and model.teacher == "checkpoint") else pipeline.teacher_epochs
    ctx = LoopContext(device=device, batch_size=pipeline.batch_size, eval_batch_size=pipeline.eval_batch_size,
                      augment=pipeline.augment, allow_flip=task.allow_flip, target_val=task.source_val,
                      generator=torch.Generator(device=device).manual_seed(derive_seed(pipeline.seed, role, "batches")),
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
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
