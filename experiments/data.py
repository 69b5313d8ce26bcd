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
data. Decoded CIFAR-10 JPEGs are cached as ``.npz`` under ``$GPFQ_CACHE_DIR`` (default
``~/.cache/gpfq_jax``), keyed by the tar's size and mtime.

CIFAR-10 JPEG order: the tar numbers files per class (``train/frog/0000.jpg`` is the first
frog of the canonical training set). With the canonical label sequence from
``cifar10-exact-subset.npz`` (next to the tar) the loader restores canonical order: all
50,000 training images, and the first 1,000 test images (the rest of the test set follows,
interleaved by class). Without that file both splits are interleaved by class
(airplane 0, automobile 0, ..., truck 0, airplane 1, ...).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import pathlib
import tarfile
import tempfile
import warnings
import zipfile
from collections.abc import Iterator

import numpy as np

DATA_DIR_ENV = "GPFQ_DATA_DIR"
CACHE_DIR_ENV = "GPFQ_CACHE_DIR"
DEFAULT_CACHE_DIR = pathlib.Path("~/.cache/gpfq_jax")
DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar10_exact")
SPLITS = ("train", "test")

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
CIFAR10_TAR = "cifar10-jpeg-q75.tar.gz"
CIFAR10_EXACT_NPZ = "cifar10-exact-subset.npz"
SYSTEM_FASHION_MNIST_DIRS = (pathlib.Path("/usr/share/datasets/fashion-mnist"),)

_IDX_PREFIX = {"train": "train", "test": "t10k"}
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
_CACHE_VERSION = 1
_NPZ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)

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


# ----------------------------------------------------------------------------- paths


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path | None:
    """Data directory: the argument, else ``$GPFQ_DATA_DIR``, else None."""
    if data_dir is not None and str(data_dir) != "":
        return pathlib.Path(data_dir).expanduser()
    env = os.environ.get(DATA_DIR_ENV)
    return pathlib.Path(env).expanduser() if env else None


def resolve_cache_dir() -> pathlib.Path:
    """Cache directory: ``$GPFQ_CACHE_DIR``, else ``~/.cache/gpfq_jax``."""
    env = os.environ.get(CACHE_DIR_ENV)
    return pathlib.Path(env).expanduser() if env else DEFAULT_CACHE_DIR.expanduser()


