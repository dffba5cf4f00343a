"""Storages and workers: Optuna storages (and waiting out a database outage), creating and loading studies, the
worker loop, its progress, machine faults and Optuna's internals."""
