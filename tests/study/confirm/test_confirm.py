"""Confirmation: the top configurations and the baselines re-run on fresh seeds in a companion study, the interval
arithmetic, and the verdict (picked on validation accuracy, judged on test accuracy seed by seed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from scipy import stats

from cli import main
from study.confirm.confirmation import t_interval, verdict

REPO = Path(__file__).resolve().parents[3]
QUICKSTART = str(REPO / "examples" / "quickstart.yaml")


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


# ---- the arithmetic -----------------------------------------------------------------------------------------------
def test_t_interval_is_students_t_interval_of_the_mean():
    values = [0.71, 0.74, 0.69, 0.77, 0.72]
    want = stats.t.interval(0.95, len(values) - 1, loc=stats.tmean(values), scale=stats.sem(values))
    assert t_interval(values) == pytest.approx(list(want), rel=1e-12)
    assert t_interval([0.5]) is None


def _runs(test: dict, val: dict) -> tuple[list[dict], dict]:
    """configs and runs as `summarize` builds them, from role -> per-seed target test / val accuracy."""
    runs = {role: {"test": dict(enumerate(test[role], 1)), "val": dict(enumerate(val[role], 1))} for role in test}
    configs = [{"role": role, "trial": i, "target_val_mean": sum(val[role]) / len(val[role]),
                "choices": {"layers.stem": "finetune", "layers.head": "replace", "alpha": 0.7, "temperature": 3.2,
                            "recipe": "distill"}}
               for i, role in enumerate(test)]
    return configs, runs


def test_verdict_names_a_winner_only_when_it_beats_or_ties_every_baseline():
    base = [0.70, 0.72, 0.69, 0.71, 0.73]
    configs, runs = _runs({"top-1": [b + d for b, d in zip(base, [0.04, 0.05, 0.03, 0.045, 0.04])],
                           "finetune-all": base, "head-only": [0.3] * 5},
                          {"top-1": [0.8] * 5, "finetune-all": [0.75] * 5, "head-only": [0.3] * 5})
    v = verdict(configs, runs, resample="splits")
    assert v["beats"] and v["winner_trial"] == 0 and v["baseline"] == "finetune-all"
    assert v["answer"]["role"] == "top-1" and v["answer"]["kind"] == "configuration"
    assert v["diff_mean"] == pytest.approx(0.041)
    assert [(c["baseline"], c["outcome"]) for c in v["comparisons"]] == [("finetune-all", "beats"),
                                                                          ("head-only", "beats")]
    assert v["text"].startswith("use stem=finetune head=replace, alpha 0.7, T 3.2 (trial 0): beats finetune-all "
                                "(+4.1 points, 95% CI [+3.2, +5.0]); beats head-only")
    assert v["text"].endswith("[target test accuracy, 5 seeds, resample: splits]")
    # The same margin on average, but noisy: the interval crosses 0, a tie, and a tie is enough to say "use".
    configs, runs = _runs({"top-1": [b + d for b, d in zip(base, [0.15, -0.08, 0.12, -0.06, 0.075])],
                           "finetune-all": base},
                          {"top-1": [0.8] * 5, "finetune-all": [0.75] * 5})
    v = verdict(configs, runs)
    assert v["comparisons"][0]["outcome"] == "ties" and v["answer"]["role"] == "top-1"
    assert "ties finetune-all" in v["text"] and v["text"].endswith("resample: none]")


def test_a_winner_that_loses_to_one_baseline_is_not_the_answer():
    # The winner beats head-only but loses to finetune-all-kd: use finetune-all-kd, whatever the val means say.
    base = [0.70, 0.72, 0.69, 0.71, 0.73]
    configs, runs = _runs({"top-1": base, "head-only": [0.3] * 5,
                           "finetune-all-kd": [b + d for b, d in zip(base, [0.04, 0.05, 0.03, 0.045, 0.04])],
                           "finetune-all": [b + d for b, d in zip(base, [0.04, 0.051, 0.03, 0.045, 0.04])]},
                          {"top-1": [0.8] * 5, "head-only": [0.3] * 5, "finetune-all-kd": [0.74] * 5,
                           "finetune-all": [0.7] * 5})
    v = verdict(configs, runs)
    assert not v["beats"] and v["winner_trial"] is None and v["answer"]["kind"] == "baseline"
    # finetune-all and finetune-all-kd tie with each other: both named, the better mean val registered.
    assert v["recommended_baselines"] == ["finetune-all-kd", "finetune-all"]
    assert v["answer"]["role"] == "finetune-all-kd"
    assert v["text"].startswith("use finetune-all-kd or finetune-all: no searched configuration beats every "
                                "baseline; the best one (trial 0, ")
    assert "loses to finetune-all-kd (-4.1 points" in v["text"] and "beats head-only" in v["text"]


def test_intervals_of_accuracies_stay_in_0_1():
    assert t_interval([0.99, 1.0, 0.97], (0.0, 1.0))[1] == 1.0
    assert t_interval([0.0, 0.02, 0.01], (0.0, 1.0))[0] == 0.0
    assert t_interval([0.99, 1.0, 0.97])[1] > 1.0  # unclipped, the t interval would claim more than 100%


def test_the_verdict_picks_its_configurations_on_validation_never_on_test():
    # top-1 has the better test accuracy but the worse validation accuracy: the verdict must be about top-2.
    configs, runs = _runs({"top-1": [0.95] * 3, "top-2": [0.80, 0.81, 0.82], "finetune-all": [0.70, 0.70, 0.71],
                           "head-only": [0.99] * 3},
                          {"top-1": [0.70] * 3, "top-2": [0.90] * 3, "finetune-all": [0.75] * 3,
                           "head-only": [0.10] * 3})
    v = verdict(configs, runs)
    assert v["best_trial"] == 1 and [c["baseline"] for c in v["comparisons"]] == ["finetune-all", "head-only"]
    # head-only's terrible val does not matter: it beats the winner on test, seed by seed, so it is the answer.
    assert v["answer"]["role"] == "head-only"


# ---- end to end -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_study_run_confirms_on_fresh_seeds_and_ends_with_the_verdict(tmp_path, teacher_cache_dir, monkeypatch,
                                                                     mlflow_sqlite):
    monkeypatch.chdir(tmp_path)
    storage = f"sqlite:///{tmp_path / 's.db'}"
    mlflow_uri = mlflow_sqlite
    sets = ["task.max_per_domain=300", "pipeline.device=cpu", "pipeline.teacher_epochs=5", "pipeline.finetune_epochs=1",
            "pipeline.distill_epochs=1", "pipeline.retrain_epochs=1", "search.generations=0", "search.threshold=1.0",
            "study.pruner.name=none", "study.pruner.kwargs={}", f"pipeline.cache_dir={teacher_cache_dir}",
            f"study.checkpoint_dir={tmp_path / 'ck'}", f"tracking.mlflow_uri={mlflow_uri}",
            "study.confirm.top=2", "study.confirm.seeds=3",
            "study.confirm.resample=none"]  # the study's split and teacher (splits: test_confirm_resample.py)
    run = cli("study", "run", "c", "--config", QUICKSTART, "--storage", storage,
              *[a for s in sets for a in ("--set", s)], "--n-trials", 6)
    assert run.exit_code == 0, run.output
    last = run.output.strip().splitlines()[-1]
    assert last.startswith("verdict: use ") and "resample: " in last, last
    assert "confirming on fresh seeds: 15 runs in study 'c-confirm': 2 distinct configurations and 3 baselines, " \
           "3 seeds each" in run.output

    main_study = optuna.load_study(study_name="c", storage=storage)
    companion = optuna.load_study(study_name="c-confirm", storage=storage)
    runs = companion.get_trials()
    assert len(runs) == 15 and all(t.state.name == "COMPLETE" for t in runs)  # (2 top + 3 baselines) x 3 seeds
    by_number = {t.number: t for t in main_study.get_trials()}
    teacher = {t.user_attrs["teacher_key"] for t in main_study.get_trials() if "teacher_key" in t.user_attrs}
    for t in runs:
        a = t.user_attrs
        assert a["seed"] in (1, 2, 3)  # fresh: never the study's seed 0
        assert a["choices"] == a["confirm_choices"] == by_number[a["confirm_of_trial"]].user_attrs["choices"]
        assert a["teacher_key"] in teacher  # the study's teacher (and so its data splits)
    tops = [n for n, t in sorted(by_number.items()) if not t.user_attrs.get("baseline")]
    ranked = sorted(tops, key=lambda n: (-by_number[n].value, n))[:2]
    assert {t.user_attrs["confirm_of_trial"] for t in runs if t.user_attrs["confirm_role"].startswith("top-")} == \
        set(ranked)

    out = tmp_path / "r"
    assert cli("study", "report", "c", "--storage", storage, "--format", "json", "--out", out).exit_code == 0
    conf = json.loads((out / "report.json").read_text())["confirmation"]
    assert [c["role"] for c in conf["configs"]] == ["top-1", "top-2", "finetune-all", "head-only", "finetune-all-kd"]
    for c in conf["configs"]:
        assert c["seeds"] == [1, 2, 3] and len(c["target_test_ci"]) == 2
        assert c["target_test_ci"][0] <= c["target_test_mean"] <= c["target_test_ci"][1]
        assert set(c) >= {"trial", "role", "seeds", "target_test_mean", "target_test_ci", "target_val_mean"}
    assert set(conf["verdict"]) >= {"text", "winner_trial", "baseline", "diff_mean", "diff_ci", "comparisons"}
    assert last == f"verdict: {conf['verdict']['text']}"
    md = cli("study", "report", "c", "--storage", storage, "--format", "md", "--out", tmp_path / "m")
    assert md.exit_code == 0
    text = (tmp_path / "m" / "report.md").read_text()
    assert text.index("## Verdict and confirmation") < text.index("## Winner vs baselines")
    _every_surface_names_the_answer(tmp_path, storage, mlflow_uri, conf["verdict"])

    # Optuna's own tools see the companion study in the same storage.
    optuna_bin = Path(sys.executable).with_name("optuna")
    listed = subprocess.run([str(optuna_bin), "studies", "--storage", storage], capture_output=True, text=True)
    assert listed.returncode == 0 and "c-confirm" in listed.stdout
    # A confirmation run replays exactly (its fresh run seed, the study's splits and teacher).
    replay = json.loads(cli("trial", "replay", "c-confirm", 4, "--storage", storage, "--json").output)
    assert replay["value"] == replay["stored_value"] and replay["run_seed"] == runs[4].user_attrs["seed"]
    # Confirming again resumes: nothing left to run, the same verdict.
    again = cli("study", "confirm", "c", "--storage", storage)
    assert again.exit_code == 0 and again.output.strip().splitlines()[-1] == last
    assert len(optuna.load_study(study_name="c-confirm", storage=storage).trials) == 15
    # Each run is an MLflow child run tagged distillstudy.confirm, in the study's own experiment.
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("c")
    tagged = client.search_runs([experiment.experiment_id], "tags.`distillstudy.confirm` != ''", max_results=100)
    assert len(tagged) == 15 and {r.data.tags["distillstudy.confirm"] for r in tagged} == \
        {"top-1", "top-2", "finetune-all", "head-only", "finetune-all-kd"}
    # Named apart from the search's `trial N` runs: the configuration and the seed.
    by_role_seed = {(t.user_attrs["confirm_role"], t.user_attrs["seed"]): t for t in runs}
    for r in tagged:
        role = r.data.tags["distillstudy.confirm"]
        seed = int(r.info.run_name.rsplit(" seed ", 1)[1])
        assert by_role_seed[(role, seed)]  # the name's seed is the run's own
        assert r.info.run_name.startswith(f"confirm {role}") and not r.info.run_name.startswith("trial")
        if role.startswith("top-"):
            assert "=" in r.info.run_name  # the layer actions of the configuration
    # Every confirmation run links the teacher's own run, never a search trial that used the same teacher.
    for r in tagged:
        teacher_run = client.get_run(r.data.tags["distillstudy.teacher_run_id"])
        assert teacher_run.data.tags["distillstudy.role"] == "teacher", teacher_run.info.run_name


def _every_surface_names_the_answer(tmp_path, storage: str, mlflow_uri: str, verdict: dict) -> None:
    """`study best`, `study compare`, the report's highlighted row, the parent run and `models:/c-best/latest` all
    name the verdict's configuration."""
    from mlflow import MlflowClient

    chosen = verdict["answer"]
    best = json.loads(cli("study", "best", "c", "--storage", storage, "--json").output)
    assert best["answer"]["state"] == "confirmed" and best["answer"]["role"] == chosen["role"]
    assert best["best"]["number"] == chosen["trial"]
    text = cli("study", "best", "c", "--storage", storage).output
    assert text.startswith("answer (confirmed, 3 seeds, resample: ") and verdict["text"] in text
    compare = json.loads(cli("study", "compare", "c", "--storage", storage, "--json").output)["studies"][0]
    assert compare["winner_trial"] == chosen["trial"] and compare["answer"].startswith("confirmed: use ")
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["winner"]["number"] == chosen["trial"] and report["answer"]["role"] == chosen["role"]
    md = (tmp_path / "m" / "report.md").read_text()
    winner_rows = md[md.index("## Winner vs baselines"):].split("## ")[1]
    highlighted = [line for line in winner_rows.splitlines() if line.startswith("| **")]
    assert len(highlighted) == 1 and f"**{chosen['trial']}**" in highlighted[0], highlighted

    client = MlflowClient(mlflow_uri)
    parent = client.get_run(optuna.load_study(study_name="c", storage=storage).user_attrs["mlflow_parent_run_id"])
    assert parent.data.tags["distillstudy.answer_state"] == "confirmed"
    assert parent.data.tags["distillstudy.verdict"] == verdict["text"]
    assert parent.data.tags["distillstudy.answer_role"] == chosen["role"]
    latest = max(client.search_model_versions("name='c-best'"), key=lambda v: int(v.version))
    assert latest.tags["distillstudy.state"] == "confirmed"
    params = client.get_run(latest.run_id).data.params
    assert params["seed"] == "1"  # the first confirmation seed (pipeline.seed + 1)
    assert {k: params[k] for k in chosen["choices"]} == {k: str(v) for k, v in chosen["choices"].items()}
    assert not client.search_registered_models("name='c-confirm-best'")


def test_confirming_a_study_without_a_completed_trial_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the parent run's artifacts go to ./mlruns: never into the checkout
    storage = f"sqlite:///{tmp_path / 's.db'}"
    assert cli("study", "create", QUICKSTART, "--name", "empty", "--storage", storage).exit_code == 0
    result = cli("study", "confirm", "empty", "--storage", storage)
    assert result.exit_code == 2 and result.stderr.strip() == \
        "error: study 'empty' has no completed non-baseline trial to confirm"
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    assert names == ["empty"]  # no companion left half-written
