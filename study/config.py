"""The study config: one YAML file with sections task, model, pipeline, search, study and tracking, loaded into
typed, validated objects. Every error names the key's full path; a misspelled key gets the closest valid one.
`--set a.b.c=value` overrides any key before validation (the value is parsed as YAML).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from models.errors import UserError, did_you_mean
from objectives.settings import ModelSettings, PipelineSettings
from objectives.tasks import TaskOptions

from .names import check_study_name
from .search import SearchSpace, parse_search
from .storage import DEFAULT_STORAGE

SECTIONS = ("task", "model", "pipeline", "search", "study", "tracking")


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


@dataclass
class SamplerSettings:
    """`study.sampler`: an Optuna sampler by name, with keyword arguments."""

    name: str = "auto"  # auto = tpe for one objective, nsga2 for several
    seed: int = 0
    kwargs: dict = field(default_factory=dict)


@dataclass
class PrunerSettings:
    """`study.pruner`: an Optuna pruner by name, with keyword arguments, optionally wrapped by PatientPruner."""

    name: str = "median"
    kwargs: dict = field(default_factory=dict)
    patience: int = -1  # >= 0 wraps the pruner in PatientPruner(patience=...)
    # The pruner is asked only after this many epochs of each stage, and at each stage's last step (see
    # study.pruning); 0 = after every epoch.
    stage_warmup: int = field(default=0, metadata={"range": (0, 10**6)})


@dataclass
class ConfirmSettings:
    """`study.confirm`: once the study is at its total, re-run its top configurations and the baselines on fresh
    seeds (see study.confirm)."""

    top: int = field(default=3, metadata={"range": (0, 100)})  # distinct top configurations; 0 = no confirmation
    seeds: int = field(default=5, metadata={"range": (2, 1000)})  # fresh run seeds each (an interval needs two)
    # splits: each seed also draws its own train/val/test split and trains its own teacher on that split's source
    # (the verdict then speaks about unseen data); none: every seed keeps the study's split and teacher (cheaper).
    resample: str = field(default="splits", metadata={"choices": ("splits", "none")})


@dataclass
class StudySettings:
    """The config's `study` section."""

    name: str = "quickstart"
    storage: str = DEFAULT_STORAGE  # any Optuna URL, or journal:PATH; DISTILLSTUDY_STORAGE overrides
    objective: list = field(default_factory=lambda: ["target_val_acc"])
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    pruner: PrunerSettings = field(default_factory=PrunerSettings)
    n_trials: int = field(default=20, metadata={"range": (1, 10**7)})  # total finished trials of the study
    baselines: bool = True  # enqueue the standard baselines when the study is created
    heartbeat_interval: int = field(default=20, metadata={"range": (1, 86400)})  # seconds, RDB storages only
    grace_period: int = field(default=60, metadata={"range": (2, 86400)})  # a silent RUNNING trial is stale after
    max_retry: int = field(default=2, metadata={"range": (0, 100)})  # re-runs of a trial whose worker died
    # seconds a worker waits out an unreachable database server (a restart) before it stops; server storages only
    storage_retry: int = field(default=60, metadata={"range": (0, 86400)})
    # Per-stage checkpoints for retried trials (a shared FS for a cluster); '' = `checkpoints` under pipeline.cache_dir.
    checkpoint_dir: str = ""
    confirm: ConfirmSettings = field(default_factory=ConfirmSettings)


@dataclass
class TrackingSettings:
    """The config's `tracking` section (MLflow)."""

    enabled: bool = True
    mlflow_uri: str = ""  # '' = MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = ""  # '' = the study's name
    log_weights: str = field(default="all", metadata={"choices": ("all", "best", "none")})
    register_best: bool = True  # register the best trial's model as '<study>-best'


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
        from .tracking.access import take_credentials

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
    _check_keys(raw, SECTIONS, "")
    cfg = Config(
        task=build_dataclass(TaskOptions, raw.get("task") or {}, "task"),
        model=build_dataclass(ModelSettings, raw.get("model") or {}, "model"),
        pipeline=build_dataclass(PipelineSettings, raw.get("pipeline") or {}, "pipeline"),
        search=SearchSpace(),
        study=build_dataclass(StudySettings, raw.get("study") or {}, "study"),
        tracking=build_dataclass(TrackingSettings, raw.get("tracking") or {}, "tracking"),
    )
    if isinstance(cfg.study.objective, str):
        cfg.study.objective = [cfg.study.objective]
    for i, name in enumerate(cfg.study.objective):
        if name not in OBJECTIVES:
            raise UserError(f"study.objective[{i}]: unknown objective '{name}'{did_you_mean(name, OBJECTIVES)}; "
                            f"choose from: {', '.join(OBJECTIVES)}")
    if not cfg.study.objective:
        raise UserError("study.objective: give at least one objective")
    _check_names(cfg)
    _check_task(cfg.task)
    cfg.search = parse_search(raw.get("search"), cfg)
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

    from .allowed_imports import not_allowed

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


def _check_keys(data, allowed, path: str) -> None:
    if not isinstance(data, dict):
        raise UserError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    for key in data:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            raise UserError(f"{where}: unknown key{did_you_mean(key, allowed)}; valid keys: {', '.join(allowed)}")


def build_dataclass(cls, data, path: str):
    """Build dataclass `cls` from `data`, checking keys, types, `choices` and `range` field metadata."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_keys(data, fields, path)
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        f, where = fields[name], f"{path}.{name}"
        values[name] = _coerce(hints[name], value, where)
        choices = f.metadata.get("choices")
        choices = choices() if callable(choices) else choices  # a registry's names, read now
        if choices is not None and values[name] not in choices:
            raise UserError(f"{where}: '{value}' is not one of {', '.join(map(str, choices))}"
                            f"{did_you_mean(value, choices)}")
        if "range" in f.metadata:
            low, high = f.metadata["range"]
            if f.metadata.get("open"):  # both ends excluded
                if not low < values[name] < high:
                    raise UserError(f"{where}: {value} is out of range ({low:g}, {high:g}): both ends excluded")
            elif not low <= values[name] <= high:
                raise UserError(f"{where}: {value} is out of range [{low}, {high}]")
    return cls(**values)


def _coerce(hint, value, where: str):
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value if value is not None else {}, where)
    origin = typing.get_origin(hint) or hint
    if origin is bool:
        if isinstance(value, bool):
            return value
    elif origin is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif origin is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif origin is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
    elif origin is list:
        if isinstance(value, list):
            return value
        if isinstance(value, str):  # a single objective may be written without brackets
            return [value]
    elif origin is dict:
        if isinstance(value, dict):
            return value
        if value is None:
            return {}
    else:
        return value
    raise UserError(f"{where}: expected {getattr(origin, '__name__', origin)}, got {type(value).__name__} "
                    f"({value!r})")
