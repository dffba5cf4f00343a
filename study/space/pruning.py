"""When a trial may be pruned: the decision points on the step axis.

Every student epoch is reported to Optuna (the curves are whole), but the pruner is asked only at a stage's
decision points: after `stage_warmup` epochs of the stage, and always at the stage's last step. A freshly
initialised group (a `replace` action, a born-again generation) starts every stage far behind and catches up within
it; asking the pruner in a stage's first epochs compares it with students that had a head start. `stage_warmup: 0`
asks after every epoch; a warm-up at least as long as the longest stage asks only at stage ends. The recipe's final
step is never a decision point: stopping there saves nothing and throws a finished result away. Comparisons stay
at the same step, i.e. the same point of the same stage in every trial (see `objectives.stages`).
"""

from __future__ import annotations

from objectives.stages import Stage


def is_decision_step(stages: list[Stage], step: int, stage_warmup: int) -> bool:
    """True when the pruner may stop a trial of recipe `stages` after it reported `step`."""
    for stage in stages:
        if stage.first_step <= step <= stage.last_step:
            return step != stages[-1].last_step and (step == stage.last_step or
                                                     step - stage.first_step + 1 > stage_warmup)
    return False


def decision_steps(stages: list[Stage], stage_warmup: int) -> list[int]:
    """Every decision point of a recipe's stages, in order."""
    return [s for st in stages for s in range(st.first_step, st.last_step + 1)
            if is_decision_step(stages, s, stage_warmup)]
