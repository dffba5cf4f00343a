"""The one set of tiny settings the end-to-end tests start from: a trial of about a second on one CPU core (every
stage one epoch, 300 images per domain, no born-again rounds, no confirmation).

Its teacher settings are those of conftest's `tiny_pipeline` (teacher_epochs 1, batch size 64, seed 0, the same
capped task), so a test through the CLI and a test of the pipeline in-process need the same teacher: with the
session's `teacher_cache_dir` it is trained once per test run. A test that varies a teacher setting trains (and
caches) another teacher; vary it only where the test is about it.
"""

from __future__ import annotations

TINY = ["task.max_per_domain=300", "pipeline.device=cpu", "pipeline.cpu_threads=1", "pipeline.teacher_epochs=1",
        "pipeline.finetune_epochs=1", "pipeline.distill_epochs=1", "pipeline.retrain_epochs=1",
        "search.generations=0", "study.confirm.top=0"]


def options(items: list[str]) -> list[str]:
    """`--set` options for the CLI: ["a=1", "b=2"] -> ["--set", "a=1", "--set", "b=2"]."""
    return [arg for item in items for arg in ("--set", item)]
