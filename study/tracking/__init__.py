"""Tracking: what the objective tells a tracker. `NullTracker` records nothing; `mlflow_tracker.MlflowTracker`
records to MLflow (its writes go through `writer.BackgroundWriter`). Every method takes explicit ids, so threads
never share an "active run". Importing this package does not import MLflow (it costs seconds)."""

from __future__ import annotations

import os

DEFAULT_URI = "sqlite:///mlflow.db"


def tracking_uri(config) -> str:
    """`tracking.mlflow_uri`, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db (MLflow's own default); without
    credentials, which go to this process's environment (`access.take_credentials`)."""
    from study.tracking.access import take_credentials

    return take_credentials(config.tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI)


def make_tracker(config):
    """The MLflow tracker, or a NullTracker when tracking is off."""
    if not config.tracking.enabled:
        return NullTracker()
    from study.tracking.mlflow_tracker import MlflowTracker

    return MlflowTracker(config)


class NullTracker:
    """Tracking disabled (`tracking.enabled: false`)."""

    def prepare_study(self, study, config) -> None:
        """Called by `study create`: a real tracker initialises its store, the experiment and the parent run."""

    def start_study(self, study, config, total: int | None = None) -> None:
        """Called once per worker before its first trial; `total` is the count of finished trials it runs to."""

    def log_teacher(self, info, model) -> None:
        """Called with each trial's teacher (and donor); a real tracker logs each distinct one once."""

    def start_trial(self, trial, choices) -> str | None:
        """Open the trial's run when it starts; returns the run id (None when not tracking)."""
        return None

    def log_epoch(self, run_id, stage: str, step: int, metrics: dict) -> None:
        """Per-epoch metrics of a stage, on the global step axis."""

    def end_trial(self, run_id, trial, state: str, result=None, reason: str | None = None,
                  value: float | None = None) -> None:
        """Close the trial's run: state is COMPLETE, PRUNED, FAIL or KILLED; a COMPLETE trial comes with its
        result and its (first) objective value."""

    def end_study(self, study, interrupted: bool = False, storage_lost: str | None = None) -> None:
        """Called when a worker stops (`interrupted`: by a signal, so it must not wait long; `storage_lost`: why
        the Optuna storage stayed unreachable, so the study's trials cannot be read)."""
