"""One trial of the transfer-and-distill pipeline, end to end:

    teacher -> finetune -> distill -> retrain (x generations) -> evaluate

Every epoch of every stage is one step on a single global axis; `report(step, target_val_acc, stage)` is called
after each, which is all the study layer needs for pruning. Nothing here knows Optuna.
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import asdict, dataclass, field

import torch

from models import GroupedModel, create_model

from .checkpoints import StageCheckpoints
from .device import place, resolve_device
from .settings import ModelSettings, PipelineSettings, TrialChoices
from .student import build_student, frozen_groups, redraw_replaced, trainable_parameters
from .tasks import FolderImages, LabeledImages, TaskData, TaskOptions, load_task
from .teacher import TeacherInfo, get_teacher
from .train import (DataSource, EpochFn, LoopContext, ReportFn, StageRun, StageSpec, accuracy, feature_term,
                    l2sp_term, make_adapters, train_stage)
from models.grouped import group_output_shapes

STAGE_ORDER = ("teacher", "finetune", "distill", "retrain", "evaluate")


@dataclass
class StageResult:
    """Accuracy of one stage's model on both domains, and what the stage cost."""

    source_val_acc: float
    source_test_acc: float
    target_val_acc: float
    target_test_acc: float
    epochs: int
    seconds: float
    threshold_epoch: int | None = None


@dataclass
class TrialResult:
    """Everything a trial produced. `value` is the best stage's target validation accuracy."""

    value: float
    best_stage: str
    stages: dict[str, StageResult]
    params: dict
    layer_map: dict
    student_params: int
    teacher_params: int
    teacher: TeacherInfo
    donor: TeacherInfo | None
    epochs_to_threshold: int | None
    total_epochs: int
    seconds: float
    device: str
    student: GroupedModel = field(repr=False)  # the best stage's model (the teacher itself if nothing beat it)
    models: dict = field(default_factory=dict, repr=False)  # stage -> model

    def to_dict(self) -> dict:
        """The JSON form printed by `trial run --json` (models left out)."""
        return {
            "value": self.value, "best_stage": self.best_stage,
            "stages": {k: asdict(v) for k, v in self.stages.items()},
            "params": self.params, "layer_map": self.layer_map, "student_params": self.student_params,
            "teacher_params": self.teacher_params, "teacher_cache": self.teacher.cache, "teacher_key": self.teacher.key,
            "donor_cache": self.donor.cache if self.donor else None, "epochs_to_threshold": self.epochs_to_threshold,
            "total_epochs": self.total_epochs, "seconds": self.seconds, "device": self.device,
        }


_task_cache: dict = {}
_task_lock = threading.Lock()


def get_task(options: TaskOptions, seed: int, device: torch.device) -> TaskData:
    """The split task on `device`, built once per process (trials of a study share it). In-memory data is moved
    there now; folder data only records it (its batches are copied there as they are read)."""
    key = (repr(options), seed, str(device))
    with _task_lock:
        if key not in _task_cache:
            task = load_task(options, seed)
            for name, value in vars(task).items():
                if isinstance(value, (LabeledImages, FolderImages)):
                    setattr(task, name, value.to(device))
            _task_cache[key] = task
        return _task_cache[key]


def preflight(task: TaskData, model: ModelSettings, pipeline: PipelineSettings, choices: TrialChoices) -> None:
    """Reject impossible layer choices (unknown groups/actions, shapes that do not fit) before any training."""
    teacher = create_model(model.arch, task.num_classes, task.image_shape[0], width=model.width)
    donor = _fresh_donor(task, model) if _needs_donor(pipeline, choices) else None
    build_student(teacher, choices.layers, pipeline.replace_with, choices.slim_width, donor, task.image_shape)


def _needs_donor(pipeline: PipelineSettings, choices: TrialChoices) -> bool:
    return pipeline.replace_with == "donor" and "replace" in choices.layers.values()


def _fresh_donor(task: TaskData, model: ModelSettings) -> GroupedModel:
    return create_model(model.donor_arch or model.arch, task.num_classes, task.image_shape[0], width=model.donor_width)


