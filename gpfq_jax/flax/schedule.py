"""The order of work of ``quantize_params``: layers in forward order, blocks via the frontier.

Layers inside a block (``gpfq_jax.flax.blocks``) get their inputs from that block run alone
on the cached block arguments (``gpfq_jax.flax.frontier``); the others (before the first
block, between families, after the last block, or every layer when there are no blocks)
from whole-model runs, the reference driver. Layers that read the same tensor within the
same block (or outside blocks) and build the same rows share one accumulation. With a
``ResumeStore`` every finished layer (and the frontier, when it moves) is saved, and a rerun
starts after the last saved layer.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from gpfq_jax.flax.activation_cache import ActivationCache
from gpfq_jax.flax.blocks import Block
from gpfq_jax.flax.calibration import Calibration
from gpfq_jax.flax.capture import traced_functions
from gpfq_jax.flax.frontier import BlockFunctions, Frontier
from gpfq_jax.flax.layer_step import (
    accumulate,
    accumulator,
    check_bias_correction,
    quantize_layer,
    reference_inputs,
    table_statistics,
)
from gpfq_jax.flax.results import DriverReport, LayerRecord
from gpfq_jax.flax.resume import ResumeStore
from gpfq_jax.flax.rules import LayerPlan
from gpfq_jax.flax.targets import Target
from gpfq_jax.flax.tracing import LayerInfo


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Per-run settings every layer uses (see ``quantize_params``)."""

    key: jax.Array
    seed: int
    bias_correction: bool
    patch_fraction: float
    stats_dtype: Any
    mesh: Mesh | None
    block_size: int | None
    damp: float
    act_order: bool
    shared_stats: bool
    progress: bool


def rows_signature(layer: LayerInfo) -> tuple:
    """Equal for two layers whose inputs become the same statistics rows."""
    if layer.view is not None:
        return ("view", layer.view.input_perm, layer.view.groups, layer.view.features)
    return (layer.kind, layer.features, layer.geometry)


def shared_groups(
    layers: list[LayerInfo], plans: list[LayerPlan], block_of: dict[int, Block],
    patch_fraction: float = 1.0,
) -> dict[int, tuple[int, ...]]:  # fmt: skip
    """Layer index -> its group (indices, forward order) for groups of two or more quantized
    layers reading the same tensor, in the same block (or none), with the same rows. Conv
    layers with ``patch_fraction < 1`` never share: each samples its own patches (seeded by
    its index), and sharing would change which."""
    groups: dict[tuple, list[int]] = {}
    for i, (layer, plan) in enumerate(zip(layers, plans)):
        sampled = layer.geometry is not None and patch_fraction < 1
        if not plan.skip and layer.kind != "embed" and not sampled:
            b = block_of.get(i)
            key = (layer.same_input_as, b.path if b else None, rows_signature(layer))
            groups.setdefault(key, []).append(i)
    return {i: tuple(g) for g in groups.values() if len(g) > 1 for i in g}


