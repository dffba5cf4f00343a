"""Search efficiency: how many trials each sampler needs to come within 1 point of the best configuration, run on
the tabular benchmark of bench/search_table.py by lookup (no training), over many seeds.

Each simulated study is a real Optuna study (in memory) with a real sampler, sampling through the project's own
`study.space.search.suggest_choices` on the quickstart's search space with every choice but the layer actions, alpha,
T and lr pinned to its default, so conditional parameters behave as in a study (T is sampled only when alpha > 0).
The three baselines are enqueued first, as `study create` does. A sampled alpha and lr are looked up at the
nearest table value (lr on a log scale); T does not change the lookup (the table holds T = 4). Continuous ranges,
not categorical sets over the grid, because the defaults chosen here are for real studies, where alpha and lr are
ranges: a sampler is judged on the space it will see. 4 parallel workers are simulated with the table's recorded
trial times: 4 trials are asked at once and each worker asks again when its trial is told (constant liar, TPE's
default, then treats the running ones as bad).
"""

from __future__ import annotations

import heapq
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import common
import numpy as np
import search_table

BUDGET = 100  # trials per simulated study: 4x the quickstart's 24, so most seeds get there
RANDOM_BUDGET = 100  # censored here (its exact figure is computed from the table: see random_exact)
CHECKPOINTS = (8, 16, 32)
WITHIN = 0.01  # "within 1 point" of the table's best target validation accuracy
SEEDS = 20
TARGET_RATIO, TARGET_DUPLICATES = 0.60, 0.05
PINNED = ["search.beta=0.0", "search.threshold=0.95", "search.source_weight=0.5", "search.generations=1",
          "search.augment=false", "search.recipe=distill"]
# GPSampler refits its model and searches the 81 layer combinations at every ask: ~5 s per trial on this machine,
# so fewer seeds and a shorter study (its row says so).
GP_BUDGET, GP_SEEDS = 14, 2

# label -> (sampler name, kwargs, parallel workers). Every TPE row spells out group and n_startup_trials, so the
# project's DEFAULT_KWARGS (which `make_sampler` applies under them) never blur which variant a row is.
FORMER = {"group": False, "n_startup_trials": 10}  # Optuna 5's TPESampler as it comes: the project's former default
VARIANTS = {
    "tpe (former default: group off, startup 10)": FORMER,
    "tpe group": {"group": True, "n_startup_trials": 10},
    "tpe startup 5": {"group": False, "n_startup_trials": 5},
    "tpe group startup 5": {"group": True, "n_startup_trials": 5},
}
DEFAULT = "tpe group startup 5"  # the variant study/space/samplers.py DEFAULT_KWARGS makes the default
CONFIGS = {"random": ("random", {}, 1),
           **{label: ("tpe", kwargs, 1) for label, kwargs in VARIANTS.items()},
           "gp": ("gp", {"warn_independent_sampling": False}, 1),
           **{f"{label}, 4 workers": ("tpe", kwargs, 4) for label, kwargs in VARIANTS.items()}}


def space_config(task: str):
    return common.quickstart(f"task.name={task}", *PINNED)


def nearest(grid: tuple, value: float, log: bool = False) -> float:
    """The grid value closest to `value` (on a log scale for lr)."""
    f = math.log if log else float
    return min(grid, key=lambda g: abs(f(g) - f(value)))


class Table:
    """Lookup of a built table: a trial's choices -> (value or None for a failed trial, seconds, cell key)."""

    def __init__(self, data: dict):
        self.cells, self.baselines = data["cells"], data["baselines"]
        # The target is the best configuration of the space: at these short epochs the finetune-all baseline (the
        # finetune recipe, outside the searched distill recipe) can beat every cell, and it is trial 0 of every study.
        self.values = [c["value"] for c in self.cells.values() if c["value"] is not None]
        self.best = max(self.values)

    def look_up(self, choices, baseline: str | None) -> tuple:
        if baseline:
            row, key = self.baselines[baseline], baseline
        else:
            key = search_table.cell_key(choices.layers, nearest(search_table.ALPHAS, choices.alpha),
                                        nearest(search_table.LRS, choices.lr, log=True))
            row = self.cells[key]
        return row["value"], row["seconds"], key