def _check_name_split(name: str, split: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


# ----------------------------------------------------------------------------- idx files


def parse_idx(raw: bytes, path: str = "<bytes>") -> np.ndarray:
    """Parse uncompressed idx bytes (unsigned-byte type only) into a uint8 array."""
    if len(raw) < 4:
        raise ValueError(f"corrupt idx file {path}: {len(raw)} bytes, shorter than the header")
    zero, dtype_code, ndim = int.from_bytes(raw[:2], "big"), raw[2], raw[3]
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        raise ValueError(
            f"corrupt idx file {path}: bad magic number 0x{raw[:4].hex()} "
            "(expected 0x00000801 for labels or 0x00000803 for images)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"corrupt idx file {path}: truncated header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise ValueError(
            f"corrupt idx file {path}: {len(raw)} bytes, expected {expected} for shape {dims}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file, gzip-compressed if its name ends in ``.gz``; uint8 array."""
    path = pathlib.Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"corrupt idx file {path}: {e}") from e
    return parse_idx(raw, str(path))


def _idx_paths(folder: pathlib.Path, split: str) -> tuple[pathlib.Path, pathlib.Path]:
    prefix = _IDX_PREFIX[split]
    return (
        folder / f"{prefix}-images-idx3-ubyte.gz",
        folder / f"{prefix}-labels-idx1-ubyte.gz",
    )


def _find_file(gz_path: pathlib.Path) -> pathlib.Path | None:
    """The ``.gz`` file if present, else its uncompressed twin, else None."""
    for p in (gz_path, gz_path.with_suffix("")):
        if p.is_file():
            return p
    return None


def load_idx_pair(folder: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, 28, 28, 1), labels int32 (n,)) from an MNIST-style folder."""
    img_gz, lbl_gz = _idx_paths(pathlib.Path(folder), split)
    img_path, lbl_path = _find_file(img_gz), _find_file(lbl_gz)
    if img_path is None or lbl_path is None:
        raise FileNotFoundError(f"missing {img_gz if img_path is None else lbl_gz}")
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or labels.ndim != 1:
        raise ValueError(
            f"unexpected idx shapes {images.shape} ({img_path}) and {labels.shape} ({lbl_path})"
        )
    if len(images) != len(labels):
        raise ValueError(
            f"{img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels"
        )
    return images[..., None].copy(), labels.astype(np.int32)


# ----------------------------------------------------------------------------- CIFAR-10


def _decode_jpeg(data: bytes, member: str) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    if arr.shape != (32, 32, 3):
        raise ValueError(f"{member}: image shape {arr.shape}, expected (32, 32, 3)")
    return arr


def decode_cifar_tar(tar_path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Decode ``{train,test}/<class>/*.jpg`` from a tar(.gz) without extracting it.

    Returns ``x_train, y_train, x_test, y_test``: images uint8 (n, 32, 32, 3) and labels
    int32 (n,), class-major with file names sorted within each class ("file order").
    """
    class_index = {c: i for i, c in enumerate(CIFAR10_CLASSES)}
    blobs: dict[str, list[tuple[int, str, bytes]]] = {s: [] for s in SPLITS}
    with tarfile.open(tar_path, "r:*") as tar:
        for member in tar:
            if not member.isfile() or not member.name.lower().endswith((".jpg", ".jpeg")):
                continue
            parts = pathlib.PurePosixPath(member.name).parts
            if len(parts) < 3 or parts[-3] not in SPLITS or parts[-2] not in class_index:
                raise ValueError(
                    f"{tar_path}: unexpected member {member.name!r}; expected "
                    f"{{train,test}}/<class>/<file>.jpg with class in {CIFAR10_CLASSES}"
                )
            data = tar.extractfile(member).read()
            blobs[parts[-3]].append((class_index[parts[-2]], parts[-1], data))
    out = {}
    for split in SPLITS:
        items = sorted(blobs[split], key=lambda t: (t[0], t[1]))
        if not items:
            raise ValueError(f"{tar_path}: no {split}/<class>/*.jpg images found")
        out[f"x_{split}"] = np.stack([_decode_jpeg(d, f"{split}/{n}") for _, n, d in items])
        out[f"y_{split}"] = np.array([c for c, _, _ in items], dtype=np.int32)
    return out


def cifar_cache_path(tar_path: str | os.PathLike) -> pathlib.Path:
    """Cache file for a decoded tar, keyed by the tar's name, size and mtime."""
    st = os.stat(tar_path)
    stem = pathlib.Path(tar_path).name.split(".")[0]
    key = f"{stem}-v{_CACHE_VERSION}-{st.st_size}-{st.st_mtime_ns}"
    return resolve_cache_dir() / f"{key}.npz"


def _save_npz_atomic(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_cifar_tar_cached(tar_path: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Decoded (file-order) split of a CIFAR JPEG tar, via the ``.npz`` cache."""
    cache = cifar_cache_path(tar_path)
    if cache.is_file():
        try:
            with np.load(cache) as z:
                return z[f"x_{split}"], z[f"y_{split}"].astype(np.int32)
        except _NPZ_ERRORS as e:  # corrupt or incompatible cache: decode again
            warnings.warn(f"ignoring unreadable cache {cache}: {e}", stacklevel=2)
    arrays = decode_cifar_tar(tar_path)
    try:
        _save_npz_atomic(cache, arrays)
    except OSError as e:
        warnings.warn(f"could not write cache {cache}: {e}", stacklevel=2)
    return arrays[f"x_{split}"], arrays[f"y_{split}"]


def interleave_order(labels: np.ndarray, canonical: np.ndarray | None = None) -> np.ndarray:
    """Permutation of class-major ``labels`` (int, (n,)) into a class-interleaved order.

    If ``canonical`` (labels of the first m canonical images) is given, output position i
    gets the next unused image of class ``canonical[i]`` (files are numbered by occurrence
    within their class); the remaining images follow round-robin over classes.
    """
    labels = np.asarray(labels)
    classes, starts, counts = np.unique(labels, return_index=True, return_counts=True)
    rank = np.arange(len(labels)) - np.repeat(starts, counts)  # rank within class
    start_of = dict(zip(classes.tolist(), starts.tolist()))
    count_of = dict(zip(classes.tolist(), counts.tolist()))
    used = np.zeros(len(labels), dtype=bool)
    head = np.empty(0, dtype=np.int64)
    if canonical is not None and len(canonical):
        canonical = np.asarray(canonical)
        head = np.empty(len(canonical), dtype=np.int64)
        for c in np.unique(canonical).tolist():
            pos = np.flatnonzero(canonical == c)
            if len(pos) > count_of.get(c, 0):
                raise ValueError(f"canonical labels need {len(pos)} images of class {c}")
            head[pos] = start_of[c] + np.arange(len(pos))
        used[head] = True
    n_used = np.array([used[labels == c].sum() for c in classes])
    rest = np.flatnonzero(~used)
    later = rank[rest] - n_used[np.searchsorted(classes, labels[rest])]
    tail = rest[np.lexsort((labels[rest], later))]
    return np.concatenate([head, tail])


def _canonical_cifar_labels(folder: pathlib.Path, split: str) -> np.ndarray | None:
    npz = folder / CIFAR10_EXACT_NPZ
    key = {"train": "y_train_all50000", "test": "y_test_first1000"}[split]
    if not npz.is_file():
        return None
    try:
        with np.load(npz) as z:
            return z[key].astype(np.int32) if key in z.files else None
    except _NPZ_ERRORS:
        return None


def load_cifar_jpeg(folder: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(images uint8 (n, 32, 32, 3), labels int32 (n,), order note) from the JPEG tar."""
    folder = pathlib.Path(folder)
    x, y = load_cifar_tar_cached(folder / CIFAR10_TAR, split)
    canonical = _canonical_cifar_labels(folder, split)
    note = "class-interleaved order"
    if canonical is not None:
        try:
            order = interleave_order(y, canonical)
            n = len(canonical)
            note = (
                "canonical order"
                if n == len(y)
                else f"canonical order for the first {n}, then class-interleaved"
            )
        except ValueError:
            order = interleave_order(y)
    else:
        order = interleave_order(y)
    return x[order], y[order], note


def load_cifar_exact(folder: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, 32, 32, 3), labels int32 (n,)) from ``cifar10-exact-subset.npz``."""
    path = pathlib.Path(folder) / CIFAR10_EXACT_NPZ
    with np.load(path) as z:
        missing = {f"x_{split}", f"y_{split}"} - set(z.files)
        if missing:
            raise ValueError(f"{path} lacks arrays {sorted(missing)}")
        return z[f"x_{split}"], z[f"y_{split}"].astype(np.int32)


# ----------------------------------------------------------------------------- tfds


def _load_tfds(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """tensorflow-datasets fallback (may download)."""
    import tensorflow_datasets as tfds

    images, labels = tfds.as_numpy(
        tfds.load(_TFDS_NAMES[name], split=split, batch_size=-1, as_supervised=True)
    )
    return np.asarray(images, dtype=np.uint8), np.asarray(labels, dtype=np.int32)


# ----------------------------------------------------------------------------- loading


def _local_candidates(name: str, split: str, root: pathlib.Path) -> list[pathlib.Path]:
    """Files that would provide ``name``/``split`` under a data directory."""
    out = []
    for sub in _SUBDIRS[name]:
        folder = root / sub
        if name in ("mnist", "fashion_mnist"):
            out.extend(_idx_paths(folder, split))
        elif name == "cifar10":
            out.append(folder / CIFAR10_TAR)
        else:
            out.append(folder / CIFAR10_EXACT_NPZ)
    return out


def _try_local(
    name: str, split: str, root: pathlib.Path, tried: list[str]
) -> tuple[np.ndarray, np.ndarray, str] | None:
    for sub in _SUBDIRS[name]:
        folder = root / sub
        if name in ("mnist", "fashion_mnist"):
            paths = _idx_paths(folder, split)
            found = [_find_file(p) for p in paths]
            if None in found:
                missing = [str(p) for p, f in zip(paths, found) if f is None]
                tried.append(f"{folder}: missing {', '.join(missing)}")
                continue
            x, y = load_idx_pair(folder, split)
            label = "MNIST" if name == "mnist" else "Fashion-MNIST"
            return x, y, f"{label} idx files ({folder})"
        if name == "cifar10":
            tar = folder / CIFAR10_TAR
            if not tar.is_file():
                tried.append(f"{tar}: missing")
                continue
            x, y, note = load_cifar_jpeg(folder, split)
            return x, y, f"CIFAR-10 JPEG q75 copy ({tar}; {note})"
        npz = folder / CIFAR10_EXACT_NPZ
        if not npz.is_file():
            tried.append(f"{npz}: missing")
            continue
        x, y = load_cifar_exact(folder, split)
        return x, y, f"CIFAR-10 exact subset ({npz})"
    return None


def _not_found_message(name: str, split: str, tried: list[str]) -> str:
    layout = {
        "mnist": "<data_dir>/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz",
        "fashion_mnist": "<data_dir>/fashion_mnist/{train,t10k}-{images-idx3,labels-idx1}"
        "-ubyte.gz (or fashion-mnist/; or apt-get install dataset-fashion-mnist)",
        "cifar10": f"<data_dir>/cifar10/{CIFAR10_TAR} containing {{train,test}}/<class>/*.jpg",
        "cifar10_exact": f"<data_dir>/cifar10/{CIFAR10_EXACT_NPZ} with x_train, y_train, "
        "x_test, y_test",
    }[name]
    lines = "\n".join(f"  - {t}" for t in tried)
    return (
        f"dataset {name!r} split {split!r} not found. Looked in:\n{lines}\n"
        f"Provide it by passing data_dir=... or setting {DATA_DIR_ENV}=/path/to/data, "
        f"laid out as {layout}."
    )


def load_split_with_source(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    allow_download: bool = True,
) -> tuple[np.ndarray, np.ndarray, str]:
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
        for folder in SYSTEM_FASHION_MNIST_DIRS:
            paths = _idx_paths(folder, split)
            if all(_find_file(p) for p in paths):
                x, y = load_idx_pair(folder, split)
                result = x, y, f"Fashion-MNIST idx files ({folder}, Debian dataset-fashion-mnist)"
                break
            tried.append(f"{folder}: missing {', '.join(str(p) for p in paths)}")
    if result is None:
        tfds_name = _TFDS_NAMES.get(name)
        if tfds_name is None:
            tried.append(f"tensorflow-datasets: no catalog entry for {name!r}")
        elif not allow_download:
            tried.append(f"tensorflow-datasets {tfds_name!r}: skipped (allow_download=False)")
        else:
            try:
                x, y = _load_tfds(name, split)
                result = x, y, f"tensorflow-datasets {tfds_name!r} split {split!r}"
            except Exception as e:  # noqa: BLE001  (offline, no TensorFlow, ...) -> not found
                tried.append(f"tensorflow-datasets {tfds_name!r}: {type(e).__name__}: {e}")
    if result is None:
        raise FileNotFoundError(_not_found_message(name, split, tried))
    x, y, source = result
    expected = _IMAGE_SHAPES[name]
    if x.ndim != 4 or x.shape[1:] != expected or x.dtype != np.uint8 or y.shape != x.shape[:1]:
        raise ValueError(
            f"{source}: got images {x.shape} {x.dtype}, labels {y.shape}; "
            f"expected uint8 (n, {', '.join(map(str, expected))}) and (n,)"
        )
    return x, y.astype(np.int32, copy=False), source


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