def run_trial(task_options: TaskOptions, model: ModelSettings, pipeline: PipelineSettings, choices: TrialChoices,
              report: ReportFn | None = None, on_epoch: EpochFn | None = None,
              checkpoints: StageCheckpoints | None = None) -> TrialResult:
    """Run the whole pipeline once with fixed choices. Raises UserError for impossible input,
    TrainingDiverged for a NaN/inf loss, and whatever `report` raises (pruning).

    With `checkpoints`, every finished stage is saved and a saved trial resumes after its last finished stage
    (its earlier per-epoch values are reported again, so the pruner sees the whole curve)."""
    started = time.perf_counter()
    device = resolve_device(pipeline.device)
    if device.type == "cpu" and pipeline.cpu_threads > 0:
        torch.set_num_threads(pipeline.cpu_threads)
    task = get_task(task_options, pipeline.seed, device)
    preflight(task, model, pipeline, choices)
    bs, workers = pipeline.eval_batch_size, pipeline.num_workers

    teacher, teacher_info = get_teacher("teacher", model.arch, model.width, task, model, pipeline, device)
    donor, donor_info = None, None
    if _needs_donor(pipeline, choices):
        donor, donor_info = get_teacher("donor", model.donor_arch or model.arch, model.donor_width, task, model,
                                        pipeline, device)
    ctx = LoopContext(device=device, batch_size=pipeline.batch_size, eval_batch_size=bs, augment=pipeline.augment,
                      allow_flip=task.allow_flip, target_val=task.target_val,
                      generator=torch.Generator(device=device), report=report, on_epoch=on_epoch,
                      num_workers=workers)
    models: dict[str, GroupedModel] = {"teacher": teacher}
    runs: dict[str, StageRun] = {"teacher": StageRun(epochs=teacher_info.epochs, seconds=teacher_info.seconds)}
    val: dict[str, float] = {"teacher": accuracy(teacher, task.target_val, bs, workers)}
    # Step 0 is the teacher, identical for every trial of a study; student epochs are steps 1, 2, ...
    if report:
        report(0, val["teacher"], "teacher")

    def reseed(stage_index: int) -> None:
        # Each stage draws from its own seed, so a cached teacher or a resumed checkpoint changes nothing.
        torch.manual_seed(pipeline.seed * 1009 + stage_index)
        ctx.generator.manual_seed(pipeline.seed * 1009 + stage_index)

    reseed(0)
    student, layer_map = build_student(teacher, choices.layers, pipeline.replace_with, choices.slim_width, donor,
                                       task.image_shape)
    student = place(student, device)

    def finetune() -> StageRun:
        spec = StageSpec(name="finetune", epochs=pipeline.finetune_epochs, frozen=frozen_groups(layer_map),
                         params=trainable_parameters(student, layer_map), lr=choices.lr, augment=choices.augment,
                         weight_decay=pipeline.weight_decay, compile=pipeline.compile,
                         sources=[DataSource("target_labeled", task.target_labeled, 1.0),
                                  DataSource("source", task.source_train, choices.source_weight)])
        return train_stage(student, spec, ctx)

    def distill() -> StageRun:
        kd_teacher = _best(models, val)[1] if pipeline.distill_teacher == "best" else teacher
        return _distill("distill", student, kd_teacher, layer_map, pipeline.distill_epochs,
                        _target_sources(task, choices), task, pipeline, choices, ctx)

    def retrain(name: str) -> StageRun:
        better = _best(models, val)[1]
        redraw_replaced(student, better, layer_map)
        sources = {"source": [DataSource("source", task.source_train, 1.0)],
                   "target": _target_sources(task, choices, with_source=False),
                   "both": _target_sources(task, choices)}[pipeline.retrain_on]
        return _distill(name, student, better, layer_map, pipeline.retrain_epochs, sources, task, pipeline,
                        choices, ctx)

    stage_fns = [("finetune", finetune), ("distill", distill)]
    stage_fns += [(f"retrain-{g}", lambda g=g: retrain(f"retrain-{g}")) for g in range(1, choices.generations + 1)]
    if checkpoints is not None:
        _resume(checkpoints.load(), student, models, runs, val, ctx, report)
    for index, (name, fn) in enumerate(stage_fns, start=1):
        if name in runs:  # restored from a checkpoint
            continue
        reseed(index)
        runs[name] = fn()
        _snapshot(name, student, models, val, task, bs, workers)
        if checkpoints is not None:
            checkpoints.save(_checkpoint_state(student, models, runs, val, ctx))

    stages = {name: _evaluate(models[name], runs[name], task, bs, workers) for name in models}
    best_stage, best_model = _best(models, val)
    threshold_epochs = [r.threshold_epoch for r in runs.values() if r.threshold_epoch is not None]
    return TrialResult(
        value=stages[best_stage].target_val_acc, best_stage=best_stage, stages=stages, params=choices.flat(),
        layer_map=layer_map, student_params=_count(student), teacher_params=_count(teacher), teacher=teacher_info,
        donor=donor_info, epochs_to_threshold=min(threshold_epochs) if threshold_epochs else None,
        total_epochs=ctx.step, seconds=time.perf_counter() - started, device=str(device), student=best_model,
        models=models)


