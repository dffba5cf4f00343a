"""Everything the CLI prints about trials and studies, formatted in one place (the commands only gather the data).

`study report` renders its own HTML/Markdown (study.report.render); this module is the terminal's text.
"""

from __future__ import annotations

import optuna

from objectives.params import PARAMS, recorded, split_layers
from objectives.pipeline import TrialResult
from study.trials.record import TrialRecord

_SHORT = {"finetune": "ft", "freeze": "fr", "replace": "rp", "adapt": "ad"}


def format_trial_line(trial: optuna.trial.FrozenTrial) -> str:
    """`trial   7 COMPLETE 0.8613 stem=ft block1=fr ... alpha=0.42 T=3.1 lr=0.0021 dann*0.31  3.2s` (the layer
    term and its beta when one ran)."""
    r = TrialRecord(trial)
    value = "/".join(f"{v:.4f}" for v in trial.values) if trial.values else "-"
    if trial.state == optuna.trial.TrialState.PRUNED and trial.intermediate_values:
        last = max(trial.intermediate_values)
        value = f"{trial.intermediate_values[last]:.4f}@{last}"
    choices = r.choices
    layers = " ".join(f"{g}={_SHORT.get(a, a)}" for g, a in r.layers.items())
    shown = ["alpha", "temperature", "lr"] if PARAMS["temperature"].is_active(choices) else ["alpha", "lr"]
    extra = " ".join(f"{'T' if k == 'temperature' else k}={choices[k]:.3g}" for k in shown if k in choices)
    if PARAMS["beta"].is_active(choices) and choices.get("beta"):  # a layer term ran
        extra = f"{extra} {choices['layer_term']}*{choices['beta']:.2g}"
    if recorded(choices, "recipe") != "distill" and not r.baseline:
        extra = f"recipe={choices['recipe']} {extra}"
    tag = f" [{r.baseline}]" if r.baseline else ""
    why = f"  ({r.failure})" if r.failure else ""
    seconds = f"{r.get('seconds'):.1f}s" if r.get("seconds") is not None else ""
    return f"trial {trial.number:>3} {trial.state.name:<8} {value:<10} {layers} {extra} {seconds}{tag}{why}"


def format_stage_lines(trial: optuna.trial.FrozenTrial) -> list[str]:
    """`--verbose`: each stage's source and target validation accuracy and epochs."""
    return [f"        {stage:<10} source val {acc['source_val_acc']:.3f}  target val {acc['target_val_acc']:.3f}  "
            f"epochs {acc['epochs']}" for stage, acc in TrialRecord(trial).stages.items()]


def format_value(value) -> str:
    """An objective value as shown: accuracies to 4 decimals, whole numbers (parameters, epochs) as integers, a
    Pareto front's values as lists, '-' for none yet."""
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1:
        return str(int(value))
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def format_epochs_to_threshold(epochs) -> str:
    """`epochs to threshold`: the first epoch at the threshold, or that it was never reached."""
    return "not reached" if epochs is None else str(epochs)


def format_list(rows: list[dict]) -> str:
    if not rows:
        return "no studies"
    out = [f"{'study':<24}{'complete':>9}{'pruned':>8}{'fail':>6}{'running':>9}{'waiting':>9}  best"]
    for r in rows:
        out.append(f"{r['name']:<24}{r['COMPLETE']:>9}{r['PRUNED']:>8}{r['FAIL']:>6}{r['RUNNING']:>9}"
                   f"{r['WAITING']:>9}  {format_value(r['best'])}")
    return "\n".join(out)


def format_status(data: dict) -> str:
    counts = ", ".join(f"{n} {s.lower()}" for s, n in data["counts"].items() if n) or "no trials"
    lines = [f"study '{data['name']}': {counts}", f"best so far: {format_value(data['best'])}"]
    for r in data["running"]:
        lines.append(f"  running trial {r['number']} for {r['age_s']} s")
    return "\n".join(lines)


