"""The YAML config: validation errors with full key paths, --set overrides, search value forms, round trip."""

from __future__ import annotations

import copy

import pytest
import yaml

from models import UserError
from objectives.settings import PipelineSettings, TrialChoices
from study.config.config import Config, apply_override, config_from_dict, load_config
from study.space.search import SearchSpace


@pytest.fixture
def quickstart(repo_root):
    return repo_root / "examples" / "quickstart.yaml"


@pytest.fixture
def raw(quickstart) -> dict:
    return yaml.safe_load(quickstart.read_text())


def error_of(raw: dict) -> str:
    with pytest.raises(UserError) as info:
        config_from_dict(raw)
    message = str(info.value)
    assert "\n" not in message
    return message


def with_value(raw: dict, path: str, value) -> dict:
    out = copy.deepcopy(raw)
    node = out
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return out


def test_quickstart_loads_with_every_section(quickstart):
    cfg = load_config(quickstart)
    assert isinstance(cfg, Config)
    assert cfg.task.name == "digits-invert" and cfg.model.arch == "digitnet"
    assert cfg.pipeline.teacher_epochs == 15 and cfg.pipeline.replace_with == "reinit"
    assert cfg.study.objective == ["target_val_acc"] and cfg.study.pruner.kwargs["n_startup_trials"] == 4
    assert cfg.search.groups == ["stem", "block1", "block2", "head"]


def test_no_config_file_gives_the_defaults():
    cfg = load_config(None)
    assert cfg.pipeline == PipelineSettings()
    choices = cfg.search.defaults()
    assert choices.layers == {"stem": "finetune", "block1": "finetune", "block2": "finetune", "head": "finetune"}


# ---- unknown keys: full path and did-you-mean, at every level -----------------------------------------------------
@pytest.mark.parametrize("path,want", [
    ("pipline", "pipline: unknown key (did you mean 'pipeline'?)"),
    ("task.nmae", "task.nmae: unknown key (did you mean 'name'?)"),
    ("pipeline.teacher_epoch", "pipeline.teacher_epoch: unknown key (did you mean 'teacher_epochs'?)"),
    ("pipeline.augment.translat", "pipeline.augment.translat: unknown key (did you mean 'translate'?)"),
    ("study.sampler.sed", "study.sampler.sed: unknown key (did you mean 'seed'?)"),
    ("tracking.log_weight", "tracking.log_weight: unknown key (did you mean 'log_weights'?)"),
    ("search.alpah", "search.alpah: unknown choice (did you mean 'alpha'?)"),
    ("search.lr.hgh", "search.lr.hgh: unknown key (did you mean 'high'?)"),
    ("search.layers.stme", "search.layers.stme: unknown layer group (did you mean 'stem'?)"),
])
def test_unknown_key_names_its_full_path_and_the_closest_key(raw, path, want):
    if path == "search.lr.hgh":
        raw["search"]["lr"] = {"low": 0.001, "hgh": 0.01}
        message = error_of(raw)
    else:
        message = error_of(with_value(raw, path, "freeze" if path.startswith("search.layers") else 1))
    assert message.startswith(want.split(" (")[0])
    assert want in message


def test_unknown_key_without_a_close_match_lists_the_valid_keys(raw):
    message = error_of(with_value(raw, "model.zzzzz", 1))
    assert message.startswith("model.zzzzz: unknown key;")
    assert "valid keys: arch, width, teacher, checkpoint, donor_arch, donor_width" in message


# ---- wrong types and out-of-range values --------------------------------------------------------------------------
@pytest.mark.parametrize("path,value,want", [
    ("pipeline.batch_size", "big", "pipeline.batch_size: expected int, got str ('big')"),
    ("pipeline.batch_size", 1.5, "pipeline.batch_size: expected int, got float (1.5)"),
    ("pipeline.batch_size", True, "pipeline.batch_size: expected int, got bool (True)"),
    ("pipeline.teacher_lr", "fast", "pipeline.teacher_lr: expected float, got str ('fast')"),
    ("pipeline.compile", "yes", "pipeline.compile: expected bool, got str ('yes')"),
    ("task.name", 3, "task.name: expected str, got int (3)"),
    ("pipeline.augment", [1], "pipeline.augment: expected a mapping, got list"),
    ("study.sampler.kwargs", [1], "study.sampler.kwargs: expected dict, got list"),
    ("search.alpha", "half", "search.alpha: expected a number, got 'half'"),
    ("search.augment", 1, "search.augment: expected true or false, got 1"),
    ("search.generations", 1.5, "search.generations: expected a whole number, got 1.5"),
    ("search.lr", {"low": 0.1}, "search.lr: a range needs both low and high"),
    ("search.augment", {"low": 0, "high": 1}, "search.augment: a yes/no choice takes true, false or [false, true]"),
    ("task", [1, 2], "task: expected a mapping, got list"),
])
def test_wrong_type_names_the_key(raw, path, value, want):
    assert error_of(with_value(raw, path, value)).startswith(want)


