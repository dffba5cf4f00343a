"""Stage checkpoints: after each finished stage the trial's state is saved, so a retried trial (its worker died,
or it was interrupted) resumes at its last finished stage instead of starting over.

The directory is keyed by the trial's choices and seed (see `checkpoint_key`), and every stage reseeds from the
seed, so resuming yields exactly what an uninterrupted run would have.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch


def checkpoint_key(study: str, params: dict, seed: int) -> str:
    """Identifies one trial's computation: the study, every choice, the seed."""
    blob = json.dumps({"study": study, "params": params, "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def atomic_save(state: dict, path: Path) -> None:
    """`torch.save` to a temporary name, then rename: a reader never sees half a file, and a killed writer leaves
    no corrupt entry (for stage checkpoints and the teacher cache alike)."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


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
