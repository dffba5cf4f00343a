"""One trial of the transfer-and-distill pipeline, end to end:

    teacher -> finetune -> distill -> retrain-1 .. retrain-G (born-again generations) -> evaluate

(recipe `distill`), or teacher -> finetune for the whole epoch budget (recipe `finetune`, the baselines' recipe).
Each stage owns a fixed block of the step axis (see `objectives.stages`); `report(step, target_val_acc, stage)` is
called after every student epoch, which is all the study layer needs for pruning. Nothing here knows Optuna.

A trial delivers one model: the student stage chosen by `pipeline.select` (never the teacher), and every figure of
the result (value, accuracies, `student_params`, `student`) describes that model.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

import torch

from models import GroupedModel, create_model, derive_seed

from .checkpoints import StageCheckpoints
from .device import place, resolve_device
from .layer_terms import LayerTermContext, LayerTermPlan, get_layer_term, layer_term_options
from .params import NO_TERM
from .replacements import get_replacement
from .settings import ModelSettings, PipelineSettings, TrialChoices
from .stages import Stage, check_stage_data, plan_stages, stage_sources
from .student import build_student, frozen_groups, trainable_parameters
from .tasks import FolderImages, LabeledImages, TaskData, TaskOptions, load_task
from .teacher import TeacherInfo, get_teacher
from .train import EpochFn, LoopContext, ReportFn, StageRun, StageSpec, accuracy, train_stage


@dataclass
class StageResult:
    """Accuracy of one stage's model on both domains, and what the stage did and cost."""

    source_val_acc: float
    source_test_acc: float
    target_val_acc: float
    target_test_acc: float
    epochs: int
    seconds: float
    threshold_epoch: int | None = None
    first_step: int = 0  # the stage's first step on the step axis (0: the teacher)
    kd_teacher: str | None = None  # the model it distilled from (None: no teacher signal)
    sources: dict = field(default_factory=dict)  # data source -> weight of its loss terms


@dataclass
class TrialResult:
    """Everything a trial produced. Every figure describes the delivered model, the student stage `best_stage`
    chosen by `select`; `stages` also holds the teacher's accuracies, for reference only."""

    value: float  # the delivered model's target validation accuracy
    best_stage: str  # the delivered stage (never 'teacher')
    select: str  # the rule that chose it: best | last
    recipe: str
    stages: dict[str, StageResult]
    params: dict
    layer_map: dict
    student_params: int  # every parameter of the delivered model, adapters included (its size)
    teacher_params: int
    teacher: TeacherInfo
    donor: TeacherInfo | None
    epochs_to_threshold: int | None
    total_epochs: int  # student epochs trained (stages that stopped at the threshold trained fewer)
    budget: int  # the last step of the recipe's step axis: its most student epochs
    seconds: float
    device: str
    run_seed: int  # seeded the students' initialisation and batch order
    model_hash: str  # fingerprint of the delivered weights: two trials that deliver the same model share it
    student: GroupedModel = field(repr=False)  # the delivered model
    # The delivered model's parameters the trial trained (fine-tuned and replaced groups, adapters); frozen and
    # adapted groups keep the teacher's. `student_params` - `trainable_params` are the teacher's, unchanged.
    trainable_params: int = 0
    models: dict = field(default_factory=dict, repr=False)  # stage -> model (the teacher included, for reference)
    # A few target validation images on the host: the input example of the logged MLflow model.
    example_input: torch.Tensor | None = field(default=None, repr=False)
    data_seed: int = 0  # seeded the data splits and the teacher (`pipeline.seed` but in a resampled confirmation)
    data_fingerprint: str = ""  # hash of the split data the trial trained and was scored on (`TaskData.fingerprint`)

    def to_dict(self) -> dict:
        """The JSON form printed by `trial run --json` (models left out)."""
        return {
            "value": self.value, "best_stage": self.best_stage, "select": self.select, "recipe": self.recipe,
            "stages": {k: asdict(v) for k, v in self.stages.items()},
            "params": self.params, "layer_map": self.layer_map, "student_params": self.student_params,
            "trainable_params": self.trainable_params, "teacher_params": self.teacher_params,
            "teacher_cache": self.teacher.cache, "teacher_key": self.teacher.key,
            "donor_cache": self.donor.cache if self.donor else None, "epochs_to_threshold": self.epochs_to_threshold,
            "total_epochs": self.total_epochs, "budget": self.budget, "seconds": self.seconds, "device": self.device,
            "run_seed": self.run_seed, "data_seed": self.data_seed, "data_fingerprint": self.data_fingerprint,
            "model_hash": self.model_hash,
        }


