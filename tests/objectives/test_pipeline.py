"""The whole pipeline (run_trial) on the embedded digits tasks, one tiny epoch per stage: every offline task and
digits architecture, every action on every layer group, frozen groups untouched, determinism, the teacher cache,
checkpoint loading and divergence."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch

from models import UserError, create_model
from objectives.pipeline import run_trial
from objectives.settings import ModelSettings, TrialChoices
from objectives.student import empty_model_like
from objectives.tasks import DomainPool, LabeledImages, list_tasks
from objectives.tasks import base as task_base
from objectives.tasks import digits as digits_tasks
from objectives.train import TrainingDiverged

GROUPS = {"digitnet": ["stem", "block1", "block2", "head"], "lenet5": ["stem", "features", "classifier", "head"]}
OFFLINE_TASKS = ["digits-invert", "digits-mnist", "digits-noise", "digits-permute", "digits-stroke", "mnist-digits"]
ACC_FIELDS = ("source_val_acc", "source_test_acc", "target_val_acc", "target_test_acc")


def layers(arch: str = "digitnet", **actions: str) -> dict[str, str]:
    """Every group of `arch` fine-tuned, except those given."""
    return {g: actions.get(g, "finetune") for g in GROUPS[arch]}


def choices(arch: str = "digitnet", layer_actions: dict | None = None, **kwargs) -> TrialChoices:
    # threshold 1.0: no stage stops early, so every stage trains its one epoch.
    kwargs = {"generations": 1, "threshold": 1.0, **kwargs}
    return TrialChoices(layers=layer_actions or layers(arch), **kwargs)


def check_result(result, generations: int = 1) -> None:
    """Stages present (the teacher for reference), accuracies finite in [0, 1], value = the target validation
    accuracy of the delivered model: the best student stage, never the teacher."""
    want = ["teacher", "finetune", "distill"] + [f"retrain-{g}" for g in range(1, generations + 1)]
    assert list(result.stages) == want
    assert list(result.models) == want
    for name, stage in result.stages.items():
        for f in ACC_FIELDS:
            acc = getattr(stage, f)
            assert math.isfinite(acc) and 0.0 <= acc <= 1.0, (name, f, acc)
        assert stage.seconds >= 0
    best = max(s.target_val_acc for name, s in result.stages.items() if name != "teacher")
    assert result.best_stage in result.stages and result.best_stage != "teacher"
    assert result.value == result.stages[result.best_stage].target_val_acc == best
    assert result.student is result.models[result.best_stage]


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return module.state_dict(keep_vars=False)


def assert_frozen_groups_identical(result) -> list[str]:
    """Weights and buffers (BatchNorm running stats, num_batches_tracked) of every frozen group are bit-identical
    in the teacher and in every stage's model. Returns the frozen groups."""
    frozen = [g for g, m in result.layer_map.items() if m["action"] == "freeze"]
    teacher = result.models["teacher"]
    for g in frozen:
        want = state_of(teacher.groups[g])
        for stage, model in result.models.items():
            got = state_of(model.groups[g])
            assert got.keys() == want.keys(), (stage, g)
            for k in want:
                assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (stage, g, k)
    return frozen


def test_the_offline_tasks_are_the_listed_ones():
    """The registry test below covers every offline task: keep its list in step with the registry (the 8x8 digits
    tasks, and the 28x28 MNIST <-> UCI digits pair)."""
    assert sorted(t.name for t in list_tasks() if t.offline) == OFFLINE_TASKS


