"""Transfer tasks over real datasets, read from disk by torchvision's own dataset classes.

Files live under `os.path.expanduser(options.data_root)` in torchvision's standard layouts:
    MNIST      <root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte
    USPS       <root>/usps.bz2, <root>/usps.t.bz2
    SVHN       <root>/train_32x32.mat, <root>/test_32x32.mat
    CIFAR-10   <root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    STL-10     <root>/stl10_binary/{train,test}_{X,y}.bin (+ class_names.txt; unlabeled_X.bin is not needed)
With `options.download`, missing files are fetched by torchvision, which verifies its downloads' checksums. Files
already on disk are trusted as they are: CIFAR-10, SVHN and STL-10 are read through subclasses that only check the
files exist, so copies placed by hand (or re-packed) still load. Missing files (download off, or failed e.g.
offline) and unreadable ones are a one-line UserError naming the dataset, the files and their directory.

Every task returns float32 images (N, C, H, W) in [0, 1] with the same shape in both domains: images are resized
with antialiased bilinear interpolation and grey images are repeated to 3 channels when the other domain is RGB.
The datasets' official test splits become `DomainPool.test`. `imagefolder` alone is not read here: its pools are
`FolderImages`, decoded batch by batch while training (a user's folders need not fit in memory).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from http.client import HTTPException

import numpy as np
import torch
from torchvision import datasets
from torchvision.datasets.utils import download_and_extract_archive, download_url

from models.errors import UserError

from .base import DomainPool, LabeledImages, TaskOptions, register_task
from .base import one_line as _one_line
from .base import resize_images as _resize
from .folder import FolderImages, check_readable

# Seed of the pre-cap subsample (see `_capped`). Fixed, so the same files always give the same images whatever
# the trial seed; the caller's own seeded cap then picks from these.
_SUBSAMPLE_SEED = 20240611
_CHUNK = 1024  # images converted to float at a time, so a 96x96 RGB pool never exists as one float tensor
_DIGITS = [str(d) for d in range(10)]
_CIFAR_STL_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "horse", "ship", "truck"]
_ALIASES = {"car": "automobile"}  # STL-10's name for CIFAR-10's class
_STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
_IMAGEFOLDER_SIZE = 64

Raw = tuple[torch.Tensor, torch.Tensor]  # uint8 images (N, C, H, W), int64 labels (N,)


# --- torchvision classes that trust files already on disk -------------------------------------------------------
# An md5 of None makes torchvision's `check_integrity` test only that the file exists. These subclasses are only
# ever constructed with download=False; downloads go through the unmodified classes' URLs and checksums.

class _SVHN(datasets.SVHN):
    split_list = {k: [url, name, None] for k, (url, name, _) in datasets.SVHN.split_list.items()}


class _CIFAR10(datasets.CIFAR10):
    train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}


class _STL10(datasets.STL10):
    # Only the labelled splits are read, so the 2.6 GB unlabeled_X.bin (train_list[2]) need not be present.
    train_list = [[name, None] for name, _ in datasets.STL10.train_list[:2]]
    test_list = [[name, None] for name, _ in datasets.STL10.test_list]


# --- shared helpers ----------------------------------------------------------------------------------------------

def _read(dataset: str, folder: str, files: list[str], download: bool, fetch: Callable[[], None], load: Callable):
    """`load()` the dataset once `folder` holds `files`. Missing files are fetched when `download` is on; when they
    stay missing (download off or failed, e.g. offline) or cannot be read, a one-line UserError says what to do."""
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing and not download:
        raise UserError(f"{dataset} data not found: put {', '.join(missing)} in {folder} or set task.download: true")
    if missing:
        try:
            fetch()
        except (OSError, RuntimeError, HTTPException) as e:  # URLError is an OSError; bad checksums are RuntimeError
            raise UserError(
                f"{dataset} data download failed ({_one_line(e)}): put {', '.join(missing)} in {folder}") from None
    try:
        return load()
    except MemoryError:
        raise
    except Exception as e:  # pickle, scipy, numpy and bz2 raise all sorts of types for a damaged or foreign file
        raise UserError(f"{dataset} files in {folder} could not be read ({type(e).__name__}: {_one_line(e)}); "
                        f"replace them with the original {dataset} files") from e


def _download(url: str, root: str, name: str, md5: str) -> None:
    """torchvision's checked download of one file, removing what a failed or corrupt download leaves behind
    (a file that exists is trusted as it is, so a partial one must not stay)."""
    try:
        download_url(url, root, name, md5)
    except BaseException:
        if os.path.isfile(os.path.join(root, name)):
            os.remove(os.path.join(root, name))
        raise


def _capped(images: torch.Tensor, labels: torch.Tensor, cap: int) -> Raw:
    """At most `cap` items (0 = all), chosen with the fixed `_SUBSAMPLE_SEED`, in their original order: done on
    the uint8 data so that big pools are never converted to float in full."""
    if cap <= 0 or len(labels) <= cap:
        return images, labels
    keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(_SUBSAMPLE_SEED))[:cap].sort().values
    return images[keep], labels[keep]


def _to_float(raw: Raw, size: int, channels: int, cap: int) -> LabeledImages:
    """uint8 (N, C, H, W) -> float32 in [0, 1], capped, resized to `size` and repeated to `channels` channels."""
    images, labels = _capped(*raw, cap)
    chunks = [_resize(images[i:i + _CHUNK].float() / 255, size) for i in range(0, len(images), _CHUNK)]
    x = torch.cat(chunks) if chunks else torch.zeros(0, images.shape[1], size, size)
    if x.shape[1] != channels:
        x = x.expand(-1, channels, -1, -1).contiguous()
    return LabeledImages(x, labels.to(torch.int64))


def _pool(splits: tuple[Raw, Raw], size: int, channels: int, cap: int) -> DomainPool:
    train, test = splits
    return DomainPool(_to_float(train, size, channels, cap), _to_float(test, size, channels, cap))


def _tensor(array) -> torch.Tensor:
    # Shares memory with (possibly transposed) numpy arrays: the copy happens later, after capping.
    return torch.from_numpy(np.asarray(array))


def _root(options: TaskOptions) -> str:
    return os.path.expanduser(options.data_root)


# --- datasets: (train, test) as uint8 (N, C, H, W) images and int64 labels ---------------------------------------

def _mnist(options: TaskOptions) -> tuple[Raw, Raw]:
    root = _root(options)
    files = [os.path.splitext(name)[0] for name, _ in datasets.MNIST.resources]  # the un-gzipped names
    return _read("MNIST", os.path.join(root, "MNIST", "raw"), files, options.download,
                 # MNIST.download skips files that exist, so it never overwrites copies placed by hand.
                 fetch=lambda: datasets.MNIST(root, download=True),
                 load=lambda: tuple((ds.data.unsqueeze(1), ds.targets)
                                    for ds in (datasets.MNIST(root, train=t) for t in (True, False))))


def _single_files(cls, root: str) -> tuple[list[str], Callable[[], None]]:
    """USPS and SVHN: one file per split in `root`; returns their names and a fetch of the missing ones (only
    those: download_url would replace a hand-placed file whose md5 differs)."""
    entries = [cls.split_list[s] for s in ("train", "test")]

    def fetch():
        for url, name, md5 in entries:
            if not os.path.isfile(os.path.join(root, name)):
                _download(url, root, name, md5)

    return [name for _, name, _ in entries], fetch


def _usps(options: TaskOptions) -> tuple[Raw, Raw]:
    root = _root(options)
    files, fetch = _single_files(datasets.USPS, root)
    return _read("USPS", root, files, options.download, fetch,
                 load=lambda: tuple((_tensor(ds.data).unsqueeze(1), torch.tensor(ds.targets))
                                    for ds in (datasets.USPS(root, train=t) for t in (True, False))))


def _svhn(options: TaskOptions) -> tuple[Raw, Raw]:
    root = _root(options)
    files, fetch = _single_files(datasets.SVHN, root)
    # torchvision already maps SVHN's label 10 to digit 0.
    return _read("SVHN", root, files, options.download, fetch,
                 load=lambda: tuple((_tensor(ds.data), _tensor(ds.labels))
                                    for ds in (_SVHN(root, split=s) for s in ("train", "test"))))


def _archive_fetch(cls, root: str) -> Callable[[], None]:
    return lambda: download_and_extract_archive(cls.url, root, filename=cls.filename, md5=cls.tgz_md5)


def _shared_classes(images: np.ndarray, labels, classes: list[str]) -> Raw:
    """Keep the images of `_CIFAR_STL_CLASSES`, relabelled to that order (STL's 'car' is CIFAR's 'automobile')."""
    names = [_ALIASES.get(c, c) for c in classes]
    absent = sorted(set(_CIFAR_STL_CLASSES) - set(names))
    if absent:
        raise ValueError(f"class list {classes} lacks {absent}")  # reported by `_read` as unreadable files
    remap = torch.tensor([_CIFAR_STL_CLASSES.index(n) if n in _CIFAR_STL_CLASSES else -1 for n in names])
    new = remap[torch.as_tensor(np.asarray(labels, dtype=np.int64))]
    keep = torch.nonzero(new >= 0).flatten()
    return _tensor(images[keep.numpy()]), new[keep]


def _cifar10(options: TaskOptions) -> tuple[Raw, Raw]:
    root, cls = _root(options), datasets.CIFAR10

    def load():
        splits = (_CIFAR10(root, train=t) for t in (True, False))
        return tuple(_shared_classes(ds.data.transpose(0, 3, 1, 2), ds.targets, ds.classes) for ds in splits)

    files = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return _read("CIFAR-10", os.path.join(root, cls.base_folder), files, options.download,
                 _archive_fetch(cls, root), load)


def _stl10(options: TaskOptions) -> tuple[Raw, Raw]:
    root, cls = _root(options), datasets.STL10

    def load():
        splits = (_STL10(root, split=s) for s in ("train", "test"))
        # torchvision sets `classes` only when class_names.txt exists; the fallback is the official order.
        return tuple(_shared_classes(ds.data, ds.labels, getattr(ds, "classes", _STL10_CLASSES)) for ds in splits)

    files = [name for name, _ in _STL10.train_list + _STL10.test_list]
    return _read("STL-10", os.path.join(root, cls.base_folder), files, options.download,
                 _archive_fetch(cls, root), load)


# --- tasks --------------------------------------------------------------------------------------------------------

def _digit_pair(source, target, options: TaskOptions, size: int, channels: int):
    cap = options.max_per_domain
    return _pool(source(options), size, channels, cap), _pool(target(options), size, channels, cap), list(_DIGITS)


@register_task("mnist-usps", shift="dataset",
               description="MNIST -> USPS handwritten digits, 1x28x28 (USPS upsampled from 16x16)")
def mnist_usps(options: TaskOptions):
    """MNIST source, USPS target, both 1x28x28; official test splits."""
    return _digit_pair(_mnist, _usps, options, size=28, channels=1)


@register_task("usps-mnist", shift="dataset",
               description="USPS -> MNIST handwritten digits, 1x28x28 (USPS upsampled from 16x16)")
def usps_mnist(options: TaskOptions):
    """USPS source, MNIST target, both 1x28x28; official test splits."""
    return _digit_pair(_usps, _mnist, options, size=28, channels=1)


@register_task("svhn-mnist", shift="dataset",
               description="SVHN house-number digits -> MNIST, 3x32x32 (MNIST resized and repeated to RGB)")
def svhn_mnist(options: TaskOptions):
    """SVHN source, MNIST target (grey repeated to 3 channels), both 3x32x32; official test splits."""
    return _digit_pair(_svhn, _mnist, options, size=32, channels=3)


@register_task("cifar10-stl10", shift="dataset", allow_flip=True,
               description="CIFAR-10 -> STL-10 on their 9 shared classes, 3x32x32 (STL downsampled from 96x96)")
def cifar10_stl10(options: TaskOptions):
    """CIFAR-10 source, STL-10 target, both 3x32x32, on the 9 shared classes in CIFAR's order (CIFAR's frog and
    STL's monkey dropped; STL's 'car' is 'automobile'); official test splits."""
    cap = options.max_per_domain
    return (_pool(_cifar10(options), 32, 3, cap), _pool(_stl10(options), 32, 3, cap), list(_CIFAR_STL_CLASSES))


def _image_folder(directory: str, role: str) -> datasets.ImageFolder:
    if not directory:
        raise UserError(f"task 'imagefolder' needs task.{role}_dir: a directory with one sub-folder per class")
    path = os.path.expanduser(directory)
    if not os.path.isdir(path):
        raise UserError(f"task 'imagefolder': {role}_dir {path} is not a directory")
    try:
        return datasets.ImageFolder(path)
    except FileNotFoundError as e:  # no class folders, or a class folder without images
        raise UserError(f"task 'imagefolder': {role}_dir {path}: {_one_line(e)}") from None


def _folder_images(ds: datasets.ImageFolder, size: int, cap: int) -> FolderImages:
    """(A fixed subsample of) the folder's images, read lazily as RGB resized to size x size; every picked file's
    header is checked now, so a stray non-image stops the run before any training."""
    labels = torch.tensor(ds.targets, dtype=torch.int64)
    index, labels = _capped(torch.arange(len(labels)), labels, cap)  # pick before reading: no wasted disk reads
    paths = [ds.samples[i][0] for i in index.tolist()]
    check_readable(paths)
    return FolderImages(ds.root, [os.path.relpath(p, ds.root) for p in paths], labels, size)


@register_task("imagefolder", shift="dataset", allow_flip=True,
               description="any two class-per-folder image directories (task.source_dir -> task.target_dir), "
                           "e.g. Office-31 domains; RGB, resized to task.image_size (default 64), streamed from disk")
def imagefolder(options: TaskOptions):
    """Source and target from `options.source_dir` / `options.target_dir`, each holding one folder per class
    (same folder names in both); images read lazily as RGB, squashed to image_size x image_size, decoded batch by
    batch by DataLoader workers (`folder.FolderImages`). No test split."""
    source, target = _image_folder(options.source_dir, "source"), _image_folder(options.target_dir, "target")
    if source.classes != target.classes:
        only_s = sorted(set(source.classes) - set(target.classes))
        only_t = sorted(set(target.classes) - set(source.classes))
        raise UserError(f"task 'imagefolder': class folders differ: only in source_dir {only_s}, "
                        f"only in target_dir {only_t}")
    size = options.image_size or _IMAGEFOLDER_SIZE
    cap = options.max_per_domain
    return (DomainPool(_folder_images(source, size, cap)), DomainPool(_folder_images(target, size, cap)),
            list(source.classes))