_task_cache: OrderedDict = OrderedDict()
_task_lock = threading.Lock()
# Splits kept per process, the most recently used: a study's one split and, in a resampled confirmation, one per
# seed (its runs come seed after seed, so the default 5 seeds plus the study's split all stay), without keeping a
# device copy of every seed's data for a confirmation on many seeds.
TASK_CACHE_SIZE = 8


def get_task(options: TaskOptions, seed: int, device: torch.device) -> TaskData:
    """The task split with `seed` on `device`, built once per process (trials of a study share it). In-memory data
    is moved there now; folder data only records it (its batches are copied there as they are read)."""
    key = (repr(options), seed, str(device))
    with _task_lock:
        if key not in _task_cache:
            task = load_task(options, seed)
            for name, value in vars(task).items():
                if isinstance(value, (LabeledImages, FolderImages)):
                    setattr(task, name, value.to(device))
            _task_cache[key] = task
            while len(_task_cache) > TASK_CACHE_SIZE:
                _task_cache.popitem(last=False)  # a trial that still runs on it keeps its own reference
        _task_cache.move_to_end(key)
        return _task_cache[key]


def preflight(task: TaskData, model: ModelSettings, pipeline: PipelineSettings,
              choices: TrialChoices) -> tuple[list[Stage], dict]:
    """Reject impossible choices before any training: unknown groups/actions, shapes that do not fit, a stage
    with nothing to train on, an unregistered layer term or replacement strategy, a layer term its own check
    rejects. Returns the recipe's stages and the student's layer map (it depends on the architecture and the
    choices, not on any weights). `choices.layer_term` must be resolved (see `run_trial`)."""
    term = choices.layer_term if choices.beta > 0 else NO_TERM  # beta 0: no term is built, whatever its name
    options = layer_term_options(choices.layer_term)  # an unknown name fails here, beta or not
    get_replacement(pipeline.replace_with)
    stages = plan_stages(pipeline, choices)
    check_stage_data(stages, task, pipeline, choices)
    teacher = create_model(model.arch, task.num_classes, task.image_shape[0], width=model.width,
                           groups=model.groups or None)
    donor = _fresh_donor(task, model) if _needs_donor(pipeline, choices) else None
    _, layer_map = build_student(teacher, choices.layers, pipeline.replace_with, choices.slim_width, donor,
                                 task.image_shape, init_seed=pipeline.seed, adapter_rank=choices.adapter_rank)
    if term != NO_TERM and options.check is not None:
        distilling = {s.name: stage_sources(s, task, pipeline, choices) for s in stages if s.kind != "finetune"}
        if distilling:
            options.check(LayerTermPlan(layer_map=layer_map, pipeline=pipeline, stage_sources=distilling))
    return stages, layer_map


def _needs_donor(pipeline: PipelineSettings, choices: TrialChoices) -> bool:
    return "replace" in choices.layers.values() and get_replacement(pipeline.replace_with).needs_donor


def _fresh_donor(task: TaskData, model: ModelSettings) -> GroupedModel:
    return create_model(model.donor_arch or model.arch, task.num_classes, task.image_shape[0], width=model.donor_width,
                        groups=model.groups or None)


