"""The search space, baselines, samplers/pruners and pruning semantics, driven through Optuna's ask/tell interface
without any training: real in-memory Optuna studies, real distributions, no mocks."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from models.errors import UserError
from study.config.config import PrunerSettings, SamplerSettings, load_config
from study.space.baselines import BASELINES, baseline_choices, enqueue_params
from study.space.samplers import DEFAULT_KWARGS, PRUNERS, SAMPLERS, make_pruner, make_sampler
from study.space.search import grid_space, suggest_choices

optuna.logging.set_verbosity(optuna.logging.WARNING)

GROUPS = ["stem", "block1", "block2", "head"]
# Every quickstart float range, given a step, so the grid sampler can enumerate it.
GRID_SETS = ["search.alpha={low: 0.0, high: 1.0, step: 0.5}", "search.temperature=4.0", "search.beta=0.0",
             "search.threshold={low: 0.9, high: 1.0, step: 0.05}", "search.lr=[0.003, 0.001]"]


@pytest.fixture
def cfg(repo_root):
    """`cfg(*overrides)` -> the quickstart config with `--set` overrides applied."""

    def make(*overrides):
        return load_config(repo_root / "examples" / "quickstart.yaml", list(overrides))

    return make


def ask(space, replace_with="reinit", fixed=None, directions=("maximize",)):
    """One asked trial (optionally with enqueued fixed params) and its sampled choices."""
    study = optuna.create_study(directions=list(directions), sampler=optuna.samplers.RandomSampler(seed=0))
    if fixed:
        study.enqueue_trial(fixed)
    trial = study.ask()
    return study, trial, suggest_choices(trial, space, replace_with)


# ---- distributions -----------------------------------------------------------------------------------------------
def test_ranges_lists_and_groups_become_distributions(cfg):
    config = cfg()
    _, trial, choices = ask(config.search, fixed={"recipe": "distill", "alpha": 0.5})  # the KD choices: distill only
    d = trial.distributions
    assert d["recipe"] == CategoricalDistribution(("distill", "finetune"))
    assert d["alpha"] == FloatDistribution(0.0, 1.0)
    assert d["temperature"] == FloatDistribution(1.0, 8.0)
    assert d["beta"] == FloatDistribution(0.0, 1.0)
    assert d["threshold"] == FloatDistribution(0.85, 1.0)
    assert d["lr"] == FloatDistribution(0.0005, 0.01, log=True)
    assert d["source_weight"] == CategoricalDistribution((0.5, 0.0, 1.0))
    assert d["generations"] == IntDistribution(0, 2)
    assert d["augment"] == CategoricalDistribution((False, True))
    for g in GROUPS:
        assert d[f"layers.{g}"] == CategoricalDistribution(("finetune", "freeze", "replace"))
    assert set(choices.layers) == set(GROUPS)
    # The sampled values land in the choices.
    assert choices.alpha == trial.params["alpha"] and choices.lr == trial.params["lr"]
    assert {g: trial.params[f"layers.{g}"] for g in GROUPS} == choices.layers


def test_steps_and_configured_actions(cfg):
    config = cfg("search.threshold={low: 0.8, high: 1.0, step: 0.05}", "search.generations={low: 0, high: 4, step: 2}",
                 "search.layers.actions=[finetune, replace]")
    _, trial, _ = ask(config.search, fixed={"recipe": "distill"})
    assert trial.distributions["threshold"] == FloatDistribution(0.8, 1.0, step=0.05)
    assert trial.distributions["generations"] == IntDistribution(0, 4, step=2)
    for g in GROUPS:
        assert trial.distributions[f"layers.{g}"] == CategoricalDistribution(("finetune", "replace"))


def test_pins_are_not_optuna_params(cfg):
    config = cfg("search.beta=0.25", "search.lr=0.001", "search.augment=true", "search.layers.head=finetune",
                 "search.layers.stem=[freeze, finetune]", "search.recipe=distill")
    _, trial, choices = ask(config.search)
    for pinned in ("beta", "lr", "augment", "layers.head"):
        assert pinned not in trial.params and pinned not in trial.distributions
    assert choices.beta == 0.25 and choices.lr == 0.001 and choices.augment is True
    assert choices.layers["head"] == "finetune"
    # A group restricted to a subset of actions is a categorical over that subset.
    assert trial.distributions["layers.stem"] == CategoricalDistribution(("freeze", "finetune"))


# ---- conditional parameters --------------------------------------------------------------------------------------
def test_temperature_only_when_alpha_positive(cfg):
    config = cfg("search.recipe=distill")
    _, trial, choices = ask(config.search, fixed={"alpha": 0.0})
    assert "temperature" not in trial.params
    assert choices.alpha == 0.0 and choices.temperature == 4.0  # the range default, unused
    _, trial, choices = ask(config.search, fixed={"alpha": 0.3, "temperature": 2.5})
    assert trial.params["temperature"] == 2.5 and choices.temperature == 2.5
    # A pinned alpha of 0 never samples the temperature.
    _, trial, _ = ask(cfg("search.alpha=0.0", "search.recipe=distill").search)
    assert "alpha" not in trial.params and "temperature" not in trial.params


def test_slim_width_only_when_replaced_with_slim(cfg):
    space = cfg().search
    all_ft = {f"layers.{g}": "finetune" for g in GROUPS}
    one_rp = {**all_ft, "layers.block2": "replace"}
    _, trial, choices = ask(space, "slim", fixed={**one_rp, "slim_width": 0.25})
    assert trial.params["slim_width"] == 0.25 and choices.slim_width == 0.25
    _, trial, choices = ask(space, "slim", fixed=all_ft)
    assert "slim_width" not in trial.params and choices.slim_width == 0.5
    for other in ("reinit", "donor"):
        _, trial, _ = ask(space, other, fixed=one_rp)
        assert "slim_width" not in trial.params


# ---- defaults and grid -------------------------------------------------------------------------------------------
def test_defaults_for_trial_run(cfg):
    d = cfg("search.layers.head=[replace, finetune]").search.defaults()
    assert d.layers == {"stem": "finetune", "block1": "finetune", "block2": "finetune", "head": "replace"}
    assert (d.alpha, d.temperature, d.beta, d.threshold, d.lr) == (0.5, 4.0, 0.0, 0.95, 0.003)
    assert (d.source_weight, d.generations, d.slim_width, d.augment) == (0.5, 1, 0.5, False)
    # A range without default starts at its low end.
    assert cfg("search.alpha={low: 0.2, high: 0.9}").search.defaults().alpha == 0.2


def test_grid_space_with_steps(cfg):
    space = cfg(*GRID_SETS, "search.layers.stem=finetune").search
    grid = grid_space(space)
    assert grid["alpha"] == [0.0, 0.5, 1.0]
    assert grid["threshold"] == [0.9, 0.95, 1.0]
    assert grid["generations"] == [0, 1, 2]
    assert grid["lr"] == [0.003, 0.001]
    assert grid["augment"] == [False, True]
    assert grid["layers.head"] == ["finetune", "freeze", "replace"]
    assert "layers.stem" not in grid and "beta" not in grid and "temperature" not in grid
    sampler = make_sampler(SamplerSettings(name="grid"), space, 1)
    assert isinstance(sampler.base, optuna.samplers.GridSampler)
    # The grid sampler drives ask/tell over exactly that space.
    study = optuna.create_study(direction="maximize", sampler=sampler)
    trial = study.ask()
    choices = suggest_choices(trial, space, "reinit")
    assert choices.threshold in grid["threshold"] and choices.alpha in grid["alpha"]


def test_grid_needs_step_for_float_ranges(cfg):
    space = cfg().search  # quickstart: float ranges without step
    with pytest.raises(UserError, match=r"search\.\w+: the grid sampler needs a list or a range with step"):
        grid_space(space)
    with pytest.raises(UserError, match="grid sampler"):
        make_sampler(SamplerSettings(name="grid"), space, 1)


# ---- baselines ---------------------------------------------------------------------------------------------------
def test_enqueue_params_only_values_inside_distributions(cfg):
    space = cfg("search.alpha={low: 0.2, high: 1.0, default: 0.5}", "search.beta=0.0",
                "search.layers.actions=[finetune, replace]", "search.layers.head=finetune").search
    ft = enqueue_params(baseline_choices("finetune-all", space), space, "reinit")
    # The finetune recipe samples no KD or distill-stage choice (its budget is the default generations').
    assert not {"alpha", "temperature", "layer_term", "beta", "threshold", "generations"} & set(ft)
    assert "layers.head" not in ft  # pinned group
    assert ft["layers.stem"] == "finetune" and ft["lr"] == 0.003 and ft["recipe"] == "finetune"
    kd = enqueue_params(baseline_choices("finetune-all-kd", space), space, "reinit")
    assert kd["alpha"] == 0.5 and kd["generations"] == 1 and "beta" not in kd  # beta: pinned
    head = enqueue_params(baseline_choices("head-only", space), space, "reinit")
    assert not any(k.startswith("layers.") for k in head)  # 'freeze' is not a sampled action here
    # Every enqueued value is one its distribution contains: Optuna takes all of them as the trial's params.
    for name in BASELINES:
        params = enqueue_params(baseline_choices(name, space), space, "reinit")
        study, trial, _ = ask(space, fixed=params)
        for key, value in params.items():
            assert trial.distributions[key]._contains(trial.distributions[key].to_internal_repr(value))
            assert trial.params[key] == value


def test_every_baseline_is_a_point_of_the_quickstart_search(cfg):
    """The quickstart searches both recipes and the actions the baselines use, so each baseline is a point the search
    could sample: its Optuna parameters, enqueued, give back exactly its choices (an answer "use finetune-all" names
    a configuration the search could have found)."""
    space = cfg().search
    assert space.params["recipe"].choices == ["distill", "finetune"]
    for name in BASELINES:
        want = baseline_choices(name, space)
        _, trial, got = ask(space, fixed=enqueue_params(want, space, "reinit"))
        assert got == want, name
        assert trial.params["recipe"] == want.recipe and all(trial.params[f"layers.{g}"] == a
                                                             for g, a in want.layers.items())


def test_the_search_samples_both_recipes_and_only_the_choices_each_uses(cfg):
    """The quickstart's own sampler (TPE, conditional): both recipes come up; a finetune-recipe trial samples no KD
    or distill-stage choice (they would be noise in TPE's model), a distill trial samples them."""
    config = cfg()
    study = optuna.create_study(direction="maximize", sampler=make_sampler(config.study.sampler, config.search, 1))
    seen = {}
    for i in range(16):
        trial = study.ask()
        choices = suggest_choices(trial, config.search, "reinit")
        seen.setdefault(choices.recipe, set(trial.params))
        study.tell(trial, 0.5 + 0.01 * i)
    assert set(seen) == {"distill", "finetune"}
    distill_only = {"alpha", "layer_term", "beta", "threshold", "generations"}  # those the quickstart does not pin
    distill_only &= {n for n, p in config.search.params.items() if p.mode != "fixed"}
    assert distill_only and distill_only <= seen["distill"]
    assert not (distill_only | {"temperature"}) & seen["finetune"]


# ---- samplers and pruners ----------------------------------------------------------------------------------------
def test_every_sampler_name_builds(cfg):
    space = cfg(*GRID_SETS).search
    for name in SAMPLERS:
        sampler = make_sampler(SamplerSettings(name=name, seed=1), space, 1)
        assert isinstance(getattr(sampler, "base", sampler), SAMPLERS[name]), name  # QMC is not seeded per trial
    assert isinstance(make_sampler(SamplerSettings(name="auto"), space, 1).base, optuna.samplers.TPESampler)
    assert isinstance(make_sampler(SamplerSettings(name="auto"), space, 2).base, optuna.samplers.NSGAIISampler)
    # The benchmark's defaults, each overridable through kwargs.
    default = make_sampler(SamplerSettings(name="tpe"), space, 1).base
    assert default._group and default._n_startup_trials == DEFAULT_KWARGS["tpe"]["n_startup_trials"]
    sampler = make_sampler(SamplerSettings(name="tpe", kwargs={"n_startup_trials": 3, "group": False}), space, 1)
    assert sampler.base._n_startup_trials == 3 and not sampler.base._group


def test_every_sampler_samples_the_search_space(cfg):
    """Each sampler name asks and is told real trials of the quickstart's space (CMA-ES needs the `cmaes` package,
    GP torch and scipy: a missing dependency fails here, not in a user's study)."""
    space = cfg().search
    for name in SAMPLERS:
        settings = SamplerSettings(name=name, seed=1)
        if name == "grid":
            space = cfg(*GRID_SETS).search
        study = optuna.create_study(direction="maximize", sampler=make_sampler(settings, space, 1))
        for i in range(6):
            trial = study.ask()
            choices = suggest_choices(trial, space, "reinit")
            study.tell(trial, choices.lr * 100 + i)
        assert len(study.trials) == 6, name


def test_trials_draw_from_their_own_seed(cfg):
    """Two workers' samplers built alike (same config, same seed) on one study: the trials they ask at once differ,
    and a study run again draws the same trials (each trial's draws come from seed + its number)."""
    space = cfg().search

    def two_workers_ask():
        storage = optuna.storages.InMemoryStorage()
        workers = [optuna.create_study(storage=storage, study_name="s", direction="maximize", load_if_exists=True,
                                       sampler=make_sampler(SamplerSettings(name="tpe", seed=7), space, 1))
                   for _ in range(2)]
        trials = [w.ask() for w in workers]  # both asked before either is told
        return [suggest_choices(t, space, "reinit") for t in trials]

    first, again = two_workers_ask(), two_workers_ask()
    assert first[0] != first[1]
    assert first == again


def test_unknown_sampler_and_bad_kwargs(cfg):
    space = cfg().search
    with pytest.raises(UserError, match=r"unknown sampler 'tpee' \(did you mean 'tpe'\?\)"):
        make_sampler(SamplerSettings(name="tpee"), space, 1)
    with pytest.raises(UserError, match=r"study\.sampler\.kwargs"):
        make_sampler(SamplerSettings(name="tpe", kwargs={"n_startup": 3}), space, 1)


def test_every_pruner_name_builds():
    needs = {"threshold": {"lower": 0.1}, "percentile": {"percentile": 25.0}}
    for name in PRUNERS:
        pruner = make_pruner(PrunerSettings(name=name, kwargs=needs.get(name, {})))
        assert isinstance(pruner, PRUNERS[name]), name
    wrapped = make_pruner(PrunerSettings(name="median", patience=2))
    assert isinstance(wrapped, optuna.pruners.PatientPruner)
    assert isinstance(make_pruner(PrunerSettings(name="median", patience=-1)), optuna.pruners.MedianPruner)


def test_unknown_pruner_and_bad_kwargs():
    with pytest.raises(UserError, match=r"unknown pruner 'medain' \(did you mean 'median'\?\)"):
        make_pruner(PrunerSettings(name="medain"))
    with pytest.raises(UserError, match=r"study\.pruner\.kwargs"):  # TypeError from Optuna
        make_pruner(PrunerSettings(name="median", kwargs={"warmup": 3}))
    with pytest.raises(UserError, match=r"study\.pruner\.kwargs"):  # ValueError from Optuna
        make_pruner(PrunerSettings(name="median", kwargs={"n_startup_trials": -1}))
    with pytest.raises(UserError, match=r"study\.pruner\.kwargs"):  # ThresholdPruner needs a bound
        make_pruner(PrunerSettings(name="threshold"))


# ---- pruning on the step axis, as the objective asks it -------------------------------------------------------------
def _curve(study, stages, values, stage_warmup):
    """One trial through ask/tell, the way the objective reports: every value on steps 1, 2, ..., the pruner asked
    only at `is_decision_step`. Returns the step it was pruned at (None: it finished)."""
    from study.space.pruning import is_decision_step

    trial = study.ask()
    for step, value in enumerate(values, start=1):
        trial.report(value, step)
        if is_decision_step(stages, step, stage_warmup) and trial.should_prune():
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return step
    study.tell(trial, values[-1])
    return None


def test_the_quickstart_pruner_is_fair_to_late_and_improving_trials(cfg):
    from objectives.stages import plan_stages

    config = cfg("search.generations=0")  # quickstart: finetune 1-3, distill 4-9; median of >= 4, patience 0, warm-up 2
    stages, settings = plan_stages(config.pipeline, config.search.defaults()), config.study.pruner
    study = optuna.create_study(direction="maximize", pruner=make_pruner(settings))
    good = [0.60, 0.70, 0.75, 0.78, 0.80, 0.81, 0.82, 0.83, 0.84]
    for shift in (0.0, 0.01, -0.01, 0.02):  # the start-up trials and the median's four
        assert _curve(study, stages, [v + shift for v in good], settings.stage_warmup) is None
    # A fresh group starts far behind and keeps improving: never stopped while it improves.
    assert _curve(study, stages, [0.10, 0.30, 0.45, 0.55, 0.65, 0.72, 0.76, 0.79, 0.81], settings.stage_warmup) is None
    # Far behind and not improving (patience 0: only a step below the trial's own best counts): stopped, but only
    # at a decision point — the finetune stage's end (its first two epochs are its warm-up), not after epoch 1.
    assert _curve(study, stages, [0.10, 0.09, 0.08, 0.07, 0.06, 0.05, 0.04, 0.03, 0.02], settings.stage_warmup) == 3
    # Behind and falling in the distill stage: stopped at its third epoch (step 6), once past that stage's warm-up.
    assert _curve(study, stages, [0.60, 0.70, 0.75, 0.50, 0.45, 0.40, 0.40, 0.40, 0.40], settings.stage_warmup) == 6


def test_without_a_stage_warmup_a_flat_trial_is_stopped_after_its_first_epoch(cfg):
    from objectives.stages import plan_stages

    config = cfg("search.generations=0", "study.pruner={name: median, kwargs: {n_startup_trials: 2}}")
    stages, settings = plan_stages(config.pipeline, config.search.defaults()), config.study.pruner
    study = optuna.create_study(direction="maximize", pruner=make_pruner(settings))
    for _ in range(2):
        _curve(study, stages, [0.8] * 9, settings.stage_warmup)
    assert _curve(study, stages, [0.1] * 9, settings.stage_warmup) == 1


def test_pruning_decision_points_skip_stage_warmups_and_the_final_step():
    from objectives.stages import Stage
    from study.space.pruning import decision_steps, is_decision_step

    stages = [Stage("finetune", "finetune", 1, 3), Stage("distill", "distill", 4, 6),
              Stage("retrain-1", "generation", 10, 3)]
    assert decision_steps(stages, 0) == list(range(1, 12))  # every epoch but the recipe's last (12)
    assert decision_steps(stages, 2) == [3, 6, 7, 8, 9]  # a stage's third epoch on, and its last; never 12
    assert decision_steps(stages, 1000) == [3, 9]  # stage ends only
    assert not is_decision_step(stages, 12, 0) and not is_decision_step(stages, 13, 0)


# ---- the layer term and the adapter rank ---------------------------------------------------------------------------
TERMS = ["none", "feature", "params", "dann"]


def test_the_layer_term_is_searched_and_beta_only_sampled_with_a_term(cfg):
    config = cfg(f"search.layer_term=[{', '.join(TERMS)}]", "search.recipe=[distill, finetune]")
    _, trial, choices = ask(config.search, fixed={"recipe": "distill", "layer_term": "dann", "beta": 0.3})
    assert trial.distributions["layer_term"] == CategoricalDistribution(tuple(TERMS))
    assert choices.layer_term == "dann" and choices.beta == 0.3
    _, trial, choices = ask(config.search, fixed={"recipe": "distill", "layer_term": "none"})
    assert "beta" not in trial.params and (choices.layer_term, choices.beta) == ("none", 0.0)
    _, trial, choices = ask(config.search, fixed={"recipe": "finetune"})  # no teacher signal: no term
    assert "layer_term" not in trial.params and (choices.layer_term, choices.beta) == ("none", 0.0)


def test_pipeline_layer_term_stays_the_default_of_search_layer_term(cfg):
    assert cfg().search.defaults().layer_term == "feature"
    assert cfg("pipeline.layer_term=params").search.defaults().layer_term == "params"
    assert "layer_term" not in ask(cfg("pipeline.layer_term=dann").search)[1].params  # a pin, as before
    assert cfg("pipeline.layer_term=params", "search.layer_term=[dann, params]").search.defaults().layer_term == "dann"
    with pytest.raises(UserError, match="search.layer_term \\(dann, none\\) leaves out pipeline.layer_term 'params'"):
        cfg("pipeline.layer_term=params", "search.layer_term=[dann, none]")
    with pytest.raises(UserError, match="search.layer_term: unknown value 'adversarial'; choose from: none, feature, "
                                        "params, dann"):
        cfg("search.layer_term=adversarial")
    with pytest.raises(UserError, match="pipeline.dann_group: unknown layer group 'blok2' \\(did you mean 'block2'"):
        cfg("pipeline.dann_group=blok2")


def test_the_adapter_rank_only_when_a_group_is_adapted(cfg):
    space = cfg("search.layers.actions=[freeze, finetune, replace, adapt]").search
    all_ft = {f"layers.{g}": "finetune" for g in GROUPS}
    _, trial, choices = ask(space, fixed={**all_ft, "layers.block1": "adapt", "adapter_rank": 32})
    assert trial.distributions["layers.block1"] == CategoricalDistribution(("freeze", "finetune", "replace", "adapt"))
    assert trial.distributions["adapter_rank"] == CategoricalDistribution((8, 2, 32))
    assert choices.adapter_rank == 32 and choices.layers["block1"] == "adapt"
    _, trial, choices = ask(space, fixed=all_ft)
    assert "adapter_rank" not in trial.params and choices.adapter_rank == 8


def test_baselines_are_unchanged_by_adapt_and_the_layer_term(cfg):
    plain = cfg().search
    searched = cfg("search.layers.actions=[freeze, finetune, replace, adapt]",
                   f"search.layer_term=[{', '.join(TERMS)}]").search
    for name in BASELINES:
        a, b = baseline_choices(name, plain), baseline_choices(name, searched)
        assert a.layers == b.layers and (a.recipe, a.alpha, a.beta) == (b.recipe, b.alpha, b.beta)
        assert "adapt" not in b.layers.values()
