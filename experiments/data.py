"""Datasets: MNIST, Fashion-MNIST and CIFAR-10 as uint8 NHWC numpy arrays.

Sources, tried in this order for each split:

1. A local data directory (``data_dir`` argument, else ``$GPFQ_DATA_DIR``)::

       <data_dir>/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
       <data_dir>/fashion_mnist/  (or fashion-mnist/)  same idx names
       <data_dir>/cifar10/cifar10-jpeg-q75.tar.gz      train|test/<class>/NNNN.jpg
       <data_dir>/cifar10/cifar10-exact-subset.npz     ("cifar10_exact")

2. Fashion-MNIST only: ``/usr/share/datasets/fashion-mnist`` (Debian package
   ``dataset-fashion-mnist``).
3. tensorflow-datasets (downloads; skipped when ``allow_download=False``).

If all fail, a ``FileNotFoundError`` lists every place looked at and how to provide the
data. The file formats: ``experiments.mnist`` (idx files), ``experiments.cifar`` (the JPEG
tar, its order, and the exact subset; decoded JPEGs are cached by
``experiments.data_cache``).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Iterator

import numpy as np

from experiments import cifar, mnist

DATA_DIR_ENV = "GPFQ_DATA_DIR"
DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar10_exact")
SPLITS = ("train", "test")
SYSTEM_FASHION_MNIST_DIRS = (pathlib.Path("/usr/share/datasets/fashion-mnist"),)

_SUBDIRS = {
    "mnist": ("mnist",),
    "fashion_mnist": ("fashion_mnist", "fashion-mnist"),
    "cifar10": ("cifar10",),
    "cifar10_exact": ("cifar10",),
}
_TFDS_NAMES = {"mnist": "mnist", "fashion_mnist": "fashion_mnist", "cifar10": "cifar10"}
_IMAGE_SHAPES = {
    "mnist": (28, 28, 1),
    "fashion_mnist": (28, 28, 1),
    "cifar10": (32, 32, 3),
    "cifar10_exact": (32, 32, 3),
}
_IDX_LABELS = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}

# Per-channel mean/std of the training images scaled to [0, 1] (population std):
# MNIST and Fashion-MNIST over all 60,000 training images; CIFAR-10 over the exact
# 50,000 training images (also used for the JPEG copy: means differ by < 0.0005, stds by
# < 0.002).
NORMALIZATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar10_exact": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
Loaded = tuple[np.ndarray, np.ndarray, str]  # images, labels, source description


@dataclasses.dataclass
class Dataset:
    """Train/validation/test splits: images uint8 (n, H, W, C), labels int32 (n,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str
    source: str

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={self.x_train.shape}, val={self.x_val.shape}, "
            f"test={self.x_test.shape}, source={self.source!r})"
        )


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path | None:
    """Data directory: the argument, else ``$GPFQ_DATA_DIR``, else None.

    A directory that is given must exist: FileNotFoundError (NotADirectoryError for a file)
    naming it and where it came from, at once, before anything else is tried.
    """
    if data_dir is not None and str(data_dir) != "":
        root, origin = pathlib.Path(data_dir).expanduser(), "data_dir"
    elif os.environ.get(DATA_DIR_ENV):
        root, origin = pathlib.Path(os.environ[DATA_DIR_ENV]).expanduser(), f"${DATA_DIR_ENV}"
    else:
        return None
    if not root.exists():
        raise FileNotFoundError(
            f"data directory {root} (from {origin}) does not exist; point {origin} at a folder "
            "laid out like <data_dir>/mnist/*.gz, <data_dir>/cifar10/... (see experiments.data)"
        )
    if not root.is_dir():
        raise NotADirectoryError(f"data directory {root} (from {origin}) is not a directory")
    return root


