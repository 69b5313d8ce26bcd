"""Block boundaries: the repeated submodules (transformer layers, residual blocks) that the
frontier driver runs one at a time.

A *family* is a set of sibling modules with one stem and an index (Linen ``layers_0``,
``layers_1``, ...; NNX list items ``layers/0``, ``layers/1``, ...), or the modules whose path
names match the user's patterns. A family is usable when its members form a *chain* in the
forward pass, checked in one abstract pass (``jax.eval_shape``):

- every member is called exactly once, in index order of the call;
- member k+1's first positional argument is member k's output (the same traced value), and
  that output is a single array;
- member k+1's other arguments are member k's: the same traced arrays (masks, positions
  computed once before the first block) and equal non-array values.

Then the input of member k+1 is a function of member k's input alone, which is what lets the
driver cache it at the boundary. ``blocks="auto"`` keeps the outermost families that form a
chain; families given by patterns must form one, or ``BlockStructureError`` names the block.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from gpfq_jax.flax.intercept import intercepted_forward, is_nnx
from gpfq_jax.flax.paths import Path, path_name
from gpfq_jax.flax.tracing import LayerInfo

_INDEXED = re.compile(r"(.*?)_?(\d+)")


class BlockStructureError(ValueError):
    """The given blocks cannot be run one at a time (not a chain; see ``gpfq_jax.flax.blocks``)."""


@dataclasses.dataclass(frozen=True)
class CallTemplate:
    """How a block is called: the tree of ``(args, kwargs)`` with its array leaves taken out.

    treedef: of ``(args, kwargs)``. arrays: positions of the array leaves (the first is the
    hidden state). static: the other leaves, by position.
    """

    treedef: Any
    arrays: tuple[int, ...]
    static: tuple[tuple[int, Any], ...]

    def rebuild(self, leaves: Sequence[Any]) -> tuple[tuple, dict]:
        """``(args, kwargs)`` from the array leaves (in ``arrays`` order)."""
        full: list[Any] = [None] * (len(self.arrays) + len(self.static))
        for i, a in zip(self.arrays, leaves):
            full[i] = a
        for i, v in self.static:
            full[i] = v
        return jax.tree.unflatten(self.treedef, full)


@dataclasses.dataclass(frozen=True)
class Block:
    """One block of a chained family, in forward order.

    path: module path (Linen params path, NNX attribute path). family: index of its family;
    position: its index in the family's chain. layers: indices (into the traced layers) of
    the quantizable layers called inside it. template: its call (shared by the family).
    module: Linen, the block as an unbound module (applied to its own variables); NNX, None
    (taken from the model by path).
    """

    path: Path
    family: int
    position: int
    layers: tuple[int, ...]
    template: CallTemplate
    module: Any = None

    @property
    def name(self) -> str:
        return path_name(self.path)


def _is_array(a: Any) -> bool:
    return isinstance(a, jax.Array | np.ndarray)


def _families_auto(layers: Sequence[LayerInfo]) -> list[list[Path]]:
    """Sibling groups (one parent, one stem, >= 2 indices) of modules holding layers; only the
    outermost (a family inside a member of another is dropped). Members in index order."""
    groups: dict[tuple, dict[int, Path]] = {}
    for layer in layers:
        for j in range(1, len(layer.path)):
            p, last = layer.path[:j], layer.path[j - 1]
            if isinstance(last, int):
                key, idx = (p[:-1], None), last
            elif isinstance(last, str) and (m := _INDEXED.fullmatch(last)) and m.group(1):
                key, idx = (p[:-1], m.group(1)), int(m.group(2))
            else:
                continue
            groups.setdefault(key, {})[idx] = p
    fams = [[g[i] for i in sorted(g)] for g in groups.values() if len(g) >= 2]
    members = {p for f in fams for p in f}
    return [f for f in fams if not any(f[0][:j] in members for j in range(1, len(f[0])))]


def _families_from_patterns(layers: Sequence[LayerInfo], patterns: Sequence[str]) -> list[list]:
    """Per pattern, the modules (holding layers) whose path name it fully matches."""
    prefixes = list(dict.fromkeys(lay.path[:j] for lay in layers for j in range(1, len(lay.path))))
    fams = []
    for pat in patterns:
        if not isinstance(pat, str):
            raise TypeError(f"blocks patterns must be strings, got {pat!r}")
        try:
            rx = re.compile(pat)
        except re.error as e:
            raise ValueError(f"blocks pattern {pat!r} is not a valid regex: {e}") from e
        found = [p for p in prefixes if rx.fullmatch(path_name(p))]
        if not found:
            names = ", ".join(sorted({path_name(p) for p in prefixes})[:12])
            raise BlockStructureError(
                f"blocks pattern {pat!r} matches no module holding quantizable layers; "
                + (f"modules: {names}" if names else "the layers are not inside submodules")
            )
        fams.append(found)
    return fams


class _BlockRecorder:
    """Hook of the block pass: every watched call's (path, args, kwargs, output, module)."""

    def __init__(self):
        self.calls: list[tuple[Path, tuple, dict, Any, Any]] = []

    def __call__(self, module, path, kind, args, kwargs, call):
        out = call()
        if kind == "block":
            unbound = None if is_nnx(module) else module.clone(parent=None, name=None)
            self.calls.append((path, args, kwargs, out, unbound))
        return out