# ---- 1. every offline task x digits architecture ------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["digitnet", "lenet5"])
@pytest.mark.parametrize("task", OFFLINE_TASKS)
def test_every_offline_task_and_arch_runs_the_whole_pipeline(task, arch, tiny_pipeline, tiny_task):
    result = run_trial(tiny_task(task), ModelSettings(arch=arch), tiny_pipeline,
                       choices(arch, layers(arch, stem="freeze")))
    check_result(result)
    assert result.layer_map["stem"]["action"] == "freeze"
    assert {s: result.stages[s].epochs for s in result.stages} == {
        "teacher": 1, "finetune": 1, "distill": 1, "retrain-1": 1}
    assert result.total_epochs == 3  # student epochs on the global step axis (the teacher is step 0)
    assert result.teacher.epochs == 1 and result.teacher.role == "teacher"
    assert result.student_params == result.teacher_params  # nothing replaced
    assert assert_frozen_groups_identical(result) == ["stem"]
    assert set(result.params) == {f"layers.{g}" for g in GROUPS[arch]} | {
        f.name for f in dataclasses.fields(TrialChoices) if f.name != "layers"}


# ---- 2. every action on every group, every replacement, both layer terms, every retrain source ------------------
def _action_cases():
    """(id, layer actions, pipeline overrides, choice overrides). Each action is applied to each group in turn
    (the others fine-tuned); replace_with is cycled through those, and each replace_with also replaces every group
    at once, so every (group, replace_with) pair runs. beta > 0 is cycled through both layer terms and retrain_on
    through all three sources, so every option runs at least once."""
    terms = [("feature", 0.5), ("params", 0.5), ("feature", 0.0)]
    sources = ["both", "source", "target"]
    rws = ["reinit", "slim", "donor"]
    runs = [("finetune", {})]
    runs += [(f"freeze-{g}", {g: "freeze"}) for g in GROUPS["digitnet"]]
    runs += [(f"replace-{g}", {g: "replace"}) for g in GROUPS["digitnet"]]
    runs += [("replace-all", {g: "replace" for g in GROUPS["digitnet"]})] * 3
    cases = []
    for i, (name, acts) in enumerate(runs):
        term, beta = terms[i % 3]
        rw = rws[i % 3] if name.startswith("replace") else "reinit"
        pipe = {"replace_with": rw, "layer_term": term, "retrain_on": sources[i % 3]}
        cases.append((f"{name}-{rw}-{term}{beta:g}-{sources[i % 3]}", acts, pipe, {"beta": beta}))
    return cases


ACTION_CASES = _action_cases()


def test_action_cases_cover_every_option():
    replaced = {(g, p["replace_with"]) for _, acts, p, _ in ACTION_CASES for g, a in acts.items() if a == "replace"}
    assert replaced == {(g, rw) for g in GROUPS["digitnet"] for rw in ("reinit", "slim", "donor")}
    frozen = {g for _, acts, _, _ in ACTION_CASES if len(acts) == 1 for g, a in acts.items() if a == "freeze"}
    assert frozen == set(GROUPS["digitnet"])
    assert {(p["layer_term"], c["beta"] > 0) for _, _, p, c in ACTION_CASES} >= {("feature", True), ("params", True)}
    assert {p["retrain_on"] for _, _, p, _ in ACTION_CASES} == {"both", "source", "target"}


@pytest.mark.parametrize("actions,pipeline_overrides,choice_overrides",
                         [c[1:] for c in ACTION_CASES], ids=[c[0] for c in ACTION_CASES])
