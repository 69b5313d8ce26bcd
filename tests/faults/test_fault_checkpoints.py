"""Checkpoint paths and contents: save never destroys anything but a gpfq_jax checkpoint (and
that only with overwrite=True); load of a missing, truncated, edited or damaged checkpoint
raises an error naming the file and the problem, or returns exactly what was saved."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from _faultkit import DATA_LOST, check, error_cases, expect_error, fault, mlp_result, same_tree

import gpfq_jax as gq
from gpfq_jax.flax import checkpoint_format as cf

META, ARRAYS = cf.META, cf.ARRAYS


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A pristine checkpoint of the MLP (seed 0)."""
    return gq.save_quantized(tmp_path_factory.mktemp("ckpts") / "ck", mlp_result(0))


@pytest.fixture
def ckpt(saved, tmp_path) -> Path:
    """A private copy of the pristine checkpoint."""
    return Path(shutil.copytree(saved, tmp_path / "ck"))


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every entry under ``root`` (and root itself): file bytes, or None for a folder/link."""
    out = {".": None if root.is_dir() else root.read_bytes()}
    if root.is_dir() and not root.is_symlink():
        for p in sorted(root.rglob("*")):
            out[str(p.relative_to(root))] = p.read_bytes() if p.is_file() else None
    return out


def litter(path: Path) -> list[str]:
    return sorted(p.name for k in ("tmp", "old") for p in path.parent.glob(f".{path.name}.{k}-*"))


# ------------------------------------------------------------------- save: never lose data


def _user_folder(p: Path) -> None:
    (p / "sub").mkdir(parents=True)
    (p / "notes.txt").write_text("my notes")
    (p / "sub" / "weights.npy").write_bytes(b"\x93NUMPY fake")


def _plain_file(p: Path) -> None:
    p.write_bytes(b"precious bytes\x00\x01")


def _checkpoint_plus_file(p: Path) -> None:
    gq.save_quantized(p, mlp_result(0))
    (p / "README.txt").write_text("mine")


def _foreign_format(p: Path) -> None:
    p.mkdir()
    (p / META).write_text(json.dumps({"format": "someone.else/1"}))
    (p / ARRAYS).mkdir()


def _link_to_user_folder(p: Path) -> None:
    target = p.parent / "target"
    _user_folder(target)
    p.symlink_to(target, target_is_directory=True)


@fault("checkpoints", "data")
@pytest.mark.parametrize(
    "make, why",
    [
        pytest.param(_user_folder, r"it holds other entries \(notes\.txt, sub\)", id="user-folder"),
        pytest.param(_plain_file, r"it is not a directory", id="plain-file"),
        pytest.param(lambda p: p.mkdir(), r"it has no readable gpfq_quantized\.json",
                     id="empty-folder"),
        pytest.param(_checkpoint_plus_file, r"it holds other entries \(README\.txt\)",
                     id="checkpoint-plus-user-file"),
        pytest.param(_foreign_format,
                     r"its gpfq_quantized\.json names another format \('someone\.else/1'\)",
                     id="other-format-metadata"),
        pytest.param(_link_to_user_folder, r"", id="symlink-to-user-folder"),
    ],
)  # fmt: skip
def test_overwrite_refuses_non_checkpoint(tmp_path, make, why):
    """save_quantized(..., overwrite=True) onto something that is not a gpfq_jax checkpoint
    raises FileExistsError naming it and why; every byte there is unchanged, no litter."""
    path = tmp_path / "dest"
    make(path)
    watched = tmp_path if path.is_symlink() else path
    before = snapshot(watched)
    expect_error(
        lambda: gq.save_quantized(path, mlp_result(1), overwrite=True), FileExistsError,
        rf"{re.escape(str(path))} exists and is not a gpfq_jax quantized checkpoint \({why}"
        r".*so nothing was written$",
    )  # fmt: skip
    check(snapshot(watched) == before, f"{path} changed", DATA_LOST)
    check(not litter(path), f"litter left: {litter(path)}", DATA_LOST)


@fault("checkpoints", "data")
def test_overwrite_replaces_a_real_checkpoint(ckpt):
    """overwrite=True over a gpfq_jax checkpoint replaces it completely, leaving no litter."""
    gq.save_quantized(ckpt, mlp_result(1), overwrite=True)
    check(same_tree(gq.load_quantized(ckpt), mlp_result(1).variables), "not the new variables")
    check(not litter(ckpt), f"litter left: {litter(ckpt)}", DATA_LOST)
    check(sorted(os.listdir(ckpt)) == sorted([META, ARRAYS]), f"{os.listdir(ckpt)}", DATA_LOST)


@fault("checkpoints", "data")
def test_stale_siblings_removed_by_next_save(ckpt):
    """Hidden temporaries of an interrupted save of this path (.NAME.tmp-*, .NAME.old-*) are
    removed by the next save; other names in the folder are never touched."""
    parent = ckpt.parent
    (parent / ".ck.tmp-0badf00d").mkdir()
    (parent / ".ck.tmp-0badf00d" / "partial").write_bytes(b"x" * 100)
    (parent / ".ck.tmp-1234abcd").write_text("a stale temporary file")
    shutil.copytree(ckpt, parent / ".ck.old-deadbeef")
    keep = {".ck2.tmp-0badf00d": "other path's", "ck.tmp-0badf00d": "not hidden",
            ".ck.backup": "user's", "notes.txt": "user's"}  # fmt: skip
    for name, text in keep.items():
        (parent / name).write_text(text)
    gq.save_quantized(ckpt, mlp_result(1), overwrite=True)
    check(not litter(ckpt), f"stale siblings left: {litter(ckpt)}", DATA_LOST)
    for name, text in keep.items():
        check((parent / name).read_text() == text, f"{name} was touched", DATA_LOST)
    check(same_tree(gq.load_quantized(ckpt), mlp_result(1).variables), "not the new variables")


@fault("checkpoints", "data")
def test_save_into_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "keep.txt").write_text("keep")
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("chmod does not stop this user from writing (running as root)")
        expect_error(lambda: gq.save_quantized(folder / "ck", mlp_result(0)), PermissionError,
                     r"Permission denied")  # fmt: skip
        check(sorted(os.listdir(folder)) == ["keep.txt"], f"{os.listdir(folder)}", DATA_LOST)
    finally:
        folder.chmod(0o755)


# ------------------------------------------------------------------- clear errors


def _edit_meta(fn):
    def damage(p: Path) -> None:
        meta = json.loads((p / META).read_text())
        fn(meta)
        (p / META).write_text(json.dumps(meta, indent=1))

    return damage


def _resigned(fn):
    """Edit the metadata and recompute its own checksum (a deliberate, consistent edit)."""

    def edit(meta):
        fn(meta)
        meta["meta_sha256"] = cf._meta_digest(meta)

    return _edit_meta(edit)


def _truncate_meta(p: Path) -> None:
    text = (p / META).read_text()
    (p / META).write_text(text[: len(text) // 2])


def _swap_arrays(p: Path) -> None:
    """The arrays folder of another, valid checkpoint (same structure, other values)."""
    gq.save_quantized(p.parent / "other", mlp_result(1))
    shutil.rmtree(p / ARRAYS)
    shutil.copytree(p.parent / "other" / ARRAYS, p / ARRAYS)


def _set(key, value):
    return lambda m: m.__setitem__(key, value)


def _layer(i, key, value):
    return lambda m: m["layers"][i].__setitem__(key, value)


BAD_META = r"{meta}: metadata is not valid JSON \(.*\); the checkpoint is corrupt or its save "
CHECKSUM = r"{meta}: metadata checksum mismatch: the file was edited or corrupted"

LOAD = error_cases(
    ("metadata-truncated", _truncate_meta, ValueError, BAD_META),
    ("metadata-empty", lambda p: (p / META).write_text(""), ValueError, BAD_META),
    ("metadata-binary", lambda p: (p / META).write_bytes(b"\xff\xfe\x00garbage"), ValueError,
     BAD_META),
    ("metadata-json-list", lambda p: (p / META).write_text("[1, 2]"), ValueError,
     r"{meta}: metadata must be a JSON object$"),
    ("metadata-deleted", lambda p: (p / META).unlink(), FileNotFoundError,
     r"{path} is not a gpfq_jax quantized checkpoint \(no gpfq_quantized\.json\)$"),
    ("edited-offset", _edit_meta(_layer(0, "offset", 0.5)), ValueError, CHECKSUM),
    ("edited-rel_error", _edit_meta(_layer(1, "rel_error", 0.0)), ValueError, CHECKSUM),
    ("deleted-layer-entry", _edit_meta(lambda m: m["layers"].pop(1)), ValueError, CHECKSUM),
    ("deleted-leaf-entry", _edit_meta(lambda m: m["leaves"].pop(0)), ValueError, CHECKSUM),
    ("changed-format", _edit_meta(_set("format", "gpfq_jax.quantized/1")), ValueError,
     r"{meta}: unknown checkpoint format 'gpfq_jax\.quantized/1' \(this version reads "
     r"'gpfq_jax\.quantized/3'\)$"),
    ("future-format", _edit_meta(_set("format", "gpfq_jax.quantized/4")), ValueError,
     r"{meta}: unknown checkpoint format 'gpfq_jax\.quantized/4'"),
    ("format-removed", _edit_meta(lambda m: m.pop("format")), ValueError,
     r"{meta}: unknown checkpoint format None"),
    ("meta_sha256-removed", _edit_meta(lambda m: m.pop("meta_sha256")), ValueError, CHECKSUM),
    ("resigned-framework", _resigned(_set("framework", "haiku")), ValueError,
     r"{meta}: unknown framework 'haiku'$"),
    ("resigned-layer-missing-key", _resigned(lambda m: m["layers"][0].pop("offset")), ValueError,
     r"{meta}: layers\[0\] has no 'offset'$"),
    ("resigned-layer-wrong-type", _resigned(_layer(1, "shape", "8x3")), ValueError,
     r"{meta}: layers\[1\]\['shape'\] has the wrong type$"),
    ("resigned-checksums-removed", _resigned(lambda m: m.pop("checksums")), ValueError,
     r"{meta}: 'checksums' is missing or malformed$"),
    ("resigned-wrong-shape", _resigned(_layer(0, "shape", [8, 6])), ValueError,
     r"{arrays}: codes of layer 'Dense_0' are int4\(6, 8\), the metadata says int4\(8, 6\)$"),
    ("resigned-wrong-checksum",
     _resigned(lambda m: m["checksums"]["codes"].__setitem__("0", "0" * 64)), ValueError,
     r"{arrays}: array codes/0 does not match its checksum \(changed or corrupted after it "
     r"was written\)$"),
    ("resigned-extra-array-checksum",
     _resigned(lambda m: m["checksums"]["scales"].__setitem__("7", "0" * 64)), ValueError,
     r"{arrays}: array scales/7 is missing$"),
    ("arrays-folder-deleted", lambda p: shutil.rmtree(p / ARRAYS), FileNotFoundError,
     r"{path}: the arrays folder arrays/ is missing$"),
    ("arrays-from-another-checkpoint", _swap_arrays, ValueError,
     r"{arrays}: array (codes|scales|float)/\d+ does not match its checksum"),
)  # fmt: skip


@fault("checkpoints")
@pytest.mark.parametrize("damage, exc, pattern", LOAD)
def test_load_damaged_checkpoint(ckpt, damage, exc, pattern):
    """load_quantized of a damaged checkpoint raises naming the file (and size_report too)."""
    damage(ckpt)
    fill = {k: str(v) for k, v in (("path", ckpt), ("meta", ckpt / META),
                                   ("arrays", ckpt / ARRAYS))}  # fmt: skip
    pattern = pattern.format(**{k: _re_escape(v) for k, v in fill.items()})
    expect_error(lambda: gq.load_quantized(ckpt), exc, pattern)
    expect_error(lambda: gq.size_report(ckpt, mlp_result(0).variables), exc, pattern)


def _re_escape(s: str) -> str:
    return re.escape(s).replace("{", "{{").replace("}", "}}")


def _save(path, res=None, **kw):
    return lambda: gq.save_quantized(path, mlp_result(0) if res is None else res, **kw)


SAVE_LOAD = error_cases(
    ("save-exists-without-overwrite", lambda p: _save(p)(), FileExistsError,
     r"{p} exists; pass overwrite=True to replace it$"),
    ("overwrite-yes", lambda p: _save(p, overwrite="yes")(), TypeError,
     r"overwrite must be True or False, got 'yes'$"),
    ("overwrite-1", lambda p: _save(p, overwrite=1)(), TypeError,
     r"overwrite must be True or False, got 1$"),
    ("overwrite-None", lambda p: _save(p, overwrite=None)(), TypeError,
     r"overwrite must be True or False, got None$"),
    ("load-missing-path", lambda p: gq.load_quantized(p.parent / "nope"), FileNotFoundError,
     r"{parent}/nope is not a gpfq_jax quantized checkpoint \(no gpfq_quantized\.json\)$"),
    ("load-plain-file",
     lambda p: (p.parent / "f.bin").write_bytes(b"x") and gq.load_quantized(p.parent / "f.bin"),
     FileNotFoundError, r"{parent}/f\.bin is not a gpfq_jax quantized checkpoint"),
    ("load-user-folder", lambda p: gq.load_quantized(p / ARRAYS), FileNotFoundError,
     r"{p}/arrays is not a gpfq_jax quantized checkpoint"),
    ("load-linen-with-model", lambda p: gq.load_quantized(p, model=object()), TypeError,
     r"model= is for NNX checkpoints; apply Linen variables with model\.apply$"),
    ("size_report-missing-path", lambda p: gq.size_report(p.parent / "nope", {}),
     FileNotFoundError, r"{parent}/nope is not a gpfq_jax quantized checkpoint"),
    ("save-not-a-result", lambda p: _save(p.parent / "new", {"params": {}})(), TypeError,
     r"res must be the QuantizeResult of quantize_params, got dict"),
    ("overwrite-symlink-to-checkpoint",
     lambda p: (p.parent / "link").symlink_to(p) or _save(p.parent / "link", overwrite=True)(),
     FileExistsError, r"link exists and is not a gpfq_jax quantized checkpoint \(it is a "
     r"symbolic link"),
)  # fmt: skip


@fault("checkpoints")
@pytest.mark.parametrize("call, exc, pattern", SAVE_LOAD)
def test_checkpoint_paths(ckpt, call, exc, pattern):
    fill = {"p": _re_escape(str(ckpt)), "parent": _re_escape(str(ckpt.parent))}
    before = snapshot(ckpt)
    expect_error(lambda: call(ckpt), exc, pattern.format(**fill))
    check(snapshot(ckpt) == before, f"{ckpt} changed", DATA_LOST)


# ------------------------------------------------------------------- damaged array files

ARRAY_FILES = [
    "arrays/_METADATA",
    "arrays/_sharding",
    "arrays/_CHECKPOINT_METADATA",
    "arrays/manifest.ocdbt",
    "arrays/d/*",
    "arrays/array_metadatas/*",
    "arrays/commit_success.txt",
    "arrays/ocdbt.process_0/manifest.ocdbt",
    "arrays/ocdbt.process_0/d/*",
]


def _flip(f: Path) -> None:
    b = bytearray(f.read_bytes())
    if b:
        b[len(b) // 2] ^= 0xFF
    f.write_bytes(bytes(b))


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


@fault("checkpoints", "data")
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("damage", [Path.unlink, _flip, _truncate], ids=["deleted", "flipped",
                                                                         "truncated"])  # fmt: skip
@pytest.mark.parametrize("pattern", ARRAY_FILES)
def test_damaged_array_file(ckpt, pattern, damage):
    """Deleting, flipping one byte of, or truncating any file of the arrays folder: load
    raises an error naming the checkpoint, or returns exactly the saved variables (a file
    orbax does not need); never other values."""
    files = sorted(f for f in ckpt.glob(pattern) if f.is_file())
    if not files:
        pytest.skip(f"this orbax version writes no {pattern}")
    for f in files:
        damage(f)
    try:
        got = gq.load_quantized(ckpt)
    except (ValueError, FileNotFoundError) as e:
        check(
            str(ckpt) in str(e), f"the error does not name the checkpoint: {e}", "[unclear error]"
        )
        return
    check(same_tree(got, mlp_result(0).variables), f"{pattern} damaged: other values loaded")