def _check_name_split(name: str, split: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


# ----------------------------------------------------------------------------- sources


def _try_idx(name: str, folder: pathlib.Path, split: str, tried: list[str]) -> Loaded | None:
    missing = mnist.missing_files(folder, split)
    if missing:
        tried.append(f"{folder}: missing {', '.join(map(str, missing))}")
        return None
    x, y = mnist.load_idx_pair(folder, split)
    return x, y, f"{_IDX_LABELS[name]} idx files ({folder})"


def _try_cifar(name: str, folder: pathlib.Path, split: str, tried: list[str]) -> Loaded | None:
    if name == "cifar10":
        tar = folder / cifar.CIFAR10_TAR
        if not tar.is_file():
            tried.append(f"{tar}: missing")
            return None
        x, y, note = cifar.load_cifar_jpeg(folder, split)
        return x, y, f"CIFAR-10 JPEG q75 copy ({tar}; {note})"
    npz = folder / cifar.CIFAR10_EXACT_NPZ
    if not npz.is_file():
        tried.append(f"{npz}: missing")
        return None
    x, y = cifar.load_cifar_exact(folder, split)
    return x, y, f"CIFAR-10 exact subset ({npz})"


def _try_local(name: str, split: str, root: pathlib.Path, tried: list[str]) -> Loaded | None:
    load = _try_idx if name in _IDX_LABELS else _try_cifar
    for sub in _SUBDIRS[name]:
        result = load(name, root / sub, split, tried)
        if result is not None:
            return result
    return None


def _try_system_fashion(split: str, tried: list[str]) -> Loaded | None:
    for folder in SYSTEM_FASHION_MNIST_DIRS:
        if not mnist.missing_files(folder, split):
            x, y = mnist.load_idx_pair(folder, split)
            return x, y, f"Fashion-MNIST idx files ({folder}, Debian dataset-fashion-mnist)"
        paths = mnist.idx_paths(folder, split)
        tried.append(f"{folder}: missing {', '.join(str(p) for p in paths)}")
    return None


def _load_tfds(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """tensorflow-datasets fallback (may download)."""
    import tensorflow_datasets as tfds

    images, labels = tfds.as_numpy(
        tfds.load(_TFDS_NAMES[name], split=split, batch_size=-1, as_supervised=True)
    )
    return np.asarray(images, dtype=np.uint8), np.asarray(labels, dtype=np.int32)


_TFDS_HOST = "storage.googleapis.com"


def _tfds_prepared(tfds_name: str) -> bool:
    """Whether tensorflow-datasets already holds ``tfds_name`` (no download needed)."""
    try:
        import tensorflow_datasets as tfds

        return bool(tfds.builder(tfds_name).is_prepared())
    except Exception:  # noqa: BLE001  (no TensorFlow, unknown name, ...)
        return False


def _download_host_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection attempt to tensorflow-datasets' host, so that an offline machine
    fails in seconds instead of retrying downloads for minutes."""
    import socket

    try:
        socket.create_connection((_TFDS_HOST, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _try_tfds(name: str, split: str, allow_download: bool, tried: list[str]) -> Loaded | None:
    tfds_name = _TFDS_NAMES.get(name)
    if tfds_name is None:
        tried.append(f"tensorflow-datasets: no catalog entry for {name!r}")
    elif not allow_download:
        tried.append(f"tensorflow-datasets {tfds_name!r}: skipped (allow_download=False)")
    elif not _tfds_prepared(tfds_name) and not _download_host_reachable():
        tried.append(f"tensorflow-datasets {tfds_name!r}: not downloaded, and its download "
                     f"host {_TFDS_HOST} is unreachable (offline)")  # fmt: skip
    else:
        try:
            x, y = _load_tfds(name, split)
            return x, y, f"tensorflow-datasets {tfds_name!r} split {split!r}"
        except Exception as e:  # noqa: BLE001  (offline, no TensorFlow, ...) -> not found
            tried.append(f"tensorflow-datasets {tfds_name!r}: {type(e).__name__}: {e}")
    return None


def _not_found_message(name: str, split: str, tried: list[str]) -> str:
    layout = {
        "mnist": "<data_dir>/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz",
        "fashion_mnist": "<data_dir>/fashion_mnist/{train,t10k}-{images-idx3,labels-idx1}"
        "-ubyte.gz (or fashion-mnist/; or apt-get install dataset-fashion-mnist)",
        "cifar10": f"<data_dir>/cifar10/{cifar.CIFAR10_TAR} containing "
        "{train,test}/<class>/*.jpg",
        "cifar10_exact": f"<data_dir>/cifar10/{cifar.CIFAR10_EXACT_NPZ} with x_train, y_train, "
        "x_test, y_test",
    }[name]
    lines = "\n".join(f"  - {t}" for t in tried)
    return (
        f"dataset {name!r} split {split!r} not found. Looked in:\n{lines}\n"
        f"Provide it by passing data_dir=... or setting {DATA_DIR_ENV}=/path/to/data, "
        f"laid out as {layout}."
    )


def _checked(name: str, result: Loaded) -> Loaded:
    x, y, source = result
    expected = _IMAGE_SHAPES[name]
    if x.ndim != 4 or x.shape[1:] != expected or x.dtype != np.uint8 or y.shape != x.shape[:1]:
        raise ValueError(
            f"{source}: got images {x.shape} {x.dtype}, labels {y.shape}; "
            f"expected uint8 (n, {', '.join(map(str, expected))}) and (n,)"
        )
    return x, y.astype(np.int32, copy=False), source


# ----------------------------------------------------------------------------- loading


def load_split_with_source(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    allow_download: bool = True,
) -> Loaded:
    """Like :func:`load_split`, plus a description of the files actually used."""
    _check_name_split(name, split)
    tried: list[str] = []
    root = resolve_data_dir(data_dir)
    result = None
    if root is not None:
        result = _try_local(name, split, root, tried)
    else:
        tried.append(f"no data directory (data_dir=None and ${DATA_DIR_ENV} unset)")
    if result is None and name == "fashion_mnist":
        result = _try_system_fashion(split, tried)
    if result is None and root is None:  # tensorflow-datasets only when no directory is given
        result = _try_tfds(name, split, allow_download, tried)
    if result is None:
        raise FileNotFoundError(_not_found_message(name, split, tried))
    return _checked(name, result)


def load_split(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    allow_download: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """One split: (images uint8 NHWC, labels int32 (n,)).

    Images are (n, 28, 28, 1) for (fashion_)mnist and (n, 32, 32, 3) for cifar10[_exact].
    ``split`` is "train" or "test". ``allow_download=False`` never tries tensorflow-datasets.
    """
    x, y, _ = load_split_with_source(name, split, data_dir, allow_download)
    return x, y


def train_val_split(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded disjoint split of ``range(n)``: (train_idx, val_idx), each sorted int64."""
    if not 0 <= val_size <= n:
        raise ValueError(f"val_size={val_size} must be between 0 and n={n}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    val_size: int = 5000,
    seed: int = 0,
    limit_train: int | None = None,
    allow_download: bool = True,
) -> Dataset:
    """Train/val/test :class:`Dataset`; val is a seeded random subset of the train split.

    ``limit_train`` keeps only the first n training images (after the val split).
    """
    x, y, source = load_split_with_source(name, "train", data_dir, allow_download)
    x_test, y_test, test_source = load_split_with_source(name, "test", data_dir, allow_download)
    if val_size >= len(x):
        raise ValueError(
            f"val_size={val_size} leaves no training images: {name!r} has {len(x)}; "
            "pass a smaller val_size"
        )
    train_idx, val_idx = train_val_split(len(x), val_size, seed)
    if limit_train is not None:
        if limit_train <= 0:
            raise ValueError(f"limit_train must be positive, got {limit_train}")
        train_idx = train_idx[:limit_train]
    if test_source != source:
        source = f"train: {source}; test: {test_source}"
    return Dataset(
        x_train=x[train_idx],
        y_train=y[train_idx],
        x_val=x[val_idx],
        y_val=y[val_idx],
        x_test=x_test,
        y_test=y_test,
        name=name,
        source=source,
    )


# ----------------------------------------------------------------------------- arrays


def normalize(images: np.ndarray, name: str) -> np.ndarray:
    """uint8 (..., C) -> float32 ``(x / 255 - mean) / std`` with :data:`NORMALIZATION`."""
    if name not in NORMALIZATION:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    mean, std = (np.asarray(v, dtype=np.float32) for v in NORMALIZATION[name])
    if images.shape[-1] != len(mean):
        raise ValueError(
            f"images have {images.shape[-1]} channels (shape {images.shape}); "
            f"{name!r} expects {len(mean)}"
        )
    return (np.asarray(images, dtype=np.float32) / 255.0 - mean) / std


def batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    drop_remainder: bool,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (x[b], y[b]) numpy batches along axis 0, optionally in a seeded random order."""
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = len(x)
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]


def augment_crop_flip(x: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """Random crop with ``pad``-pixel zero padding plus random horizontal flip.

    x: (B, H, W, C) (any dtype); returns the same shape and dtype.
    """
    b, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy = rng.integers(0, 2 * pad + 1, size=b)
    dx = rng.integers(0, 2 * pad + 1, size=b)
    rows = dy[:, None] + np.arange(h)[None, :]  # (B, H)
    cols = dx[:, None] + np.arange(w)[None, :]  # (B, W)
    flip = rng.random(b) < 0.5
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
    bi = np.arange(b)[:, None, None]
    return padded[bi, rows[:, :, None], cols[:, None, :]]


__all__ = [
    "DATA_DIR_ENV",
    "DATASETS",
    "Dataset",
    "NORMALIZATION",
    "SPLITS",
    "SYSTEM_FASHION_MNIST_DIRS",
    "augment_crop_flip",
    "batches",
    "load_dataset",
    "load_split",
    "load_split_with_source",
    "normalize",
    "resolve_data_dir",
    "train_val_split",
]
