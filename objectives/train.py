"""The training loop shared by every stage: index-based batches from in-memory device tensors, one fused forward
per step over all data sources, per-epoch evaluation, and a report callback after every epoch.

In-memory data has no DataLoader: it already lives on the device, so a batch is one gather, and the only
host-device syncs are once per epoch (loss sums and accuracy are accumulated on the device and read together).
Image-folder data (`FolderImages`) is the exception: it streams from a DataLoader with worker processes, and each
of its batches is copied host -> device, which is inherent for data that does not live on the device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.seeding import GLOBAL_RNG, dropout_generator, torch_compute

from .augment import augment_batch
from .losses import distill_loss
from .settings import AugmentSettings
from .tasks import FolderImages, Images, LabeledImages
from .tasks.folder import ShuffledBatches

# report(step, value, stage): called after every epoch with the target validation accuracy. The study layer turns
# it into trial.report/should_prune; raising from it (TrialPruned) stops the trial.
ReportFn = Callable[[int, float, str], None]
# on_epoch(stage, step, metrics): per-epoch metrics for tracking (losses, accuracy).
EpochFn = Callable[[str, int, dict], None]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: the trial stops with this reason."""


@dataclass
class DataSource:
    """One stream of training data in a stage and the weight of its loss terms."""

    name: str
    data: Images
    weight: float
    labeled: bool = True  # False: the teacher's soft labels stand in for labels

    @property
    def domain(self) -> str:
        """source | target (the target's labelled subset and its unlabelled pool are both the target domain)."""
        return "target" if self.name.startswith("target") else "source"


@dataclass(frozen=True)
class StepInfo:
    """What a layer term may know of one training step before its forward pass: the fused batch's rows by domain,
    in batch order (`(domain, rows)` per data source), and the stage's progress p = step / planned steps, in
    [0, 1) (planned: epochs x steps per epoch, whether or not a threshold stops the stage earlier)."""

    domains: tuple[tuple[str, int], ...]
    progress: float


@dataclass
class StageSpec:
    """What one stage trains, on what, with which loss."""

    name: str
    epochs: int
    sources: list[DataSource]
    params: list[nn.Parameter]
    lr: float
    frozen: set[str] = field(default_factory=set)  # groups kept in eval mode (BatchNorm statistics untouched)
    teacher: nn.Module | None = None  # None: plain cross-entropy (teacher and finetune stages)
    # The KD term's weight and T, given with a teacher and read only then: the trial's choices, whose defaults live
    # in `objectives.params` alone.
    alpha: float | None = None
    temperature: float | None = None
    beta: float = 0.0
    layer_term: Callable[[], torch.Tensor] | None = None  # beta's term (`objectives.layer_terms`), after forward
    on_step: Callable[[StepInfo], None] | None = None  # told each step's batch layout and progress, before forward
    threshold: float | None = None  # stop once target validation accuracy reaches this
    augment: bool = False
    weight_decay: float = 0.0
    compile: bool = False  # torch.compile the training forward (CUDA only: on CPU compiling costs more than it saves)

    def __post_init__(self):
        if self.teacher is not None and (self.alpha is None or self.temperature is None):
            raise ValueError(f"stage {self.name}: a teacher needs the KD term's alpha and temperature")


@dataclass
class StageRun:
    """What a stage did: its first step on the step axis, epochs trained, whether/when it reached the threshold,
    per-epoch target validation accuracy (steps first_step, first_step + 1, ...), seconds; and, set by the
    pipeline, which model it distilled from and the weight of each data source it trained on."""

    first_step: int = 0
    epochs: int = 0
    threshold_epoch: int | None = None  # global step at which the threshold was reached
    val_curve: list[float] = field(default_factory=list)
    seconds: float = 0.0
    kd_teacher: str | None = None  # the stage whose model taught this one (None: no teacher signal)
    sources: dict[str, float] = field(default_factory=dict)  # data source -> weight of its loss terms