def make(name: str, kwargs: dict, seed: int, space):
    """The sampler, built by the project's `make_sampler` (as a worker does)."""
    from study.config.config import SamplerSettings
    from study.space.samplers import make_sampler

    return make_sampler(SamplerSettings(name=name, seed=seed, kwargs=dict(kwargs)), space, 1)


def simulate(task: str, label: str, seed: int) -> dict:
    """One simulated study; returns the values in the order they were told and the duplicate counts."""
    import warnings

    import optuna

    from study.space.baselines import BASELINES, baseline_choices, enqueue_params
    from study.space.search import suggest_choices
    from study.trials.record import TrialRecord, baseline_attrs

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    name, kwargs, workers = CONFIGS[label]
    budget = RANDOM_BUDGET if name == "random" else GP_BUDGET if name == "gp" else BUDGET
    config, table = space_config(task), TABLES[task]
    space, replace_with = config.search, config.pipeline.replace_with
    study = optuna.create_study(direction="maximize", sampler=make(name, kwargs, seed, space))
    for b in BASELINES:
        study.enqueue_trial(enqueue_params(baseline_choices(b, space), space, replace_with),
                            user_attrs=baseline_attrs(b))
    running, told, seen = [], [], set()  # running: heap of (finish time, order, trial, value, key)
    sampled = parallel_dupes = revisits = 0
    clock, asked = 0.0, 0

    def ask(now: float):
        nonlocal sampled, parallel_dupes, revisits, asked
        trial = study.ask()
        baseline = TrialRecord(trial).baseline
        choices = suggest_choices(trial, space, replace_with)
        value, seconds, key = table.look_up(choices, baseline)
        if not baseline:
            sampled += 1
            parallel_dupes += any(key == r[4] for r in running)
            revisits += key in seen
        seen.add(key)
        heapq.heappush(running, (now + seconds, asked, trial, None if baseline else value, key, value))
        asked += 1

    while asked < min(workers, budget):
        ask(clock)
    while running:
        clock, _, trial, searched, _, value = heapq.heappop(running)
        if value is None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, value)
        told.append(searched)  # a baseline takes a trial of the budget but is no find of the search
        if asked < budget:
            ask(clock)
    return {"values": told, "sampled": sampled, "parallel_dupes": parallel_dupes, "revisits": revisits,
            "budget": budget}


TABLES: dict[str, Table] = {}


def _init(tables: dict) -> None:
    TABLES.update({task: Table(data) for task, data in tables.items()})


def trials_to_target(values: list, best: float) -> int | None:
    """Told trials until one comes within WITHIN of the best (None: never within the budget)."""
    for i, v in enumerate(values):
        if v is not None and v >= best - WITHIN - 1e-12:
            return i + 1
    return None


def best_after(values: list, n: int) -> float:
    done = [v for v in values[:n] if v is not None]
    return max(done) if done else float("nan")


def summarise(runs: list[dict], best: float) -> dict:
    """Median and IQR over seeds. A study that never got there counts as its budget + 1 (a lower bound), so a
    median is exact as long as at least half of the seeds got there (else it is reported as '> budget')."""
    hits = [trials_to_target(r["values"], best) for r in runs]
    budget = runs[0]["budget"]
    filled = np.array([h if h is not None else budget + 1 for h in hits], dtype=float)
    out = {"hits": hits, "reached": sum(h is not None for h in hits), "n": len(hits),
           "median": float(np.median(filled)), "q1": float(np.percentile(filled, 25)),
           "q3": float(np.percentile(filled, 75)), "budget": budget,
           "censored": sum(h is None for h in hits) * 2 >= len(hits)}
    for n in CHECKPOINTS:
        vals = np.array([best_after(r["values"], n) for r in runs])
        out[f"best@{n}"] = (float(np.median(vals)), float(np.percentile(vals, 25)), float(np.percentile(vals, 75)))
    sampled = sum(r["sampled"] for r in runs)
    out["parallel_dupes"] = sum(r["parallel_dupes"] for r in runs) / sampled
    out["revisits"] = sum(r["revisits"] for r in runs) / sampled
    return out