class LayerWalk:
    """One run over the layers (see the module docstring)."""

    def __init__(self, target: Target, layers: list[LayerInfo], plans: list[LayerPlan],
                 blocks: list[Block], batches: Calibration, options: RunOptions,
                 cache: ActivationCache, store: ResumeStore | None):  # fmt: skip
        self.target, self.layers, self.plans = target, layers, plans
        self.batches, self.opt, self.store = batches, options, store
        self.blocks = blocks
        self.family_size = collections.Counter(b.family for b in blocks)
        self.block_of = {i: b for b in blocks for i in b.layers}
        self.last_of = {max(b.layers): b for b in blocks}
        self.next_of = {
            a.path: b for a, b in zip(blocks, blocks[1:]) if b.family == a.family
        }  # fmt: skip
        self.groups = {}
        if options.shared_stats:
            self.groups = shared_groups(layers, plans, self.block_of, options.patch_fraction)
        self.cache = cache
        self.frontier = Frontier(BlockFunctions(target), cache)
        self.records: dict[int, LayerRecord] = {}
        self.pending: dict[int, Any] = {}  # shared statistics waiting for later members
        self.report = DriverReport(mode="frontier" if blocks else "reference",
                                   blocks=[b.name for b in blocks])  # fmt: skip
        groups = sorted(set(self.groups.values()))  # forward order of their first layers
        self.report.shared = [[layers[j].name for j in g] for g in groups]

    def _resume(self) -> int:
        """Load the saved layers and frontier; the index of the first layer to do."""
        if self.store is None:
            return 0
        todo = [i for i, p in enumerate(self.plans) if not p.skip]
        dtypes = {i: self.target.float_kernel(self.layers[i]).dtype for i in todo}
        for i, (record, bias) in self.store.finished(dtypes).items():
            self.target.set_kernel(self.layers[i], record.result.q)
            if bias is not None:
                self.target.set_bias(self.layers[i], bias)
            self.records[i] = record
        front = self.store.load_frontier(self.cache)
        if front is not None:
            self.frontier.block = self.blocks[front["block"]]
            self.frontier.batches, self.frontier.count = front["batches"], front["count"]
        self.report.resumed_layers = len(self.records)
        return self.store.next_layer

    def run(self) -> tuple[list[LayerRecord], list[str], DriverReport]:
        start = self._resume()
        traced = traced_functions()
        bar = tqdm(total=len(self.layers), initial=start, desc="quantize", unit="layer",
                   disable=not self.opt.progress)  # fmt: skip
        try:
            for i in range(start, len(self.layers)):
                b = self.block_of.get(i)
                where = f" [block {b.position + 1}/{self.family_size[b.family]}]" if b else ""
                bar.set_postfix_str(self.layers[i].name + where)
                self._step(i, b)
                bar.update(1)
        finally:
            bar.close()
            self.cache.close()
        rep = self.report
        rep.traced_functions = traced_functions() - traced
        rep.frontier_seconds = self.frontier.seconds
        rep.cache_peak_bytes, rep.spilled_bytes = (
            self.cache.peak_host_bytes,
            self.cache.spilled_bytes,
        )
        skipped = [lay.name for lay, p in zip(self.layers, self.plans) if p.skip]
        return [self.records[i] for i in sorted(self.records)], skipped, rep

    def _step(self, i: int, b: Block | None) -> None:
        """Layer i (entering its block first when needed), then leave the block if it ends."""
        changed = bool(self.records)
        saved_front = False
        if b is not None and self.frontier.block is not b:
            self.frontier.enter(b, self.batches, changed)
            saved_front = True
        bias = None
        if not self.plans[i].skip:
            self.records[i], bias = self._quantize(i, b, changed)
        if b is not None and self.last_of.get(i) is b:
            nxt = self.next_of.get(b.path)
            self.frontier.advance(b, bool(self.records), nxt)
            if nxt is None:
                self.cache.close()
            saved_front = True
        if self.store is not None:
            self._save(i, bias, saved_front)

    def _save(self, i: int, bias: Any, frontier_moved: bool) -> None:
        if i in self.records:
            self.store.save_layer(i, self.records[i], bias)
        if frontier_moved:
            f = self.frontier
            if f.block is None:
                self.store.clear_frontier()
            else:
                self.store.save_frontier(self.cache, self.blocks.index(f.block), f.batches,
                                         f.count)  # fmt: skip
        self.store.commit(i + 1)

    def _captured(self, b: Block) -> list[LayerInfo]:
        """The layers of block ``b`` whose inputs are captured (quantized, not a table, and
        not a follower of a shared-statistics group)."""
        return [
            self.layers[j]
            for j in b.layers
            if not self.plans[j].skip
            and self.layers[j].kind != "embed"
            and self.groups.get(j, (j,))[0] == j
        ]

    def _accumulated(self, i: int, b: Block | None, changed: bool, input_means: bool) -> Any:
        """Layer i's accumulated statistics: a table's (an embedding has no input data), the
        ones an earlier layer of its shared-statistics group left in ``pending`` (with zero
        seconds, as that layer was charged), or its captured inputs' (left in ``pending`` for
        the group's later layers). ``changed``: the quantized stream differs from the float
        one; ``input_means``: also accumulate the input means when a layer of the group
        corrects its bias."""
        layer, opt = self.layers[i], self.opt
        group = self.groups.get(i, (i,))
        if layer.kind == "embed":
            return table_statistics(layer, opt.stats_dtype)
        if i in self.pending:
            return dataclasses.replace(self.pending.pop(i), capture_seconds=0.0,
                                       stats_seconds=0.0, capture_first_seconds=0.0)  # fmt: skip
        seed = (opt.seed * 1_000_003 + group[0]) % 2**31
        kernel = None if len(group) > 1 else self.target.float_kernel(layer)
        acc = accumulator(
            layer, kernel, stats_dtype=opt.stats_dtype, patch_fraction=opt.patch_fraction,
            seed=seed, mesh=opt.mesh,
        )  # fmt: skip
        if b is not None:
            inputs = self.frontier.inputs(b, layer, changed, self._captured(b))
        else:
            inputs = reference_inputs(self.target, layer, self.batches, changed, opt.mesh)
        means = input_means and any(
            check_bias_correction(self.layers[j], opt.bias_correction) for j in group
        )  # fmt: skip
        acc = accumulate(acc, inputs, changed=changed, input_means=means)
        for j in group:
            if j > i:
                self.pending[j] = acc
        return acc

    def _quantize(self, i: int, b: Block | None, changed: bool) -> tuple[LayerRecord, Any]:
        layer, plan, opt = self.layers[i], self.plans[i], self.opt
        correct = check_bias_correction(layer, opt.bias_correction)
        group = self.groups.get(i, (i,))
        acc = self._accumulated(i, b, changed, input_means=True)
        record = quantize_layer(
            self.target, layer, plan, acc, correct=correct, stats_dtype=opt.stats_dtype,
            mesh=opt.mesh, key=jax.random.fold_in(opt.key, i), block_size=opt.block_size,
            damp=opt.damp, act_order=opt.act_order,
        )  # fmt: skip
        record.block = None if b is None else b.name
        record.shares_stats_with = None if group[0] == i else self.layers[group[0]].name
        bias = np.asarray(self.target.quant_bias(layer)) if correct else None
        return record, bias


__all__ = ["LayerWalk", "RunOptions", "rows_signature", "shared_groups"]
