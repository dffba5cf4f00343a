"""Teacher reuse: a study of N tiny trials costs about one teacher plus N trials, not N x (teacher + trial).

Per repeat, interleaved: (A) train the quickstart teacher once into an empty cache dir (`get_teacher`, timed);
(B) run a fresh N-trial study (`run_worker`, tracking off, pruner none) whose cache dir starts empty, so its first
trial trains the teacher and the others load it. Trial times with a warm cache are the study's trials that
report `teacher_cache: hit`.
"""

from __future__ import annotations

import time

import common


def make_config(work, device: str, quick: bool, n_trials: int):
    return common.quickstart(
        f"pipeline.device={device}", f"study.checkpoint_dir={work / 'checkpoints'}", "study.baselines=false",
        f"study.n_trials={n_trials}", "study.pruner.name=none", "study.pruner.kwargs={}", "tracking.enabled=false",
        "pipeline.finetune_epochs=1", f"pipeline.distill_epochs={1 if quick else 2}", "pipeline.retrain_epochs=1")


def teacher_alone(config, work, counter) -> float:
    """Seconds to train (and cache) the teacher from an empty cache dir."""
    counter[0] += 1
    config.pipeline.cache_dir = str(work / f"cache-teacher-{counter[0]}")
    return common.warm_teacher(config)


def study_cold(config, work, n_trials: int, device: str, counter) -> dict:
    """A fresh study of n_trials from an empty cache dir: total seconds and per-trial seconds by cache state."""
    from study.trials.record import TrialRecord
    from study.workers.studies import create_study
    from study.workers.worker import run_worker

    counter[0] += 1
    config.pipeline.cache_dir = str(work / f"cache-study-{counter[0]}")
    name, url = f"reuse-{counter[0]}", common.storage_url(work, f"reuse-{counter[0]}.db")
    create_study(config, name, url)
    started = time.perf_counter()
    study = run_worker(name, url, n_trials=n_trials, device=device)
    total = time.perf_counter() - started
    trials = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    cache = [TrialRecord(t).get("teacher_cache") for t in trials]
    return {"total": total, "n": len(trials), "misses": cache.count("miss"), "hits": cache.count("hit"),
            "warm": [common.trial_seconds(t) for t, c in zip(trials, cache) if c == "hit"],
            "cold": [common.trial_seconds(t) for t, c in zip(trials, cache) if c == "miss"],
            "in_trials": sum(common.trial_seconds(t) for t in trials)}


def run(args) -> common.Section:
    work = common.scratch(args, "teacher")
    n, repeats = (4, 1) if args.quick else (6, 3)
    a_cfg, b_cfg = make_config(work, args.device, args.quick, n), make_config(work, args.device, args.quick, n)
    ca, cb = [0], [0]
    common.warm_teacher(make_config(work, args.device, args.quick, n))  # warm-up: imports, task load (not counted)
    r = common.interleave(repeats, {"teacher": lambda: teacher_alone(a_cfg, work, ca),
                                    "study": lambda: study_cold(b_cfg, work, n, args.device, cb)})
    rows, measured_vs_naive, measured_vs_one = [], [], []
    for t_teacher, s in zip(r["teacher"], r["study"]):
        trial = common.median(s["warm"])
        naive, one = s["n"] * (t_teacher + trial), t_teacher + s["n"] * trial
        measured_vs_naive.append(s["total"] / naive)
        measured_vs_one.append(s["total"] / one)
        rows.append(f"| {t_teacher:.2f} | {trial:.2f} | {common.fmt(s['cold'])} | "
                    f"{s['n']} ({s['misses']} miss / {s['hits']} hit) | {s['total']:.2f} | "
                    f"{s['total'] - s['in_trials']:.2f} | {one:.2f} | {naive:.2f} | {s['total'] / naive:.3f} | "
                    f"{s['total'] / one:.3f} |")
    p = a_cfg.pipeline
    f = {"n_trials": n, "repeats": repeats, "measured_over_naive": common.median(measured_vs_naive),
         "measured_over_one_teacher_plus_trials": common.median(measured_vs_one),
         "teacher_s": common.median(r["teacher"]), "warm_trial_s": common.median([common.median(s["warm"])
                                                                                 for s in r["study"]]),
         "total_s": common.median([s["total"] for s in r["study"]]),
         "teacher_trainings_per_study": max(s["misses"] for s in r["study"])}
    lines = [f"Quickstart task; teacher {p.teacher_epochs} epochs; tiny trials ({p.finetune_epochs}+{p.distill_epochs}"
             f"+{p.retrain_epochs}x generations epochs, TPE seed 0, pruner none, tracking off); a study of {n} "
             f"trials per repeat from an empty cache dir; {repeats} repeat(s), interleaved with the teacher-alone "
             f"timing.", "",
             "| teacher alone (s) | warm trial, median (s) | cold trial (s) | trials | study total, measured (s) | "
             "outside trials (s) | "
             "teacher + N x trial (s) | naive N x (teacher + trial) (s) | measured / naive | "
             "measured / (teacher + N x trial) |", "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|", *rows, "",
             f"Median: the study cost **{f['measured_over_naive']:.2f}x the naive figure** and "
             f"{f['measured_over_one_teacher_plus_trials']:.2f}x one teacher plus N trials; the teacher was trained "
             f"{f['teacher_trainings_per_study']} time(s) per study. (The remainder above 1.0 in the last column is "
             f"the worker's own cost outside trials: loading the study, the sampler, storage writes.)"]
    return common.Section("2. Teacher reuse (bench/teacher_reuse.py)", f, lines)


if __name__ == "__main__":
    common.main_for(run, __doc__.splitlines()[0])
