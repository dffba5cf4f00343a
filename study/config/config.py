"""The study config: one YAML file with sections task, model, pipeline, search, study and tracking, loaded into
typed, validated objects (pydantic dataclasses: each section's class declares its keys' types, ranges and choices).
Every error is one line naming the key's full path (`study.config.validation`); a misspelled key gets the closest
valid one.
`--set a.b.c=value` overrides any key before validation (the value is parsed as YAML).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import yaml
from pydantic import BeforeValidator, Strict

from models.errors import UserError, did_you_mean
from objectives.fields import NONE_IS_EMPTY, SETTINGS, Bool, Int, Mapping, Text, in_range
from objectives.settings import ModelSettings, PipelineSettings
from objectives.tasks import TaskOptions
from study.config.names import check_study_name
from study.config.validation import validate
from study.space.search import SearchSpace, parse_search
from study.workers.storage import DEFAULT_STORAGE


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader with two changes. YAML 1.1 reads `1e-3` (no dot) as a string; accept YAML 1.2 floats so
    learning rates can be written plainly. And a key given twice in one mapping is an error (PyYAML keeps the last
    silently, so a user's first setting would vanish without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` is resolved by flatten_mapping
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # PyYAML's own construct_mapping rejects it with its message
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str):
    """yaml.safe_load with YAML 1.2 floats (`1e-3`)."""
    return yaml.load(text, Loader=_Loader)


# Each objective a study can optimise, with its direction.
OBJECTIVES = {"target_val_acc": "maximize", "source_val_acc": "maximize", "student_params": "minimize",
              "epochs_to_threshold": "minimize"}
# A single objective may be written without brackets (its names are checked in config_from_dict).
Objectives = Annotated[list[Text], BeforeValidator(lambda value: [value] if isinstance(value, str) else value),
                       Strict()]


@pydantic.dataclasses.dataclass(config=SETTINGS)
class SamplerSettings:
    """`study.sampler`: an Optuna sampler by name, with keyword arguments."""

    name: Text = "auto"  # auto = tpe for one objective, nsga2 for several
    seed: Int = 0
    kwargs: Mapping = field(default_factory=dict)


@pydantic.dataclasses.dataclass(config=SETTINGS)
class PrunerSettings:
    """`study.pruner`: an Optuna pruner by name, with keyword arguments, optionally wrapped by PatientPruner."""

    name: Text = "median"
    kwargs: Mapping = field(default_factory=dict)
    patience: Int = -1  # >= 0 wraps the pruner in PatientPruner(patience=...)
    # The pruner is asked only after this many epochs of each stage, and at each stage's last step (see
    # study.space.pruning); 0 = after every epoch.
    stage_warmup: Int = in_range(0, 0, 10**6)


@pydantic.dataclasses.dataclass(config=SETTINGS)
class ConfirmSettings:
    """`study.confirm`: once the study is at its total, re-run its top configurations and the baselines on fresh
    seeds (see study.confirm)."""

    top: Int = in_range(3, 0, 100)  # distinct top configurations; 0 = no confirmation
    seeds: Int = in_range(5, 2, 1000)  # fresh run seeds each (an interval needs two)
    # splits: each seed also draws its own train/val/test split and trains its own teacher on that split's source
    # (the verdict then speaks about unseen data); none: every seed keeps the study's split and teacher (cheaper).
    resample: Literal["splits", "none"] = "splits"


@pydantic.dataclasses.dataclass(config=SETTINGS)
class StudySettings:
    """The config's `study` section."""

    name: Text = "quickstart"
    storage: Text = DEFAULT_STORAGE  # any Optuna URL, or journal:PATH; DISTILLSTUDY_STORAGE overrides
    objective: Objectives = field(default_factory=lambda: ["target_val_acc"])
    sampler: Annotated[SamplerSettings, NONE_IS_EMPTY] = field(default_factory=SamplerSettings)
    pruner: Annotated[PrunerSettings, NONE_IS_EMPTY] = field(default_factory=PrunerSettings)
    n_trials: Int = in_range(20, 1, 10**7)  # total finished trials of the study
    baselines: Bool = True  # enqueue the standard baselines when the study is created
    heartbeat_interval: Int = in_range(20, 1, 86400)  # seconds, RDB storages only
    grace_period: Int = in_range(60, 2, 86400)  # a silent RUNNING trial is stale after
    max_retry: Int = in_range(2, 0, 100)  # re-runs of a trial whose worker died
    # seconds a worker waits out an unreachable database server (a restart) before it stops; server storages only
    storage_retry: Int = in_range(60, 0, 86400)
    # Per-stage checkpoints for retried trials (a shared FS for a cluster); '' = `checkpoints` under pipeline.cache_dir.
    checkpoint_dir: Text = ""
    confirm: Annotated[ConfirmSettings, NONE_IS_EMPTY] = field(default_factory=ConfirmSettings)


