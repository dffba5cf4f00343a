"""The pipeline's typed settings: fixed ones (`ModelSettings`, `PipelineSettings`) and a trial's choices
(`TrialChoices`). The study layer fills these from the YAML config; the pipeline only reads them.

The config's sections validate themselves (pydantic, see `objectives.fields`): types, ranges, fixed choices
(`Literal`) and registry-backed ones (`pipeline.layer_term`, `pipeline.replace_with`, whose names are read from the
registry when a value is checked, so a newly registered name is valid with no edit here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

import pydantic

from .fields import NONE_IS_EMPTY, SETTINGS, Bool, Float, Int, Mapping, Text, in_range, registered
from .params import PARAMS, layer_param, split_layers


def _searched(name: str):
    # A trial choice's default is its search parameter's (`objectives.params`), declared there only.
    return field(default=PARAMS[name].scalar())


@pydantic.dataclasses.dataclass(config=SETTINGS)
class ModelSettings:
    """The config's `model` section."""

    # A registered name, torchvision:NAME, timm:NAME or package.module:function (`models.external`).
    arch: Text = "digitnet"
    width: Float = in_range(1.0, 0.05, 16.0)  # hidden-width factor of the teacher (and so of the student)
    teacher: Literal["train", "checkpoint", "pretrained"] = "train"  # where the teacher comes from
    checkpoint: Text = ""  # teacher state_dict file when teacher: checkpoint
    donor_arch: Text = ""  # replace_with: donor takes groups from this model, trained on the source ('' = arch)
    donor_width: Float = in_range(2.0, 0.05, 16.0)  # hidden-width factor of the donor (wider = more accurate)
    # Layer group -> module-name prefixes, input to output ({} = the architecture's default grouping).
    groups: Mapping = field(default_factory=dict)


@pydantic.dataclasses.dataclass(config=SETTINGS)
class AugmentSettings:
    """Batch-level tensor augmentation, applied to training batches when the trial's `augment` is true."""

    translate: Float = in_range(0.125, 0.0, 0.5)  # max shift, as a fraction of the image side
    flip: Bool = True  # horizontal flips, only for tasks whose labels survive them
    brightness: Float = in_range(0.2, 0.0, 1.0)  # max additive brightness change
    contrast: Float = in_range(0.2, 0.0, 1.0)  # max relative contrast change
    noise: Float = in_range(0.03, 0.0, 1.0)  # std of additive Gaussian noise


@pydantic.dataclasses.dataclass(config=SETTINGS)
class PipelineSettings:
    """The config's `pipeline` section: everything fixed for all trials of a study."""

    seed: Int = in_range(0, 0, 2**31 - 1)  # drives data splits, init and batch order
    device: Text = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: Int = in_range(64, 1, 65536)
    teacher_epochs: Int = in_range(15, 0, 10000)
    teacher_lr: Float = in_range(3e-3, 1e-7, 10.0)
    finetune_epochs: Int = in_range(4, 0, 10000)
    distill_epochs: Int = in_range(8, 0, 10000)
    retrain_epochs: Int = in_range(4, 0, 10000)  # per generation
    # Where a replaced group's module comes from: reinit | slim | donor (`objectives.replacements`).
    replace_with: Annotated[Text, registered("objectives.replacements", "list_replacements")] = "reinit"
    # beta's term when `search.layer_term` is not given (its default; kept so older configs run unchanged): none |
    # feature MSE | params, L2-SP to the source weights | dann, domain-adversarial (`objectives.layer_terms`).
    layer_term: Annotated[Text, registered("objectives.layer_terms", "layer_term_choices")] = "feature"
    # The group whose output the dann term's domain classifier reads ('' = the last group before the head).
    dann_group: Text = ""
    retrain_on: Literal["both", "source", "target"] = "both"
    distill_teacher: Literal["best", "source"] = "best"  # distill's teacher: better of teacher/finetune, or the source
    # The model a trial delivers (and every figure it reports): the student stage with the best target validation
    # accuracy (like early stopping; first of equals) or the last student stage. The teacher is never delivered.
    select: Literal["best", "last"] = "best"
    weight_decay: Float = in_range(0.0, 0.0, 1.0)
    augment: Annotated[AugmentSettings, NONE_IS_EMPTY] = field(default_factory=AugmentSettings)
    cache_dir: Text = ".distillstudy/cache"  # teacher/donor cache (a shared directory for cluster workers)
    cpu_threads: Int = in_range(1, 0, 1024)  # torch threads on CPU; small models run fastest on one (0 = torch's)
    compile: Bool = False  # torch.compile the student (CUDA only; ignored on CPU)
    eval_batch_size: Int = in_range(1024, 1, 1 << 20)
    # DataLoader worker processes decoding imagefolder images (0 = decode in the trial's process); in-memory tasks
    # never use them. Results do not depend on it: the batch order is seeded independently of the workers.
    num_workers: Int = in_range(2, 0, 64)


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
