"""A tabular benchmark of the layer-action space (in the style of NAS-Bench-201 and HPOBench): every combination of
layer actions (3^4 = 81 for digitnet) at a grid of alpha and lr, trained once through the real pipeline
(`objectives.pipeline.run_trial`, the objective's entry point) and stored with its whole curve.

The table is built once per task and cached (bench/out/search_table_<task>.json, keyed by its conditions: a change
of grid, epochs or code version rebuilds it). bench/search_efficiency.py runs the samplers on it by lookup.

    .venv/bin/python bench/search_table.py            # build (or load) the tables and print their summary
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import common

from objectives.params import split_layers

TASKS = ("digits-invert", "digits-permute")
ACTIONS = ("freeze", "finetune", "replace")
ALPHAS = (0.0, 0.5, 0.9)
LRS = (1e-3, 1e-2)  # two, so the table builds in minutes on 2 busy cores (3e-3, the default, sits between)
EPOCHS = {"finetune_epochs": 1, "distill_epochs": 2, "retrain_epochs": 1}  # 4 student epochs (quickstart: 12)
QUICK_EPOCHS = {"finetune_epochs": 1, "distill_epochs": 1, "retrain_epochs": 1}
OUT = common.BENCH / "out"
BASELINES = ("finetune-all", "head-only", "finetune-all-kd")


def overrides(task: str, quick: bool, cache_dir: str) -> list[str]:
    """The quickstart config with short epochs, every choice but layers/alpha/lr at its default, no tracking."""
    epochs = QUICK_EPOCHS if quick else EPOCHS
    return [f"task.name={task}", "pipeline.device=cpu", f"pipeline.cache_dir={cache_dir}", "tracking.enabled=false",
            *(f"pipeline.{k}={v}" for k, v in epochs.items())]


def cells(groups: list[str]) -> list[tuple[dict, float, float]]:
    """Every (layer actions, alpha, lr) of the grid, in a fixed order."""
    return [(dict(zip(groups, acts)), alpha, lr)
            for acts in itertools.product(ACTIONS, repeat=len(groups)) for alpha in ALPHAS for lr in LRS]


def cell_key(layers: dict, alpha: float, lr: float) -> str:
    return f"{'/'.join(layers.values())}|{alpha:g}|{lr:g}"


def _run_chunk(task: str, quick: bool, cache_dir: str, jobs: list) -> list[dict]:
    """Train the given cells (or baselines) in this child process; returns one row per job."""
    import torch

    from models.errors import InvalidChoice
    from objectives.pipeline import run_trial
    from study.space.baselines import baseline_choices

    torch.set_num_threads(1)
    config = common.quickstart(*overrides(task, quick, cache_dir))
    space, rows = config.search, []
    for job in jobs:
        if isinstance(job, str):  # a baseline: its real choices (its own recipe)
            choices = baseline_choices(job, space)
        else:
            layers, alpha, lr = job
            choices = replace(space.defaults(), layers=layers, alpha=alpha, lr=lr)
        curve: dict[int, float] = {}
        started = time.perf_counter()
        try:
            value = run_trial(config.task, config.model, config.pipeline, choices,
                              report=lambda step, value, stage: curve.__setitem__(step, value)).value  # noqa: B023
        except InvalidChoice:  # every group frozen: the study's objective fails such a trial, so the table does too
            value = None
        rows.append({"key": job if isinstance(job, str) else cell_key(*job), "value": value,
                     "curve": curve, "seconds": time.perf_counter() - started, "params": choices.flat()})
    return rows


def table_path(task: str, quick: bool) -> Path:
    return OUT / f"search_table_{task}{'-quick' if quick else ''}.json"


def _conditions(task: str, quick: bool) -> dict:
    """Everything the table's values depend on; a cached table is reused only if these match."""
    config = common.quickstart(*overrides(task, quick, "unused"))
    code = hashlib.sha256()
    for path in sorted((common.REPO / "objectives").rglob("*.py")) + sorted((common.REPO / "models").rglob("*.py")):
        code.update(path.read_bytes())
    return {"task": task, "actions": ACTIONS, "alphas": ALPHAS, "lrs": LRS,
            "epochs": QUICK_EPOCHS if quick else EPOCHS, "max_per_domain": config.task.max_per_domain,
            "defaults": {k: v for k, v in split_layers(config.search.defaults().flat())[1].items()
                         if k not in ("alpha", "lr")},
            "seed": config.pipeline.seed, "code": code.hexdigest()[:16]}


def build(task: str, quick: bool, workers: int, cache_dir: str) -> dict:
    """Train every cell and baseline of one task's table on `workers` processes."""
    config = common.quickstart(*overrides(task, quick, cache_dir))
    common.warm_teacher(config)  # once, here, so the children never race on the teacher's cache lock
    grid = cells(config.search.groups)
    if quick:
        grid = grid[::27]  # a smoke run: 27 cells, every alpha and lr
    jobs = list(BASELINES) + grid
    chunks = [jobs[i::workers * 4] for i in range(workers * 4)]  # interleaved: cheap and costly cells mixed
    started = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = [pool.submit(_run_chunk, task, quick, cache_dir, chunk) for chunk in chunks if chunk]
        rows = [row for f in futures for row in f.result()]
    by_key = {r["key"]: r for r in rows}
    return {"conditions": _conditions(task, quick), "groups": config.search.groups,
            "build_seconds": time.perf_counter() - started, "workers": workers,
            "baselines": {b: by_key.pop(b) for b in BASELINES}, "cells": by_key}


def load_or_build(task: str, quick: bool = False, workers: int | None = None, cache_dir: str | None = None,
                  log=print) -> dict:
    """The cached table of `task` if its conditions still hold, else a freshly built (and saved) one."""
    path = table_path(task, quick)
    if path.exists():
        table = json.loads(path.read_text())
        if table["conditions"] == json.loads(json.dumps(_conditions(task, quick))):
            return table
        log(f"{path.name}: conditions changed, rebuilding")
    workers = workers or max(1, len(os.sched_getaffinity(0)))
    cache_dir = cache_dir or str(common.REPO / ".distillstudy" / "cache")
    log(f"building {path.name} on {workers} processes ...")
    table = build(task, quick, workers, cache_dir)
    OUT.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=None))
    log(f"built in {table['build_seconds']:.0f} s")
    return table


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    args = p.parse_args()
    for task in TASKS:
        table = load_or_build(task, args.quick)
        values = sorted((c["value"] for c in table["cells"].values() if c["value"] is not None), reverse=True)
        near = sum(v >= values[0] - 0.01 for v in values)
        print(f"{task}: {len(values)} cells, best {values[0]:.3f}, {near} within 1 point, "
              f"median {values[len(values) // 2]:.3f}; "
              + ", ".join(f"{b} {r['value']:.3f}" for b, r in table["baselines"].items()))


if __name__ == "__main__":
    main()
