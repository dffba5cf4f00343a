"""`trial replay`'s verdict: a replayed trial next to what the study stored of it, compared bit for bit.

A replay is identical only when everything the trial stored and the replay recomputes is exactly equal: the value,
the delivered weights (`model_hash`, when stored) and every per-epoch target validation accuracy the trial reported
(its curve). A pruned trial delivered no model: its curve up to the step where it was pruned is compared (the
replay runs to the end). Nothing is rounded: one changed bit of the weights is a difference, even where the
accuracies agree (on small validation sets they often do).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from objectives.pipeline import TrialResult


@dataclass
class Replayed:
    """One replay and the stored record it is compared with."""

    result: TrialResult
    stored_value: float | None  # the trial's value (a pruned trial's: its last reported accuracy)
    stored_hash: str | None = None  # None: pruned (no model delivered) or stored before weights were hashed
    stored_curve: dict[int, float] = field(default_factory=dict)  # step -> reported target val acc
    curve: dict[int, float] = field(default_factory=dict)  # the replay's
    pruned: bool = False

    @property
    def delta(self) -> float | None:
        """Replayed minus stored value (None where either is missing, or for a pruned trial)."""
        if self.pruned or self.stored_value is None:
            return None
        return self.result.value - self.stored_value

    def differences(self) -> list[str]:
        """What differs, one phrase each; empty when the replay is bit-identical."""
        found = []
        if not self.pruned and self.result.value != self.stored_value:
            found.append(f"value {self.stored_value} stored, {self.result.value} replayed (delta {self.delta:+.6g})")
        if not self.pruned and self.stored_hash is not None and self.result.model_hash != self.stored_hash:
            found.append(f"weights differ (model_hash {self.stored_hash} stored, {self.result.model_hash} replayed)")
        for step, value in sorted(self.stored_curve.items()):
            if self.curve.get(step) != value:
                found.append(f"target val acc at step {step}: {value} stored, {self.curve.get(step)} replayed")
                break  # the first point that differs; every later one follows from it
        return found

    @property
    def identical(self) -> bool:
        """Bit-identical: value, weights (when stored) and the stored curve."""
        return not self.differences()

    def compared(self) -> str:
        """What was compared, for the verdict line."""
        parts = ["curve up to the pruned step"] if self.pruned else \
            ["value"] + (["weights"] if self.stored_hash is not None else [])
        if not self.pruned and self.stored_curve:
            parts.append(f"{len(self.stored_curve)} per-epoch accuracies")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        """The comparison's fields of `trial replay --json` (beside the replayed result's own)."""
        return {"stored_value": self.stored_value, "stored_model_hash": self.stored_hash, "pruned": self.pruned,
                "delta": self.delta, "identical": self.identical, "differences": self.differences()}