@pytest.mark.parametrize("path,value,want", [
    ("pipeline.batch_size", 0, "pipeline.batch_size: 0 is out of range [1, 65536]"),
    ("pipeline.teacher_lr", 11.0, "pipeline.teacher_lr: 11.0 is out of range [1e-07, 10.0]"),
    ("model.width", 0.0, "model.width: 0.0 is out of range [0.05, 16.0]"),
    ("pipeline.augment.translate", 0.9, "pipeline.augment.translate: 0.9 is out of range [0.0, 0.5]"),
    ("study.n_trials", 0, "study.n_trials: 0 is out of range [1, 10000000]"),
    ("search.alpha", 2, "search.alpha: 2 is out of range [0, 1]"),
    ("search.lr", {"low": 0.0, "high": 0.1}, "search.lr.low: 0.0 is out of range [1e-07, 10]"),
    ("search.temperature", {"low": 4.0, "high": 2.0}, "search.temperature: low (4.0) is greater than high (2.0)"),
    ("search.alpha", {"low": 0.2, "high": 0.4, "default": 0.5}, "search.alpha.default: 0.5 is outside [0.2, 0.4]"),
    ("search.slim_width", [0.5, 2.0], "search.slim_width: 2.0 is out of range [0.01, 1]"),
    ("pipeline.replace_with", "slm", "pipeline.replace_with: 'slm' is not one of reinit, slim, donor "
                                     "(did you mean 'slim'?)"),
    ("tracking.log_weights", "some", "tracking.log_weights: 'some' is not one of all, best, none"),
    ("study.objective", ["target_val_ac"], "study.objective[0]: unknown objective 'target_val_ac' "
                                           "(did you mean 'target_val_acc'?)"),
])
def test_out_of_range_or_not_a_choice(raw, path, value, want):
    assert error_of(with_value(raw, path, value)).startswith(want)


def test_malformed_yaml_reports_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("task:\n  name: digits-invert\npipeline:\n  seed: 0\n   batch_size: [64\n")
    with pytest.raises(UserError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"config file '{path}' is not valid YAML at line 5")
    assert "\n" not in message


