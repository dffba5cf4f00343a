"""Throughput: training images per second of `objectives.train.train_stage` versus a bare PyTorch loop over the
same batches (same model init, batch size, steps per epoch, Adam, cross-entropy; bf16 autocast and channels_last
on CUDA in both, as the pipeline does).

- digitnet on the embedded digits (the quickstart task's source train split, 1x8x8);
- resnet18 on CIFAR-sized synthetic tensors (3x32x32, 1024 images (256 with --quick), 10 classes: on one CPU
  thread resnet18 trains at only ~50 images/s, so 2048 would not fit `make bench`'s 15 minutes).

The stage is given an empty validation set, so both sides only train: the per-epoch evaluation is part of the
overhead benchmark, not of this one.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext

import common
import torch
import torch.nn.functional as F

BATCH = 64  # the pipeline's default batch size


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def with_train_stage(model, data, epochs: int, device) -> float:
    from objectives.settings import AugmentSettings
    from objectives.train import DataSource, LoopContext, StageSpec, train_stage

    empty = data.subset(torch.arange(0, device=device))
    spec = StageSpec(name="throughput", epochs=epochs, sources=[DataSource("train", data, 1.0)],
                     params=list(model.parameters()), lr=3e-3)
    ctx = LoopContext(device=device, batch_size=BATCH, eval_batch_size=1024, augment=AugmentSettings(),
                      allow_flip=False, target_val=empty, generator=torch.Generator(device=device).manual_seed(0))
    _sync(device)
    started = time.perf_counter()
    train_stage(model, spec, ctx)
    _sync(device)
    return time.perf_counter() - started


def bare(model, data, epochs: int, device) -> float:
    g = torch.Generator(device=device).manual_seed(0)
    stream = common.index_batches(len(data), BATCH, g, device)
    steps = math.ceil(len(data) / BATCH)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    _sync(device)
    started = time.perf_counter()
    for _ in range(epochs):
        for _ in range(steps):
            i = next(stream)
            with amp:
                logits = model(data.x[i])
            loss = F.cross_entropy(logits.float(), data.y[i])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        loss.item()  # one sync per epoch, as train_stage
    _sync(device)
    return time.perf_counter() - started


def workloads(args, device):
    """(name, build_model, data) for each workload, data already on the device."""
    from models import create_model
    from objectives.device import place
    from objectives.pipeline import get_task
    from objectives.tasks import LabeledImages

    digits = get_task(common.quickstart().task, 0, device).source_train
    n = 256 if args.quick else 1024
    g = torch.Generator().manual_seed(0)
    synthetic = LabeledImages(torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    synthetic = synthetic.to(device)

    def build(arch, channels):
        def make():
            torch.manual_seed(0)
            return place(create_model(arch, 10, channels), device)
        return make

    return [("digitnet", "embedded digits, source train, 1x8x8", build("digitnet", 1), digits),
            ("resnet18", "synthetic 3x32x32, 10 classes", build("resnet18", 3), synthetic)]


def run(args) -> common.Section:
    from objectives.device import resolve_device

    device = resolve_device(args.device)
    torch.set_num_threads(1)  # the pipeline's default on CPU (pipeline.cpu_threads: 1); both sides alike
    repeats = 2 if args.quick else 3
    target = 0.5 if args.quick else 1.5  # seconds per measurement, roughly
    rows, f = [], {"repeats": repeats, "device": str(device)}
    for name, what, make, data in workloads(args, device):
        a_model, b_model = make(), make()
        # Warm-up (not counted) on the first 4 batches, which also tells how many epochs make a measure.
        head = data.subset(torch.arange(min(len(data), 4 * BATCH), device=device))
        first = min(with_train_stage(a_model, head, 1, device), bare(b_model, head, 1, device))
        epochs = max(1, round(target / (first * len(data) / len(head))))
        images = epochs * math.ceil(len(data) / BATCH) * min(BATCH, len(data))
        # Both lambdas run inside common.interleave, within this iteration: the loop variables they read are current.
        r = common.interleave(repeats, {"stage": lambda: with_train_stage(a_model, data, epochs, device),  # noqa: B023
                                        "bare": lambda: bare(b_model, data, epochs, device)})  # noqa: B023
        ratio = [s / b for s, b in zip(r["stage"], r["bare"])]
        ips_stage, ips_bare = images / common.median(r["stage"]), images / common.median(r["bare"])
        f[name] = {"images_per_s_train_stage": ips_stage, "images_per_s_bare": ips_bare,
                   "time_ratio": common.median(ratio), "images_per_measure": images}
        rows.append(f"| {name} | {what} | {images} | {ips_stage:,.0f} | {ips_bare:,.0f} | "
                    f"**{f[name]['time_ratio']:.3f}** ({common.fmt(ratio, 3)}) |")
    precision = "bf16 autocast, channels_last" if device.type == "cuda" else "fp32"
    lines = [f"Device `{device}`, batch {BATCH}, 1 torch thread on CPU, {repeats} repeats interleaved after a "
             f"warm-up on 4 batches; each measure is whole epochs ({precision}).",
             "", "| model | data | images per measure | train_stage img/s | bare img/s | "
             "time ratio train_stage / bare (per repeat) |", "|---|---|---:|---:|---:|---|", *rows, "",
             "A ratio near 1.0 means the loop adds nothing measurable over plain PyTorch on the same batches."]
    return common.Section("5. Training-loop throughput (bench/throughput.py)", f, lines)


if __name__ == "__main__":
    common.main_for(run, __doc__.splitlines()[0])