def _trial_lines(row: dict, label: str) -> list[str]:
    """A trial row of `study best`: what it delivered and its accuracies, layer actions, hyperparameters that
    mattered (no T with alpha 0, no unused slim width), size."""
    layers, others = split_layers({k.removeprefix("choice."): v for k, v in row.items() if k.startswith("choice.")})
    active = row.get("active")
    hyper = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in others.items() if active is None or k in active)
    layers = ", ".join(f"{g}={a}" for g, a in layers.items())
    stage = row.get("best_stage", "")
    acc = {k: row.get(f"{stage}.{k}") for k in ("source_val_acc", "target_val_acc", "target_test_acc")}
    accs = "  ".join(f"{k} {v:.4f}" for k, v in acc.items() if v is not None)
    delivered = f"; delivered: {row['delivered']}" if row.get("delivered") else ""
    return [f"{label} trial {row['number']} (delivers stage {stage}{delivered}): {accs}",
            f"    layers: {layers}", f"    {hyper}", f"    student params {row.get('student_params')}, "
            f"epochs to threshold {format_epochs_to_threshold(row.get('epochs_to_threshold'))}"]


def format_best(data: dict) -> str:
    """The study's answer (the confirmation's verdict, else the search's best trial labelled unconfirmed) with
    its layer actions, hyperparameters and accuracies, the baselines beside it."""
    lines = []
    answer = data.get("answer") or {}
    if "pareto_front" in data:
        lines.append(f"Pareto front ({', '.join(data['objective'])}):")
        for row in data["pareto_front"]:
            lines += _trial_lines(row, f"  values {format_value(row['values'])}")
    elif answer.get("state") == "confirmed":
        lines += _confirmed_lines(data, answer)
    else:
        lines += _trial_lines(data["best"], "winner: (unconfirmed)")
    for row in data["baselines"]:
        lines += _trial_lines(row, f"baseline {row['baseline']}:")[:1]
    if answer.get("state") == "unconfirmed":
        lines.append(f"unconfirmed: the search's best on one seed and one validation split; re-run it on fresh "
                     f"seeds against the baselines with `{answer['confirm']}`")
    return "\n".join(lines)


def _confirmed_lines(data: dict, answer: dict) -> list[str]:
    c = answer["confirmation"]
    ci = c["target_test_ci"]
    lines = [f"answer (confirmed, {len(c['seeds'])} seeds, resample: {answer['resample']}): use "
             f"{answer['role'] if answer['kind'] == 'baseline' else answer['description']}",
             f"    target test {c['target_test_mean']:.4f}" + (f" (95% CI [{ci[0]:.4f}, {ci[1]:.4f}])" if ci else "")
             + f", target val {c['target_val_mean']:.4f}, mean over the confirmation seeds",
             f"    verdict: {answer['text']}"]
    if data.get("best"):
        lines += _trial_lines(data["best"], "  from search")
    search = data.get("search_best")
    if search and (not data.get("best") or search["number"] != data["best"]["number"]):
        lines += _trial_lines(search, "search's best (not the answer):")[:1]
    return lines


def format_confirmation(summary: dict) -> str:
    """The confirmation table (mean target test accuracy with its 95% interval over seeds, clipped to [0, 1]; what
    its runs delivered: `distill 4, finetune 1` = four distilled models, one whose fine-tuned stage won) and the
    verdict."""
    lines = [f"confirmation ({summary['study']}, resample: {summary.get('resample', 'none')}):",
             f"  {'configuration':<16}{'trial':>6}{'seeds':>6}  {'target test (95% CI)':<28}{'target val':>10}"
             f"  delivered"]
    for c in summary["configs"]:
        ci = c["target_test_ci"]
        test = f"{c['target_test_mean']:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")
        delivered = ", ".join(f"{kind} {n}" for kind, n in sorted(c.get("delivered", {}).items()))
        lines.append(f"  {c['role']:<16}{c['trial']:>6}{len(c['seeds']):>6}  {test:<28}{c['target_val_mean']:>10.4f}"
                     f"  {delivered}")
    verdict = summary["verdict"]
    lines.append(f"verdict: {verdict['text']}" if verdict else "verdict: too few confirmation runs completed")
    return "\n".join(lines)


def format_epoch_line(stage: str, step: int, metrics: dict) -> str:
    """`trial run`'s progress line for one epoch: the stage, the step on the study's axis, the epoch's metrics."""
    names = {"target_val_acc": "target val acc", "kd_loss": "kd loss", "ce_loss": "ce loss", "layer_term": "layer term"}
    shown = ", ".join(f"{names.get(k, k)} {v:.4f}" for k, v in metrics.items())
    return f"  {stage:<12} step {step:>3}: {shown}"


