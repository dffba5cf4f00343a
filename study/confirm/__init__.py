"""Confirmation: the top configurations and the baselines re-run on fresh seeds, and the verdict."""
