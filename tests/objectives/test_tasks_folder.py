"""The `imagefolder` task streamed through a DataLoader (objectives/tasks/folder.py), on tiny PNG folders of random
pixels written here: the pixels equal the eager decode the task used to do, results do not depend on the number
of workers, a changed folder changes the fingerprint, unreadable files are one-line errors, trials replay exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from torchvision import datasets
from torchvision.transforms.functional import pil_to_tensor

from models.errors import UserError
from objectives.tasks import TaskOptions, get_task_info, load_task

CLASSES = ["cat", "dog"]


def write_domain(root, mode: str, size: tuple[int, int], seed: int, per_class: int = 6) -> None:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / name / f"{i}.png")


@pytest.fixture
def folders(tmp_path) -> TaskOptions:
    """An RGB 20x14 source and a grey 24x24 target, 2 classes x 6 images each, read at 16x16."""
    write_domain(tmp_path / "src", "RGB", (20, 14), seed=0)
    write_domain(tmp_path / "tgt", "L", (24, 24), seed=1)
    return TaskOptions(name="imagefolder", source_dir=str(tmp_path / "src"), target_dir=str(tmp_path / "tgt"),
                       image_size=16, target_labeled_per_class=1)


def eager_decode(folder: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the task did before streaming: every image decoded at load time with ImageFolder's loader, then
    resized with antialiased bilinear interpolation."""
    ds = datasets.ImageFolder(folder)
    x = [pil_to_tensor(ds.loader(path)).unsqueeze(0).float() / 255 for path, _ in ds.samples]
    x = [F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)
         for t in x]
    return torch.cat(x), torch.tensor(ds.targets)


def test_streamed_pixels_equal_the_eager_decode(folders):
    source, target, _ = get_task_info("imagefolder").builder(folders)
    for pool, folder in ((source, folders.source_dir), (target, folders.target_dir)):
        want_x, want_y = eager_decode(folder, 16)
        for workers in (0, 2):
            got = pool.train.load(num_workers=workers, batch_size=5)  # 3 batches, so both workers decode
            assert torch.equal(got.x, want_x) and torch.equal(got.y, want_y)


def test_image_damaged_past_its_header_is_a_one_line_error(folders):
    path = os.path.join(folders.target_dir, "dog", "3.png")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])  # the header still reads, so only decoding finds it
    _, target, _ = get_task_info("imagefolder").builder(folders)
    for workers in (0, 2):
        with pytest.raises(UserError) as e:
            target.train.load(num_workers=workers, batch_size=4)
        assert str(e.value) == f"task 'imagefolder': cannot read image {path}: image file is truncated"


def test_fingerprint_follows_the_files(folders):
    before = load_task(folders, seed=0).fingerprint
    assert load_task(folders, seed=0).fingerprint == before
    path = os.path.join(folders.source_dir, "cat", "0.png")
    os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 10**9))  # same bytes, newer file: may be different now
    assert load_task(folders, seed=0).fingerprint != before


def _stages(result) -> dict:
    stages = {name: dataclasses.asdict(stage) for name, stage in result.stages.items()}
    for stage in stages.values():
        del stage["seconds"]
    return stages


def test_trial_results_do_not_depend_on_num_workers(folders, tiny_pipeline, tmp_path):
    from objectives.pipeline import run_trial
    from objectives.settings import ModelSettings, TrialChoices

    layers = {"stem": "freeze", "block1": "finetune", "block2": "finetune", "head": "replace"}
    results = []
    for workers in (0, 2):
        # Own teacher caches, so both runs train their teacher too; batches of 4 make several per source.
        pipeline = dataclasses.replace(tiny_pipeline, num_workers=workers, batch_size=4, finetune_epochs=2,
                                       cache_dir=str(tmp_path / f"cache{workers}"))
        results.append(run_trial(folders, ModelSettings(), pipeline,
                                 TrialChoices(layers=layers, augment=True, beta=0.5)))
    zero, two = results
    assert zero.teacher.cache == two.teacher.cache == "miss"
    assert _stages(zero) == _stages(two)
    assert zero.total_epochs == two.total_epochs


def test_trial_replays_identically(folders, tmp_path, monkeypatch):
    from cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DISTILLSTUDY_STORAGE", raising=False)
    config = {
        "task": dataclasses.asdict(folders),
        "pipeline": {"device": "cpu", "cpu_threads": 1, "batch_size": 4, "teacher_epochs": 1, "finetune_epochs": 1,
                     "distill_epochs": 1, "retrain_epochs": 1, "num_workers": 2, "cache_dir": str(tmp_path / "c")},
        "search": {"layers": {"actions": ["finetune", "replace"]}, "augment": [True], "generations": [1]},
        "study": {"baselines": False, "checkpoint_dir": str(tmp_path / "checkpoints"), "confirm": {"top": 0}},
        "tracking": {"enabled": False},
    }
    (tmp_path / "folder.yaml").write_text(json.dumps(config))  # JSON is YAML
    storage = f"sqlite:///{tmp_path / 's.db'}"

    def cli(*args):
        result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    cli("study", "create", "folder.yaml", "--name", "f", "--storage", storage)
    cli("study", "run", "f", "--storage", storage, "--n-trials", 1)
    replayed = json.loads(cli("trial", "replay", "f", 0, "--storage", storage, "--json"))
    assert replayed["stored_value"] is not None and replayed["value"] == replayed["stored_value"]
