"""Pruning regret: is a pruner configuration fair to every layer action, and what does it cost in good trials?

Step 1 records, per task (digits-invert, digits-permute, digits-stroke), an *unpruned* quickstart study (pruner
none, baselines on, tracking off, sampler seed 0, full quickstart epochs): every COMPLETE trial's layer actions,
final value, whole curve and stage blocks, saved as JSON (scratch dir and bench/out/pruning_regret_<task>.json;
`--replay-only` reuses those). Step 2 replays the recorded trials, in trial-number order and without retraining,
through real Optuna pruners built by the project's `make_pruner`, asking them only at `study.space.pruning`'s decision
steps, exactly as the objective does. Unpruned curves make every configuration comparable on the same trials;
the price is that the sequence is fixed (a real study's sampler would have proposed other trials after a prune).
"""

from __future__ import annotations

import json
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import common

TASKS = ("digits-invert", "digits-permute", "digits-stroke")
ACTIONS = ("freeze", "finetune", "replace")
OUT = common.BENCH / "out"
TARGET_SHARE, TARGET_FAIR = 0.40, 1.5  # from the product issue; plus: no top-quartile trial stopped
MEDIAN = {"n_startup_trials": 4, "n_warmup_steps": 1}  # the quickstart's MedianPruner
PCT25 = {"percentile": 25.0, "n_startup_trials": 4, "n_warmup_steps": 1}
ENDS = 1000  # a stage warm-up longer than any stage: ask only at stage ends

# label -> (pruner name, kwargs, patience, stage_warmup); the first row is the quickstart's former default, the
# one marked (default) its current one (examples/quickstart.yaml).
CONFIGS = {
    "median s4 w0 (former default)": ("median", MEDIAN, -1, 0),
    "median s4 w1": ("median", MEDIAN, -1, 1),
    "median s4 w2": ("median", MEDIAN, -1, 2),
    "median s4 ends": ("median", MEDIAN, -1, ENDS),
    "pct25 s4 w0": ("percentile", PCT25, -1, 0),
    "pct25 s4 w2": ("percentile", PCT25, -1, 2),
    "pct25 s4 ends": ("percentile", PCT25, -1, ENDS),
    "median s8 w2": ("median", {**MEDIAN, "n_startup_trials": 8}, -1, 2),
    # Extras, picked from an offline grid over these recordings (so flattered by them): `min4` = n_min_trials 4
    # (no verdict at a step fewer than 4 trials reached, e.g. late retrain steps); `patience0` = PatientPruner(0),
    # never prune a trial that improved at this step; `from9` = n_warmup_steps 9, i.e. only after the distill stage.
    # The default adds stage_warmup 2 to the patience: on these recordings it costs nothing over w0, and it keeps
    # the pruner away from the first two epochs of every stage, where fresh groups are furthest behind.
    "median s4 w2 patience0 min4 (default)": ("median", {**MEDIAN, "n_min_trials": 4}, 0, 2),
    "median s4 w0 patience0 min4": ("median", {**MEDIAN, "n_min_trials": 4}, 0, 0),
    "pct25 s4 from9 min4": ("percentile", {**PCT25, "n_warmup_steps": 9, "n_min_trials": 4}, -1, 0),
}


# ---- step 1: record unpruned studies --------------------------------------------------------------------------
def overrides(task: str, work: str, device: str, n_trials: int) -> list[str]:
    return [f"task.name={task}", "study.pruner.name=none", "study.pruner.kwargs={}", "tracking.enabled=false",
            "study.baselines=true", "study.sampler.seed=0", f"study.n_trials={n_trials}", f"pipeline.device={device}",
            f"pipeline.cache_dir={work}/cache", f"study.checkpoint_dir={work}/checkpoints"]