def random_exact(task: str) -> dict:
    """Random search's trials to target in closed form: each sampled trial lands in a cell within 1 point with
    probability p (the product of each choice's chance under the space's distributions), after the 3 baselines."""
    config, table = space_config(task), TABLES[task]
    alpha, lr = config.search.params["alpha"], config.search.params["lr"]

    def share(grid, value, low, high, log):  # the chance a uniform (log-uniform) draw is nearest to `value`
        f = math.log if log else float
        i = grid.index(value)
        lo = f(low) if i == 0 else (f(grid[i - 1]) + f(value)) / 2
        hi = f(high) if i == len(grid) - 1 else (f(value) + f(grid[i + 1])) / 2
        return max(0.0, min(hi, f(high)) - max(lo, f(low))) / (f(high) - f(low))

    groups = len(next(iter(table.cells)).split("|")[0].split("/"))
    p = 0.0
    for key, cell in table.cells.items():
        if cell["value"] is not None and cell["value"] >= table.best - WITHIN - 1e-12:
            _, a, r = key.split("|")
            p += (1 / len(search_table.ACTIONS)) ** groups * share(search_table.ALPHAS, float(a), alpha.low,
                                                                   alpha.high, False) \
                * share(search_table.LRS, float(r), lr.low, lr.high, True)
    q = lambda x: 3 + math.ceil(math.log(1 - x) / math.log(1 - p))  # noqa: E731
    return {"p": p, "median": q(0.5), "q1": q(0.25), "q3": q(0.75)}


def _jobs(quick: bool):
    def seeds(label):
        return range(2 if quick else GP_SEEDS if CONFIGS[label][0] == "gp" else SEEDS)

    # GP first: its runs are the longest, so the pool never ends waiting on one of them.
    labels = sorted(CONFIGS, key=lambda label: CONFIGS[label][0] != "gp")
    return [(task, label, seed) for label in labels for task in search_table.TASKS for seed in seeds(label)]


def _simulate_job(job):
    return job, simulate(*job)


def run(args) -> common.Section:
    # Always the full table (built once, then cached): a lookup needs every cell; --quick only runs fewer seeds.
    tables = {task: search_table.load_or_build(task) for task in search_table.TASKS}
    jobs = _jobs(args.quick)
    # Two processes per core: the jobs are short CPU bursts, and on a shared machine the scheduler shares by process.
    workers = 2 * max(1, len(os.sched_getaffinity(0)))
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init, initargs=(tables,)) as pool:
        results = dict(pool.map(_simulate_job, jobs))
    _init(tables)
    per_task = {}
    for task in search_table.TASKS:
        best = TABLES[task].best
        per_task[task] = {label: summarise([results[(t, lab, s)] for (t, lab, s) in jobs if t == task and lab == label],
                                           best) for label in CONFIGS}
    return common.Section("7. Search efficiency (bench/search_efficiency.py)", figures(per_task, tables),
                          lines(per_task, tables, args.quick))


def figures(per_task: dict, tables: dict) -> dict:
    return {"per_task": {t: {lab: {k: v for k, v in s.items() if k != "hits"} for lab, s in rows.items()}
                         for t, rows in per_task.items()},
            "tables": {t: {"best": TABLES[t].best, "build_seconds": d["build_seconds"], "cells": len(d["cells"])}
                       for t, d in tables.items()}}


def _median_text(s: dict) -> str:
    if s["censored"]:
        return f"> {s['budget']}"
    q3 = f"> {s['budget']}" if s["q3"] > s["budget"] else f"{s['q3']:.0f}"
    return f"{s['median']:.0f} [{s['q1']:.0f}, {q3}]"


