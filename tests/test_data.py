"""Tests for experiments.data (and its mnist, cifar, data_cache modules) on the real offline
datasets (never the network)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from experiments import cifar as cifar_files  # the fixture `cifar` holds the loaded splits
from experiments import data, data_cache

DATA_DIR = Path(
    os.environ.get(data.DATA_DIR_ENV) or Path(__file__).resolve().parents[2] / "shared" / "data"
)
MNIST_DIR = DATA_DIR / "mnist"
CIFAR_TAR = DATA_DIR / "cifar10" / cifar_files.CIFAR10_TAR
CIFAR_NPZ = DATA_DIR / "cifar10" / cifar_files.CIFAR10_EXACT_NPZ

MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte.gz": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte.gz": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte.gz": "27ae3e4e09519cfbb04c329615203637",
}
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def require(*paths: Path) -> None:
    """Skip the test when any of ``paths`` is absent, naming it."""
    for p in paths:
        if not p.exists():
            pytest.skip(f"data file missing: {p}")


def fashion_dir() -> Path:
    dirs = [DATA_DIR / "fashion_mnist", DATA_DIR / "fashion-mnist", *data.SYSTEM_FASHION_MNIST_DIRS]
    for d in dirs:
        if (d / "train-images-idx3-ubyte.gz").exists():
            return d
    pytest.skip(f"Fashion-MNIST missing: looked in {', '.join(map(str, dirs))}")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def mnist():
    require(*(MNIST_DIR / f for f in MNIST_MD5))
    return {s: data.load_split_with_source("mnist", s, DATA_DIR, False) for s in data.SPLITS}


@pytest.fixture(scope="session")
def cifar():
    require(CIFAR_TAR)
    t0 = time.perf_counter()
    out = {s: data.load_split_with_source("cifar10", s, DATA_DIR, False) for s in data.SPLITS}
    print(f"CIFAR-10 JPEG load (decode or cache): {time.perf_counter() - t0:.1f}s")
    return out


@pytest.fixture(scope="session")
def cifar_exact():
    require(CIFAR_NPZ)
    with np.load(CIFAR_NPZ) as z:
        return {k: z[k] for k in z.files}


# ----------------------------------------------------------------------------- MNIST


def test_mnist_shapes_dtypes_counts(mnist):
    (x, y, source), (xt, yt, _) = mnist["train"], mnist["test"]
    assert x.shape == (60000, 28, 28, 1) and xt.shape == (10000, 28, 28, 1)
    assert x.dtype == xt.dtype == np.uint8
    assert y.dtype == yt.dtype == np.int32 and y.shape == (60000,) and yt.shape == (10000,)
    assert np.bincount(y, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(yt, minlength=10).sum() == 10000
    assert str(MNIST_DIR) in source


@pytest.mark.parametrize("fname", sorted(MNIST_MD5))
def test_mnist_md5(fname):
    require(MNIST_DIR / fname)
    with gzip.open(MNIST_DIR / fname, "rb") as f:
        assert hashlib.md5(f.read()).hexdigest() == MNIST_MD5[fname]


def test_mnist_pixels_match_raw_idx(mnist):
    with gzip.open(MNIST_DIR / "t10k-images-idx3-ubyte.gz", "rb") as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16)
    assert np.array_equal(mnist["test"][0].ravel(), raw)


def test_load_dataset_mnist(mnist):
    ds = data.load_dataset("mnist", DATA_DIR, val_size=5000, seed=0, allow_download=False)
    assert ds.x_train.shape == (55000, 28, 28, 1) and ds.x_val.shape == (5000, 28, 28, 1)
    assert ds.x_test.shape == (10000, 28, 28, 1) and ds.name == "mnist"
    assert str(MNIST_DIR) in ds.source
    small = data.load_dataset("mnist", DATA_DIR, seed=0, limit_train=100, allow_download=False)
    assert np.array_equal(small.x_train, ds.x_train[:100])
    assert np.array_equal(small.y_val, ds.y_val)
    assert "(55000" not in repr(small) and "(100, 28, 28, 1)" in repr(small)


def test_normalize_mnist(mnist):
    z = data.normalize(mnist["train"][0], "mnist")
    assert z.dtype == np.float32 and z.shape == (60000, 28, 28, 1)
    assert abs(float(z.mean())) < 1e-3 and abs(float(z.std()) - 1) < 1e-3
    with pytest.raises(ValueError, match="channels"):
        data.normalize(mnist["train"][0], "cifar10")


# ----------------------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist():
    folder = fashion_dir()
    x, y, source = data.load_split_with_source("fashion_mnist", "train", DATA_DIR, False)
    xt, yt = data.load_split("fashion_mnist", "test", DATA_DIR, allow_download=False)
    assert x.shape == (60000, 28, 28, 1) and xt.shape == (10000, 28, 28, 1)
    assert x.dtype == np.uint8 and y.dtype == yt.dtype == np.int32
    assert np.bincount(y).tolist() == [6000] * 10
    assert str(folder) in source


# ----------------------------------------------------------------------------- CIFAR-10


def test_cifar_jpeg_shapes_and_counts(cifar):
    (x, y, source), (xt, yt, _) = cifar["train"], cifar["test"]
    assert x.shape == (50000, 32, 32, 3) and xt.shape == (10000, 32, 32, 3)
    assert x.dtype == xt.dtype == np.uint8 and y.dtype == yt.dtype == np.int32
    assert np.bincount(y).tolist() == [5000] * 10
    assert np.bincount(yt).tolist() == [1000] * 10
    assert str(CIFAR_TAR) in source and "JPEG" in source


def test_cifar_jpeg_canonical_order(cifar, cifar_exact):
    (x, y, source), (xt, yt, _) = cifar["train"], cifar["test"]
    assert "canonical order" in source
    assert np.array_equal(y, cifar_exact["y_train_all50000"])
    assert np.array_equal(yt[:1000], cifar_exact["y_test_first1000"])
    assert np.array_equal(cifar_exact["y_train"], y[:4000])
    # Pixels: JPEG q75 vs exact, image by image (a wrong match gives ~70).
    d_train = np.abs(x[:4000].astype(np.int16) - cifar_exact["x_train"]).mean(axis=(1, 2, 3))
    d_test = np.abs(xt[:1000].astype(np.int16) - cifar_exact["x_test"]).mean(axis=(1, 2, 3))
    assert d_train.mean() < 8 and d_test.mean() < 8
    assert d_train.max() < 25 and d_test.max() < 25


def test_cifar_cache_reused(cifar, monkeypatch):
    cache = cifar_files.cifar_cache_path(CIFAR_TAR)
    assert cache.is_file()

    def no_decode(*a, **k):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(cifar_files, "decode_cifar_tar", no_decode)
    t0 = time.perf_counter()
    x, y = data.load_split("cifar10", "train", DATA_DIR, allow_download=False)
    assert time.perf_counter() - t0 < 10
    assert np.array_equal(x, cifar["train"][0]) and np.array_equal(y, cifar["train"][1])


def test_cifar_exact_split():
    require(CIFAR_NPZ)
    x, y, source = data.load_split_with_source("cifar10_exact", "train", DATA_DIR, False)
    xt, yt = data.load_split("cifar10_exact", "test", DATA_DIR, allow_download=False)
    assert x.shape == (4000, 32, 32, 3) and xt.shape == (1000, 32, 32, 3)
    assert y.dtype == yt.dtype == np.int32 and x.dtype == np.uint8
    assert str(CIFAR_NPZ) in source
    with pytest.raises(ValueError, match="val_size"):
        data.load_dataset("cifar10_exact", DATA_DIR, allow_download=False)


def _write_tiny_tar(path: Path, shade: int) -> None:
    """Tiny CIFAR-style tar: 2 train and 1 test image per class, flat colours."""
    from PIL import Image

    with tarfile.open(path, "w:gz") as tar:
        for split, n in (("train", 2), ("test", 1)):
            for c, cls in enumerate(cifar_files.CIFAR10_CLASSES):
                for k in range(n):
                    img = np.full((32, 32, 3), (shade + 20 * c + k) % 256, np.uint8)
                    buf = io.BytesIO()
                    Image.fromarray(img).save(buf, format="JPEG", quality=95)
                    info = tarfile.TarInfo(f"{split}/{cls}/{k:04d}.jpg")
                    info.size = len(buf.getvalue())
                    tar.addfile(info, io.BytesIO(buf.getvalue()))


def test_cifar_tar_cache_invalidated(tmp_path, monkeypatch):
    monkeypatch.setenv(data_cache.CACHE_DIR_ENV, str(tmp_path / "cache"))
    tar = tmp_path / "data" / "cifar10" / cifar_files.CIFAR10_TAR
    tar.parent.mkdir(parents=True)
    _write_tiny_tar(tar, shade=10)
    x, y = data.load_split("cifar10", "train", tmp_path / "data", allow_download=False)
    assert x.shape == (20, 32, 32, 3)
    assert y.tolist() == list(range(10)) * 2  # class-interleaved without the exact npz
    assert abs(int(x[1, 0, 0, 0]) - 30) <= 2  # automobile 0000
    first_cache = cifar_files.cifar_cache_path(tar)
    assert first_cache.parent == tmp_path / "cache" and first_cache.is_file()

    _write_tiny_tar(tar, shade=100)
    os.utime(tar, ns=(1_000_000_000, 1_000_000_000))
    assert cifar_files.cifar_cache_path(tar) != first_cache
    x2, _ = data.load_split("cifar10", "train", tmp_path / "data", allow_download=False)
    assert abs(int(x2[1, 0, 0, 0]) - 120) <= 2

    cifar_files.cifar_cache_path(tar).write_bytes(b"truncated")  # corrupt cache: decode again
    with pytest.warns(UserWarning, match="unreadable cache"):
        x3, _ = data.load_split("cifar10", "train", tmp_path / "data", allow_download=False)
    assert np.array_equal(x3, x2)


def test_interleave_order():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])  # class-major file order
    assert labels[cifar_files.interleave_order(labels)].tolist() == [0, 1, 2, 0, 1, 2, 0, 2]
    order = cifar_files.interleave_order(labels, canonical=np.array([2, 0, 2]))
    assert order.tolist()[:3] == [5, 0, 6]
    assert sorted(order.tolist()) == list(range(8))
    with pytest.raises(ValueError):
        cifar_files.interleave_order(labels, canonical=np.array([1, 1, 1]))


# ----------------------------------------------------------------------------- errors


def test_missing_dataset_names_paths(tmp_path, monkeypatch):
    for name, expected in [
        ("mnist", tmp_path / "mnist" / "train-images-idx3-ubyte.gz"),
        ("cifar10", tmp_path / "cifar10" / cifar_files.CIFAR10_TAR),
        ("cifar10_exact", tmp_path / "cifar10" / cifar_files.CIFAR10_EXACT_NPZ),
    ]:
        with pytest.raises(FileNotFoundError) as e:
            data.load_split(name, "train", tmp_path, allow_download=False)
        assert str(expected) in str(e.value) and data.DATA_DIR_ENV in str(e.value)

    # A data directory is given: tensorflow-datasets is never tried (no silent fallback).
    def must_not_download(name, split):
        raise AssertionError("tensorflow-datasets must not be tried when a data_dir is given")

    monkeypatch.setattr(data, "_load_tfds", must_not_download)
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST_DIRS", (tmp_path / "sys",))
    with pytest.raises(FileNotFoundError) as e:
        data.load_dataset("fashion_mnist", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "fashion_mnist") in msg and str(tmp_path / "fashion-mnist") in msg
    assert str(tmp_path / "sys") in msg and "tensorflow-datasets" not in msg

    # No data directory: tensorflow-datasets is the fallback; offline it fails at once...
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(data, "_tfds_prepared", lambda name: False)
    monkeypatch.setattr(data, "_download_host_reachable", lambda: False)
    with pytest.raises(FileNotFoundError, match="unreachable \\(offline\\)"):
        data.load_split("mnist", "train")

    # ... and any tfds failure becomes the same FileNotFoundError.
    def offline(name, split):
        raise ConnectionError("offline test")

    monkeypatch.setattr(data, "_download_host_reachable", lambda: True)
    monkeypatch.setattr(data, "_load_tfds", offline)
    with pytest.raises(FileNotFoundError, match="offline test"):
        data.load_split("mnist", "train")


def test_resolve_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    assert data.resolve_data_dir() is None
    (tmp_path / "env").mkdir()
    (tmp_path / "arg").mkdir()
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "env"))
    assert data.resolve_data_dir() == tmp_path / "env"
    assert data.resolve_data_dir(str(tmp_path / "arg")) == tmp_path / "arg"
    # A directory that is given must exist: no silent fallback to another source.
    with pytest.raises(FileNotFoundError, match=r"data directory .*missing.* \(from data_dir\)"):
        data.resolve_data_dir(str(tmp_path / "missing"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        data.resolve_data_dir(str(tmp_path / "file"))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "env" / "mnist"))):
        data.load_split("mnist", "test", allow_download=False)
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_split("imagenet", "train")
    with pytest.raises(ValueError, match="unknown split"):
        data.load_split("mnist", "validation")


def _write_gz(path: Path, raw: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(raw)


def test_corrupt_idx_raises(tmp_path):
    folder = tmp_path / "mnist"
    header = (0x803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (2, 28, 28))
    _write_gz(folder / "t10k-images-idx3-ubyte.gz", header + bytes(2 * 28 * 28))
    _write_gz(folder / "t10k-labels-idx1-ubyte.gz", (0x801).to_bytes(4, "big") + b"\0\0\0\2\1\7")
    x, y = data.load_split("mnist", "test", tmp_path, allow_download=False)
    assert x.shape == (2, 28, 28, 1) and y.tolist() == [1, 7]

    _write_gz(folder / "t10k-labels-idx1-ubyte.gz", b"\x12\x34\x08\x01\0\0\0\2\1\7")
    with pytest.raises(ValueError, match="magic"):
        data.load_split("mnist", "test", tmp_path, allow_download=False)
    _write_gz(folder / "t10k-labels-idx1-ubyte.gz", (0x801).to_bytes(4, "big") + b"\0\0\0\3\1")
    with pytest.raises(ValueError, match="expected 11"):
        data.load_split("mnist", "test", tmp_path, allow_download=False)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="corrupt idx"):
        data.load_split("mnist", "test", tmp_path, allow_download=False)


# ----------------------------------------------------------------------------- splits/batches


def test_train_val_split():
    tr, va = data.train_val_split(1000, 100, seed=3)
    tr2, va2 = data.train_val_split(1000, 100, seed=3)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    assert len(tr) == 900 and len(va) == 100 and not set(tr) & set(va)
    assert sorted({*tr, *va}) == list(range(1000))
    assert not np.array_equal(va, data.train_val_split(1000, 100, seed=4)[1])
    with pytest.raises(ValueError):
        data.train_val_split(10, 11, seed=0)


def test_batches():
    x, y = np.arange(10)[:, None], np.arange(10)
    got = list(data.batches(x, y, 4, shuffle=False, seed=0, drop_remainder=False))
    assert [len(b[1]) for b in got] == [4, 4, 2] and got[0][1].tolist() == [0, 1, 2, 3]
    kept = list(data.batches(x, y, 4, shuffle=True, seed=1, drop_remainder=True))
    again = list(data.batches(x, y, 4, shuffle=True, seed=1, drop_remainder=True))
    assert [len(b[1]) for b in kept] == [4, 4]
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(kept, again))
    assert all(np.array_equal(bx[:, 0], by) for bx, by in kept)
    assert len(set(np.concatenate([b[1] for b in kept]).tolist())) == 8
