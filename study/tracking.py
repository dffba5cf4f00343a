"""What the objective tells a tracker. `NullTracker` records nothing; `study.mlflow_tracking.MlflowTracker`
records to MLflow. Every method takes explicit ids, so threads never share an "active run"."""

from __future__ import annotations


class NullTracker:
    """Tracking disabled (`tracking.enabled: false`)."""

    def start_study(self, study, config) -> None:
        """Called once per worker before its first trial."""

    def log_teacher(self, info, model) -> None:
        """Called with each trial's teacher (and donor); a real tracker logs each distinct one once."""

    def start_trial(self, trial, choices) -> str | None:
        """Open the trial's run when it starts; returns the run id (None when not tracking)."""
        return None

    def log_epoch(self, run_id, stage: str, step: int, metrics: dict) -> None:
        """Per-epoch metrics of a stage, on the global step axis."""

    def end_trial(self, run_id, trial, state: str, result=None, reason: str | None = None) -> None:
        """Close the trial's run: state is COMPLETE, PRUNED, FAIL or KILLED."""

    def end_study(self, study) -> None:
        """Called when a worker stops."""