def test_yaml_that_is_not_a_mapping_and_a_missing_file(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- task\n- model\n")
    with pytest.raises(UserError, match="must be a mapping with sections task, model"):
        load_config(path)
    with pytest.raises(UserError, match="config file '.*nope.yaml' not found"):
        load_config(tmp_path / "nope.yaml")


# ---- --set overrides ----------------------------------------------------------------------------------------------
def test_set_values_are_typed_as_yaml(quickstart):
    cfg = load_config(quickstart, [
        "pipeline.batch_size=32",                         # int
        "pipeline.teacher_lr=0.01",                       # float
        "pipeline.augment.flip=false",                    # bool, nested section
        "pipeline.cache_dir=/tmp/x y",                    # str with a space
        "study.sampler={name: random, seed: 3}",          # dict
        "study.objective=[target_val_acc, student_params]",  # list
        "search.slim_width=[0.25, 0.5]",                  # list: categorical
        "search.alpha=0.7",                               # number: pin
        "search.lr={low: 0.001, high: 0.1, log: true, default: 0.01}",  # dict: range
        "search.augment=true",                            # bool pin
        "search.layers.head=replace",                     # pin one group
        "model.checkpoint=",                              # empty value: ''
    ])
    assert cfg.pipeline.batch_size == 32 and isinstance(cfg.pipeline.batch_size, int)
    assert cfg.pipeline.teacher_lr == 0.01
    assert cfg.pipeline.augment.flip is False
    assert cfg.pipeline.cache_dir == "/tmp/x y"
    assert cfg.study.sampler.name == "random" and cfg.study.sampler.seed == 3
    assert cfg.study.objective == ["target_val_acc", "student_params"]
    assert cfg.model.checkpoint == ""
    choices = cfg.search.defaults()
    assert choices.slim_width == 0.25 and choices.alpha == 0.7 and choices.lr == 0.01 and choices.augment is True
    assert choices.layers["head"] == "replace"
    # Overrides apply before validation: a bad one is reported like a bad YAML value.
    with pytest.raises(UserError, match=r"^pipeline.batch_size: expected int, got str \('many'\)$"):
        load_config(quickstart, ["pipeline.batch_size=many"])
    with pytest.raises(UserError, match=r"^pipeline.seeed: unknown key \(did you mean 'seed'\?\)"):
        load_config(quickstart, ["pipeline.seeed=1"])


def test_set_on_a_config_without_that_section_creates_it():
    cfg = load_config(None, ["pipeline.augment.noise=0.0", "task.name=digits-noise"])
    assert cfg.pipeline.augment.noise == 0.0 and cfg.task.name == "digits-noise"


@pytest.mark.parametrize("item,want", [
    ("pipeline.seed", "--set 'pipeline.seed': expected KEY=VALUE"),
    ("pipeline.seed.x=1", "--set pipeline.seed.x: 'pipeline.seed' is not a section"),
])
def test_bad_set_syntax(quickstart, item, want):
    with pytest.raises(UserError) as info:
        load_config(quickstart, [item])
    assert str(info.value).startswith(want)


def test_apply_override_edits_the_raw_dict_in_place():
    raw: dict = {"search": {"alpha": 0.5}}
    apply_override(raw, "search.alpha={low: 0.1, high: 0.9}")
    apply_override(raw, "search.layers.stem=[freeze, finetune]")
    assert raw == {"search": {"alpha": {"low": 0.1, "high": 0.9}, "layers": {"stem": ["freeze", "finetune"]}}}


# ---- search value forms --------------------------------------------------------------------------------------------
def test_search_value_forms_resolve_to_trial_run_defaults():
    cfg = load_config(None, [
        "search.alpha=0.25",                                       # pin
        "search.temperature={low: 1.0, high: 8.0, default: 2.0}",  # range with default
        "search.beta={low: 0.1, high: 1.0}",                       # range without default: low
        "search.lr={low: 0.001, high: 0.01, log: true}",           # log range without default: low
        "search.threshold={low: 0.8, high: 1.0, step: 0.05}",      # stepped range
        "search.source_weight=[1.0, 0.0]",                         # list: first element
        "search.generations=2",                                    # int pin
        "search.augment=[true, false]",                            # bool list
        "search.layers.actions=[replace, freeze]",                 # actions for unpinned groups: first
        "search.layers.stem=freeze",                               # pinned group
        "search.layers.head=[finetune, replace]",                  # group's own list: first
    ])
    space = cfg.search
    assert space.params["alpha"].mode == "fixed"
    assert space.params["temperature"].mode == "range" and space.params["source_weight"].mode == "categorical"
    assert space.group_actions() == {"stem": ["freeze"], "block1": ["replace", "freeze"],
                                     "block2": ["replace", "freeze"], "head": ["finetune", "replace"]}
    assert space.defaults() == TrialChoices(
        layers={"stem": "freeze", "block1": "replace", "block2": "replace", "head": "finetune"},
        alpha=0.25, temperature=2.0, beta=0.1, lr=0.001, threshold=0.8, source_weight=1.0, generations=2,
        slim_width=0.5, layer_term="feature", augment=True)
    assert isinstance(space.defaults().generations, int)
    assert not space.is_empty()


def test_everything_pinned_is_an_empty_search():
    overrides = [f"search.{k}={v}" for k, v in [("alpha", 0.5), ("temperature", 4), ("beta", 0), ("threshold", 1),
                                                  ("lr", 0.003), ("source_weight", 1), ("generations", 0),
                                                  ("slim_width", 0.5), ("augment", "false"),
                                                  ("recipe", "distill")]]
    cfg = load_config(None, [*overrides, "search.layers.actions=[finetune]"])
    assert cfg.search.is_empty()
    assert cfg.search.defaults().temperature == 4.0 and isinstance(cfg.search.defaults().temperature, float)


# ---- unknown names ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,want", [
    (["search.layers.bloc1=freeze"], "search.layers.bloc1: unknown layer group (did you mean 'block1'?) of digitnet; "
                                     "groups: stem, block1, block2, head"),
    (["model.arch=lenet5", "search.layers.block1=freeze"], "search.layers.block1: unknown layer group"),
    (["search.layers.head=frezze"], "search.layers.head: unknown action 'frezze' (did you mean 'freeze'?); "
                                    "choose from: freeze, finetune, replace"),
    (["search.layers.actions=[finetune, replce]"], "search.layers.actions: unknown action 'replce' "
                                                   "(did you mean 'replace'?)"),
    (["search.layers.head=[]"], "search.layers.head: empty list of actions"),
    (["model.arch=digitnte"], "model.arch: unknown architecture 'digitnte' (did you mean 'digitnet'?)"),
    (["model.donor_arch=lenet"], "model.donor_arch: unknown architecture 'lenet' (did you mean 'lenet5'?)"),
    (["task.name=digits-invret"], "task.name: unknown task 'digits-invret' (did you mean 'digits-invert'?)"),
])
def test_unknown_group_action_or_arch(quickstart, overrides, want):
    with pytest.raises(UserError) as info:
        load_config(quickstart, overrides)
    assert str(info.value).startswith(want)