def run_trial(task_options: TaskOptions, model: ModelSettings, pipeline: PipelineSettings, choices: TrialChoices,
              report: ReportFn | None = None, on_epoch: EpochFn | None = None,
              checkpoints: StageCheckpoints | None = None, run_seed: int | None = None,
              data_seed: int | None = None) -> TrialResult:
    """Run the whole pipeline once with fixed choices. Raises UserError for impossible input,
    TrainingDiverged for a NaN/inf loss, and whatever `report` raises (pruning).

    `run_seed` (default `pipeline.seed`) seeds the students' initialisation and batch order; `data_seed` (default
    `pipeline.seed`) seeds the task's train/val/test splits and the teacher trained on that split's source (cached
    per data seed, so every trial with the same data seed shares split and teacher). A study's trials use the
    defaults; a confirmation re-runs a configuration on fresh run seeds, with the study's data seed (`resample:
    none`) or the run seed as data seed too (`resample: splits`: a new split and teacher per seed).

    With `checkpoints`, every finished stage is saved and a saved trial resumes after its last finished stage
    (its earlier per-epoch values are reported again, so the pruner sees the whole curve)."""
    started = time.perf_counter()
    # The term a trial runs is its own choice; '' (a caller that did not choose) is the pipeline's default, resolved
    # here so the result records the term that ran.
    choices = dataclasses.replace(choices, layer_term=choices.layer_term or pipeline.layer_term)
    device = resolve_device(pipeline.device)
    if device.type == "cpu" and pipeline.cpu_threads > 0:
        torch.set_num_threads(pipeline.cpu_threads)
    data_seed = pipeline.seed if data_seed is None else data_seed
    task = get_task(task_options, data_seed, device)
    stages, layer_map = preflight(task, model, pipeline, choices)
    trial = _TrialRun(task=task, pipeline=pipeline, choices=choices, layer_map=layer_map, device=device,
                      seed=pipeline.seed if run_seed is None else run_seed, data_seed=data_seed,
                      ctx=LoopContext(device=device, batch_size=pipeline.batch_size,
                                      eval_batch_size=pipeline.eval_batch_size, augment=pipeline.augment,
                                      allow_flip=task.allow_flip, target_val=task.target_val,
                                      generator=torch.Generator(device=device), report=report, on_epoch=on_epoch,
                                      num_workers=pipeline.num_workers))
    trial.teacher, trial.teacher_info = get_teacher("teacher", model.arch, model.width, task, model, pipeline, device,
                                                    data_seed)
    if _needs_donor(pipeline, choices):
        trial.donor, trial.donor_info = get_teacher("donor", model.donor_arch or model.arch, model.donor_width, task,
                                                    model, pipeline, device, data_seed)
    trial.teacher_val = trial.accuracy(trial.teacher, task.target_val)
    if on_epoch:  # the teacher's point on the curves (step 0); never reported to the pruner: it is no candidate
        on_epoch("teacher", 0, {"target_val_acc": trial.teacher_val})
    if checkpoints is not None:
        _resume(checkpoints.load(), lambda: trial.fresh_student(0), trial.models, trial.runs, trial.val, report)
    for index, stage in enumerate(stages):
        if stage.name not in trial.runs:  # else restored from a checkpoint
            trial.run_stage(stage, stages[index - 1].name if index > 0 else None)
            if checkpoints is not None:
                checkpoints.save(_checkpoint_state(trial.models, trial.runs, trial.val))
    return trial.result(stages, started)