def _template(args: tuple, kwargs: dict) -> CallTemplate:
    leaves, treedef = jax.tree.flatten((args, kwargs))
    arrays = tuple(i for i, a in enumerate(leaves) if _is_array(a))
    static = tuple((i, a) for i, a in enumerate(leaves) if not _is_array(a))
    return CallTemplate(treedef, arrays, static)


def _chain_problem(fam: list[Path], calls: dict[Path, list]) -> str:
    """Why ``fam`` (members in call order) is not a chain, or ''."""
    for p in fam:
        if len(calls.get(p, ())) != 1:
            return f"block {path_name(p)!r} is called {len(calls.get(p, ()))} times, not once"
    seq = [calls[p][0] for p in fam]
    for (p0, a0, k0, out0, _), (p1, a1, k1, _, _) in zip(seq, seq[1:]):
        where = f"block {path_name(p1)!r}"
        if not a1 or not _is_array(a1[0]) or a1[0] is not out0:
            return (f"{where}'s first positional argument is not the output of "
                    f"{path_name(p0)!r} (a single array)")  # fmt: skip
        rest0, tree0 = jax.tree.flatten((a0[1:], k0))
        rest1, tree1 = jax.tree.flatten((a1[1:], k1))
        if tree0 != tree1:
            return f"{where} is called with other arguments than {path_name(p0)!r}"
        for u, v in zip(rest0, rest1):
            if (u is not v) if (_is_array(u) or _is_array(v)) else not _equal(u, v):
                return (f"{where} gets other extra arguments than {path_name(p0)!r} (they "
                        "must be the same values, computed before the first block)")  # fmt: skip
    if not seq[0][1] or not _is_array(seq[0][1][0]):
        return f"block {path_name(fam[0])!r} is not called with an array first"
    return ""


def _equal(u: Any, v: Any) -> bool:
    try:
        return bool(u == v)
    except Exception:  # noqa: BLE001 - values without a truth value are not equal
        return False


# long: one abstract pass, then the chain check and the per-block layer lists.
def find_blocks(
    model: Any,
    variables: Any,
    batch: Any,
    apply_kwargs: dict,
    layers: Sequence[LayerInfo],
    blocks: str | Sequence[str] | None,
) -> tuple[list[Block], str]:
    """The blocks the frontier driver runs, in forward order, and a note on what was found.

    ``blocks``: "auto" (repeated sibling modules that form a chain; none -> an empty list and
    the reason), None (no blocks), or regex patterns fully matched against module path names
    (each pattern's matches are one family and must form a chain, else BlockStructureError).
    """
    if blocks is None:
        return [], "blocks=None: every layer from the model input"
    if isinstance(blocks, str) and blocks != "auto":
        raise ValueError(f"blocks must be 'auto', None or a list of patterns, got {blocks!r}")
    explicit = not isinstance(blocks, str)
    fams = _families_from_patterns(layers, blocks) if explicit else _families_auto(layers)
    if not fams:
        return [], "no repeated submodules holding layers (e.g. layers_0, layers_1)"
    watch = frozenset(p for f in fams for p in f)
    rec = _BlockRecorder()
    if is_nnx(model):
        graphdef, state = nnx.split(model)
    else:
        graphdef, state = None, variables
    jax.eval_shape(
        lambda st, x: intercepted_forward(
            model, graphdef, st, (x,), apply_kwargs, rec, watch=watch
        ),
        state,
        batch,
    )
    calls: dict[Path, list] = {}
    for c in rec.calls:
        calls.setdefault(c[0], []).append(c)
    order = {c[0]: i for i, c in reversed(list(enumerate(rec.calls)))}
    out, notes, family = [], [], 0
    for fam in fams:
        fam = sorted(fam, key=lambda p: order.get(p, -1))
        problem = _chain_problem(fam, calls)
        if problem:
            if explicit:
                raise BlockStructureError(f"blocks cannot be run one at a time: {problem}")
            notes.append(f"{path_name(fam[0])}...: {problem}")
            continue
        _, args, kwargs, _, _ = calls[fam[0]][0]
        template = _template(args, kwargs)
        for k, p in enumerate(fam):
            inside = tuple(i for i, lay in enumerate(layers) if lay.path[: len(p)] == p)
            out.append(Block(p, family, k, inside, template, calls[p][0][4]))
        family += 1
    _check_disjoint(out)
    out.sort(key=lambda b: min(b.layers))
    note = "; ".join(notes) if not out else f"{len(out)} blocks"
    return out, note


def _check_disjoint(blocks: list[Block]) -> None:
    seen: dict[int, str] = {}
    for b in blocks:
        for i in b.layers:
            if i in seen:
                raise BlockStructureError(
                    f"blocks {seen[i]!r} and {b.name!r} overlap (one holds the other)"
                )
            seen[i] = b.name


__all__ = ["Block", "BlockStructureError", "CallTemplate", "find_blocks"]
