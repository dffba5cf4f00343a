"""`study report` and `study compare` on studies with KNOWN synthetic values (no training).

Each study is created by `create_study` from the quickstart config in a temporary SQLite storage. Its trials are
made through ask/tell with `suggest_choices` (layer actions fixed by enqueue_trial, so the expected tables can be
computed by hand from SPECS) and the user attributes the objective records. To keep the suite fast, ask/tell runs
on an in-memory twin of the study and the finished trials are then added to the SQLite study in one commit each
(ask/tell straight on SQLite costs a disk commit per call); the few-trials study and the RUNNING trial use the
SQLite study directly.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
import pytest
from click.testing import CliRunner
from optuna.trial import TrialState

from cli import main
from objectives.pipeline import StageResult, TrialResult
from objectives.teacher import TeacherInfo
from study.config.config import load_config
from study.report.stats import bootstrap_ci
from study.space.search import suggest_choices
from study.trials import record
from study.workers.studies import create_study

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning",
                                        "ignore:Heartbeat of storage:UserWarning")
COMPLETE, PRUNED, FAIL = TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL
GROUPS = ["stem", "block1", "block2", "head"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FEW = "fewer than two completed trials"
QUICKSTART = Path(__file__).resolve().parents[3] / "examples" / "quickstart.yaml"


@dataclass
class Spec:
    layers: str  # one letter per group: f=finetune, z=freeze, r=replace, a=adapt
    acc: float | None  # target val acc (None for a failed trial)
    state: TrialState = COMPLETE
    baseline: str = ""
    alpha: float | None = None  # fix alpha (0 = no KD, so the temperature is not sampled)
    params: int = 1000  # student size
    extra: dict = field(default_factory=dict)

    def actions(self) -> dict:
        names = {"f": "finetune", "z": "freeze", "r": "replace", "a": "adapt"}
        return {g: names[c] for g, c in zip(GROUPS, self.layers)}


SPECS_A = [  # single objective: target_val_acc
    Spec("ffff", 0.60, baseline="finetune-all", alpha=0.0),
    Spec("zzzf", 0.55, baseline="head-only"),
    Spec("fzrf", 0.72),
    Spec("zfrr", 0.66),
    Spec("rfff", 0.70),
    Spec("frzf", 0.68),
    Spec("zzfr", 0.50, PRUNED),
    Spec("rrrr", None, FAIL),
    Spec("fzrf", 0.74),
    Spec("zfzr", 0.58),
    Spec("fzzf", 0.58),
    # Enough completed trials for importances (20), all below the winner's 0.74 and block2=replace's mean.
    *[Spec(layers, acc) for layers, acc in [("ffff", 0.62), ("ffzf", 0.61), ("fzff", 0.59), ("rfzf", 0.57),
                                            ("zfff", 0.63), ("ffzr", 0.56), ("frff", 0.64), ("zzff", 0.52),
                                            ("fffr", 0.65), ("rzzf", 0.51), ("ffzz", 0.54)]],
    # Two trials that delivered the very same model: one sample in the effect table.
    Spec("fzfr", 0.60, extra={"model_hash": "same-weights"}),
    Spec("fzfr", 0.60, extra={"model_hash": "same-weights"}),
]
SPECS_B = [  # objective [student_params, target_val_acc]; stem pinned to finetune
    Spec("ffff", 0.61, params=900, baseline="finetune-all", alpha=0.0),
    Spec("fzrf", 0.70, params=500),
    Spec("frrf", 0.64, params=300),
    Spec("fzzr", 0.52, params=200),
    Spec("fffr", 0.66, params=800),
    Spec("frfz", 0.59, params=700),
]


def synthetic_result(choices, spec: Spec, number: int) -> TrialResult:
    """A TrialResult with the spec's accuracy on its delivered (distill) stage, as the pipeline would return it."""
    acc = spec.acc
    stages = {"finetune": StageResult(0.9, 0.89, acc - 0.05, acc - 0.07, epochs=3, seconds=0.5, first_step=1),
              "distill": StageResult(0.9, 0.89, acc, acc - 0.02, epochs=3, seconds=0.5, first_step=4)}
    teacher = TeacherInfo(role="teacher", key="k", cache="hit", path="", epochs=1, seconds=0.1, source_val_acc=0.95,
                          target_val_acc=0.1)
    return TrialResult(value=acc, best_stage="distill", select="best", recipe=choices.recipe, stages=stages,
                       params=choices.flat(), layer_map={}, student_params=spec.params, teacher_params=spec.params,
                       teacher=teacher, donor=None, epochs_to_threshold=4, total_epochs=6, budget=9, seconds=1.5,
                       device="cpu", run_seed=0, model_hash=spec.extra.get("model_hash", f"weights-{number}"),
                       student=None)