def test_layer_groups_follow_the_architecture(quickstart):
    cfg = load_config(quickstart, ["model.arch=lenet5", "search.layers.features=freeze"])
    assert cfg.search.groups == ["stem", "features", "classifier", "head"]
    assert cfg.search.defaults().layers == {"stem": "finetune", "features": "freeze", "classifier": "finetune",
                                            "head": "finetune"}


def test_unknown_task_is_also_reported_when_the_task_is_loaded():
    # The config rejects it first; the task registry itself does too (for code that builds TaskOptions directly).
    from objectives.tasks import TaskOptions, load_task

    with pytest.raises(UserError, match="unknown task 'digits-invret' \\(did you mean 'digits-invert'\\?\\); "
                                        "choose from: .*digits-invert"):
        load_task(TaskOptions(name="digits-invret"), seed=0)


@pytest.mark.parametrize("overrides", [
    ["search.layers.actions=[freeze]"],
    ["search.layers.actions=freeze"],
    [f"search.layers.{g}=freeze" for g in ("stem", "block1", "block2", "head")],
])
def test_all_freeze_is_rejected(quickstart, overrides):
    with pytest.raises(UserError, match="^search.layers: every layer group can only be 'freeze': nothing would train$"):
        load_config(quickstart, overrides)


def test_all_freeze_but_one_group_is_fine(quickstart):
    cfg = load_config(quickstart, ["search.layers.actions=[freeze]", "search.layers.head=[freeze, finetune]"])
    assert cfg.search.defaults().layers["head"] == "freeze"  # the first is freeze; a study may sample finetune


# ---- round trip ---------------------------------------------------------------------------------------------------
def test_to_dict_round_trips(quickstart):
    cfg = load_config(quickstart, ["search.layers.head=replace", "study.objective=[target_val_acc, student_params]",
                                   "pipeline.augment.noise=0.1", "study.sampler.kwargs={n_startup_trials: 3}"])
    data = cfg.to_dict()
    again = config_from_dict(data)
    assert again == cfg
    assert again.search.defaults() == cfg.search.defaults()
    # Plain data: survives a YAML dump and load (what a study stores), and is not shared with the config.
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(data))) == cfg
    data["pipeline"]["seed"] = 99
    assert cfg.pipeline.seed == 0


def test_defaults_round_trip():
    cfg = load_config(None)
    assert config_from_dict(cfg.to_dict()) == cfg
    assert isinstance(cfg.search, SearchSpace) and cfg.to_dict()["search"] == {}


def test_epochs_to_threshold_needs_a_pinned_threshold(quickstart):
    with pytest.raises(UserError, match="^study.objective epochs_to_threshold needs a pinned threshold"):
        load_config(quickstart, ["study.objective=epochs_to_threshold"])
    with pytest.raises(UserError, match="needs a pinned threshold"):
        load_config(quickstart, ["study.objective=[target_val_acc, epochs_to_threshold]",
                                 "search.threshold=[0.8, 0.9]"])
    cfg = load_config(quickstart, ["study.objective=epochs_to_threshold", "search.threshold=0.9"])
    assert cfg.search.params["threshold"].value == 0.9


def test_recipe_is_a_pinned_or_listed_choice(quickstart):
    assert load_config(quickstart).search.defaults().recipe == "distill"
    finetune = load_config(quickstart, ["search.recipe=finetune"]).search.defaults()
    assert (finetune.recipe, finetune.alpha, finetune.beta) == ("finetune", 0.0, 0.0)
    assert load_config(quickstart, ["search.recipe=[distill, finetune]"]).search.params["recipe"].choices == \
        ["distill", "finetune"]
    with pytest.raises(UserError, match=r"^search.recipe: unknown value 'finetun' \(did you mean 'finetune'\?\)"):
        load_config(quickstart, ["search.recipe=finetun"])
    with pytest.raises(UserError, match="^search.recipe: takes one of distill, finetune"):
        load_config(quickstart, ["search.recipe={low: 0, high: 1}"])
