"""`trial run`: one pipeline with fixed choices, no Optuna study."""

from __future__ import annotations

from objectives.pipeline import TrialResult, run_trial

from .config import Config


def run_fixed_trial(config: Config, on_epoch=None) -> TrialResult:
    """Run the pipeline with the config's default choices (pins, range defaults, first list elements)."""
    return run_trial(config.task, config.model, config.pipeline, config.search.defaults(), on_epoch=on_epoch)


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
    lines.append(f"student params: {result.student_params:,} (teacher {result.teacher_params:,}); "
                 f"teacher cache: {result.teacher.cache}; epochs trained: {result.total_epochs} of {result.budget}; "
                 f"epochs to threshold: {result.epochs_to_threshold}; "
                 f"{result.seconds:.1f} s on {result.device}")
    return "\n".join(lines)
