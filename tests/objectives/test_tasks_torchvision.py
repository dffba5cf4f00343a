"""torchvision-backed tasks, on tiny files written here in each dataset's real on-disk format (never downloads).

Every image is one constant grey level that encodes its original label (`_level`), so after loading, resizing
and relabelling we can check each image still sits next to the right label.
"""

from __future__ import annotations

import bz2
import pickle
import struct
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from models.errors import UserError
from objectives.tasks.base import TaskOptions, get_task_info
from objectives.tasks.folder import FolderImages

STL_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SHARED = ["airplane", "automobile", "bird", "cat", "deer", "dog", "horse", "ship", "truck"]


def _level(label: int) -> int:
    return 20 * label + 10


def _labels(per_class: int) -> np.ndarray:
    return np.repeat(np.arange(10), per_class)


def _constant(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.stack([np.full(shape, _level(int(c)), dtype=np.uint8) for c in labels])


def write_mnist(root, per_class=2):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)

    def idx(path, array):  # idx format: 0, 0, type 0x08 (uint8), ndim; big-endian dims; data
        path.write_bytes(struct.pack(">I", 0x800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
                         + array.tobytes())

    for prefix, n in (("train", per_class), ("t10k", 1)):
        y = _labels(n).astype(np.uint8)
        idx(raw / f"{prefix}-images-idx3-ubyte", _constant(y, (28, 28)))
        idx(raw / f"{prefix}-labels-idx1-ubyte", y)


def write_usps(root, per_class=2):
    for name, n in (("usps.bz2", per_class), ("usps.t.bz2", 1)):
        lines = []
        for c in _labels(n):  # libsvm text: label in 1..10, 256 pixels in [-1, 1]
            v = (_level(int(c)) + 0.5) / 255 * 2 - 1
            lines.append(f"{c + 1} " + " ".join(f"{i}:{v:.6f}" for i in range(1, 257)))
        with bz2.open(root / name, "wt") as f:
            f.write("\n".join(lines) + "\n")


def write_svhn(root, per_class=2):
    import scipy.io

    for name, n in (("train_32x32.mat", per_class), ("test_32x32.mat", 1)):
        digits = _labels(n)
        x = _constant(digits, (32, 32, 3)).transpose(1, 2, 3, 0)  # stored as (H, W, C, N)
        y = np.where(digits == 0, 10, digits).astype(np.uint8)[:, None]  # SVHN writes digit 0 as label 10
        scipy.io.savemat(root / name, {"X": x, "y": y})


def write_cifar10(root):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        y = _labels(1)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": _constant(y, (3 * 32 * 32,)), "labels": y.tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_CLASSES}, f)


def write_stl10(root, per_class=1):
    folder = root / "stl10_binary"
    folder.mkdir()
    for split, n in (("train", per_class), ("test", 2)):
        y = _labels(n)
        (folder / f"{split}_X.bin").write_bytes(_constant(y, (3, 96, 96)).tobytes())
        (folder / f"{split}_y.bin").write_bytes((y + 1).astype(np.uint8).tobytes())  # 1-based on disk
    (folder / "class_names.txt").write_text("\n".join(STL_CLASSES) + "\n")


def build(name, root, **kw):
    return get_task_info(name).builder(TaskOptions(name=name, data_root=str(root), download=False, **kw))


def original_labels(x: torch.Tensor) -> torch.Tensor:
    """Undo `_level`: each image's grey level -> the label it was written with."""
    return ((x.mean(dim=(1, 2, 3)) * 255 - 10) / 20).round().long()


def check_pool(pool, shape, n_train, n_test):
    for part, n in ((pool.train, n_train), (pool.test, n_test)):
        assert part.x.dtype == torch.float32 and part.y.dtype == torch.int64
        assert tuple(part.x.shape) == (n, *shape) and tuple(part.y.shape) == (n,)
        assert part.x.min() >= 0 and part.x.max() <= 1


@pytest.mark.parametrize("name", ["mnist-usps", "usps-mnist"])
def test_mnist_usps(tmp_path, name):
    write_mnist(tmp_path)
    write_usps(tmp_path, per_class=3)
    source, target, classes = build(name, tmp_path)
    mnist, usps = (source, target) if name == "mnist-usps" else (target, source)
    assert classes == [str(d) for d in range(10)]
    check_pool(mnist, (1, 28, 28), 20, 10)
    check_pool(usps, (1, 28, 28), 30, 10)  # upsampled from 16x16
    for pool in (mnist, usps):
        for part in (pool.train, pool.test):
            assert torch.equal(original_labels(part.x), part.y)


def test_svhn_mnist(tmp_path):
    write_svhn(tmp_path)
    write_mnist(tmp_path)
    source, target, classes = build("svhn-mnist", tmp_path)
    assert classes == [str(d) for d in range(10)]
    check_pool(source, (3, 32, 32), 20, 10)
    check_pool(target, (3, 32, 32), 20, 10)  # MNIST resized and repeated to RGB
    assert torch.equal(target.train.x[:, 0], target.train.x[:, 2])
    assert sorted(source.train.y.tolist()) == sorted(_labels(2).tolist())  # label 10 came back as digit 0
    for part in (source.train, source.test, target.train):
        assert torch.equal(original_labels(part.x), part.y)


def test_cifar10_stl10(tmp_path, monkeypatch):
    monkeypatch.setattr("objectives.tasks.torchvision_tasks._CHUNK", 4)  # convert in several chunks
    write_cifar10(tmp_path)
    write_stl10(tmp_path)
    info = get_task_info("cifar10-stl10")
    assert info.allow_flip and info.shift == "dataset"
    source, target, classes = build("cifar10-stl10", tmp_path)
    assert classes == SHARED
    check_pool(source, (3, 32, 32), 45, 9)  # 5 batches x 9 kept classes; frog dropped
    check_pool(target, (3, 32, 32), 9, 18)  # 96x96 downsampled; monkey dropped
    for part, names in ((source.train, CIFAR_CLASSES), (source.test, CIFAR_CLASSES),
                        (target.train, STL_CLASSES), (target.test, STL_CLASSES)):
        written = [names[i] for i in original_labels(part.x).tolist()]
        assert "frog" not in written and "monkey" not in written
        expected = [SHARED.index("automobile" if n == "car" else n) for n in written]
        assert part.y.tolist() == expected
    assert SHARED.index("automobile") in target.train.y.tolist()  # STL's 'car' is there, under CIFAR's name


def test_cap_is_deterministic_and_applied_before_conversion(tmp_path):
    write_mnist(tmp_path, per_class=5)
    write_usps(tmp_path)
    a, _, _ = build("mnist-usps", tmp_path, max_per_domain=7)
    b, _, _ = build("mnist-usps", tmp_path, max_per_domain=7)
    assert len(a.train) == 7 and len(a.test) == 7
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)
    assert torch.equal(original_labels(a.train.x), a.train.y)


