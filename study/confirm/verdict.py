"""The verdict of a confirmation: which configuration to use, from the confirmation runs alone.

The winner is the confirmed top configuration with the best mean target *val* accuracy (selection never sees test
data). It is then compared with EACH baseline on target *test* accuracy, seed by seed (the same seeds, so the same
splits and teachers: a paired comparison): the mean paired difference and its 95% Student-t interval. Against one
baseline the winner *beats* it (interval above 0), *ties* it (interval contains 0, or one seed: no interval) or
*loses* to it (interval below 0).

The answer ("use X") is the winner when it beats or ties every baseline. Otherwise it is the baseline(s) that beat
the winner and that no other baseline beats (named together when several tie); the one registered as the study's
model among tied baselines is the one with the best mean target val accuracy. No baseline is ever picked by a
validation difference alone.

Intervals: the 95% Student-t interval of the mean, mean +- t(0.975, n-1) * sd / sqrt(n), clipped to the range the
quantity can take ([0, 1] for an accuracy, [-1, 1] for a difference of two), so an interval never claims an
accuracy above 100%. With few seeds and accuracies near 0 or 1 the clipped side is conservative, not exact.
"""

from __future__ import annotations

import math

from objectives.params import PARAMS, recorded, split_layers
from study.space.baselines import BASELINES

LEVEL = 0.95
ACCURACY = (0.0, 1.0)
DIFFERENCE = (-1.0, 1.0)


def t_interval(values: list[float], bounds: tuple[float, float] | None = None) -> list[float] | None:
    """The 95% Student-t interval of the mean (None below two values), clipped to `bounds` when given. Written out
    rather than `scipy.stats.t.interval`, which answers NaN for seeds that all agree (zero spread), where the
    interval is the mean itself."""
    from scipy import stats

    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.5 + LEVEL / 2, n - 1) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return [low, high]


def mean(values: list[float]) -> float | None:
    """The plain mean (None for no values)."""
    return sum(values) / len(values) if values else None


def outcome(ci: list[float] | None) -> str:
    """beats / ties / loses for a paired difference's interval (no interval: ties, nothing can be told apart)."""
    if ci is not None and ci[0] > 0:
        return "beats"
    if ci is not None and ci[1] < 0:
        return "loses"
    return "ties"


def compare(runs: dict, role: str, other: str) -> dict:
    """`role` against `other` on target test accuracy, paired by seed: seeds, mean difference, interval, outcome."""
    seeds = sorted(set(runs[role]["test"]) & set(runs[other]["test"]))
    diffs = [runs[role]["test"][s] - runs[other]["test"][s] for s in seeds]
    ci = t_interval(diffs, DIFFERENCE)
    return {"baseline": other, "seeds": seeds, "diff_mean": mean(diffs), "diff_ci": ci,
            "outcome": outcome(ci) if diffs else "ties"}


def verdict(configs: list[dict], runs: dict, resample: str = "none") -> dict | None:
    """The winner against every baseline and the answer (see the module docstring); None without a confirmed top
    configuration or baseline. `resample`: how the confirmation varied its seeds (named in the text)."""
    tops = [c for c in configs if c["role"].startswith("top-")]
    bases = [c for c in configs if c["role"] in BASELINES]
    if not tops or not bases:
        return None
    winner = max(tops, key=lambda c: (c["target_val_mean"], -c["trial"]))
    comparisons = [compare(runs, winner["role"], b["role"]) for b in bases]
    lost = [c for c in comparisons if c["outcome"] == "loses"]
    if lost:
        recommended = _recommended_baselines(runs, bases, [c["baseline"] for c in lost])
        answer = max((b for b in bases if b["role"] in recommended),
                     key=lambda b: (b["target_val_mean"], -list(BASELINES).index(b["role"])))
    else:
        recommended, answer = [], winner
    closest = min(comparisons, key=lambda c: c["diff_mean"] if c["diff_mean"] is not None else math.inf)
    seeds = sorted(set().union(*(c["seeds"] for c in comparisons)))
    text = _text(winner, comparisons, recommended, len(seeds), resample)
    return {"text": text, "winner_trial": None if lost else winner["trial"], "best_trial": winner["trial"],
            "beats": not lost, "comparisons": comparisons, "recommended_baselines": recommended,
            "answer": {"role": answer["role"], "trial": answer["trial"], "choices": answer["choices"],
                       "kind": "baseline" if lost else "configuration"},
            "baseline": closest["baseline"], "diff_mean": closest["diff_mean"], "diff_ci": closest["diff_ci"],
            "seeds": seeds, "resample": resample}


def _recommended_baselines(runs: dict, bases: list[dict], beat_winner: list[str]) -> list[str]:
    """Of the baselines that beat the winner, those no other baseline beats (all of them, should that leave none)."""
    unbeaten = [b for b in beat_winner
                if not any(compare(runs, o["role"], b)["outcome"] == "beats" for o in bases if o["role"] != b)]
    return unbeaten or beat_winner


def _points(c: dict) -> str:
    if c["diff_mean"] is None:
        return "no common seeds"
    ci = c["diff_ci"]
    return f"{100 * c['diff_mean']:+.1f} points" + (f", 95% CI [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci
                                                   else ", one seed: no interval")


def _text(winner: dict, comparisons: list[dict], recommended: list[str], seeds: int, resample: str) -> str:
    detail = "; ".join(f"{_verb(c['outcome'])} {c['baseline']} ({_points(c)})" for c in comparisons)
    tail = f"target test accuracy, {seeds} seeds, resample: {resample}"
    if not recommended:
        return f"use {describe(winner['choices'])} (trial {winner['trial']}): {detail} [{tail}]"
    tied = f"; {' and '.join(recommended)} are tied with each other" if len(recommended) > 1 else ""
    return (f"use {' or '.join(recommended)}: no searched configuration beats every baseline; the best one "
            f"(trial {winner['trial']}, {describe(winner['choices'])}) {detail}{tied} [{tail}]")


def _verb(result: str) -> str:
    return {"beats": "beats", "ties": "ties", "loses": "loses to"}[result]


def describe(flat: dict) -> str:
    """`stem=finetune block1=replace ..., alpha 0.7, T 3.2` for a configuration's choices."""
    layers = " ".join(f"{g}={a}" for g, a in split_layers(flat)[0].items())
    parts = [layers]
    if recorded(flat, "recipe") != "distill":
        parts.append(f"recipe {flat['recipe']}")
    elif PARAMS["temperature"].is_active(flat):  # T shown only where it shaped a KD term
        parts.append(f"alpha {flat['alpha']:.2g}, T {flat['temperature']:.2g}")
    else:
        parts.append("alpha 0")
    return ", ".join(parts)