@pydantic.dataclasses.dataclass(config=SETTINGS)
class TrackingSettings:
    """The config's `tracking` section (MLflow)."""

    enabled: Bool = True
    mlflow_uri: Text = ""  # '' = MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: Text = ""  # '' = the study's name
    log_weights: Literal["all", "best", "none"] = "all"
    register_best: Bool = True  # register the best trial's model as '<study>-best'
    # seconds a stopping worker (Ctrl-C, SIGTERM, a lost storage) waits for its queued MLflow writes before it drops
    # them and exits: keep it under the scheduler's kill grace period (Kubernetes and Slurm: 30 s by default)
    exit_wait: Int = in_range(15, 0, 3600)


@pydantic.dataclasses.dataclass(config=SETTINGS)
class _Sections:
    """The config file's sections, validated in one go so every error carries its key's full path (`search` has
    its own checks: its keys depend on the parameter table and the model's layer groups)."""

    task: Annotated[TaskOptions, NONE_IS_EMPTY] = field(default_factory=TaskOptions)
    model: Annotated[ModelSettings, NONE_IS_EMPTY] = field(default_factory=ModelSettings)
    pipeline: Annotated[PipelineSettings, NONE_IS_EMPTY] = field(default_factory=PipelineSettings)
    search: Any = None
    study: Annotated[StudySettings, NONE_IS_EMPTY] = field(default_factory=StudySettings)
    tracking: Annotated[TrackingSettings, NONE_IS_EMPTY] = field(default_factory=TrackingSettings)


SECTIONS = tuple(f.name for f in dataclasses.fields(_Sections))


@dataclass
class Config:
    """A whole, validated config."""

    task: TaskOptions
    model: ModelSettings
    pipeline: PipelineSettings
    search: SearchSpace
    study: StudySettings
    tracking: TrackingSettings

    def with_changes(self, section: str, **changes) -> Config:
        """A copy with `changes` to one section: a validated config is never changed in place (a worker's
        `--device`, a study's name), so whoever holds it can trust it."""
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})

    def to_dict(self) -> dict:
        """Plain data (YAML/JSON-able) that `config_from_dict` turns back into the same Config."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS if name != "search"}
        out["search"] = self.search.to_dict()
        return out


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config file (None = built-in defaults), apply `--set` overrides, validate."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file '{path}' not found")
        try:
            raw = parse_yaml(_read_text(path)) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise UserError(f"config file '{path}' is not valid YAML{where}: "
                            f"{getattr(exc, 'problem', None) or exc}") from None
        if not isinstance(raw, dict):
            raise UserError(f"config file '{path}' must be a mapping with sections {', '.join(SECTIONS)}")
    for item in overrides:
        apply_override(raw, item)
    config = config_from_dict(raw)
    try:  # checked here, not in config_from_dict: a study stored before the rule must stay readable
        check_study_name(config.study.name, creating=True)
    except UserError as exc:
        raise UserError(f"study.name: {exc}") from None
    if config.tracking.mlflow_uri:  # its credentials go to this process's environment, never into a stored config
        from study.tracking.access import take_credentials

        config = config.with_changes("tracking", mlflow_uri=take_credentials(config.tracking.mlflow_uri))
    return config


def _read_text(path: Path) -> str:
    """The file's text as UTF-8 (a BOM allowed), else a one-line UserError saying where it is not."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise UserError(f"config file '{path}' is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at line "
                        f"{line}); save it as UTF-8") from None
    except OSError as exc:
        raise UserError(f"cannot read config file '{path}': {exc.strerror or exc}") from None