@dataclass
class _TrialRun:
    """One trial under way: what its stages share, and the models, runs and val accuracies of the finished ones."""

    task: TaskData
    pipeline: PipelineSettings
    choices: TrialChoices
    layer_map: dict
    device: torch.device
    seed: int  # the run seed: students' initialisation and batch order
    data_seed: int  # the split and the teacher
    ctx: LoopContext
    teacher: GroupedModel | None = None
    teacher_info: TeacherInfo | None = None
    teacher_val: float = 0.0
    donor: GroupedModel | None = None
    donor_info: TeacherInfo | None = None
    models: dict = field(default_factory=dict)  # stage -> student
    runs: dict = field(default_factory=dict)  # stage -> StageRun
    val: dict = field(default_factory=dict)  # stage -> target val accuracy

    def accuracy(self, model: GroupedModel, data) -> float:
        return accuracy(model, data, self.pipeline.eval_batch_size, self.pipeline.num_workers)

    def fresh_student(self, generation: int) -> GroupedModel:
        """Generation 0 is the finetune stage's student; each born-again generation starts from a fresh one."""
        student, _ = build_student(self.teacher, self.choices.layers, self.pipeline.replace_with,
                                   self.choices.slim_width, self.donor, self.task.image_shape,
                                   init_seed=derive_seed(self.seed, "student", generation),
                                   adapter_rank=self.choices.adapter_rank)
        return place(student, self.device)

    def run_stage(self, stage: Stage, previous: str | None) -> None:
        """Train one stage's student (distill continues the finetuned one) and record it."""
        pipeline, choices, ctx = self.pipeline, self.choices, self.ctx
        # Each stage draws from its own seed, so a cached teacher or a resumed checkpoint changes nothing.
        ctx.generator.manual_seed(derive_seed(self.seed, "batches", stage.name))
        ctx.step = stage.first_step - 1
        if stage.kind == "distill" and previous is not None:
            student = copy.deepcopy(self.models[previous])
        else:
            student = self.fresh_student(stage.generation)
        kd_name, kd_model = _kd_teacher(stage, previous, self.teacher, self.teacher_val, self.models, self.val,
                                        pipeline)
        sources = stage_sources(stage, self.task, pipeline, choices)
        if kd_model is None:
            spec = StageSpec(name=stage.name, epochs=stage.epochs, sources=sources,
                             params=trainable_parameters(student, self.layer_map), lr=choices.lr,
                             augment=choices.augment, frozen=frozen_groups(self.layer_map),
                             weight_decay=pipeline.weight_decay, compile=pipeline.compile)
            run = train_stage(student, spec, ctx)
        else:
            run = _distill(stage, student, kd_model, self.teacher, self.layer_map, sources, self.task, pipeline,
                           choices, ctx, self.seed)
        run.kd_teacher, run.sources = kd_name, {s.name: s.weight for s in sources}
        self.runs[stage.name], self.models[stage.name] = run, student
        self.val[stage.name] = self.accuracy(student, self.task.target_val)

    def result(self, stages: list[Stage], started: float) -> TrialResult:
        """The finished trial (begun at `perf_counter()` `started`): the delivered stage and every stage's
        accuracies on both domains."""
        task, models, runs = self.task, self.models, self.runs
        bs, workers = self.pipeline.eval_batch_size, self.pipeline.num_workers
        delivered = select_stage(self.val, self.pipeline.select)
        info = self.teacher_info
        results = {"teacher": _evaluate(self.teacher, StageRun(epochs=info.epochs, seconds=info.seconds), task, bs,
                                        workers)}
        results.update({name: _evaluate(models[name], runs[name], task, bs, workers) for name in models})
        threshold_steps = [r.threshold_epoch for r in runs.values() if r.threshold_epoch is not None]
        return TrialResult(
            value=results[delivered].target_val_acc, best_stage=delivered, select=self.pipeline.select,
            recipe=self.choices.recipe, stages=results, params=self.choices.flat(), layer_map=self.layer_map,
            student_params=_count(models[delivered]), teacher_params=_count(self.teacher), teacher=info,
            donor=self.donor_info, epochs_to_threshold=min(threshold_steps) if threshold_steps else None,
            total_epochs=sum(r.epochs for r in runs.values()), budget=stages[-1].last_step,
            seconds=time.perf_counter() - started,
            device=str(self.device), run_seed=self.seed, model_hash=weights_hash(models[delivered]),
            student=models[delivered], models={"teacher": self.teacher, **models},
            trainable_params=_count(models[delivered], trainable=True),
            example_input=_example_images(task.target_val), data_seed=self.data_seed,
            data_fingerprint=task.fingerprint)


def _example_images(images: LabeledImages | FolderImages, count: int = 4) -> torch.Tensor:
    """The first `count` images of `images` on the host, in the default memory format: the input example of the
    logged MLflow model (more than one, so that `torch.export` keeps its batch dimension dynamic)."""
    head = images.subset(torch.arange(min(count, len(images))))
    x = head.load().x if isinstance(head, FolderImages) else head.x
    return x.to("cpu", memory_format=torch.contiguous_format)