def test_every_action_on_every_group(actions, pipeline_overrides, choice_overrides, tiny_pipeline, tiny_task):
    pipeline = dataclasses.replace(tiny_pipeline, **pipeline_overrides)
    metrics: list[tuple[str, dict]] = []
    result = run_trial(tiny_task(), ModelSettings(donor_width=2.0), pipeline,
                       choices(layer_actions=layers(**actions), **choice_overrides),
                       on_epoch=lambda stage, step, m: metrics.append((stage, m)))
    check_result(result)
    assert {g: m["action"] for g, m in result.layer_map.items()} == layers(**actions)
    assert_frozen_groups_identical(result)
    want = {"reinit": "reinit", "slim": "slim x0.5", "donor": "donor digitnet x2"}[pipeline.replace_with]
    for m in result.layer_map.values():
        assert m["weights"] == (want if m["action"] == "replace" else "teacher")
    assert (result.donor is not None) == (pipeline.replace_with == "donor" and "replace" in actions.values())
    # Every student epoch reported its metrics; distill stages report the layer term exactly when beta > 0.
    assert [s for s, _ in metrics] == ["teacher", "finetune", "distill", "retrain-1"]  # the teacher: step 0
    for stage, m in metrics[1:]:
        assert all(math.isfinite(v) for v in m.values())
        assert ("layer_term" in m) == (stage != "finetune" and choice_overrides["beta"] > 0)
    final = result.models["retrain-1"]
    assert sum(p.numel() for p in final.parameters()) == result.student_params
    if pipeline.replace_with == "slim" and "replace" in actions.values():
        # Slim replacements make a smaller student, which reloads into an empty model of its group widths.
        assert result.student_params < result.teacher_params
        assert all(final.group_widths[g] == 0.5 for g, a in actions.items() if a == "replace")
        empty = empty_model_like(final, num_classes=10, in_channels=1)
        empty.load_state_dict(final.state_dict())
    elif pipeline.replace_with == "donor" and "replace" in actions.values():
        assert result.student_params > result.teacher_params  # the donor is twice as wide
    else:
        assert result.student_params == result.teacher_params


# ---- 3. frozen groups: weights and BatchNorm buffers untouched -----------------------------------------------------
def test_frozen_groups_weights_and_batchnorm_buffers_are_bit_identical(tiny_pipeline, tiny_task):
    acts = layers(stem="freeze", block1="replace", block2="freeze")
    result = run_trial(tiny_task(), ModelSettings(), tiny_pipeline,
                       choices(layer_actions=acts, beta=0.5, generations=2, augment=True))
    check_result(result, generations=2)
    assert assert_frozen_groups_identical(result) == ["stem", "block2"]
    teacher = result.models["teacher"]
    buffers = [k for k in state_of(teacher.groups["stem"]) if "running_" in k or "num_batches_tracked" in k]
    assert len(buffers) == 6  # two BatchNorms, three buffers each: they were really compared
    for stage in ("finetune", "distill", "retrain-1", "retrain-2"):
        model = result.models[stage]
        assert not any(p.requires_grad for g in ("stem", "block2") for p in model.groups[g].parameters())
        # The comparison can fail: the trained groups did move, BatchNorm statistics included.
        assert not torch.equal(model.groups["head"][2].weight, teacher.groups["head"][2].weight)
        assert model.groups["block1"][2].num_batches_tracked > 0  # a trained group's BatchNorm did count


# ---- 5. determinism, and a cached teacher gives the trial a trained one gives --------------------------------------
def _comparable(result) -> dict:
    return {k: {f: getattr(v, f) for f in (*ACC_FIELDS, "epochs", "threshold_epoch")}
            for k, v in result.stages.items()}


def _assert_same_models(a, b) -> None:
    assert list(a.models) == list(b.models)
    for stage in a.models:
        sa, sb = state_of(a.models[stage]), state_of(b.models[stage])
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), stage


def test_same_seed_gives_identical_trials_and_a_cached_teacher_changes_nothing(tiny_pipeline, tiny_task, tmp_path):
    task = tiny_task("digits-stroke")
    acts = layers(stem="freeze", block1="replace")
    trial = choices(layer_actions=acts, augment=True, beta=0.3)
    first = run_trial(task, ModelSettings(), dataclasses.replace(tiny_pipeline, cache_dir=str(tmp_path / "a")), trial)
    cached = run_trial(task, ModelSettings(), dataclasses.replace(tiny_pipeline, cache_dir=str(tmp_path / "a")), trial)
    torch.manual_seed(987)  # whatever this process drew before must not matter, not even to a new teacher
    torch.rand(1000)
    again = run_trial(task, ModelSettings(), dataclasses.replace(tiny_pipeline, cache_dir=str(tmp_path / "b")), trial)
    assert (first.teacher.cache, cached.teacher.cache, again.teacher.cache) == ("miss", "hit", "miss")
    assert first.teacher.key == cached.teacher.key == again.teacher.key
    assert _comparable(first) == _comparable(cached) == _comparable(again)
    assert first.value == cached.value == again.value
    _assert_same_models(first, cached)
    _assert_same_models(first, again)