def apply_override(raw: dict, item: str) -> None:
    """Apply one `a.b.c=value` override to the raw config dict (value parsed as YAML)."""
    if "=" not in item:
        raise UserError(f"--set '{item}': expected KEY=VALUE, e.g. search.layers.head=finetune")
    key, _, text = item.partition("=")
    try:
        value = parse_yaml(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.strip().split(".")
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:  # `tracking:` with nothing under it is an empty section
            node[part] = {}
        if not isinstance(node[part], dict):
            raise UserError(f"--set {key}: '{'.'.join(parts[:i + 1])}' is not a section")
        node = node[part]
    node[parts[-1]] = value


def config_from_dict(raw: dict) -> Config:
    """Validate plain data into a Config (unknown keys, types and ranges checked, with full key paths)."""
    sections = validate(_Sections, raw)
    cfg = Config(task=sections.task, model=sections.model, pipeline=sections.pipeline, search=SearchSpace(),
                 study=sections.study, tracking=sections.tracking)
    for i, name in enumerate(cfg.study.objective):
        if name not in OBJECTIVES:
            raise UserError(f"study.objective[{i}]: unknown objective '{name}'{did_you_mean(name, OBJECTIVES)}; "
                            f"choose from: {', '.join(OBJECTIVES)}")
    if not cfg.study.objective:
        raise UserError("study.objective: give at least one objective")
    _check_names(cfg)
    _check_task(cfg.task)
    cfg.search = parse_search(sections.search, cfg)
    if cfg.pipeline.dann_group and cfg.pipeline.dann_group not in cfg.search.groups:
        raise UserError(f"pipeline.dann_group: unknown layer group '{cfg.pipeline.dann_group}'"
                        f"{did_you_mean(cfg.pipeline.dann_group, cfg.search.groups)} of {cfg.model.arch}; groups: "
                        f"{', '.join(cfg.search.groups)}")
    if "epochs_to_threshold" in cfg.study.objective and cfg.search.params["threshold"].mode != "fixed":
        # A sampled threshold would reward sampling a low one: the objective compares epochs to one bar.
        raise UserError("study.objective epochs_to_threshold needs a pinned threshold (a sampled one rewards "
                        "sampling a low one): set search.threshold to one number, e.g. --set search.threshold=0.9")
    return cfg


def _check_names(cfg: Config) -> None:
    """Registry names are checked at load time, with the key's path, so no study is created from a typo."""
    from models.imports import ImportNotAllowed
    from models.registry import check_arch
    from objectives.tasks import get_task_info
    from study.config.allowed_imports import not_allowed

    checks = [("task.name", get_task_info, cfg.task.name), ("model.arch", check_arch, cfg.model.arch)]
    if cfg.model.donor_arch:
        checks.append(("model.donor_arch", check_arch, cfg.model.donor_arch))
    for where, lookup, name in checks:
        try:
            lookup(name)
        except ImportNotAllowed:
            raise not_allowed(where, name) from None
        except UserError as exc:
            raise UserError(str(exc) if str(exc).startswith(where) else f"{where}: {exc}") from None


def _check_task(task: TaskOptions) -> None:
    """What the single keys' ranges cannot say: the splits leave data to train on, and imagefolder has its folders."""
    if task.val_fraction + task.test_fraction >= 1:
        raise UserError(f"task.val_fraction + task.test_fraction is {task.val_fraction + task.test_fraction:g}: "
                        f"it must be below 1 to leave a training split")
    if task.name == "imagefolder":
        for key in ("source_dir", "target_dir"):
            if not getattr(task, key).strip():
                raise UserError(f"task.{key}: required by task imagefolder (a folder with one subfolder per class)")

