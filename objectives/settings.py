"""The pipeline's typed settings: fixed ones (`ModelSettings`, `PipelineSettings`) and a trial's choices
(`TrialChoices`). The study layer fills these from the YAML config; the pipeline only reads them.

Field metadata drives validation in `study.config`: `choices` (allowed values) and `range` (inclusive bounds).
The `choices` of a registry-backed key (`pipeline.layer_term`, `pipeline.replace_with`) is a function returning its
registry's names when called, so a newly registered name is valid with no edit here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from .params import PARAMS, layer_param, split_layers


def _choices(*values):
    return field(default=values[0], metadata={"choices": values})


def _range(default, low, high):
    return field(default=default, metadata={"range": (low, high)})


def _searched(name: str):
    # A trial choice's default is its search parameter's (`objectives.params`), declared there only.
    return field(default=PARAMS[name].scalar())


def _registered(default: str, module: str, lister: str):
    # `choices` as a function: the registry's names at the moment of validation (its module imports this one, so
    # it is imported only then).
    return field(default=default,
                 metadata={"choices": lambda: getattr(importlib.import_module(module), lister)()})


@dataclass
class ModelSettings:
    """The config's `model` section."""

    # A registered name, torchvision:NAME, timm:NAME or package.module:function (`models.external`).
    arch: str = "digitnet"
    width: float = _range(1.0, 0.05, 16.0)  # hidden-width factor of the teacher (and so of the student)
    teacher: str = _choices("train", "checkpoint", "pretrained")  # where the teacher comes from
    checkpoint: str = ""  # teacher state_dict file when teacher: checkpoint
    donor_arch: str = ""  # replace_with: donor takes groups from this model, trained on the source ('' = arch)
    donor_width: float = _range(2.0, 0.05, 16.0)  # hidden-width factor of the donor (wider = more accurate)
    # Layer group -> module-name prefixes, input to output ({} = the architecture's default grouping).
    groups: dict = field(default_factory=dict)


@dataclass
class AugmentSettings:
    """Batch-level tensor augmentation, applied to training batches when the trial's `augment` is true."""

    translate: float = _range(0.125, 0.0, 0.5)  # max shift, as a fraction of the image side
    flip: bool = True  # horizontal flips, only for tasks whose labels survive them
    brightness: float = _range(0.2, 0.0, 1.0)  # max additive brightness change
    contrast: float = _range(0.2, 0.0, 1.0)  # max relative contrast change
    noise: float = _range(0.03, 0.0, 1.0)  # std of additive Gaussian noise


@dataclass
class PipelineSettings:
    """The config's `pipeline` section: everything fixed for all trials of a study."""

    seed: int = _range(0, 0, 2**31 - 1)  # drives data splits, init and batch order
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = _range(64, 1, 65536)
    teacher_epochs: int = _range(15, 0, 10000)
    teacher_lr: float = _range(3e-3, 1e-7, 10.0)
    finetune_epochs: int = _range(4, 0, 10000)
    distill_epochs: int = _range(8, 0, 10000)
    retrain_epochs: int = _range(4, 0, 10000)  # per generation
    # Where a replaced group's module comes from: reinit | slim | donor (`objectives.replacements`).
    replace_with: str = _registered("reinit", "objectives.replacements", "list_replacements")
    # beta's term when `search.layer_term` is not given (its default; kept so older configs run unchanged): none |
    # feature MSE | params, L2-SP to the source weights | dann, domain-adversarial (`objectives.layer_terms`).
    layer_term: str = _registered("feature", "objectives.layer_terms", "layer_term_choices")
    # The group whose output the dann term's domain classifier reads ('' = the last group before the head).
    dann_group: str = ""
    retrain_on: str = _choices("both", "source", "target")
    distill_teacher: str = _choices("best", "source")  # distill's teacher: better of teacher/finetune, or the source
    # The model a trial delivers (and every figure it reports): the student stage with the best target validation
    # accuracy (like early stopping; first of equals) or the last student stage. The teacher is never delivered.
    select: str = _choices("best", "last")
    weight_decay: float = _range(0.0, 0.0, 1.0)
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    cache_dir: str = ".distillstudy/cache"  # teacher/donor cache (a shared directory for cluster workers)
    cpu_threads: int = _range(1, 0, 1024)  # torch threads on CPU; small models run fastest on one (0 = torch's)
    compile: bool = False  # torch.compile the student (CUDA only; ignored on CPU)
    eval_batch_size: int = _range(1024, 1, 1 << 20)
    # DataLoader worker processes decoding imagefolder images (0 = decode in the trial's process); in-memory tasks
    # never use them. Results do not depend on it: the batch order is seeded independently of the workers.
    num_workers: int = _range(2, 0, 64)


@dataclass
class TrialChoices:
    """One trial's choices: what the study searches over (the config's `search` section, resolved)."""

    layers: dict[str, str]  # layer group -> freeze | finetune | replace | adapt
    recipe: str = _searched("recipe")  # one of params.RECIPES
    temperature: float = _searched("temperature")
    alpha: float = _searched("alpha")  # weight of the KD term (1 - alpha on the label term); 0 = no KD, pool unused
    beta: float = _searched("beta")  # weight of the layer term
    threshold: float = _searched("threshold")  # distillation stops once target validation accuracy reaches this
    lr: float = _searched("lr")
    source_weight: float = _searched("source_weight")  # weight of the source data's loss terms (0 = target only)
    generations: int = _searched("generations")  # born-again generations (recipe finetune: only sets the budget)
    slim_width: float = _searched("slim_width")  # width factor of slim replacements
    # beta's term: none | a registered layer term; '' = the pipeline's `layer_term` (run_trial resolves it).
    layer_term: str = _searched("layer_term")
    adapter_rank: int = _searched("adapter_rank")  # rank of adapted groups' residual adapters (full 1x1 from width on)
    augment: bool = _searched("augment")

    def flat(self) -> dict:
        """Every choice under its one name, the search parameter's (`layers.<group>` for a layer group, else the
        field's name): the Optuna parameter, the MLflow param and the stored record use it, and `--set` takes it as
        `search.<name>`."""
        out = {layer_param(g): a for g, a in self.layers.items()}
        out.update({k: v for k, v in self.__dict__.items() if k != "layers"})
        return out

    @classmethod
    def from_flat(cls, flat: dict) -> TrialChoices:
        """The inverse of `flat`."""
        layers, others = split_layers(flat)
        return cls(layers=layers, **others)
