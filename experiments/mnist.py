"""MNIST-style idx files (MNIST, Fashion-MNIST): ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``
(``.gz`` or uncompressed) read into uint8 NHWC images and int32 labels."""

from __future__ import annotations

import gzip
import os
import pathlib

import numpy as np

_IDX_PREFIX = {"train": "train", "test": "t10k"}


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


def idx_paths(folder: pathlib.Path, split: str) -> tuple[pathlib.Path, pathlib.Path]:
    """The (images, labels) ``.gz`` paths of ``split`` ("train" or "test") in ``folder``."""
    prefix = _IDX_PREFIX[split]
    return (
        folder / f"{prefix}-images-idx3-ubyte.gz",
        folder / f"{prefix}-labels-idx1-ubyte.gz",
    )


def find_file(gz_path: pathlib.Path) -> pathlib.Path | None:
    """The ``.gz`` file if present, else its uncompressed twin, else None."""
    for p in (gz_path, gz_path.with_suffix("")):
        if p.is_file():
            return p
    return None


def missing_files(folder: pathlib.Path, split: str) -> list[pathlib.Path]:
    """The idx files of ``split`` that ``folder`` lacks (in either form)."""
    return [p for p in idx_paths(folder, split) if find_file(p) is None]


def load_idx_pair(folder: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, 28, 28, 1), labels int32 (n,)) from an MNIST-style folder."""
    img_gz, lbl_gz = idx_paths(pathlib.Path(folder), split)
    img_path, lbl_path = find_file(img_gz), find_file(lbl_gz)
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


__all__ = ["find_file", "idx_paths", "load_idx_pair", "missing_files", "parse_idx", "read_idx"]
