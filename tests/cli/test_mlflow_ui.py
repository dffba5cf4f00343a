"""What a new user sees in the MLflow UI, in a real browser: a real `mlflow server`, a tiny study tracked to it, and
the link the study prints opened in headless Chromium with a fresh profile (no saved choice of view). It must land
on the model-training runs table with the study's columns, not on MLflow 3's GenAI view (traces), which is where
the bare experiment page opens in a fresh browser."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess

import pytest
from click.testing import CliRunner
from mlflow_server import mlflow_server

from cli import main
from study.commands import QUICKSTART

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                reason="chromium not installed (apt-get install -y chromium): the MLflow UI is not "
                                       "opened in a browser")


def page_text(url: str, profile) -> str:
    """The page's visible text once its scripts have run (a virtual-time budget lets the UI fetch and render)."""
    proc = subprocess.run(
        [CHROMIUM or "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
         "--window-size=2400,1000",  # wide enough that the table renders every column (it virtualises them)
         "--virtual-time-budget=30000", "--dump-dom", url], capture_output=True, text=True, timeout=240)
    dom = re.sub(r"<script.*?</script>|<style.*?</style>", "", proc.stdout, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())


def test_the_printed_link_lands_on_the_runs_table_with_the_value_column(tmp_path, teacher_cache_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with mlflow_server(tmp_path) as (url, _):
        sets = ["task.max_per_domain=300", "pipeline.device=cpu", "pipeline.cpu_threads=1",
                "pipeline.teacher_epochs=1", "pipeline.finetune_epochs=1", "pipeline.distill_epochs=1",
                "pipeline.retrain_epochs=1", "search.generations=0", "study.baselines=false", "study.confirm.top=0",
                "study.pruner.name=none", "study.pruner.kwargs={}", f"pipeline.cache_dir={teacher_cache_dir}",
                f"study.checkpoint_dir={tmp_path / 'ck'}", f"tracking.mlflow_uri={url}", "tracking.log_weights=none",
                "tracking.register_best=false"]
        run = CliRunner().invoke(main, ["study", "run", "ui", "--config", str(QUICKSTART), "--storage",
                                        f"sqlite:///{tmp_path / 's.db'}", "--n-trials", "2",
                                        *[a for s in sets for a in ("--set", s)]], catch_exceptions=False)
        assert run.exit_code == 0, run.output
        links = re.findall(r"browse the trials: open (\S+)", run.stdout)
        assert len(links) == 1 and links[0].startswith(f"{url}/#/experiments/"), run.stdout

        text = page_text(links[0], tmp_path / "profile")
    assert "Run Name" in text and "trial 0" in text and "trial 1" in text, text[:2000]  # the runs table
    header = text[text.index("Run Name"):text.index("trial 0")]
    for name in ("value", "target_val_acc", "target_test_acc", "layers.head"):  # the study's columns
        assert re.search(rf"(^|\s){re.escape(name)}(\s|$)", header), (name, header)
    assert "Sort: value" in text, text[:2000]
    assert "Traces 0" not in text and "Observability" not in text, text[:2000]  # not the GenAI overview