def run_spec(study: optuna.Study, config, spec: Spec) -> None:
    """One trial through ask/tell, recorded by the objective's own writers (study.trials.record)."""
    pinned = {g for g, acts in config.search.group_actions().items() if len(acts) == 1}
    fixed = {f"layers.{g}": a for g, a in spec.actions().items() if g not in pinned}
    if spec.alpha is not None:
        fixed["alpha"] = spec.alpha
    fixed.update(spec.extra.get("fixed", {}))
    study.enqueue_trial(fixed, user_attrs=record.baseline_attrs(spec.baseline) if spec.baseline else None)
    t = study.ask()
    choices = suggest_choices(t, config.search, config.pipeline.replace_with)
    record.write_start(t, choices, seed=0)
    if spec.state == FAIL:
        record.write_failure(t, "RuntimeError: synthetic")
        study.tell(t, state=FAIL)
        return
    multi = len(study.directions) > 1
    steps = 2 if spec.state == PRUNED else 3
    if not multi:
        for s in range(steps):
            t.report(spec.acc - 0.1 + 0.05 * s, s)
    if spec.state == PRUNED:
        record.write_pruned(t, "pruned at step 1 (synthetic)", 0.5)
        study.tell(t, state=PRUNED)
        return
    record.write_result(t, synthetic_result(choices, spec, t.number))
    values = {"target_val_acc": spec.acc, "student_params": float(spec.params), "epochs_to_threshold": 4.0,
              "source_val_acc": 0.9}
    study.tell(t, [values[o] for o in config.study.objective] if multi else spec.acc)