def record_study(task: str, n_trials: int, work: str, device: str) -> dict:
    """Run one unpruned study in this (child) process; return its COMPLETE trials as plain data."""
    import torch

    from objectives.stages import plan_stages
    from study.trials.record import TrialRecord
    from study.workers.studies import create_study
    from study.workers.worker import run_worker

    torch.set_num_threads(1)
    config = common.quickstart(*overrides(task, work, device, n_trials))
    name, url = f"regret-{task}", common.storage_url(work, f"regret-{task}.db")
    create_study(config, name, url)
    study = run_worker(name, url, n_trials=n_trials, device=device)
    trials = []
    for t in sorted(study.trials, key=lambda t: t.number):
        if t.state.name != "COMPLETE":
            continue
        choices = TrialRecord(t).trial_choices()
        trials.append({"number": t.number, "baseline": TrialRecord(t).baseline, "layers": choices.layers,
                       "value": t.value, "curve": {int(s): v for s, v in sorted(t.intermediate_values.items())},
                       "stages": [(s.name, s.first_step, s.epochs) for s in plan_stages(config.pipeline, choices)]})
    return {"task": task, "n_trials": n_trials, "states": [t.state.name for t in study.trials], "trials": trials}


def out_path(task: str, quick: bool) -> Path:
    return OUT / f"pruning_regret_{task}{'-quick' if quick else ''}.json"  # a smoke run never clobbers a full one


def record(args, work: Path, n_trials: int) -> dict:
    for task in TASKS:  # teachers first, in this process, so the children do not race on the cache lock
        common.warm_teacher(common.quickstart(*overrides(task, str(work), args.device, n_trials)))
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:  # 2 cores: never more than 2 trainers
        futures = [pool.submit(record_study, task, n_trials, str(work), args.device) for task in TASKS]
        recorded = {r["task"]: r for r in (f.result() for f in futures)}
    OUT.mkdir(parents=True, exist_ok=True)
    for task, data in recorded.items():
        for path in (work / out_path(task, args.quick).name, out_path(task, args.quick)):
            path.write_text(json.dumps(data, indent=1))
    return recorded


def load_recorded(quick: bool) -> dict:
    recorded = {}
    for task in TASKS:
        data = json.loads(out_path(task, quick).read_text())
        for t in data["trials"]:  # JSON keys are strings
            t["curve"] = {int(s): v for s, v in t["curve"].items()}
        recorded[task] = data
    return recorded


# ---- step 2: replay ------------------------------------------------------------------------------------------
def replay(trials: list[dict], spec: tuple) -> dict:
    """Replay the trials through the pruner; returns number -> (pruned?, epochs spent, step pruned at or None)."""
    import optuna

    from objectives.stages import Stage
    from study.config.config import PrunerSettings
    from study.space.pruning import is_decision_step
    from study.space.samplers import make_pruner

    name, kwargs, patience, warmup = spec
    pruner = make_pruner(PrunerSettings(name=name, kwargs=dict(kwargs), patience=patience, stage_warmup=warmup))
    study = optuna.create_study(direction="maximize", pruner=pruner)
    out = {}
    for rec in sorted(trials, key=lambda r: r["number"]):
        stages = [Stage(n, "", first, epochs) for n, first, epochs in rec["stages"]]
        t, spent, outcome = study.ask(), 0, None
        for step, value in sorted(rec["curve"].items()):
            t.report(value, step)
            spent += 1
            # Baselines are never asked (the objective lets them finish: they are the reference).
            if not rec["baseline"] and is_decision_step(stages, step, warmup) and t.should_prune():
                study.tell(t, state=optuna.trial.TrialState.PRUNED)
                outcome = (True, spent, step)
                break
        if outcome is None:
            study.tell(t, rec["value"])
            outcome = (False, spent, None)
        out[rec["number"]] = outcome
    return out


def uses(rec: dict, action: str) -> bool:
    return action in rec["layers"].values()