@dataclass
class LoopContext:
    """Settings shared by every stage of one trial."""

    device: torch.device
    batch_size: int
    eval_batch_size: int
    augment: AugmentSettings
    allow_flip: bool
    target_val: Images
    generator: torch.Generator
    report: ReportFn | None = None
    on_epoch: EpochFn | None = None
    step: int = 0  # the step axis: the last step trained (a stage's first epoch is step + 1)
    num_workers: int = 0  # DataLoader workers for folder data (in-memory data never uses them)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (BatchNorm stays fp32 under autocast); nothing on CPU, where it would be slower."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def accuracy(model: nn.Module, data: Images, batch_size: int, num_workers: int = 0) -> float:
    """Top-1 accuracy of `model` on `data` (eval mode; counts accumulate on the device, read once). Folder data is
    read by `num_workers` DataLoader workers."""
    if len(data) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    device = data.x.device if isinstance(data, LabeledImages) else data.device
    correct = torch.zeros((), dtype=torch.int64, device=device)
    with torch.inference_mode(), autocast(device):
        if isinstance(data, LabeledImages):
            for i in range(0, len(data), batch_size):
                with torch_compute():  # one batch at a time: see `models.seeding.TORCH_STATE`
                    correct += (model(data.x[i:i + batch_size]).argmax(dim=1) == data.y[i:i + batch_size]).sum()
        else:
            for batch in data.batches(batch_size, num_workers):
                with torch_compute():
                    correct += (model(batch.x).argmax(dim=1) == batch.y).sum()
    model.train(was_training)
    return correct.item() / len(data)


def set_train_mode(model: nn.Module, frozen: set[str]) -> None:
    """Train mode everywhere except frozen groups, whose BatchNorm running statistics must not move."""
    model.train()
    for name in frozen:
        model.group_module(name).eval()


class _IndexStream:
    """Endless reshuffled batches of one in-memory data source: each batch one gather on the device."""

    def __init__(self, data: LabeledImages, batch_size: int, g: torch.Generator, device: torch.device):
        self.data, self.n, self.g, self.device = data, len(data), g, device
        self.batch_size = min(batch_size, self.n)
        self.perm, self.pos = self._shuffle(), 0

    def _shuffle(self) -> torch.Tensor:
        return torch.randperm(self.n, generator=self.g, device=self.device)

    def next(self) -> LabeledImages:
        if self.pos + self.batch_size > self.n:
            self.perm, self.pos = self._shuffle(), 0
        self.pos += self.batch_size
        return self.data.subset(self.perm[self.pos - self.batch_size:self.pos])

    def close(self) -> None:
        pass


class _FolderStream:
    """Endless reshuffled batches of folder data, decoded by DataLoader workers that live for the whole stage (one
    iterator over an endless sampler: no worker restart per epoch). Same batch semantics as `_IndexStream`."""

    def __init__(self, data: FolderImages, batch_size: int, g: torch.Generator, num_workers: int):
        # One draw from the trial's generator seeds the order: reproducible, and the same for any worker count.
        seed = int(torch.randint(0, 2**62, (1,), generator=g, device=g.device).item())
        self.batches = data.batches(batch_size, num_workers, ShuffledBatches(len(data), batch_size, seed))

    def next(self) -> LabeledImages:
        # Unlike `_IndexStream`, every batch is a host -> device copy (non-blocking, from pinned memory on CUDA):
        # inherent for data that does not live on the device.
        return next(self.batches)

    def close(self) -> None:
        self.batches.close()  # ends the DataLoader iterator, which stops its workers


def _stream(data: Images, ctx: LoopContext):
    if isinstance(data, LabeledImages):
        return _IndexStream(data, ctx.batch_size, ctx.generator, ctx.device)
    return _FolderStream(data, ctx.batch_size, ctx.generator, ctx.num_workers)