def write_folder(root, classes, size, mode, per_class=2):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new(mode, size, color=(_level(c),) * len(mode)).save(root / name / f"{i}.png")


def test_imagefolder(tmp_path):
    write_folder(tmp_path / "src", ["cat", "dog", "fox"], (30, 20), "RGB")
    write_folder(tmp_path / "tgt", ["cat", "dog", "fox"], (40, 40), "L", per_class=3)
    info = get_task_info("imagefolder")
    assert info.allow_flip and info.shift == "dataset"
    source, target, classes = build("imagefolder", tmp_path, source_dir=str(tmp_path / "src"),
                                    target_dir=str(tmp_path / "tgt"), image_size=16)
    assert classes == ["cat", "dog", "fox"]
    assert source.test is None and target.test is None
    for pool, n in ((source, 6), (target, 9)):
        assert isinstance(pool.train, FolderImages) and pool.train.image_shape == (3, 16, 16)  # streamed, not read
        images = pool.train.load()
        assert tuple(images.x.shape) == (n, 3, 16, 16) and images.x.dtype == torch.float32
        assert images.y.dtype == torch.int64 and 0 <= images.x.min() and images.x.max() <= 1
        assert torch.equal(original_labels(images.x), images.y)
    default, _, _ = build("imagefolder", tmp_path, source_dir=str(tmp_path / "src"), target_dir=str(tmp_path / "tgt"))
    assert tuple(default.train.load().x.shape[1:]) == (3, 64, 64)


def test_imagefolder_mismatched_classes(tmp_path):
    write_folder(tmp_path / "src", ["cat", "dog"], (8, 8), "RGB", per_class=1)
    write_folder(tmp_path / "tgt", ["cat", "cow"], (8, 8), "RGB", per_class=1)
    with pytest.raises(UserError, match="dog.*cow"):
        build("imagefolder", tmp_path, source_dir=str(tmp_path / "src"), target_dir=str(tmp_path / "tgt"))
    with pytest.raises(UserError, match="source_dir"):
        build("imagefolder", tmp_path, target_dir=str(tmp_path / "tgt"))
    write_folder(tmp_path / "tgt", ["dog"], (8, 8), "RGB", per_class=1)  # classes now match...
    (tmp_path / "src" / "cow").mkdir()
    (tmp_path / "src" / "cow" / "0.png").write_bytes(b"not a png")  # ...but one image is not one
    with pytest.raises(UserError, match="cannot read image .*0.png"):
        build("imagefolder", tmp_path, source_dir=str(tmp_path / "src"), target_dir=str(tmp_path / "tgt"))