# ---- 6. the teacher cache and checkpoints ---------------------------------------------------------------------------
def test_cache_hit_loads_the_stored_teacher_without_training(tiny_pipeline, tiny_task, tmp_path):
    pipeline = dataclasses.replace(tiny_pipeline, cache_dir=str(tmp_path), distill_epochs=0)
    trial = choices(generations=0)
    first = run_trial(tiny_task(), ModelSettings(), pipeline, trial)
    assert first.teacher.cache == "miss" and first.teacher.epochs == 1
    weights = Path(first.teacher.path)
    assert weights.is_file() and weights.with_suffix(".json").is_file()

    # Tamper with the stored weights: a hit must hand back exactly these, proving nothing was (re)trained.
    state = torch.load(weights, weights_only=True)
    state["groups.head.4.bias"] = state["groups.head.4.bias"] + 1.0
    torch.save(state, weights)
    meta = weights.with_suffix(".json")  # and reseal the entry, or the hit would see a corrupt file and retrain
    sealed = json.loads(meta.read_text())
    sealed["file"] = {"size": weights.stat().st_size, "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    meta.write_text(json.dumps(sealed))
    stamp = weights.stat().st_mtime_ns
    second = run_trial(tiny_task(), ModelSettings(), pipeline, trial)
    assert second.teacher.cache == "hit" and second.teacher.path == str(weights)
    assert weights.stat().st_mtime_ns == stamp  # not rewritten
    got = state_of(second.models["teacher"])
    assert all(torch.equal(got[k], state[k]) for k in state)
    # The recorded training (epochs, accuracy) is reported as it was stored.
    assert second.stages["teacher"].epochs == 1
    assert second.teacher.epochs == first.teacher.epochs
    assert second.teacher.source_val_acc == first.teacher.source_val_acc


def test_teacher_from_a_valid_checkpoint(tiny_pipeline, tiny_task, tmp_path):
    torch.manual_seed(123)
    saved = create_model("digitnet", num_classes=10, in_channels=1)
    path = tmp_path / "teacher.pt"
    torch.save(saved.state_dict(), path)
    pipeline = dataclasses.replace(tiny_pipeline, cache_dir=str(tmp_path / "cache"), distill_epochs=0)
    result = run_trial(tiny_task(), ModelSettings(teacher="checkpoint", checkpoint=str(path)), pipeline,
                       choices(generations=0))
    assert result.teacher.cache == "miss" and result.teacher.epochs == 0  # used as given, not trained
    got, want = state_of(result.models["teacher"]), saved.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


class _Payload:
    """A pickled object whose unpickling would run code: creates a directory (harmless, but visible)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _malicious(path: Path) -> None:
    torch.save({"groups.head.4.bias": _Payload(str(path.parent / "pwned"))}, path)


class _Custom:
    """A plain custom class: not on weights_only's allow-list."""


def _custom_class(path: Path) -> None:
    torch.save({"groups.head.4.bias": _Custom()}, path)


def _random_bytes(path: Path) -> None:
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())


def _other_arch(path: Path) -> None:
    torch.save(create_model("lenet5", num_classes=10, in_channels=1).state_dict(), path)


def _not_a_state_dict(path: Path) -> None:
    torch.save(torch.zeros(3), path)