def figures(trials: list[dict], outcome: dict) -> dict:
    """Epoch share, top-quartile trials stopped, and prune rates per action (overall and per final-value bin)."""
    import numpy as np

    share = sum(outcome[r["number"]][1] for r in trials) / sum(len(r["curve"]) for r in trials)
    cut = float(np.percentile([r["value"] for r in trials], 75))
    top = [r for r in trials if r["value"] >= cut]
    stopped = [r["number"] for r in top if outcome[r["number"]][0]]
    searched = sorted((r for r in trials if not r["baseline"]), key=lambda r: (r["value"], r["number"]))

    def rates(group):
        out = {}
        for a in ACTIONS:
            users = [r for r in group if uses(r, a)]
            out[a] = (sum(outcome[r["number"]][0] for r in users), len(users))
        return out

    bins, worst = [], 1.0
    for q in range(4):  # quartiles by rank of final value: trials of similar quality are compared with each other
        group = [r for i, r in enumerate(searched) if i * 4 // len(searched) == q]
        per = {a: p / n for a, (p, n) in rates(group).items() if n >= 2}
        lo, hi = (min(per.values()), max(per.values())) if per else (0.0, 0.0)
        ratio = 1.0 if hi == 0 else (math.inf if lo == 0 else hi / lo)
        bins.append({"quartile": q + 1, "values": [group[0]["value"], group[-1]["value"]] if group else [],
                     "rates": rates(group), "ratio": ratio})
        worst = max(worst, ratio)
    return {"share": share, "top_cut": cut, "top_stopped": stopped, "top_total": len(top), "fair_worst": worst,
            "bins": bins, "rates": rates(searched), "pruned": sum(o[0] for o in outcome.values()),
            # Pruned at the trial's own last step: no epoch saved, the finished trial's result thrown away.
            "at_last": sum(outcome[r["number"]][2] == max(r["curve"]) for r in trials if outcome[r["number"]][0])}


def predictability(trials: list[dict]) -> dict:
    """Why the targets pull against each other: an oracle's epoch share (baselines and the top quartile run in full,
    every other trial stopped after k epochs) and the rank correlation of the value at step k with the final one."""
    import numpy as np

    cut, total = float(np.percentile([r["value"] for r in trials], 75)), sum(len(r["curve"]) for r in trials)
    out = {}
    for k in (1, 3):  # the first epoch; the finetune stage's end
        kept = [len(r["curve"]) if r["baseline"] or r["value"] >= cut else min(k, len(r["curve"])) for r in trials]
        pairs = np.array([(r["curve"][k], r["value"]) for r in trials if not r["baseline"] and k in r["curve"]])
        ranks = pairs.argsort(axis=0).argsort(axis=0)
        out[k] = {"oracle_share": sum(kept) / total, "spearman": float(np.corrcoef(ranks.T)[0, 1])}
    return out


# ---- presentation -----------------------------------------------------------------------------------------------
def ratio_text(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.2f}"


def rate_text(pruned: int, n: int) -> str:
    return f"{100 * pruned / n:.0f}% ({pruned}/{n})" if n else "n/a"


def summarise(per_task: dict) -> dict:
    """Mean over tasks per configuration, with the targets judged on every task."""
    out = {}
    for label in CONFIGS:
        fs = [per_task[task][label] for task in TASKS]
        worst = [f["fair_worst"] for f in fs]
        out[label] = {"share": sum(f["share"] for f in fs) / len(fs),
                      "top_stopped": sum(len(f["top_stopped"]) for f in fs),
                      "top_total": sum(f["top_total"] for f in fs),
                      "at_last": sum(f["at_last"] for f in fs),
                      "fair_mean": sum(worst) / len(worst), "fair_max": max(worst),
                      "rates": {a: (sum(f["rates"][a][0] for f in fs), sum(f["rates"][a][1] for f in fs))
                                for a in ACTIONS}}
        s = out[label]
        s["met"] = {"share": s["share"] <= TARGET_SHARE, "top": s["top_stopped"] == 0,
                    "fair": s["fair_max"] <= TARGET_FAIR}
    return out


def why(label: str, per_task: dict, recorded: dict) -> list[str]:
    """The data behind each missed target of one configuration: which trials, which bins."""
    out = []
    for task in TASKS:
        f, trials = per_task[task][label], {r["number"]: r for r in recorded[task]["trials"]}
        for n in f["top_stopped"]:
            r, (_, _, step) = trials[n], f["outcome"][n]
            out.append(f"{task}: top-quartile trial {n} (final {r['value']:.3f}, actions "
                       f"{'/'.join(r['layers'].values())}) pruned at step {step} with {r['curve'][step]:.3f}")
        for b in f["bins"]:
            if b["ratio"] > TARGET_FAIR:
                rates = ", ".join(f"{a} {p}/{n}" for a, (p, n) in b["rates"].items() if n >= 2)
                out.append(f"{task}: final-value quartile {b['quartile']} ({b['values'][0]:.3f}-{b['values'][1]:.3f}) "
                           f"ratio {ratio_text(b['ratio'])}: pruned {rates}")
    return out


def run(args) -> common.Section:
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # PatientPruner's notice
    n_trials = 8 if args.quick else 32  # the quickstart has 24; more trials make the quartile bins less noisy
    if getattr(args, "replay_only", False):
        recorded, source = load_recorded(args.quick), "reused from bench/out (--replay-only)"
    else:
        work = common.scratch(args, "pruning-regret")
        recorded, source = record(args, work, n_trials), f"recorded now (JSON in {work} and bench/out)"
    per_task = {}
    for task in TASKS:
        per_task[task] = {}
        for label, spec in CONFIGS.items():
            outcome = replay(recorded[task]["trials"], spec)
            per_task[task][label] = {**figures(recorded[task]["trials"], outcome), "outcome": outcome}
    summary = summarise(per_task)
    cfg = common.quickstart()
    p = cfg.pipeline
    counts = ", ".join(f"{t} {len(recorded[t]['trials'])}" for t in TASKS)
    lines = [f"Unpruned quickstart studies (pruner none, TPE seed 0, baselines on, tracking off, "
             f"{p.finetune_epochs}+{p.distill_epochs}+{p.retrain_epochs}/generation epochs), "
             f"{recorded[TASKS[0]]['n_trials']} finished trials per task, {source}; COMPLETE trials kept: {counts}. "
             "Each configuration replays the same recorded trials in trial-number order through a real Optuna "
             "pruner (in memory, no retraining), asked only at `study.space.pruning.is_decision_step`; baselines "
             "report but are never asked. The sequence is held fixed: a real pruned study's sampler would have "
             "proposed other trials after each prune.", "",
             "Configurations: `median`/`pct25` = MedianPruner / PercentilePruner(percentile=25), `sN` = "
             "n_startup_trials N, n_warmup_steps 1 unless `from9` (n_warmup_steps 9: only after the distill stage), "
             f"`wK` = `study.pruner.stage_warmup` K, `ends` = stage_warmup {ENDS} (stage ends only), `min4` = "
             "n_min_trials 4 (no verdict at a step fewer than 4 finished trials reached), `patience0` = wrapped in "
             "PatientPruner(patience=0) (never stop a trial that improved at that step). The rows with `patience0`, "
             "`min4` or `from9` were picked from an offline grid over these same recordings, so their figures "
             "flatter them.", "",
             f"Figures: epochs = steps reported before the prune (all steps if never pruned) / all steps of the "
             f"unpruned curves (target <= {100 * TARGET_SHARE:.0f}%); top-quartile stopped = pruned trials among "
             f"those whose final value is >= the 75th percentile of all kept trials (target 0); fairness = within "
             f"each quartile (by rank) of non-baseline final values, max / min prune rate over the actions used by "
             f">= 2 trials of that bin, worst bin reported (target <= {TARGET_FAIR}). Bins hold ~7 trials, so one "
             "trial moves a rate by ~15 points: read the ratios as coarse.", ""]
    head = ("| config | epochs | top-quartile stopped | worst fairness | pruned freeze | pruned finetune | "
            "pruned replace |", "|---|---:|---:|---:|---:|---:|---:|")
    for task in TASKS:
        lines += [f"**{task}**", "", *head]
        for label, f in per_task[task].items():
            lines.append(f"| {label} | {100 * f['share']:.0f}% | {len(f['top_stopped'])}/{f['top_total']} | "
                         f"{ratio_text(f['fair_worst'])} | "
                         + " | ".join(rate_text(*f["rates"][a]) for a in ACTIONS) + " |")
        lines.append("")
    lines += ["**Mean over the three tasks** (top-quartile stopped and prune rates summed over tasks; a target is met "
              "only if met on every task)", "",
              "| config | epochs (mean) | top-quartile stopped | fairness mean / worst | pruned freeze "
              "| pruned finetune | pruned replace | pruned at last step | targets epochs / top-q / fair |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for label, s in summary.items():
        lines.append(f"| {label} | {100 * s['share']:.0f}% | {s['top_stopped']}/{s['top_total']} | "
                     f"{ratio_text(s['fair_mean'])} / {ratio_text(s['fair_max'])} | "
                     + " | ".join(rate_text(*s["rates"][a]) for a in ACTIONS) + f" | {s['at_last']} | "
                     + " / ".join("met" if s["met"][k] else "missed" for k in ("share", "top", "fair")) + " |")
    # The default was chosen on these tables: no top-quartile trial stopped first, then fairness, then epochs.
    best = next(label for label in CONFIGS if label.endswith("(default)"))
    s, (name, kwargs, patience, warmup) = summary[best], CONFIGS[best]
    over = "" if s["met"]["share"] else f", {100 * (s['share'] - TARGET_SHARE):.0f} points over"
    unfair = "" if s["met"]["fair"] else f", target {TARGET_FAIR}"
    lines += ["", f"The quickstart default, against the three targets: **{best}** = pruner `{name}` kwargs `{kwargs}`"
              f"{f', patience {patience}' if patience >= 0 else ''}, stage_warmup {warmup}: epochs "
              f"{100 * s['share']:.0f}% ({common.verdict(s['met']['share'])}{over}), "
              f"top-quartile stopped {s['top_stopped']}/{s['top_total']} ({common.verdict(s['met']['top'])}), "
              f"worst fairness ratio {ratio_text(s['fair_max'])} ({common.verdict(s['met']['fair'])}{unfair})."]
    pred = {t: predictability(recorded[t]["trials"]) for t in TASKS}
    def each(k, key):
        return "/".join(f"{100 * pred[t][k][key]:.0f}%" if key == "oracle_share" else f"{pred[t][k][key]:.2f}"
                        for t in TASKS)

    lines += ["", f"Why the targets pull against each other (per task, {'/'.join(TASKS)}): an oracle that runs the "
              f"baselines and the top-quartile trials in full and stops every other trial after its first epoch "
              f"spends {each(1, 'oracle_share')} of the epochs, after the finetune stage (step 3) "
              f"{each(3, 'oracle_share')}; so <= {100 * TARGET_SHARE:.0f}% with no top-quartile trial stopped needs "
              f"a perfect verdict after 1 epoch. But the step-1 value ranks trials poorly (Spearman with the final "
              f"value {each(1, 'spearman')}; at step 3 {each(3, 'spearman')}), so any pruner that saves that much "
              f"stops good trials. 'pruned at last step' counts trials stopped at "
              f"their own last step, which saves nothing and loses a finished result."]
    reasons = why(best, per_task, recorded)
    if reasons:
        lines += ["", "Where it misses:", *[f"- {r}" for r in reasons]]
    figs = {"n_trials": recorded[TASKS[0]]["n_trials"], "best": best, "summary": summary, "predictability": pred,
            "per_task": {t: {c: {k: v for k, v in f.items() if k != "outcome"} for c, f in fs.items()}
                         for t, fs in per_task.items()}}
    return common.Section("6. Pruning regret (bench/pruning_regret.py)", figs, lines)


def main() -> None:
    import time

    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--replay-only", action="store_true", help="skip the studies; replay bench/out/*.json")
    args = p.parse_args()
    started, load_start = time.time(), common.load()
    section = common.timed(run, args)
    print(section.text())
    common.write_results([section], args.device, started, load_start, args.results)
    print(f"\nwritten to {args.results}")


if __name__ == "__main__":
    main()
