"""What `tasks list`, `models list` and `models show` print: plain data, formatted by the CLI."""

from __future__ import annotations

from models import create_model, group_parameter_counts, list_models
from objectives.tasks import list_tasks


def tasks_catalog() -> list[dict]:
    """Every task with its shift type; for offline tasks also sizes and image shape (others need the data)."""
    from objectives.tasks import TaskOptions, load_task

    rows = []
    for info in list_tasks():
        row = {"name": info.name, "shift": info.shift, "offline": info.offline, "description": info.description}
        if info.offline:
            task = load_task(TaskOptions(name=info.name), seed=0)
            row.update(sizes=task.sizes(), image_shape=list(task.image_shape), classes=task.num_classes)
        rows.append(row)
    return rows


def models_catalog() -> list[dict]:
    """Every architecture with its layer groups and parameter count (10 classes, 3 channels)."""
    return [model_info(name) for name in list_models()]


def model_info(arch: str, num_classes: int = 10, in_channels: int = 3) -> dict:
    """Layer groups of `arch` in order, with parameters per group."""
    model = create_model(arch, num_classes=num_classes, in_channels=in_channels)
    counts = group_parameter_counts(model)
    return {"arch": arch, "groups": [{"name": g, "params": n} for g, n in counts.items()],
            "params": sum(counts.values()), "num_classes": num_classes, "in_channels": in_channels}
