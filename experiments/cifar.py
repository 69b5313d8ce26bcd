"""CIFAR-10 from the JPEG q75 copy (``cifar10-jpeg-q75.tar.gz``) or the exact subset
(``cifar10-exact-subset.npz``), as uint8 NHWC images and int32 labels.

The tar's decoded images are cached (``experiments.data_cache``). JPEG order: the tar numbers
files per class (``train/frog/0000.jpg`` is the first frog of the canonical training set).
With the canonical label sequence from ``cifar10-exact-subset.npz`` (next to the tar) the
loader restores canonical order: all 50,000 training images, and the first 1,000 test images
(the rest of the test set follows, interleaved by class). Without that file both splits are
interleaved by class (airplane 0, automobile 0, ..., truck 0, airplane 1, ...).
"""

from __future__ import annotations

import io
import os
import pathlib
import tarfile

import numpy as np

from experiments import data_cache

SPLITS = ("train", "test")
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
CIFAR10_TAR = "cifar10-jpeg-q75.tar.gz"
CIFAR10_EXACT_NPZ = "cifar10-exact-subset.npz"
_CACHE_VERSION = 1


def _decode_jpeg(data: bytes, member: str) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    if arr.shape != (32, 32, 3):
        raise ValueError(f"{member}: image shape {arr.shape}, expected (32, 32, 3)")
    return arr


def _read_members(tar_path: str | os.PathLike) -> dict[str, list[tuple[int, str, bytes]]]:
    """(class index, file name, JPEG bytes) of every image, per split."""
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
    return blobs


def decode_cifar_tar(tar_path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Decode ``{train,test}/<class>/*.jpg`` from a tar(.gz) without extracting it.

    Returns ``x_train, y_train, x_test, y_test``: images uint8 (n, 32, 32, 3) and labels
    int32 (n,), class-major with file names sorted within each class ("file order").
    """
    blobs = _read_members(tar_path)
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
    return data_cache.cache_path(tar_path, _CACHE_VERSION)


def load_cifar_tar_cached(tar_path: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Decoded (file-order) split of a CIFAR JPEG tar, via the ``.npz`` cache."""
    keys = (f"x_{split}", f"y_{split}")
    arrays = data_cache.load_npz_cached(
        cifar_cache_path(tar_path), lambda: decode_cifar_tar(tar_path), keys
    )
    return arrays[keys[0]], arrays[keys[1]].astype(np.int32)


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
    except data_cache.NPZ_ERRORS:
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


__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_EXACT_NPZ",
    "CIFAR10_TAR",
    "cifar_cache_path",
    "decode_cifar_tar",
    "interleave_order",
    "load_cifar_exact",
    "load_cifar_jpeg",
    "load_cifar_tar_cached",
]
