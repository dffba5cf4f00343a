"""Stage checkpoints: after each finished stage the trial's state is saved, so a retried trial (its worker died,
or it was interrupted) resumes at its last finished stage instead of starting over.

A checkpoint carries the identity of the computation it belongs to (`checkpoint_identity`: its owner, which the
caller names, e.g. the study, its task and config; the code version; every choice; the run and data seeds) and is
resumed only by a trial with the same identity; its directory is named by the identity's hash
(`checkpoint_key`). Every stage reseeds from the seed, so resuming yields exactly what an uninterrupted run would
have.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from .keys import stable_hash
from .version import code_version


def checkpoint_identity(owner: dict, params: dict, seed: int, data_seed: int) -> str:
    """One trial's computation as canonical JSON: its `owner` (who runs it and on what: for a study its storage,
    id, task and config), the code version, every choice, the run seed and the data seed."""
    return json.dumps({"owner": owner, "code": code_version(), "params": params, "seed": seed,
                       "data_seed": data_seed}, sort_keys=True, default=str)


def checkpoint_key(identity: str) -> str:
    """The directory name of a checkpoint with `identity` (see `checkpoint_identity`)."""
    return stable_hash(identity, length=20)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` to a temporary name beside `path`, then rename: a reader never sees half a file, and a killed
    writer leaves no corrupt entry (stage checkpoints, the teacher cache's weights and their seal alike)."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def atomic_save(state: dict, path: Path) -> None:
    """`torch.save` atomically (see `atomic_write`)."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


class StageCheckpoints:
    """The latest stage state of one trial, in `directory/state.pt` (loaded with weights_only=True), saved with its
    `identity` (see `checkpoint_identity`) and loaded only by a trial of the same identity."""

    def __init__(self, directory: str | Path, identity: str | None = None):
        self.directory = Path(os.path.expanduser(str(directory)))
        self.path = self.directory / "state.pt"
        self.identity = identity

    def load(self) -> dict | None:
        """The saved state, or None: none saved, an unreadable file, or another computation's (all then ignored,
        and overwritten by this trial's first finished stage)."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a half-written or foreign file: start the trial over
            return None
        if not isinstance(state, dict) or state.get("identity") != self.identity:
            return None  # another study's, task's, config's or code's: never resumed
        return {k: v for k, v in state.items() if k != "identity"}

    def save(self, state: dict) -> None:
        """Write atomically (a killed worker never leaves half a checkpoint)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_save({**state, "identity": self.identity}, self.path)

    def clear(self) -> None:
        """Remove the checkpoint once the trial has ended for good."""
        shutil.rmtree(self.directory, ignore_errors=True)
