"""Mixed precision under an average bits-per-weight budget (``quantize_params(budget_bits=)``).

1. Statistics of every quantized layer from the FLOAT model (X~ = X: H = G = F), in one walk
   of the layers (a ``LayerWalk`` that never writes a kernel back, so every capture is
   float-only: one float run per block gives all its layers' inputs; layers reading one
   tensor share one accumulation).
2. Each layer quantized from them at every candidate width, with the layer's own spec and
   method (only ``bits`` changes): its error ``rel_error ** 2`` = ||XW - XQ||^2 / ||XW||^2 and
   its storage in bits, counted as ``size_report`` counts it (codes at their storage bits,
   rounded up to bytes per layer; steps at their dtype's size; asym zero points at the codes'
   storage bits, rounded up to bytes).
   With ``fisher`` (``quantize_params(budget_fisher=)``: the diagonal Fisher of a loss, e.g.
   from ``core.fisher.fisher_diagonal``) a candidate's error is instead the loss increase the
   Fisher predicts for its quantized kernel, ``1/2 sum F (Q - W)^2`` (``core.fisher``): the
   output error of step 2 counts every layer alike, while the Fisher weighs each layer's
   error by how much of it reaches the loss through the layers after it.
3. ``core.bit_budget.solve_budget``: least summed error with total bits <= budget x weights.
4. ``quantize_params`` then runs the ordinary sequential quantization with per-layer rules
   (``BitAllocation.rules``) placing each layer's chosen bits.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gpfq_jax.core.alphabets import QuantSpec
from gpfq_jax.core.bit_budget import budget_units, solve_budget
from gpfq_jax.core.fisher import fisher_error
from gpfq_jax.core.general import quantize_view
from gpfq_jax.core.layer import LayerResult, quantize_from_stats
from gpfq_jax.core.sharding import resolve_mesh
from gpfq_jax.core.stats import LayerStats
from gpfq_jax.flax.activation_cache import ActivationCache
from gpfq_jax.flax.blocks import Block, find_blocks
from gpfq_jax.flax.bn_fold import fold_batchnorms
from gpfq_jax.flax.budget_fisher import check_fisher, layer_fisher
from gpfq_jax.flax.calibration import Calibration
from gpfq_jax.flax.rules import LayerPlan, Rule, as_rule, plan_layers
from gpfq_jax.flax.schedule import LayerWalk, RunOptions
from gpfq_jax.flax.sizes import layer_storage_bytes
from gpfq_jax.flax.targets import Target, make_target
from gpfq_jax.flax.tracing import LayerInfo

DEFAULT_CANDIDATES = (2, 3, 4, 8)


@dataclasses.dataclass(frozen=True)
class LayerAllocation:
    """One quantized layer's options and choice.

    params: weights in the kernel. candidates: bit widths, ascending. errors: per candidate,
    ``rel_error ** 2`` from the float model's statistics (objective "output") or the Fisher's
    loss estimate ``1/2 sum F (Q - W)^2`` (objective "fisher"). cost_bits: per candidate, the
    layer's storage in bits (codes, steps, zero points; see the module docstring). bits: the
    chosen width.
    """

    name: str
    params: int
    candidates: tuple[int, ...]
    errors: tuple[float, ...]
    cost_bits: tuple[int, ...]
    bits: int

    @property
    def error(self) -> float:
        return self.errors[self.candidates.index(self.bits)]

    @property
    def bits_per_weight(self) -> float:
        return self.cost_bits[self.candidates.index(self.bits)] / self.params


@dataclasses.dataclass
class BitAllocation:
    """What ``allocate_bits`` chose (``QuantizeResult.bit_allocation``).

    budget_bits: the budget in bits per weight. layers: one LayerAllocation per quantized
    layer, forward order. bits_per_weight: achieved (total storage bits / total weights, <=
    budget). min_bits_per_weight: the cheapest choice's. total_error: the summed errors of
    the choice (``objective`` "output": ``rel_error ** 2`` from float-model statistics;
    "fisher": the Fisher's loss estimate). exact: the knapsack's optimum is exact (True
    unless its costs were rounded to a coarser unit; still within budget).
    """

    budget_bits: float
    candidates: tuple[int, ...]
    layers: list[LayerAllocation]
    bits_per_weight: float
    min_bits_per_weight: float
    total_error: float
    exact: bool
    seconds: float = 0.0
    objective: str = "output"

    @property
    def bits(self) -> dict[str, int]:
        """Layer name -> chosen bit width."""
        return {a.name: a.bits for a in self.layers}

    def rules(self, base_rules: Sequence[Any] | None = None) -> list[Rule]:
        """Rules giving each layer its chosen bits, for ``quantize_params(rules=...)``.

        One rule per allocated layer (its name, anchored), first; each keeps the spec and
        method of the first ``base_rules`` entry matching that layer and sets ``bits``; the
        ``base_rules`` follow (skips)."""
        base = [as_rule(r) for r in (base_rules or ())]
        out = []
        for a in self.layers:
            r = next((r for r in base if re.search(r.pattern, a.name)), None)
            spec, method = (None, None) if r is None else (r.spec, r.method)
            out.append(Rule(f"^{re.escape(a.name)}$", spec=spec, method=method, bits=a.bits))
        return out + base

    def with_budget(self, budget_bits: float) -> BitAllocation:
        """The allocation at another budget from the same measured errors and costs (no pass
        over the data): the trade-off curve of one model costs one measurement."""
        budget, _ = check_budget(budget_bits, self.candidates, None)
        errors = np.array([a.errors for a in self.layers])
        costs = np.array([a.cost_bits for a in self.layers], dtype=np.int64)
        names, params = [a.name for a in self.layers], [a.params for a in self.layers]
        return solve_allocation(names, params, self.candidates, errors, costs, budget,
                                self.objective)  # fmt: skip

    def summary(self) -> list[dict]:
        """Per-layer dicts: layer, params, chosen bits, bits/weight, error, every candidate's."""
        return [
            {"layer": a.name, "params": a.params, "bits": a.bits,
             "bits_per_weight": a.bits_per_weight, "error": a.error,
             "errors": dict(zip(a.candidates, a.errors)),
             "cost_bits": dict(zip(a.candidates, a.cost_bits))}
            for a in self.layers
        ]  # fmt: skip


def check_budget(budget_bits: Any, candidates: Any, rules: Sequence[Any] | None) -> tuple:
    """(budget, sorted candidates) validated; rules must not fix bits. ValueError otherwise."""
    if isinstance(budget_bits, bool) or not isinstance(
        budget_bits, int | float | np.integer | np.floating
    ):
        raise ValueError(f"budget_bits must be a number of bits per weight, got {budget_bits!r}")
    if not math.isfinite(budget_bits) or budget_bits <= 0:
        raise ValueError(f"budget_bits must be finite and > 0, got {budget_bits!r}")
    if isinstance(candidates, str | bytes) or not isinstance(candidates, Sequence):
        raise ValueError(f"budget_candidates must be a sequence of bit widths, got {candidates!r}")
    if not candidates:
        raise ValueError("budget_candidates is empty; give bit widths such as (2, 3, 4, 8)")
    for b in candidates:
        if isinstance(b, bool) or not isinstance(b, int | np.integer) or not 2 <= b <= 8:
            raise ValueError(f"budget_candidates must be integer bit widths 2..8 (ternary is "
                             f"not a candidate), got {b!r} in {tuple(candidates)!r}")  # fmt: skip
    if len(set(candidates)) != len(candidates):
        raise ValueError(f"budget_candidates has duplicates: {tuple(candidates)!r}")
    for r in (as_rule(r) for r in (rules or ())):
        spec = r.spec
        if r.bits is not None or isinstance(spec, QuantSpec) or (
            isinstance(spec, Mapping) and "bits" in spec
        ):  # fmt: skip
            raise ValueError(
                f"rule {r.pattern!r} fixes the bit width, which budget_bits chooses; drop its "
                "bits (a spec override must be a dict without 'bits'), or skip the layer"
            )
    return float(budget_bits), tuple(sorted(int(b) for b in candidates))


def _candidate_specs(layers: list[LayerInfo], plans: list[LayerPlan], candidates: tuple,
                     budget: float) -> dict[int, list[QuantSpec]]:  # fmt: skip
    """Quantized layer index -> its spec at every candidate (ValueError naming the layer when
    its grid cannot take one); the codes alone must fit the budget."""
    specs, code_bits, weights = {}, 0, 0
    for i, (layer, plan) in enumerate(zip(layers, plans)):
        if plan.skip:
            continue
        if plan.spec.bits == "ternary":
            raise ValueError(
                f"layer {layer.name!r}: its spec is ternary, an alphabet that cannot take the "
                f"candidate bit widths {candidates}; give the spec an integer bits "
                "(budget_bits replaces it) or skip the layer"
            )
        try:
            specs[i] = [dataclasses.replace(plan.spec, bits=b) for b in candidates]
        except (ValueError, TypeError) as e:
            raise ValueError(f"layer {layer.name!r}: its spec cannot take a candidate bit "
                             f"width of {candidates}: {e}") from e  # fmt: skip
        n = math.prod(layer.kernel_shape)
        code_bits += n * min(s.alphabet.storage_bits for s in specs[i])
        weights += n
    if not specs:
        raise ValueError("budget_bits: every layer is skipped; there is nothing to allocate")
    if budget < code_bits / weights:
        raise ValueError(f"budget_bits={budget} is infeasible: the smallest candidate's codes "
                         f"alone take {code_bits / weights:.4f} bits per weight (steps and zero "
                         "points come on top)")  # fmt: skip
    return specs


def result_bits(r: LayerResult, params: int) -> int:
    """A quantized layer's storage in bits, as ``size_report`` counts it (bytes x 8)."""
    return 8 * layer_storage_bytes(params, r.storage_bits, r.step, r.zero_point)


class FloatStatsWalk(LayerWalk):
    """A LayerWalk over the float model only: each layer's statistics (X~ = X) quantized at
    every candidate spec, nothing written back (``measured``: index -> (errors, cost bits));
    with ``fisher`` (index -> the kernel's Fisher diagonal) the errors are the Fisher's loss
    estimates, else ``rel_error ** 2``."""

    def __init__(self, *args: Any, specs: dict[int, list[QuantSpec]],
                 fisher: dict[int, np.ndarray] | None = None):  # fmt: skip
        super().__init__(*args, store=None)
        self.specs, self.fisher = specs, fisher
        self.measured: dict[int, tuple[list[float], list[int]]] = {}

    def _step(self, i: int, b: Block | None) -> None:
        if b is not None and self.frontier.block is not b:
            self.frontier.enter(b, self.batches, False)
        if not self.plans[i].skip:
            stats = self._accumulated(i, b, False, input_means=False).acc.result()
            self.measured[i] = self._measure(i, stats)
        if b is not None and self.last_of.get(i) is b:
            nxt = self.next_of.get(b.path)
            self.frontier.advance(b, False, nxt)
            if nxt is None:
                self.cache.close()

    def _measure(self, i: int, stats: LayerStats) -> tuple[list[float], list[int]]:
        layer, plan, opt = self.layers[i], self.plans[i], self.opt
        kernel, params = self.target.float_kernel(layer), math.prod(layer.kernel_shape)
        kw = dict(mesh=opt.mesh, key=jax.random.fold_in(opt.key, i), block_size=opt.block_size,
                  damp=opt.damp, act_order=opt.act_order)  # fmt: skip
        errors, costs = [], []
        for spec in self.specs[i]:
            try:
                if layer.view is None:
                    r = quantize_from_stats(kernel, stats, spec, plan.method, **kw)
                else:
                    r = quantize_view(kernel, layer.view, stats, spec, plan.method, **kw)
            except (ValueError, TypeError) as e:
                raise type(e)(f"layer {layer.name!r} at {spec.bits} bits: {e}") from e
            if self.fisher is None:
                err = float(r.rel_error) ** 2
            else:
                err = fisher_error(self.fisher[i], kernel, r.q)
            if not math.isfinite(err):
                raise ValueError(f"layer {layer.name!r} at {spec.bits} bits: its relative "
                                 f"output error is {err}; check the calibration data")  # fmt: skip
            errors.append(err)
            costs.append(result_bits(r, params))
        return errors, costs


def solve_allocation(
    names: Sequence[str], params: Sequence[int], candidates: tuple[int, ...],
    errors: np.ndarray, costs: np.ndarray, budget_bits: float, objective: str = "output",
) -> BitAllocation:  # fmt: skip
    """The least summed error within ``budget_bits`` per weight, from measured errors and
    costs (L, K) (layers x ``candidates``, costs in bits; ``objective`` names what the errors
    are, "output" or "fisher"); ValueError when infeasible."""
    weights = sum(params)
    cheapest = int(costs.min(axis=1).sum())
    if budget_units(budget_bits, weights) < cheapest:
        raise ValueError(
            f"budget_bits={budget_bits} is infeasible: the minimum achievable is "
            f"{cheapest / weights:.6g} bits per weight (every layer at its smallest candidate; "
            "codes, steps and zero points, as size_report counts them)"
        )
    sol = solve_budget(errors, costs, budget_units(budget_bits, weights))
    chosen = [
        LayerAllocation(name, int(n), candidates, tuple(map(float, errors[row])),
                        tuple(map(int, costs[row])), candidates[k])
        for row, (name, n, k) in enumerate(zip(names, params, sol.choice))
    ]  # fmt: skip
    return BitAllocation(budget_bits, candidates, chosen, sol.cost / weights, cheapest / weights,
                         sol.objective, sol.exact, objective=objective)  # fmt: skip


def allocate_for_plans(
    target: Target, layers: list[LayerInfo], plans: list[LayerPlan], blocks: list[Block],
    batches: Calibration, options: RunOptions, cache_bytes: int, budget_bits: float,
    candidates: tuple[int, ...], fisher: Any = None,
) -> BitAllocation:  # fmt: skip
    """The allocation for an already traced and planned model (``quantize_params`` calls it
    after its checks; ``allocate_bits`` is the stand-alone form). ``budget_bits`` and
    ``candidates`` as returned by ``check_budget``; ``fisher``: None (objective "output") or
    the params-shaped Fisher diagonal (objective "fisher", see :func:`layer_fisher`)."""
    t0 = time.perf_counter()
    specs = _candidate_specs(layers, plans, candidates, budget_bits)
    per_layer = None if fisher is None else layer_fisher(fisher, layers, plans)
    walk = FloatStatsWalk(target, layers, plans, blocks, batches, options,
                          ActivationCache(cache_bytes, None), specs=specs,
                          fisher=per_layer)  # fmt: skip
    walk.run()
    order = sorted(walk.measured)
    errors = np.array([walk.measured[i][0] for i in order])  # (L, K)
    costs = np.array([walk.measured[i][1] for i in order], dtype=np.int64)  # (L, K) bits
    names = [layers[i].name for i in order]
    params = [math.prod(layers[i].kernel_shape) for i in order]
    out = solve_allocation(names, params, candidates, errors, costs, budget_bits,
                           "output" if fisher is None else "fisher")  # fmt: skip
    out.seconds = time.perf_counter() - t0
    return out


# long: the stand-alone entry point; its signature mirrors quantize_params's (near 60 lines).
def allocate_bits(
    model: Any,
    variables: Any,
    calib: Any,
    spec: QuantSpec | dict | None = None,
    method: str = "gpfq",
    rules: Sequence[Any] | None = None,
    *,
    budget_bits: float,
    budget_candidates: Sequence[int] = DEFAULT_CANDIDATES,
    budget_fisher: Any = None,
    batch_size: int = 256,
    apply_kwargs: dict | None = None,
    fold_batchnorm: bool = False,
    seed: int = 0,
    progress: bool = True,
    key: jax.Array | None = None,
    patch_fraction: float = 1.0,
    block_size: int | None = None,
    damp: float = 0.01,
    act_order: bool = False,
    stats_dtype: Any = jnp.float32,
    mesh: Any = None,
    blocks: str | Sequence[str] | None = "auto",
    shared_stats: bool = True,
    cache_bytes: int = 2**31,
) -> BitAllocation:
    """The per-layer bit widths that ``quantize_params(..., budget_bits=budget_bits)`` would
    use, without quantizing: inspect them, then quantize with
    ``quantize_params(..., rules=alloc.rules(rules))`` (the same result). The arguments are
    ``quantize_params``'s (``bias_correction`` does not change the choice: the errors are
    those of the kernels). Returns a BitAllocation (per layer: weights, every candidate's
    error and storage bits, the chosen bits; the achieved bits per weight)."""
    from gpfq_jax.flax import driver  # the driver imports this module

    driver._check_options(fold_batchnorm=fold_batchnorm, progress=progress, act_order=act_order,
                          seed=seed, patch_fraction=patch_fraction, apply_kwargs=apply_kwargs,
                          shared_stats=shared_stats)  # fmt: skip
    driver._check_stats_dtype(stats_dtype)
    driver._check_run_layout(blocks, cache_bytes, None)
    budget, candidates = check_budget(budget_bits, budget_candidates, rules)
    check_fisher(budget_fisher, fold_batchnorm)
    batches = Calibration(calib, batch_size)
    if apply_kwargs is None:
        apply_kwargs = driver.default_apply_kwargs(model)
    target = make_target(model, variables, dict(apply_kwargs))
    trace = driver._checked_trace(target, batches.first)
    names, kinds = [lay.name for lay in trace.layers], [lay.kind for lay in trace.layers]
    plans = plan_layers(names, rules, spec, method, kinds)
    if fold_batchnorm:
        fold_batchnorms(target, trace.bn_follows, trace.layers, plans, batches.first)
    found, _ = find_blocks(target.model, target.discover_vars, batches.first, target.kwargs,
                           trace.layers, blocks)  # fmt: skip
    options = RunOptions(
        key=jax.random.PRNGKey(seed) if key is None else key, seed=seed, bias_correction=False,
        patch_fraction=patch_fraction, stats_dtype=stats_dtype, mesh=resolve_mesh(mesh),
        block_size=block_size, damp=damp, act_order=act_order, shared_stats=shared_stats,
        progress=progress,
    )  # fmt: skip
    return allocate_for_plans(target, trace.layers, plans, found, batches, options, cache_bytes,
                              budget, candidates, budget_fisher)  # fmt: skip


__all__ = [
    "DEFAULT_CANDIDATES",
    "BitAllocation",
    "FloatStatsWalk",
    "allocate_bits",
    "LayerAllocation",
    "allocate_for_plans",
    "check_budget",
    "result_bits",
    "solve_allocation",
]
