"""Seeds a trial derives from `pipeline.seed`, and thread-safe seeded initialisation.

Module constructors draw their initial weights from torch's global CPU generator, which every thread of a process
shares: with `--n-jobs 2`, two trials constructing modules at once would interleave their draws, and neither
could be replayed. `seeded_init` serialises those draws behind one process-wide lock and seeds the generator
for the block, so an initialisation depends on its seed alone; `create_model` and `GroupedModel.new_group` take
the same (re-entrant) lock, so no unseeded construction can draw from a seeded block's stream either. Everything
else a trial draws (batch order, augmentation, dropout) comes from the trial's own `torch.Generator`.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

GLOBAL_RNG = threading.RLock()  # held by whoever draws from torch's global CPU generator


def derive_seed(seed: int, *parts: object) -> int:
    """An independent 63-bit seed for one use of `seed` (e.g. `derive_seed(seed, "init", "head", 2)`): changing
    or adding one use never shifts the draws of another, and no two uses share a stream."""
    text = "/".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


@contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Construct modules inside this block to draw their initial weights from `seed` alone: the global CPU
    generator is locked against other threads, seeded, and restored afterwards. Build on the CPU, then move."""
    with GLOBAL_RNG, torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


class GeneratorDropout(nn.Dropout):
    """`nn.Dropout` that draws its mask from `self.generator` when one is set (the trainer sets the trial's own
    generator for the length of a stage), so concurrent trials never share dropout randomness; with none set it
    is plain `nn.Dropout`. Same scaling: kept units are multiplied by 1 / (1 - p)."""

    generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or self.generator is None:
            return super().forward(x)
        keep = torch.rand(x.shape, generator=self.generator, device=x.device) >= self.p
        return x * keep / (1 - self.p)


@contextmanager
def dropout_generator(model: nn.Module, generator: torch.Generator) -> Iterator[None]:
    """Let every `GeneratorDropout` of `model` draw from `generator` inside the block (detached afterwards, so the
    model can be copied and saved as usual)."""
    layers = [m for m in model.modules() if isinstance(m, GeneratorDropout)]
    for m in layers:
        m.generator = generator
    try:
        yield
    finally:
        for m in layers:
            m.generator = None
