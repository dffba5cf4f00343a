"""Seeds a trial derives from `pipeline.seed`, and thread-safe seeded initialisation.

Module constructors draw their initial weights from torch's global CPU generator, which every thread of a process
shares: with `--n-jobs 2`, two trials constructing modules at once would interleave their draws, and neither
could be replayed. `seeded_init` serialises those draws behind one process-wide lock and seeds the generator
for the block, so an initialisation depends on its seed alone; `create_model` and `GroupedModel.new_group` take
the same (re-entrant) lock, so no unseeded construction can draw from a seeded block's stream either. Everything
else a trial draws (batch order, augmentation, dropout) comes from the trial's own `torch.Generator`.

Some library code changes torch's process-wide state for a while: `torch.export` (the tracker logs the best model
with it, on its writer thread) switches oneDNN (and cuDNN) kernels off, which changes the rounding of every
convolution another thread computes meanwhile, and puts back the global generator's state it saw on entry, which
would overwrite a seeded block's draws. `TORCH_STATE` keeps such code apart from training: every training step and
evaluation holds it shared (`torch_compute`), and code that changes process-wide state runs inside
`exclusive_torch_state`, which waits for the steps in flight, holds new ones back, and holds `GLOBAL_RNG` too.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import nn

GLOBAL_RNG = threading.RLock()  # held by whoever draws from torch's global CPU generator


class SharedExclusiveLock:
    """A readers-writer lock for threads: any number hold it shared, or one holds it alone. A waiting exclusive
    holder goes first (no new shared holder starts while it waits), so it cannot starve behind busy trials. Shared
    holds nest within a thread (a nested one never waits, so a waiting exclusive holder cannot deadlock it)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0  # shared holds, nested ones included
        self._exclusive = False
        self._waiting = 0  # exclusive holders waiting
        self._mine = threading.local()  # this thread's shared depth

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Hold the lock shared for the block."""
        depth = getattr(self._mine, "depth", 0)
        with self._cond:
            while depth == 0 and (self._exclusive or self._waiting):
                self._cond.wait()
            self._shared += 1
        self._mine.depth = depth + 1
        try:
            yield
        finally:
            self._mine.depth = depth
            with self._cond:
                self._shared -= 1
                if self._shared == 0:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the lock alone for the block (once every shared holder has left)."""
        with self._cond:
            self._waiting += 1
            try:
                while self._exclusive or self._shared:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


TORCH_STATE = SharedExclusiveLock()  # shared: a trial computes; exclusive: process-wide torch state changes


def torch_compute() -> AbstractContextManager[None]:
    """Hold around a trial's computation (a training step, an evaluation): no process-wide torch state (backend
    flags, the global generator) changes while it runs."""
    return TORCH_STATE.shared()


@contextmanager
def exclusive_torch_state() -> Iterator[None]:
    """Run code that changes torch's process-wide state and puts it back (`torch.export`): no trial thread computes,
    builds or draws from the global generator meanwhile, so none sees the change."""
    with TORCH_STATE.exclusive(), GLOBAL_RNG:
        yield


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
    model can be copied and saved as usual). A plain `nn.Dropout` (a torchvision, timm or user network's) is made a
    `GeneratorDropout` for the block, since it would draw from the global generator every thread shares."""
    plain = [m for m in model.modules() if type(m) is nn.Dropout]
    for m in plain:
        m.__class__ = GeneratorDropout  # same attributes, same forward when no generator is set
    layers = [m for m in model.modules() if isinstance(m, GeneratorDropout)]
    for m in layers:
        m.generator = generator
    try:
        yield
    finally:
        for m in layers:
            m.generator = None
        for m in plain:
            m.__class__ = nn.Dropout
