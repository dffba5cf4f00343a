"""The Optuna side: config, search space, storages, workers, MLflow tracking and reports.

`cli.py` calls into this package; it calls into `objectives` (the pipeline), never the other way round.
"""