@pytest.mark.parametrize("name, dataset, folder", [
    ("mnist-usps", "MNIST", "MNIST/raw"),
    ("usps-mnist", "USPS", ""),
    ("svhn-mnist", "SVHN", ""),
    ("cifar10-stl10", "CIFAR-10", "cifar-10-batches-py"),
])
def test_missing_files_name_the_directory(tmp_path, name, dataset, folder):
    with pytest.raises(UserError) as e:
        build(name, tmp_path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{dataset} data not found")
    assert f" in {tmp_path / folder if folder else tmp_path} " in message
    assert "task.download" in message


def test_missing_stl10_lists_only_missing_files(tmp_path):
    write_cifar10(tmp_path)
    write_stl10(tmp_path)
    (tmp_path / "stl10_binary" / "test_y.bin").unlink()
    with pytest.raises(UserError, match=f"^STL-10 data not found: put test_y.bin in {tmp_path / 'stl10_binary'} "):
        build("cifar10-stl10", tmp_path)


def test_unreadable_files_are_a_user_error(tmp_path):
    write_cifar10(tmp_path)
    write_stl10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match=f"^CIFAR-10 files in {tmp_path / 'cifar-10-batches-py'} could not be read"):
        build("cifar10-stl10", tmp_path)


@pytest.fixture
def offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("offline (test)")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_offline_download_is_a_user_error(tmp_path, offline):
    options = TaskOptions(name="mnist-usps", data_root=str(tmp_path), download=True)
    with pytest.raises(UserError) as e:
        get_task_info("mnist-usps").builder(options)
    message = str(e.value)
    assert "\n" not in message and message.startswith("MNIST data download failed (")
    assert str(tmp_path / "MNIST" / "raw") in message


def test_failed_download_leaves_no_partial_file(tmp_path, monkeypatch):
    # A file on disk is trusted without its md5, so a half-written one must not survive a failed download.
    import torchvision.datasets.utils as tv_utils

    def cut_off(url, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise ConnectionResetError("connection reset (test)")

    monkeypatch.setattr(tv_utils, "_get_redirect_url", lambda url, max_hops: url)
    monkeypatch.setattr(tv_utils, "_urlretrieve", cut_off)
    write_mnist(tmp_path)
    options = TaskOptions(name="svhn-mnist", data_root=str(tmp_path), download=True)
    with pytest.raises(UserError, match="^SVHN data download failed \\(connection reset"):
        get_task_info("svhn-mnist").builder(options)
    assert not (tmp_path / "train_32x32.mat").exists()


def test_files_present_are_trusted_without_network(tmp_path, offline):
    # The hand-written files fail torchvision's md5 checks; with download on they must load, not be re-fetched.
    write_cifar10(tmp_path)
    write_stl10(tmp_path)
    options = TaskOptions(name="cifar10-stl10", data_root=str(tmp_path), download=True)
    source, target, _ = get_task_info("cifar10-stl10").builder(options)
    assert len(source.train) == 45 and len(target.test) == 18


# ---- the whole pipeline on each torchvision-backed task (tiny files, one epoch per stage) ---------------------------
def _write_task_files(name: str, root) -> dict:
    if name in ("mnist-usps", "usps-mnist"):
        write_mnist(root, per_class=8)
        write_usps(root, per_class=8)
    elif name == "svhn-mnist":
        write_svhn(root, per_class=8)
        write_mnist(root, per_class=8)
    elif name == "cifar10-stl10":
        write_cifar10(root)
        write_stl10(root, per_class=8)
    else:
        write_folder(root / "src", ["cat", "dog", "fox"], (20, 20), "RGB", per_class=8)
        write_folder(root / "tgt", ["cat", "dog", "fox"], (24, 24), "L", per_class=8)
        return {"source_dir": str(root / "src"), "target_dir": str(root / "tgt"), "image_size": 16}
    return {}


@pytest.mark.parametrize("arch", ["digitnet", "lenet5"])
@pytest.mark.parametrize("name", ["mnist-usps", "usps-mnist", "svhn-mnist", "cifar10-stl10", "imagefolder"])
def test_whole_pipeline_runs_on_the_task(tmp_path, name, arch, tiny_pipeline):
    from models import create_model
    from objectives.pipeline import run_trial
    from objectives.settings import ModelSettings, TrialChoices

    options = TaskOptions(name=name, data_root=str(tmp_path), download=False, target_labeled_per_class=1,
                          **_write_task_files(name, tmp_path))
    groups = create_model(arch, num_classes=10, in_channels=1).group_names
    layers = {g: ("replace" if g == groups[-1] else "finetune") for g in groups}
    result = run_trial(options, ModelSettings(arch=arch), tiny_pipeline,
                       TrialChoices(layers=layers, generations=1, alpha=0.5))
    assert list(result.stages) == ["teacher", "finetune", "distill", "retrain-1"]
    assert 0.0 <= result.value <= 1.0 and result.value == result.stages[result.best_stage].target_val_acc