def format_trial(result: TrialResult) -> str:
    """A per-stage table of source and target accuracy (the delivered stage starred, the teacher for reference),
    then the trial's value and choices."""
    lines = [f"{'stage':<12}{'steps':>8}{'epochs':>7}{'seconds':>9}{'src val':>9}{'src test':>9}{'tgt val':>9}"
             f"{'tgt test':>9}  taught by"]
    for name, s in result.stages.items():
        mark = " *" if name == result.best_stage else ""
        steps = "0" if name == "teacher" else f"{s.first_step}-{s.first_step + s.epochs - 1}"
        teacher = "(reference)" if name == "teacher" else (s.kd_teacher or "-")
        lines.append(f"{name:<12}{steps:>8}{s.epochs:>7}{s.seconds:>9.2f}{s.source_val_acc:>9.3f}"
                     f"{s.source_test_acc:>9.3f}{s.target_val_acc:>9.3f}{s.target_test_acc:>9.3f}  {teacher}{mark}")
    lines.append(f"value: target val acc of the delivered model, stage '{result.best_stage}' "
                 f"(select: {result.select}; recipe {result.recipe}): {result.value:.4f}")
    lines.append("layers: " + ", ".join(f"{g}={m['action']}" for g, m in result.layer_map.items()))
    lines += [f"adapter after {g}: {a['kind']} rank {a['rank']} on {a['channels']} channels, {a['params']:,} params"
              for g, m in result.layer_map.items() if (a := m.get("adapter"))]
    lines.append(f"student params: {result.student_params:,}, trained {result.trainable_params:,} "
                 f"(teacher {result.teacher_params:,}); "
                 f"teacher cache: {result.teacher.cache}; epochs trained: {result.total_epochs} of {result.budget}; "
                 f"epochs to threshold: {format_epochs_to_threshold(result.epochs_to_threshold)}; "
                 f"{result.seconds:.1f} s on {result.device}")
    return "\n".join(lines)


def format_replay(replayed) -> str:
    """`trial replay`'s verdict line (a `study.trials.replay.Replayed`): identical only when bit for bit."""
    head = f"stored value: {replayed.stored_value}  replayed: {replayed.result.value}"
    if replayed.pruned:
        head += "  (pruned: the stored value is its accuracy when pruned; the replay ran to the end)"
    if replayed.identical:
        return f"{head}  identical ({replayed.compared()} bit for bit)"
    return f"{head}  DIFFERENT: " + "; ".join(replayed.differences())


def format_compare(data: dict) -> str:
    """A text table: study, task, the winner's (the study's answer's) action per group, winner and best baseline
    target val acc, and whether the answer is confirmed."""
    def acc(v):
        return f"{v:.4f}" if isinstance(v, float) else "-"

    head = ["study", "task", *data["groups"], "winner", "baseline", "best baseline", "trials", "answer"]
    rows = [head]
    for r in data["studies"]:
        rows.append([r["study"], r["task"], *[r["layers"].get(g, "-") for g in data["groups"]],
                     acc(r["winner_target_val_acc"]), acc(r["best_baseline_target_val_acc"]),
                     r["best_baseline"] or "-", str(r["complete"]), r.get("answer", "unconfirmed")])
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("winner / baseline: target val acc on the search's seed of the winner (" + data["winner_rule"] +
                 ") and of the best completed baseline; answer: the confirmed verdict, or unconfirmed")
    return "\n".join(lines)


def format_tasks(rows: list[dict]) -> str:
    """`tasks list`: name, shift, image shape, split sizes (offline tasks) and description."""
    lines = []
    for r in rows:
        shape = "x".join(map(str, r["image_shape"])) if "image_shape" in r else "-"
        parts = ("source_train", "target_labeled", "target_unlabeled", "target_val", "target_test")
        sizes = "/".join(str(r["sizes"][k]) for k in parts) if "sizes" in r else "(your data)"
        lines.append(f"{r['name']:<15} {r['shift']:<8} {shape:<8} {sizes:<22} {r['description']}")
    return "\n".join(lines)


def format_models(rows: list[dict]) -> str:
    """`models list`: architecture, parameters, layer groups in order."""
    return "\n".join(f"{r['arch']:<20} {r['params']:>11,}  " + " -> ".join(g["name"] for g in r["groups"])
                     for r in rows)


def format_model_info(info: dict) -> str:
    """`models show`: each layer group with its parameters, then the total."""
    lines = [f"{g['name']:<12} {g['params']:>11,}" for g in info["groups"]]
    return "\n".join([*lines, f"{'total':<12} {info['params']:>11,}"])
