"""Stage checkpoints: after each finished stage the trial's state is saved, so a retried trial (its worker died,
or it was interrupted) resumes at its last finished stage instead of starting over.

The directory is keyed by the trial's choices and seed (see `checkpoint_key`), and every stage reseeds from the
seed, so resuming yields exactly what an uninterrupted run would have.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from .keys import stable_hash


def checkpoint_key(study: str, params: dict, seed: int) -> str:
    """Identifies one trial's computation: the study, every choice, the seed."""
    return stable_hash({"study": study, "params": params, "seed": seed}, length=20)


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
    """The latest stage state of one trial, in `directory/state.pt` (loaded with weights_only=True)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(os.path.expanduser(str(directory)))
        self.path = self.directory / "state.pt"

    def load(self) -> dict | None:
        """The saved state, or None (also for an unreadable file, which is then ignored)."""
        if not self.path.exists():
            return None
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a half-written or foreign file: start the trial over
            return None

    def save(self, state: dict) -> None:
        """Write atomically (a killed worker never leaves half a checkpoint)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_save(state, self.path)

    def clear(self) -> None:
        """Remove the checkpoint once the trial has ended for good."""
        shutil.rmtree(self.directory, ignore_errors=True)