def _checkpoint_state(student, models, runs, val, ctx) -> dict:
    return {"student": student.state_dict(), "step": ctx.step, "val": dict(val),
            "models": {k: m.state_dict() for k, m in models.items() if k != "teacher"},
            "runs": {k: asdict(r) for k, r in runs.items() if k != "teacher"}}


def _resume(state: dict | None, student, models, runs, val, ctx, report) -> None:
    if not state:
        return
    student.load_state_dict(state["student"])
    step = 1
    for name, run in state["runs"].items():  # insertion order = stage order
        runs[name] = StageRun(**run)
        models[name] = copy.deepcopy(student)
        models[name].load_state_dict(state["models"][name])
        val[name] = state["val"][name]
        for value in runs[name].val_curve:
            if report:
                report(step, value, name)
            step += 1
    ctx.step = state["step"]


def _target_sources(task: TaskData, choices: TrialChoices, with_source: bool = True) -> list[DataSource]:
    sources = [DataSource("target_labeled", task.target_labeled, 1.0),
               DataSource("target_unlabeled", task.target_unlabeled, 1.0, labeled=False)]
    if with_source:
        sources.append(DataSource("source", task.source_train, choices.source_weight))
    return sources


def _distill(name: str, student: GroupedModel, teacher: GroupedModel, layer_map: dict, epochs: int,
             sources: list[DataSource], task: TaskData, pipeline: PipelineSettings, choices: TrialChoices,
             ctx: LoopContext) -> StageRun:
    """Distill `teacher` (a frozen copy) into the student's trainable groups."""
    teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
    params = trainable_parameters(student, layer_map)
    trained = [g for g, m in layer_map.items() if m["action"] != "freeze"]
    term, cleanup = None, None
    if choices.beta > 0 and pipeline.layer_term == "feature":
        adapters = make_adapters(group_output_shapes(student, task.image_shape),
                                 group_output_shapes(teacher, task.image_shape), trained).to(ctx.device)
        term, cleanup = feature_term(student, teacher, trained, adapters)
        params += list(adapters.parameters())
    elif choices.beta > 0:
        # L2-SP anchors only weights inherited from the teacher (finetuned groups), at their values now.
        inherited = tuple(f"groups.{g}." for g, m in layer_map.items() if m["action"] == "finetune")
        start = {n: p.detach().clone() for n, p in student.named_parameters()
                 if p.requires_grad and n.startswith(inherited)}
        term = l2sp_term(student, start)
    spec = StageSpec(name=name, epochs=epochs, sources=sources, params=params, lr=choices.lr,
                     frozen=frozen_groups(layer_map), teacher=teacher, alpha=choices.alpha,
                     temperature=choices.temperature, beta=choices.beta, layer_term=term,
                     threshold=choices.threshold, augment=choices.augment, weight_decay=pipeline.weight_decay,
                     compile=pipeline.compile)
    try:
        return train_stage(student, spec, ctx)
    finally:
        if cleanup:
            cleanup()


def _snapshot(name: str, student: GroupedModel, models: dict, val: dict, task: TaskData, bs: int,
              workers: int) -> None:
    models[name] = copy.deepcopy(student)
    val[name] = accuracy(student, task.target_val, bs, workers)


def _best(models: dict, val: dict) -> tuple[str, GroupedModel]:
    # Selection looks only at target *validation* accuracy; the first of equals wins (fewer epochs).
    name = max(models, key=lambda k: (val[k], -list(models).index(k)))
    return name, models[name]


def _evaluate(model: GroupedModel, run: StageRun, task: TaskData, bs: int, workers: int) -> StageResult:
    return StageResult(source_val_acc=accuracy(model, task.source_val, bs, workers),
                       source_test_acc=accuracy(model, task.source_test, bs, workers),
                       target_val_acc=accuracy(model, task.target_val, bs, workers),
                       target_test_acc=accuracy(model, task.target_test, bs, workers),
                       epochs=run.epochs, seconds=run.seconds, threshold_epoch=run.threshold_epoch)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
