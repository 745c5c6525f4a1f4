"""Datasets: Fashion-MNIST (embedded default), CIFAR-10/100 and ImageNet-style folders.

Nothing here downloads.  Every data set is read from a folder:

* **Fashion-MNIST**: the four idx files (``train-images-idx3-ubyte.gz`` ...,
  gzipped or not) from ``data=`` / ``--data DIR``, then ``$OBA_FX_DATA``, then
  ``/usr/share/datasets/fashion-mnist`` (Debian: ``apt-get install
  dataset-fashion-mnist``).  A ``fashion-mnist`` subfolder of each is also tried.
* **CIFAR-10/100**: the standard "python version" batches
  (``cifar-10-batches-py/data_batch_1`` ... / ``cifar-100-python/train``) in the
  named folder or directly in it.
* **ImageNet-style**: ``DIR/train/<class>/*.jpg`` and ``DIR/val/<class>/*.jpg``
  (torchvision ``ImageFolder``).

The small data sets live in memory as uint8 tensors and are batched by
:class:`TensorLoader`, which does the standard augmentation (random crop with
zero padding, horizontal flip) on whole batches and normalises with the data
set's channel mean/std.  Shuffling and augmentation draw from a generator seeded
by ``(seed, epoch)``, so an interrupted training run resumes to the same weights.
Calibration batches are a seeded sample of the training set, unaugmented.
"""
from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from .passes.errors import UsageError

__all__ = ["DatasetNotFound", "DataSpec", "TensorLoader", "get_dataset", "DATASETS", "FASHION_MNIST_DIR",
           "read_idx"]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")


class DatasetNotFound(FileNotFoundError):
    """The data set's files are not where we looked; the message says where and how to get them."""


def _seed_for(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + 12_345) % (2**63 - 1)