def lines(per_task: dict, tables: dict, quick: bool) -> list[str]:
    cond = tables[search_table.TASKS[0]]["conditions"]
    out = [f"Table (bench/search_table.py): every combination of layer actions "
           f"({len(search_table.ACTIONS)}^{len(tables[search_table.TASKS[0]]['groups'])}) x alpha "
           f"{list(search_table.ALPHAS)} x lr {list(search_table.LRS)}, trained once through `run_trial` "
           f"(quickstart config, pipeline.seed {cond['seed']}, epochs {cond['epochs']}, max_per_domain "
           f"{cond['max_per_domain']}, T 4, every other choice at its default), plus the three baselines; "
           f"cached in bench/out. "
           + "; ".join(f"{t}: {len(d['cells'])} cells built in {d['build_seconds']:.0f} s on {d['workers']} "
                       f"processes, best {TABLES[t].best:.3f}, "
                       f"{sum(v >= TABLES[t].best - WITHIN for v in TABLES[t].values)} entries within 1 point"
                       for t, d in tables.items()) + ".", "",
           __doc__.split("\n\n", 1)[1].replace("\n", " ").strip(), "",
           f"{2 if quick else SEEDS} seeds per row (GP {2 if quick else GP_SEEDS}: see its budget). Trials to target = "
           f"trials told until a sampled one is within 1 point ({WITHIN:.2f}) of the best cell's target val acc (the "
           f"baselines take the first trials of the budget but are no find of the search; median [IQR]; a study "
           f"that never got there counts as budget + 1; budget {BUDGET} trials, random {RANDOM_BUDGET}, GP "
           f"{GP_BUDGET}). Best after n = best target val acc among the sampled trials of the first n told (median "
           f"[IQR]). Duplicates = sampled proposals that land in the same table cell as a trial still running "
           f"(4 workers); revisits = same cell as any earlier trial.", ""]
    default = DEFAULT
    for task, rows in per_task.items():
        out += [f"**{task}** (best {TABLES[task].best:.3f})", "",
                "| sampler | trials to target | reached | best after 8 | after 16 | after 32 | duplicates | "
                "revisits |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for label, s in rows.items():
            dup = f"{100 * s['parallel_dupes']:.1f}%" if CONFIGS[label][2] > 1 else "-"
            after = [f"{s[f'best@{n}'][0]:.3f} [{s[f'best@{n}'][1]:.3f}, {s[f'best@{n}'][2]:.3f}]"
                     if n <= s["budget"] else "-" for n in CHECKPOINTS]
            out.append(f"| {label} | {_median_text(s)} | {s['reached']}/{s['n']} | {' | '.join(after)} | {dup} | "
                       f"{100 * s['revisits']:.1f}% |")
        exact = random_exact(task)
        out.append(f"| random, exact (p = {exact['p']:.4f} per sampled trial) | {exact['median']} [{exact['q1']}, "
                   f"{exact['q3']}] | - | - | - | - | - | - |")
        dft, par = rows[default], rows[f"{default}, 4 workers"]
        ratio = dft["median"] / exact["median"]  # a censored median is a lower bound on the ratio
        bound = "at most " if dft["censored"] else ""
        out += ["", f"Default ({default}) against the targets: median trials to target "
                f"{'> ' + str(dft['budget']) if dft['censored'] else format(dft['median'], '.0f')} vs random "
                f"{exact['median']} (exact) = {bound if not dft['censored'] else 'at least '}{100 * ratio:.0f}% "
                f"({'**undecided** within the budget' if dft['censored'] else common.verdict(ratio <= TARGET_RATIO)}"
                f", target <= "
                f"{100 * TARGET_RATIO:.0f}%); duplicates with 4 workers {100 * par['parallel_dupes']:.1f}% "
                f"({common.verdict(par['parallel_dupes'] <= TARGET_DUPLICATES)}, target <= "
                f"{100 * TARGET_DUPLICATES:.0f}%).", ""]
    return out


def main() -> None:
    common.main_for(run, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