def make_study(url: str, name: str, specs, overrides=(), twin: bool = True):
    config = load_config(QUICKSTART, ["tracking.enabled=false", "study.baselines=false", *overrides])
    study, _ = create_study(config, name, url)
    target = optuna.create_study(directions=study.directions) if twin else study
    for spec in specs:
        run_spec(target, config, spec)
    if twin:
        study.add_trials(target.get_trials())
    return study, config


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Studies A (single objective, a RUNNING trial), B (two objectives, a pinned group), C (one completed
    trial), D (no trials) in one storage."""
    tmp = tmp_path_factory.mktemp("report")
    url = f"sqlite:///{tmp}/studies.db"
    a, _ = make_study(url, "A", SPECS_A)
    a.ask()  # a worker still running a trial
    make_study(url, "B", SPECS_B, ["search.layers.stem=finetune", "study.objective=[student_params,target_val_acc]",
                                   "task.name=digits-noise"])
    make_study(url, "C", [Spec("ffzf", 0.7), Spec("zzzf", 0.4, PRUNED)], twin=False)
    make_study(url, "D", [])
    return {"url": url, "tmp": tmp}


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def report(env, name, fmt, out=None):
    out = out or env["tmp"] / f"{name}-{fmt}"
    result = cli("study", "report", name, "--storage", env["url"], "--out", out, "--format", fmt)
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.fixture(scope="module")
def report_a_json(env):
    out, stdout = report(env, "A", "json")
    return json.loads((out / "report.json").read_text()), stdout


@pytest.fixture(scope="module")
def report_a_html(env):
    return report(env, "A", "html")


def expected_cells(specs, groups=GROUPS):
    cells, seen = {}, set()
    for s in specs:
        model = s.extra.get("model_hash")
        if s.state == COMPLETE and model not in seen:
            if model:
                seen.add(model)
            for g, a in s.actions().items():
                if g in groups:
                    cells.setdefault((g, a), []).append(s.acc)
    return cells


def hand_ci(values):
    x = np.array(values)
    rng = np.random.default_rng(0)
    means = x[rng.integers(0, len(x), size=(2000, len(x)))].mean(axis=1)
    return list(np.percentile(means, [2.5, 97.5]))


def check_group_table(groups: dict, specs):
    cells = expected_cells(specs)
    pruned = {}
    for s in specs:
        if s.state == PRUNED:
            for g, a in s.actions().items():
                pruned[(g, a)] = pruned.get((g, a), 0) + 1
    for (g, a), vals in cells.items():
        row = groups[g]["actions"][a]
        assert row["n"] == len(vals)
        assert row["mean"] == pytest.approx(np.mean(vals))
        assert row["best"] == pytest.approx(max(vals))
        assert row["pruned"] == pruned.get((g, a), 0)
        if len(vals) >= 3:  # a two-trial cell has no interval
            assert row["ci95"] == pytest.approx(hand_ci(vals))
            assert row["ci95"][0] <= row["mean"] <= row["ci95"][1]
        else:
            assert row["ci95"] is None
    for g in GROUPS:
        means = {a: np.mean(v) for (gg, a), v in cells.items() if gg == g}
        assert groups[g]["best_action"] == max(means, key=means.get)
        # every action shown has at least one completed or pruned trial
        assert set(groups[g]["actions"]) == {a for (gg, a) in [*cells, *pruned] if gg == g}


# ---- the numbers ------------------------------------------------------------------------------------------------
def test_group_table_matches_hand_computation(report_a_json):
    data, _ = report_a_json
    check_group_table(data["groups"], SPECS_A)
    assert data["groups"]["block2"]["best_action"] == "replace"  # 0.72, 0.66, 0.74
    assert data["groups"]["block1"]["actions"]["finetune"]["n"] == len(expected_cells(SPECS_A)["block1", "finetune"])
    raw = sum(1 for spec in SPECS_A if spec.state == COMPLETE and spec.layers[3] == "r")
    assert data["groups"]["head"]["actions"]["replace"]["n"] == raw - 1  # the duplicate model counted once
    assert data["bootstrap"]["resamples"] == 2000 and data["bootstrap"]["seed"] == 0


def test_adapt_and_the_layer_term_get_effect_rows(tmp_path):
    """A study searching all four actions and all four layer terms: adapt is a row of the group table, and every
    term a row of the per-choice table, counted only where sampled (a finetune-recipe trial has no term)."""
    terms = [("dann", 0.70), ("dann", 0.74), ("feature", 0.66), ("params", 0.60), ("none", 0.62), ("none", 0.58)]
    specs = [Spec("faff", acc, extra={"fixed": {"layer_term": term, "recipe": "distill"}}) for term, acc in terms]
    specs += [Spec("fzaf", 0.50, extra={"fixed": {"recipe": "finetune"}}),
              Spec("aaaa", 0.40, PRUNED, extra={"fixed": {"layer_term": "dann", "recipe": "distill"}})]
    url = f"sqlite:///{tmp_path}/e.db"
    make_study(url, "E", specs, ["search.layers.actions=[freeze, finetune, replace, adapt]",
                                 "search.layer_term=[none, feature, params, dann]",
                                 "search.recipe=[distill, finetune]"])
    result = cli("study", "report", "E", "--storage", url, "--out", tmp_path / "e", "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "e" / "report.json").read_text())
    block1 = data["groups"]["block1"]["actions"]
    assert block1["adapt"]["n"] == 6 and block1["adapt"]["mean"] == pytest.approx(np.mean([a for _, a in terms]))
    assert block1["adapt"]["pruned"] == 1 and data["groups"]["block2"]["actions"]["adapt"]["n"] == 1
    rows = data["choices"]["layer_term"]["actions"]
    assert list(rows) == ["dann", "feature", "none", "params"]
    assert {v: r["n"] for v, r in rows.items()} == {"dann": 2, "feature": 1, "none": 2, "params": 1}
    assert rows["dann"]["mean"] == pytest.approx(0.72) and rows["dann"]["pruned"] == 1
    assert data["choices"]["layer_term"]["best_action"] == "dann"
    assert {v: r["n"] for v, r in data["choices"]["recipe"]["actions"].items()} == {"distill": 6, "finetune": 1}
    md = cli("study", "report", "E", "--storage", url, "--out", tmp_path / "m", "--format", "md")
    assert md.exit_code == 0, md.output
    text = (tmp_path / "m" / "report.md").read_text()
    assert "## Per-choice effect" in text and "| **layer_term** | **dann \\*** |" in text
    assert "| layer_term | params | 1 | 0 | 0.6000 |" in text and "adapt" in text.split("## Per-group effect")[1]


def test_winner_baselines_and_counts(report_a_json):
    data, stdout = report_a_json
    w = data["winner"]
    assert w["number"] == 8 and w["target_val_acc"] == pytest.approx(0.74)
    assert w["layers"] == {"stem": "finetune", "block1": "freeze", "block2": "replace", "head": "finetune"}
    assert w["target_test_acc"] == pytest.approx(0.72) and w["source_val_acc"] == pytest.approx(0.9)
    assert w["student_params"] == 1000 and w["epochs_to_threshold"] == 4 and "lr" in w["hyperparameters"]
    assert {b["baseline"] for b in data["baselines"]} == {"finetune-all", "head-only"}
    assert data["best_baseline"]["baseline"] == "finetune-all"
    assert data["counts"]["RUNNING"] == 1 and data["counts"]["PRUNED"] == 1 and data["counts"]["FAIL"] == 1
    assert any("running" in n for n in data["notes"])
    assert FEW not in stdout


def test_importances_cover_every_parameter(report_a_json):
    imp = report_a_json[0]["importance"]
    expected = {f"layers.{g}" for g in GROUPS} | {"recipe", "alpha", "temperature", "beta", "threshold", "lr",
                                                   "source_weight", "generations", "augment"}
    # temperature is conditional (not sampled by the alpha=0 baseline) and still assessed
    assert set(imp["fanova"]) == expected and set(imp["ped_anova"]) == expected
    assert sum(imp["fanova"].values()) == pytest.approx(1.0, abs=1e-6)
    assert all(v >= 0 for v in [*imp["fanova"].values(), *imp["ped_anova"].values()])
    assert sum(imp["ped_anova"].values()) == pytest.approx(1.0, abs=1e-6) or not any(imp["ped_anova"].values())
    assert imp["n_trials"] == 22 and imp["dropped_trials"] == 0


def test_bootstrap_interval_properties():
    assert bootstrap_ci([0.5]) is None
    assert bootstrap_ci([0.7, 0.7, 0.7]) == pytest.approx([0.7, 0.7])
    rng = np.random.default_rng(1)
    data = rng.normal(0.6, 0.05, size=200)
    small, large = bootstrap_ci(data[:5]), bootstrap_ci(data)
    assert small[0] <= np.mean(data[:5]) <= small[1] and large[0] <= np.mean(data) <= large[1]
    assert large[1] - large[0] < small[1] - small[0]
    assert bootstrap_ci(data[:5]) == small  # fixed seed: reproducible


# ---- formats, plots -----------------------------------------------------------------------------------------------
def test_html_report_and_plots(report_a_html):
    out, stdout = report_a_html
    html = (out / "report.html").read_text()
    assert "plotly" in html and "<script src" not in html  # plotly.js inline: works offline
    for key in ("history", "intermediate", "importance", "parallel", "heatmap"):
        assert f'id="plot-{key}"' in html
        png = (out / f"{key}.png").read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 1000
        assert str(out / f"{key}.png") in stdout
    assert not (out / "pareto.png").exists()
    assert "Winner vs baselines" in html and "Per-group effect" in html and "class=best" in html
    assert str(out / "report.html") in stdout.splitlines()[0]


def test_md_report_multi_objective_with_pinned_group(env):
    out, stdout = report(env, "B", "md")
    md = (out / "report.md").read_text()
    assert "## Pareto front vs baselines" in md and "| group | action |" in md
    # Each baseline's recipe is stated where the baselines are shown.
    assert "finetune-all: every group fine-tuned with cross-entropy" in md and "head-only: the same recipe" in md
    for key in ("history", "parallel", "heatmap", "pareto"):
        assert f"]({key}.png)" in md and (out / f"{key}.png").read_bytes().startswith(PNG_MAGIC)
    assert "](importance.png)" not in md  # too few trials for importances
    assert "**stem**" in md  # the pinned group's only action is its best (highlighted)
    data_out, _ = report(env, "B", "json")
    data = json.loads((data_out / "report.json").read_text())
    check_group_table(data["groups"], SPECS_B)  # values from the stages' target_val_acc, not values[0]
    assert data["groups"]["stem"]["actions"]["finetune"]["n"] == len(SPECS_B)
    # Six completed trials: importances are left out, with the reason.
    assert "fanova" not in data["importance"] and "need at least 20" in data["importance"]["skipped"]
    assert {r["number"] for r in data["pareto_front"]} == {1, 2, 3}  # (500, .70), (300, .64), (200, .52)
    assert data["winner"]["number"] == 1


def test_compare_two_studies(env):
    result = cli("study", "compare", "A", "B", "--storage", env["url"], "--json")
    assert result.exit_code == 0, result.output
    rows = {r["study"]: r for r in json.loads(result.output)["studies"]}
    assert rows["A"]["task"] == "digits-invert" and rows["B"]["task"] == "digits-noise"
    assert rows["A"]["layers"]["block2"] == "replace" and rows["A"]["winner_target_val_acc"] == pytest.approx(0.74)
    assert rows["A"]["best_baseline_target_val_acc"] == pytest.approx(0.60)
    assert rows["B"]["winner_target_val_acc"] == pytest.approx(0.70)
    text = cli("study", "compare", "A", "B", "--storage", env["url"]).output
    assert "digits-invert" in text and "digits-noise" in text and "0.7400" in text and "0.6000" in text


@pytest.mark.parametrize("name,n", [("C", 1), ("D", 0)])
def test_fewer_than_two_completed_trials(env, name, n, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default --out: reports/<study>/
    result = cli("study", "report", name, "--storage", env["url"], "--format", "html")
    assert result.exit_code == 0, result.output
    assert f"{FEW} ({n})" in result.output
    html = (tmp_path / "reports" / name / "report.html").read_text()
    assert FEW in html and "Per-group effect" in html and not list((tmp_path / "reports" / name).glob("*.png"))
    out, _ = report(env, name, "json")
    data = json.loads((out / "report.json").read_text())
    assert "skipped" in data["importance"] and (data["winner"] is None) == (n == 0)


def test_user_errors_exit_2(env, tmp_path):
    result = cli("study", "report", "nope", "--storage", env["url"])
    assert result.exit_code == 2 and "no study 'nope'" in result.output and "Traceback" not in result.output
    result = cli("study", "compare", "A", "nope", "--storage", env["url"])
    assert result.exit_code == 2 and "no study 'nope'" in result.output
    result = cli("study", "report", "A", "--storage", f"sqlite:///{tmp_path}/missing.db")
    assert result.exit_code == 2 and "does not exist" in result.output


def test_logged_to_parent_mlflow_run(env, tmp_path, mlflow_sqlite):
    from mlflow import MlflowClient

    uri = mlflow_sqlite
    url = f"sqlite:///{tmp_path}/tracked.db"
    study, _ = make_study(url, "E", SPECS_A[:3], ["tracking.enabled=true", f"tracking.mlflow_uri={uri}"])
    result = cli("study", "report", "E", "--storage", url, "--out", tmp_path / "noparent", "--format", "json")
    assert result.exit_code == 0 and "no parent run" in result.output
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("E", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    study.set_user_attr("mlflow_parent_run_id", run_id)
    result = cli("study", "report", "E", "--storage", url, "--out", tmp_path / "out", "--format", "json")
    assert result.exit_code == 0 and f"logged 1 files to MLflow run {run_id}" in result.output
    assert [a.path for a in client.list_artifacts(run_id, "report")] == ["report/report.json"]


# ---- the page in a real browser ----------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium not installed (apt-get install -y chromium): the HTML report is not rendered")
def test_html_report_renders_in_headless_chromium(report_a_html, tmp_path):
    out, _ = report_a_html
    proc = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path}",
         "--enable-logging=stderr", "--v=0", "--dump-dom", (out / "report.html").as_uri()],
        capture_output=True, text=True, timeout=180)
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    assert not [line for line in console if "Uncaught" in line], console
    for key in ("history", "intermediate", "importance", "parallel", "heatmap"):
        assert f'id="plot-{key}"' in proc.stdout
    assert proc.stdout.count("js-plotly-plot") >= 5  # plotly.js ran and drew every plot
