"""Helpers shared by the benchmarks: the quickstart config with overrides, machine/version facts, medians,
interleaved A/B repeats, a teacher cache, and writing bench/RESULTS.md.

Every benchmark module has `run(args) -> Section` (a title, the figures as a dict, and markdown lines) and a
`main()` that parses the common flags, runs it, prints it and writes RESULTS.md. `run_all.py` runs them all.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(REPO) not in sys.path:  # the project is installed editable, but running from a bare checkout works too
    sys.path.insert(0, str(REPO))

QUICKSTART = REPO / "examples" / "quickstart.yaml"
RESULTS = BENCH / "RESULTS.md"
PY = sys.executable


@dataclass
class Section:
    """One benchmark's outcome: figures (numbers, for the JSON) and the markdown printed and written."""

    title: str
    figures: dict = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def text(self) -> str:
        return "\n".join([f"## {self.title}", "", *self.lines, "", f"_(this benchmark took {self.seconds:.0f} s)_"])


# ---- configs -----------------------------------------------------------------------------------------------------
def quickstart(*overrides: str):
    """The quickstart config with `--set`-style overrides (validated like the CLI does)."""
    from study.config.config import load_config

    return load_config(QUICKSTART, list(overrides))


def pinned_search(**values) -> list[str]:
    """Overrides that pin every choice (lr stays a one-element list: a study needs one non-fixed choice)."""
    out = [f"search.layers.actions=[{values.pop('actions', 'finetune')}]"]
    out += [f"search.{k}={v}" for k, v in values.items()]
    return out


def storage_url(directory: str | Path, name: str = "optuna.db") -> str:
    return f"sqlite:///{Path(directory) / name}"


def warm_teacher(config) -> float:
    """Train (or load) the config's teacher into its cache dir on the config's threads; returns seconds spent."""
    import torch

    from objectives.device import resolve_device
    from objectives.pipeline import get_task
    from objectives.teacher import get_teacher

    started = time.perf_counter()
    device = resolve_device(config.pipeline.device)
    if device.type == "cpu" and config.pipeline.cpu_threads > 0:
        torch.set_num_threads(config.pipeline.cpu_threads)  # as run_trial does, so it trains as fast as in a trial
    task = get_task(config.task, config.pipeline.seed, device)
    get_teacher("teacher", config.model.arch, config.model.width, task, config.model, config.pipeline, device)
    return time.perf_counter() - started


def trial_seconds(trial) -> float:
    """Wall time of a finished Optuna trial from its stored start/complete timestamps."""
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def trial_epochs(trial) -> int:
    """Student epochs a trial spent: recorded for a finished trial, else its reported epochs (pruned)."""
    from study.trials.record import TrialRecord

    return int(TrialRecord(trial).epochs)


def index_batches(n: int, batch: int, g, device):
    """Endless reshuffled index batches into n examples: a fresh permutation per pass, batches of min(batch, n),
    a partial last batch skipped (what the pipeline's index streams do). For the bare loops."""
    import torch

    batch = min(batch, n)
    while True:
        perm = torch.randperm(n, generator=g, device=device)
        for i in range(0, n - batch + 1, batch):
            yield perm[i:i + batch]


# ---- statistics --------------------------------------------------------------------------------------------------
def median(values) -> float:
    return statistics.median(values) if values else float("nan")


def interleave(repeats: int, arms: dict) -> dict:
    """Call every arm (name -> zero-argument function) once per repeat, rotating which goes first, so drift in
    machine load hits every arm alike. Returns name -> list of results, in repeat order."""
    names, out = list(arms), {name: [] for name in arms}
    for i in range(repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:
            out[name].append(arms[name]())
    return out


def fmt(values, digits: int = 2) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


# ---- machine and results -----------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_lines(device: str) -> list[str]:
    import mlflow
    import optuna
    import torch

    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    lines = [f"- CPU: {cpu_model()}, {cores} logical cores ({usable} usable by this process)",
             f"- OS: {platform.platform()}"]
    if torch.cuda.is_available():
        lines.append(f"- GPU: {', '.join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))}")
    lines.append(f"- Versions: python {platform.python_version()}, torch {torch.__version__}, "
                 f"optuna {optuna.__version__}, mlflow {mlflow.__version__}")
    lines.append(f"- Device asked for: `{device}`; torch threads per training process: 1 (the project's "
                 f"`pipeline.cpu_threads` default) unless a section says otherwise")
    return lines


def load() -> str:
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def write_results(sections: list[Section], device: str, started: float, load_start: str, path: Path = RESULTS,
                  command: str | None = None) -> str:
    """Overwrite `path` with this run: command, machine, versions, load, then every section."""
    command = command or " ".join(shlex.quote(a) for a in [Path(PY).name, *sys.argv])
    total = time.time() - started
    head = ["# distillstudy benchmarks", "",
            f"Latest run: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}, "
            f"total {total:.0f} s ({total / 60:.1f} min).", "",
            f"Command: `{command}` (from the repository root)", "",
            *machine_lines(device),
            f"- Load average (1/5/15 min) at start: {load_start}; at end: {load()}", "",
            "Ratios are medians of per-repeat ratios, A and B interleaved within this run; absolute times are "
            "only for orientation. Nothing here asserts on timings.", ""]
    text = "\n".join(head + [s.text() + "\n" for s in sections])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a fast smoke run (fewer repeats, tiny studies)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--results", type=Path, default=RESULTS, help="where to write the markdown (default %(default)s)")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a fresh temporary one)")
    return p


def scratch(args, name: str) -> Path:
    """A fresh scratch directory for one benchmark (under --workdir, else the system temp dir)."""
    base = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"distillstudy-bench-{name}-", dir=base))


def main_for(run, description: str) -> None:
    """The standalone entry point of one benchmark: parse, run, print, write RESULTS.md."""
    args = parser(description).parse_args()
    started, load_start = time.time(), load()
    section = timed(run, args)
    print(section.text())
    write_results([section], args.device, started, load_start, args.results)
    print(f"\nwritten to {args.results}")


def timed(run, args) -> Section:
    t = time.perf_counter()
    section = run(args)
    section.seconds = time.perf_counter() - t
    return section