def weights_hash(model: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of a model's state: names, dtypes, shapes and bytes of every tensor."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def select_stage(val: dict[str, float], rule: str) -> str:
    """The delivered stage among the student stages (in stage order; the teacher is never one): `best` = the
    highest target validation accuracy, the earliest of equals (fewer epochs, like early stopping); `last` = the
    last stage. Selection looks only at target *validation* accuracy, never at test data."""
    names = list(val)
    if rule == "last":
        return names[-1]
    return max(names, key=lambda k: (val[k], -names.index(k)))


def _kd_teacher(stage: Stage, previous: str | None, teacher: GroupedModel, teacher_val: float, models: dict,
                val: dict, pipeline: PipelineSettings) -> tuple[str | None, GroupedModel | None]:
    """The model a stage distils from. finetune: none. distill: the source teacher, or with `distill_teacher:
    best` the better of it and the finetuned student by target val acc (the teacher on ties). A born-again
    generation: the previous stage's model (generation g - 1), as in Furlanello et al. (2018)."""
    if stage.kind == "finetune":
        return None, None
    if stage.kind == "generation" and previous is not None:
        return previous, models[previous]
    if stage.kind == "distill" and pipeline.distill_teacher == "best" and previous is not None \
            and val[previous] > teacher_val:
        return previous, models[previous]
    return "teacher", teacher


def _distill(stage: Stage, student: GroupedModel, teacher: GroupedModel, source_teacher: GroupedModel,
             layer_map: dict, sources: list, task: TaskData, pipeline: PipelineSettings, choices: TrialChoices,
             ctx: LoopContext, seed: int) -> StageRun:
    """Distill `teacher` (a frozen copy) into the student's trainable groups. With beta > 0, the registered layer
    term `choices.layer_term` is built for this stage (its extra parameters trained too) and closed after it."""
    teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
    params = trainable_parameters(student, layer_map)
    term = None
    if choices.beta > 0 and choices.layer_term != NO_TERM:  # else no term: no hooks, no extra work per step
        term = get_layer_term(choices.layer_term)(LayerTermContext(
            student=student, teacher=teacher, source_teacher=source_teacher, layer_map=layer_map,
            image_shape=task.image_shape, device=ctx.device, seed=seed, stage=stage.name, pipeline=pipeline))
        params += term.params
    spec = StageSpec(name=stage.name, epochs=stage.epochs, sources=sources, params=params, lr=choices.lr,
                     frozen=frozen_groups(layer_map), teacher=teacher, alpha=choices.alpha,
                     temperature=choices.temperature, beta=choices.beta,
                     layer_term=term.term if term is not None else None,
                     on_step=term.on_step if term is not None else None, threshold=choices.threshold,
                     augment=choices.augment, weight_decay=pipeline.weight_decay, compile=pipeline.compile)
    try:
        return train_stage(student, spec, ctx)
    finally:
        if term is not None:
            term.close()


def _checkpoint_state(models: dict, runs: dict, val: dict) -> dict:
    return {"val": dict(val), "models": {k: m.state_dict() for k, m in models.items()},
            "runs": {k: asdict(r) for k, r in runs.items()}}


def _resume(state: dict | None, new_student, models: dict, runs: dict, val: dict, report: ReportFn | None) -> None:
    if not state:
        return
    for name, run in state["runs"].items():  # insertion order = stage order
        runs[name] = StageRun(**run)
        models[name] = new_student()
        models[name].load_state_dict(state["models"][name])
        val[name] = state["val"][name]
        for offset, value in enumerate(runs[name].val_curve):
            if report:
                report(runs[name].first_step + offset, value, name)


def _evaluate(model: GroupedModel, run: StageRun, task: TaskData, bs: int, workers: int) -> StageResult:
    return StageResult(source_val_acc=accuracy(model, task.source_val, bs, workers),
                       source_test_acc=accuracy(model, task.source_test, bs, workers),
                       target_val_acc=accuracy(model, task.target_val, bs, workers),
                       target_test_acc=accuracy(model, task.target_test, bs, workers),
                       epochs=run.epochs, seconds=run.seconds, threshold_epoch=run.threshold_epoch,
                       first_step=run.first_step, kd_teacher=run.kd_teacher, sources=dict(run.sources))


def _count(model: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)