def train_stage(model: nn.Module, spec: StageSpec, ctx: LoopContext) -> StageRun:
    """Train `spec.params` of `model` for up to `spec.epochs` epochs, on steps `ctx.step + 1` onwards; one epoch is
    one pass over the largest source (smaller ones are cycled). Reports target validation accuracy after every
    epoch. A stage with epochs but nothing to train on is a bug of the caller (choices are checked before)."""
    run, started = StageRun(first_step=ctx.step + 1), time.perf_counter()
    if spec.epochs == 0:
        return run
    sources = [s for s in spec.sources if s.weight > 0 and len(s.data) > 0]
    if not sources or not spec.params:
        raise ValueError(f"stage '{spec.name}' has {'no data' if not sources else 'no trainable parameters'}")
    optimizer = torch.optim.Adam(spec.params, lr=spec.lr, weight_decay=spec.weight_decay)
    streams = [_stream(s.data, ctx) for s in sources]
    forward = torch.compile(model) if spec.compile and ctx.device.type == "cuda" else model
    try:
        with dropout_generator(model, ctx.generator):
            _train_epochs(model, forward, spec, ctx, sources, streams, optimizer, run)
    finally:
        for stream in streams:
            stream.close()
    run.seconds = time.perf_counter() - started
    return run


def _train_epochs(model, forward, spec: StageSpec, ctx: LoopContext, sources, streams, optimizer,
                  run: StageRun) -> None:
    steps = math.ceil(max(len(s.data) for s in sources) / ctx.batch_size)
    planned = spec.epochs * steps
    for epoch in range(spec.epochs):
        set_train_mode(model, spec.frozen)
        sums = torch.zeros(3, device=ctx.device)  # loss, distill/CE term, layer term: summed on the device
        for i in range(steps):
            progress = (epoch * steps + i) / planned
            with _step_guard(forward is not model):
                sums += _train_step(forward, spec, ctx, sources, streams, optimizer, progress)
        ctx.step += 1
        run.epochs += 1
        val = accuracy(model, ctx.target_val, ctx.eval_batch_size, ctx.num_workers)
        loss, main, layer = (sums / steps).tolist()  # the epoch's one host-device sync for losses
        if not all(math.isfinite(v) for v in (loss, main, layer)):
            raise TrainingDiverged(f"loss became {loss} in stage '{spec.name}' at step {ctx.step}")
        run.val_curve.append(val)
        if ctx.on_epoch:
            metrics = {"loss": loss, "target_val_acc": val}
            metrics["kd_loss" if spec.teacher is not None else "ce_loss"] = main
            if spec.layer_term is not None:
                metrics["layer_term"] = layer
            ctx.on_epoch(spec.name, ctx.step, metrics)
        if ctx.report:
            ctx.report(ctx.step, val, spec.name)
        if spec.threshold is not None and val >= spec.threshold:
            run.threshold_epoch = ctx.step
            break


def _step_guard(compiled: bool) -> ExitStack:
    """What one training step holds: `torch_compute` (no process-wide torch state changes under it, see
    `models.seeding`); compiled, also the global generator's lock, since torch.compile restores the generator's
    state after compiling (at the first step, and again whenever it recompiles), which would overwrite another
    thread's seeded draws."""
    stack = ExitStack()
    stack.enter_context(torch_compute())
    if compiled:
        stack.enter_context(GLOBAL_RNG)
    return stack


def _train_step(model, spec: StageSpec, ctx: LoopContext, sources, streams, optimizer,
                progress: float) -> torch.Tensor:
    batches = [(s, stream.next()) for s, stream in zip(sources, streams)]
    x = torch.cat([b.x for _, b in batches])
    if spec.on_step is not None:
        spec.on_step(StepInfo(tuple((s.domain, len(b)) for s, b in batches), progress))
    if spec.augment:
        x = augment_batch(x, ctx.augment, ctx.allow_flip, ctx.generator)
    with autocast(ctx.device):
        logits = model(x)
        teacher_logits = None
        if spec.teacher is not None:
            with torch.no_grad():
                teacher_logits = spec.teacher(x)
    logits = logits.float()
    main = torch.zeros((), device=ctx.device)
    start = 0
    for source, batch in batches:
        end = start + len(batch)
        if spec.teacher is None:
            per_example = F.cross_entropy(logits[start:end], batch.y, reduction="none")
        else:
            per_example = distill_loss(logits[start:end], teacher_logits[start:end].float(),
                                       batch.y if source.labeled else None, spec.alpha, spec.temperature)
        main = main + source.weight * per_example.mean()
        start = end
    layer = spec.layer_term() if spec.layer_term is not None and spec.beta > 0 else torch.zeros((), device=ctx.device)
    loss = main + spec.beta * layer
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return torch.stack([loss.detach(), main.detach(), layer.detach()])