@pytest.mark.parametrize("write,message", [
    (_malicious, "cannot be loaded safely"),
    (_custom_class, "cannot be loaded safely"),
    (_random_bytes, "not a torch checkpoint"),
    (_other_arch, "does not fit digitnet"),
    (_not_a_state_dict, "is not a state_dict"),
    (None, "not found"),
], ids=["malicious-pickle", "custom-class", "random-bytes", "other-arch", "tensor", "missing"])
def test_bad_teacher_checkpoint_is_a_user_error(write, message, tiny_pipeline, tiny_task, tmp_path):
    path = tmp_path / "teacher.pt"
    if write:
        write(path)
    pipeline = dataclasses.replace(tiny_pipeline, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserError, match=message) as info:
        run_trial(tiny_task(), ModelSettings(teacher="checkpoint", checkpoint=str(path)), pipeline, choices())
    assert "\n" not in str(info.value)
    assert not (tmp_path / "pwned").exists()  # weights_only=True never ran the payload
    assert not list((tmp_path / "cache").glob("teacher-*.pt"))  # nothing cached


# ---- 7. divergence ------------------------------------------------------------------------------------------------
def test_non_finite_loss_raises_training_diverged(tiny_pipeline, tiny_task, monkeypatch):
    """A NaN loss cannot be provoked honestly through the settings: Adam's step is bounded by the learning rate,
    BatchNorm renormalises and log-softmax is stable, so even lr=10 (the maximum) for 20 epochs per stage stays
    finite. So the data is broken instead, as a faulty user task would be: a target domain with one saturated
    (+inf) pixel per image. The source is clean, so the teacher trains; fine-tuning on the target diverges."""

    def broken(options):
        source, target, names = digits_tasks.digits_invert(options)
        x = target.train.x.clone()
        x[:, :, 0, 0] = float("inf")
        return source, DomainPool(LabeledImages(x, target.train.y)), names

    task_base.register_task("digits-broken", "input", "target pixels are +inf")(broken)  # for this test only
    try:
        with pytest.raises(TrainingDiverged, match=r"loss became nan in stage 'finetune' at step 1"):
            run_trial(tiny_task("digits-broken"), ModelSettings(), tiny_pipeline, choices())
    finally:
        task_base.unregister_task("digits-broken")


# ---- impossible choices fail before any training ------------------------------------------------------------------
@pytest.mark.parametrize("model,acts,pipeline_overrides,message", [
    ({}, {"stem": "freeze", "block1": "freeze", "block2": "freeze", "head": "freeze"}, {}, "nothing would train"),
    ({}, {"stem": "finetune", "block1": "finetune", "block2": "finetune", "hed": "finetune"}, {},
     "unknown layer group 'hed' \\(did you mean 'head'\\?\\)"),
    ({}, layers(head="frezze"), {}, "unknown action 'frezze' .*did you mean 'freeze'"),
    ({}, {"stem": "finetune"}, {}, "no action for layer group"),
    ({"donor_arch": "lenet5"}, layers(block1="replace"), {"replace_with": "donor"},
     "donor lenet5 has no layer group 'block1'"),
    ({"donor_arch": "lenet5"}, layers(stem="replace"), {"replace_with": "donor"}, "do not fit the digitnet"),
], ids=["all-freeze", "unknown-group", "unknown-action", "missing-group", "donor-without-group",
        "donor-wrong-shape"])
def test_impossible_layer_choices_are_user_errors(model, acts, pipeline_overrides, message, tiny_pipeline,
                                                  tiny_task, tmp_path):
    pipeline = dataclasses.replace(tiny_pipeline, cache_dir=str(tmp_path), **pipeline_overrides)
    with pytest.raises(UserError, match=message):
        run_trial(tiny_task(), ModelSettings(**model), pipeline, choices(layer_actions=acts))
    assert not list(tmp_path.glob("*.pt"))  # rejected before any teacher was trained


def test_unknown_task_is_a_user_error(tiny_pipeline, tiny_task):
    with pytest.raises(UserError, match="unknown task 'digits-invret' \\(did you mean 'digits-invert'\\?\\)"):
        run_trial(tiny_task("digits-invret"), ModelSettings(), tiny_pipeline, choices())
