"""One trial: the Optuna objective, the trial record, stage checkpoints and trial replay."""
