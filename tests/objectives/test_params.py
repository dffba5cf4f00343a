"""One source of truth per choice: the parameter table (`objectives.params.PARAMS`) declares each choice's default
and activity rule, `TrialChoices` takes its defaults from it, the `layers.<group>` name is spelled only there, and
each rule decides what a real Optuna trial samples (ask/tell, no training)."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import optuna
import pytest

from objectives.params import NO_TERM, PARAMS, ParamSpec, layer_group, layer_param, split_layers
from objectives.settings import TrialChoices
from study.config.config import load_config
from study.space.search import active_params, suggest_choices

optuna.logging.set_verbosity(optuna.logging.WARNING)

REPO = Path(__file__).resolve().parents[2]
GROUPS = ["stem", "block1", "block2", "head"]
ALL_FINETUNE = {layer_param(g): "finetune" for g in GROUPS}
# The quickstart search with every conditional choice searchable: a layer-term list and the adapt action.
WIDE = ["search.layers.actions=[finetune, freeze, replace, adapt]", "search.layer_term=[feature, none]",
        "search.adapter_rank=[8, 2]"]
# Each conditional choice: enqueued params under which it is sampled, and params under which it is not.
RULE_CASES = {
    "alpha": ({"recipe": "distill"}, {"recipe": "finetune"}),
    "temperature": ({"recipe": "distill", "alpha": 0.3}, {"recipe": "distill", "alpha": 0.0}),
    "layer_term": ({"recipe": "distill"}, {"recipe": "finetune"}),
    "beta": ({"recipe": "distill", "layer_term": "feature"}, {"recipe": "distill", "layer_term": NO_TERM}),
    "threshold": ({"recipe": "distill"}, {"recipe": "finetune"}),
    "generations": ({"recipe": "distill"}, {"recipe": "finetune"}),
    "slim_width": ({layer_param("block2"): "replace"}, {}),
    "adapter_rank": ({layer_param("block2"): "adapt"}, {}),
}


@pytest.fixture(scope="module")
def space(repo_root):
    return load_config(repo_root / "examples" / "quickstart.yaml", WIDE).search


def ask(space, fixed: dict):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial({**ALL_FINETUNE, **fixed})
    trial = study.ask()
    return trial, suggest_choices(trial, space, "slim")


# ---- defaults ----------------------------------------------------------------------------------------------------
def test_trial_choices_defaults_are_the_tables():
    fields = {f.name: f.default for f in dataclasses.fields(TrialChoices) if f.name != "layers"}
    assert set(fields) == set(PARAMS)  # one field per searchable choice
    assert fields == {name: spec.scalar() for name, spec in PARAMS.items()}
    assert (fields["temperature"], fields["alpha"], fields["lr"]) == (4.0, 0.5, 3e-3)


def test_trial_choices_declares_no_default_of_its_own():
    """Every field default of TrialChoices is `_searched(name)`: a literal there would be a second source."""
    tree = ast.parse((REPO / "objectives" / "settings.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TrialChoices")
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and node.value is not None:
            assert isinstance(node.value, ast.Call) and node.value.func.id == "_searched", ast.unparse(node)
            assert node.value.args[0].value == node.target.id


# ---- the layer parameter's name ----------------------------------------------------------------------------------
def test_layer_param_round_trip():
    assert layer_group(layer_param("block1")) == "block1" and layer_group("alpha") is None
    assert split_layers({layer_param("head"): "freeze", "alpha": 0.2}) == ({"head": "freeze"}, {"alpha": 0.2})
    choices = TrialChoices(layers={"stem": "replace"}, alpha=0.1)
    assert TrialChoices.from_flat(choices.flat()) == choices


def _strings(tree: ast.AST):
    """Every string literal but docstrings (the parts of an f-string included)."""
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node


def test_layers_prefix_is_spelled_only_in_the_table():
    """`layers.<group>` is built or parsed only by objectives.params; `search.layers.` (a config key) may be
    named anywhere."""
    spelled = re.compile(r"(?<!search\.)\blayers\.(?!<)")  # `layers.<group>` in prose names it
    files = [REPO / "cli.py", *sorted((REPO / "study").rglob("*.py")), *sorted((REPO / "objectives").rglob("*.py"))]
    offenders = [f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}" for path in files
                 if path != REPO / "objectives" / "params.py"
                 for node in _strings(ast.parse(path.read_text())) if spelled.search(node.value)]
    assert not offenders, "\n".join(offenders)


# ---- activity rules ----------------------------------------------------------------------------------------------
def test_every_conditional_choice_has_a_case():
    always = next(f.default for f in dataclasses.fields(ParamSpec) if f.name == "active")
    conditional = {name for name, spec in PARAMS.items() if spec.active is not always}
    assert conditional == set(RULE_CASES)


@pytest.mark.parametrize("name", list(RULE_CASES))
def test_each_rule_decides_what_optuna_samples(space, name):
    on, off = RULE_CASES[name]
    trial, choices = ask(space, on)
    assert name in trial.params and name in active_params(space, "slim", choices)
    trial, choices = ask(space, off)
    assert name not in trial.params and name not in active_params(space, "slim", choices)
    spec = PARAMS[name]
    expected = space.params[name].default() if spec.inactive is None else spec.inactive
    assert getattr(choices, name) == expected


def test_finetune_recipe_has_no_teacher_signal(space):
    trial, choices = ask(space, {"recipe": "finetune"})
    assert (choices.alpha, choices.beta, choices.layer_term) == (0.0, 0.0, NO_TERM)
    assert not {"alpha", "temperature", "beta", "layer_term"} & set(trial.params)


def test_rules_answer_recorded_choices():
    """Summaries of stored trials ask the same rules with the recorded flat choices."""
    assert PARAMS["temperature"].is_active({"recipe": "distill", "alpha": 0.4})
    assert not PARAMS["temperature"].is_active({"recipe": "distill", "alpha": 0.0})
    assert not PARAMS["temperature"].is_active({"recipe": "finetune", "alpha": 0.4})
    assert PARAMS["slim_width"].is_active({layer_param("head"): "replace"}, "slim")
    assert not PARAMS["slim_width"].is_active({layer_param("head"): "replace"}, "reinit")