class TensorLoader:
    """Batches over in-memory uint8 images ``(N, C, H, W)`` with batch-wise augmentation.

    Args:
        images: uint8 tensor (N, C, H, W).
        labels: int64 tensor (N,).
        batch_size: samples per batch.
        mean, std: per-channel normalisation (applied after scaling to [0, 1]).
        shuffle: draw a new permutation each epoch.
        augment: random crop with ``pad`` pixels of zero padding and, when
            ``flip``, a horizontal flip with probability 1/2.
        seed: seeds permutation and augmentation together with the epoch
            (see :meth:`set_epoch`); iterating twice in one epoch repeats it.
        drop_last: drop a final partial batch.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, mean, std, *,
                 shuffle: bool = False, augment: bool = False, pad: int = 4, flip: bool = True, seed: int = 0,
                 drop_last: bool = False):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise UsageError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.augment = int(batch_size), shuffle, augment
        self.pad, self.flip, self.seed, self.drop_last = int(pad), flip, int(seed), drop_last
        c = images.shape[1]
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(1, c, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(1, c, 1, 1)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation/augmentation the next iteration uses."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b, c, h, w = x.shape
        if self.pad:
            p = self.pad
            xp = torch.nn.functional.pad(x, (p, p, p, p))
            oy = torch.randint(0, 2 * p + 1, (b,), generator=gen)
            ox = torch.randint(0, 2 * p + 1, (b,), generator=gen)
            rows = (oy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
            cols = (ox[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
            bi = torch.arange(b)[:, None, None]
            x = xp.permute(0, 2, 3, 1)[bi, rows, cols].permute(0, 3, 1, 2)
        if self.flip:
            m = torch.rand(b, generator=gen) < 0.5
            x = torch.where(m[:, None, None, None], x.flip(-1), x)
        return x

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(_seed_for(self.seed, self.epoch))
        n = len(self.labels)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images[idx].float().div_(255)
            if self.augment:
                x = self._augment(x, gen)
            yield ((x - self.mean) / self.std).contiguous(), self.labels[idx]


@dataclass
class DataSpec:
    """One data set: its shape, and factories for training/test/calibration batches."""

    name: str
    num_classes: int
    in_channels: int
    img_size: int
    root: str
    train_size: int
    test_size: int
    _train: Callable[..., object] = field(repr=False)
    _test: Callable[..., object] = field(repr=False)
    _calib: Callable[..., list] = field(repr=False)
    classes: tuple = ()

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.img_size, self.img_size)

    def train(self, batch_size: int = 128, augment: bool = True, seed: int = 0):
        """Shuffled, augmented training batches (call ``.set_epoch(e)`` each epoch)."""
        return self._train(batch_size, augment, seed)

    def test(self, batch_size: int = 256):
        """Test batches in order, unaugmented."""
        return self._test(batch_size)

    def calibration(self, batches: int = 8, batch_size: int = 64, seed: int = 0) -> list:
        """``batches`` seeded, unaugmented batches of distinct training samples."""
        if batches < 1 or batch_size < 1:
            raise UsageError(f"calibration needs batches >= 1 and batch_size >= 1, got {batches}, {batch_size}")
        return self._calib(batches, batch_size, seed)

    def describe(self) -> dict:
        return {"name": self.name, "root": self.root, "num_classes": self.num_classes,
                "input_shape": list(self.input_shape), "train_size": self.train_size, "test_size": self.test_size}


# --------------------------------------------------------------------------- idx / Fashion-MNIST

def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (gzipped or not) as a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UsageError(f"{path}: cannot read idx file ({e}); the file is damaged, reinstall the data set") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UsageError(f"{path}: not an idx file of unsigned bytes (bad magic number); reinstall the data set")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise UsageError(f"{path}: idx header says {dims} but holds {data.size} bytes; the file is truncated")
    return data.reshape(dims)


_FM_FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
             "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}


def _fm_files_in(d: Path) -> dict[str, Path] | None:
    found = {}
    for key, stem in _FM_FILES.items():
        for cand in (d / f"{stem}.gz", d / stem):
            if cand.is_file():
                found[key] = cand
                break
        else:
            return None
    return found


def find_fashion_mnist(data: str | os.PathLike | None = None) -> dict[str, Path]:
    """Locate the four Fashion-MNIST idx files; raise DatasetNotFound listing every place tried."""
    candidates: list[tuple[str, Path]] = []
    if data:
        candidates.append(("--data", Path(data)))
    if os.environ.get("OBA_FX_DATA"):
        candidates.append(("$OBA_FX_DATA", Path(os.environ["OBA_FX_DATA"])))
    candidates.append(("Debian default", Path(FASHION_MNIST_DIR)))
    tried = []
    for how, base in candidates:
        for d in (base, base / "fashion-mnist", base / "fashion_mnist", base / "FashionMNIST" / "raw"):
            tried.append(f"{d} ({how})")
            files = _fm_files_in(d)
            if files:
                return files
        if how == "--data":  # an explicit folder that lacks the files is an error, not a fallback
            break
    raise DatasetNotFound(
        "Fashion-MNIST not found; looked in " + "; ".join(tried) + ". Install it with "
        "'apt-get update && apt-get install -y dataset-fashion-mnist' (files go to " + FASHION_MNIST_DIR + "), "
        "or pass --data DIR / set OBA_FX_DATA to a folder holding train-images-idx3-ubyte.gz, "
        "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz")


def _limit(x, y, n, seed):
    if n is None or n >= len(y):
        return x, y
    if n < 1:
        raise UsageError(f"a sample limit must be >= 1, got {n}")
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(_seed_for(seed, -2)))[:n].sort().values
    return x[idx], y[idx]


def _in_memory_spec(name, root, xtr, ytr, xte, yte, num_classes, mean, std, pad, flip, classes=(),
                    limit_train=None, limit_test=None) -> DataSpec:
    xtr, xte = torch.from_numpy(np.array(xtr, copy=True)), torch.from_numpy(np.array(xte, copy=True))
    ytr = torch.from_numpy(np.asarray(ytr, dtype=np.int64))
    yte = torch.from_numpy(np.asarray(yte, dtype=np.int64))
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise UsageError(f"{name} in {root}: {len(xtr)} train images but {len(ytr)} labels, "
                         f"{len(xte)} test images but {len(yte)} labels; the files do not belong together")
    xtr, ytr = _limit(xtr, ytr, limit_train, 0)
    xte, yte = _limit(xte, yte, limit_test, 1)

    def train(batch_size, augment, seed):
        return TensorLoader(xtr, ytr, batch_size, mean, std, shuffle=True, augment=augment, pad=pad, flip=flip,
                            seed=seed, drop_last=len(ytr) > batch_size)

    def test(batch_size):
        return TensorLoader(xte, yte, batch_size, mean, std)

    def calib(batches, batch_size, seed):
        n = batches * batch_size
        if n > len(ytr):
            raise UsageError(f"calibration asks for {n} samples but {name} has {len(ytr)} training samples")
        idx = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(_seed_for(seed, -1)))[:n]
        loader = TensorLoader(xtr[idx], ytr[idx], batch_size, mean, std)
        return list(loader)

    return DataSpec(name, num_classes, xtr.shape[1], xtr.shape[-1], str(root), len(ytr), len(yte), train, test,
                    calib, tuple(classes))


def fashion_mnist(data: str | os.PathLike | None = None, **limits) -> DataSpec:
    files = find_fashion_mnist(data)
    arr = {k: read_idx(p) for k, p in files.items()}
    for k in ("train_x", "test_x"):
        if arr[k].ndim != 3:
            raise UsageError(f"{files[k]}: expected (N, 28, 28) images, got shape {arr[k].shape}")
    return _in_memory_spec("fashion-mnist", files["train_x"].parent, arr["train_x"][:, None], arr["train_y"],
                           arr["test_x"][:, None], arr["test_y"], 10, (0.2860,), (0.3530,), pad=2, flip=True,
                           classes=FASHION_MNIST_CLASSES, **limits)


# --------------------------------------------------------------------------- CIFAR

_CIFAR = {
    "cifar10": dict(sub="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
                    label=b"labels", classes=10, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    "cifar100": dict(sub="cifar-100-python", train=["train"], test=["test"], label=b"fine_labels", classes=100,
                     mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
}


def cifar(name: str, data: str | os.PathLike | None, **limits) -> DataSpec:
    spec = _CIFAR[name]
    base = data or os.environ.get("OBA_FX_DATA")
    if not base:
        raise DatasetNotFound(f"{name} needs a folder: pass --data DIR (or set OBA_FX_DATA) holding "
                              f"'{spec['sub']}/' with the python-version batches from "
                              "https://www.cs.toronto.edu/~kriz/cifar.html (nothing is downloaded)")
    base = Path(base)
    root = next((d for d in (base / spec["sub"], base) if all((d / f).is_file() for f in spec["train"] + spec["test"])),
                None)
    if root is None:
        raise DatasetNotFound(f"{name} not found in {base} or {base / spec['sub']}: expected files "
                              f"{', '.join(spec['train'] + spec['test'])} (the python-version CIFAR archive, "
                              "extracted)")

    def read(files):
        xs, ys = [], []
        for f in files:
            try:
                with open(root / f, "rb") as fh:
                    d = pickle.load(fh, encoding="bytes")
                xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(d[spec["label"]], dtype=np.int64))
            except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
                raise UsageError(f"{root / f}: not a CIFAR python batch ({type(e).__name__}: {e})") from None
        return np.concatenate(xs), np.concatenate(ys)

    xtr, ytr = read(spec["train"])
    xte, yte = read(spec["test"])
    return _in_memory_spec(name, root, xtr, ytr, xte, yte, spec["classes"], spec["mean"], spec["std"], pad=4,
                           flip=True, **limits)


# --------------------------------------------------------------------------- ImageNet-style folders

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def imagefolder(data: str | os.PathLike | None, img_size: int = 224, workers: int = 2, limit_train=None,
                limit_test=None) -> DataSpec:
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    base = data or os.environ.get("OBA_FX_DATA")
    if not base:
        raise DatasetNotFound("imagenet needs a folder: pass --data DIR holding train/<class>/*.jpg and "
                              "val/<class>/*.jpg (torchvision ImageFolder layout)")
    base = Path(base)
    if not (base / "train").is_dir() or not (base / "val").is_dir():
        raise DatasetNotFound(f"{base}: expected subfolders train/ and val/, each with one folder per class")
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    tr_aug = T.Compose([T.RandomResizedCrop(img_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    te_tf = T.Compose([T.Resize(int(img_size * 256 / 224)), T.CenterCrop(img_size), T.ToTensor(), norm])
    train_set = ImageFolder(base / "train", tr_aug)
    train_plain = ImageFolder(base / "train", te_tf)
    test_set = ImageFolder(base / "val", te_tf)
    if train_set.classes != test_set.classes:
        raise UsageError(f"{base}: train/ and val/ hold different class folders")
    classes = tuple(train_set.classes)
    if limit_train is not None and limit_train < len(train_set):
        idx = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(1))[:limit_train].tolist()
        train_set, train_plain = torch.utils.data.Subset(train_set, idx), torch.utils.data.Subset(train_plain, idx)
    if limit_test is not None and limit_test < len(test_set):
        idx = torch.randperm(len(test_set), generator=torch.Generator().manual_seed(2))[:limit_test].tolist()
        test_set = torch.utils.data.Subset(test_set, idx)

    class _Seeded:
        def __init__(self, ds, batch_size, shuffle, seed):
            self.ds, self.batch_size, self.shuffle, self.seed, self.epoch = ds, batch_size, shuffle, seed, 0

        def set_epoch(self, e):
            self.epoch = e

        def __len__(self):
            return -(-len(self.ds) // self.batch_size)

        def __iter__(self):
            g = torch.Generator().manual_seed(_seed_for(self.seed, self.epoch))
            torch.manual_seed(_seed_for(self.seed, self.epoch))  # transform randomness
            return iter(torch.utils.data.DataLoader(self.ds, self.batch_size, shuffle=self.shuffle, generator=g,
                                                    num_workers=workers))

    def calib(batches, batch_size, seed):
        n = batches * batch_size
        if n > len(train_plain):
            raise UsageError(f"calibration asks for {n} samples but {base / 'train'} has {len(train_plain)}")
        idx = torch.randperm(len(train_plain), generator=torch.Generator().manual_seed(_seed_for(seed, -1)))[:n]
        sub = torch.utils.data.Subset(train_plain, idx.tolist())
        return list(torch.utils.data.DataLoader(sub, batch_size, num_workers=workers))

    return DataSpec("imagenet", len(classes), 3, img_size, str(base), len(train_set), len(test_set),
                    lambda b, a, s: _Seeded(train_set if a else train_plain, b, True, s),
                    lambda b: _Seeded(test_set, b, False, 0), calib, classes)


# --------------------------------------------------------------------------- registry

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagenet")
_ALIASES = {"fashion-mnist": "fashion-mnist", "fashion_mnist": "fashion-mnist", "fmnist": "fashion-mnist",
            "fashionmnist": "fashion-mnist", "cifar10": "cifar10", "cifar-10": "cifar10", "cifar100": "cifar100",
            "cifar-100": "cifar100", "imagenet": "imagenet", "imagefolder": "imagenet"}


def get_dataset(name: str = "fashion-mnist", data: str | os.PathLike | None = None, *,
                limit_train: int | None = None, limit_test: int | None = None) -> DataSpec:
    """A :class:`DataSpec` by name (see :data:`DATASETS`), read from ``data`` or the default places.

    ``limit_train`` / ``limit_test`` keep a seeded random subset of that many
    samples (quick runs and smoke tests).
    """
    key = _ALIASES.get(str(name).lower())
    if key is None:
        raise UsageError(f"unknown dataset '{name}'; choose from {', '.join(DATASETS)}")
    limits = {"limit_train": limit_train, "limit_test": limit_test}
    if key == "fashion-mnist":
        return fashion_mnist(data, **limits)
    if key in _CIFAR:
        return cifar(key, data, **limits)
    return imagefolder(data, **limits)
