"""Mixed precision under a storage budget: the multiple-choice knapsack, pure functions.

Layer i (L layers) can take one of K options (bit widths); option k costs ``costs[i, k]``
storage units (integers, e.g. bits: codes plus steps and zero points) and gives the error
``errors[i, k]`` (e.g. the squared relative output error). ``solve_budget`` chooses one option
per layer minimising ``sum_i errors[i, k_i]`` subject to ``sum_i costs[i, k_i] <= budget``.

Solver: dynamic programming over the budget left above every layer's cheapest option. Extra
costs ``e[i, k] = costs[i, k] - min_k costs[i, k]`` are measured in a unit ``u``: their
greatest common divisor ``g`` when the whole range ``sum_i max_k e[i, k] / g`` fits in
``max_cells`` cells (then the optimum is exact), else a multiple of ``g`` with every extra cost
rounded UP and the budget rounded DOWN, so the chosen options never exceed the budget (they are
optimal among the solutions whose rounded-up costs fit). ``u`` depends on the costs only, not
on the budget, so a larger budget never gives a larger objective. Cost: O(L K C) with
C <= ``max_cells`` + 1 cells, plus an (L, C) int8 table of choices.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

DEFAULT_MAX_CELLS = 1 << 17


@dataclasses.dataclass(frozen=True)
class BudgetSolution:
    """The chosen option per layer.

    choice: (L,) option index per layer. objective: ``sum_i errors[i, choice[i]]``. cost: the
    exact total cost of the choice (<= budget). exact: True when the unit is the costs' gcd
    (the optimum over all choices), False when costs were rounded up to a coarser unit
    (feasible, optimal on that grid). unit: the cost unit of the dynamic programme.
    """

    choice: tuple[int, ...]
    objective: float
    cost: int
    exact: bool
    unit: int


def _checked_arrays(errors: Sequence, costs: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """errors (L, K) finite >= 0 floats, costs (L, K) non-negative integers."""
    err = np.asarray(errors, dtype=np.float64)
    raw = np.asarray(costs)
    if err.ndim != 2 or err.shape[0] < 1 or err.shape[1] < 1:
        raise ValueError(f"errors must be a non-empty (layers, options) array, got {err.shape}")
    if raw.shape != err.shape:
        raise ValueError(f"costs {raw.shape} and errors {err.shape} must have the same shape")
    if err.shape[1] > 127:
        raise ValueError(f"at most 127 options per layer, got {err.shape[1]}")
    if not np.issubdtype(raw.dtype, np.integer):
        raise ValueError(f"costs must be integers (storage units), got dtype {raw.dtype}")
    cost = raw.astype(np.int64)
    bad = np.argwhere(~np.isfinite(err) | (err < 0))
    if bad.size:
        i, k = bad[0]
        raise ValueError(f"errors must be finite and >= 0; layer {i} option {k}: {err[i, k]}")
    if (cost < 0).any():
        raise ValueError("costs must be >= 0")
    return err, cost


def cost_unit(costs: np.ndarray, max_cells: int = DEFAULT_MAX_CELLS) -> tuple[int, bool]:
    """(unit, exact) of the dynamic programme for integer ``costs`` (L, K): the gcd of the
    extra costs over each layer's cheapest option when their total range fits ``max_cells``
    cells, else the smallest multiple of it that does (exact False)."""
    extra = costs - costs.min(axis=1, keepdims=True)
    g = math.gcd(*(int(v) for v in np.unique(extra))) or 1
    span = int(extra.max(axis=1).sum()) // g
    if span <= max_cells:
        return g, True
    return g * math.ceil(span / max_cells), False


def budget_units(budget_per_weight: float, weights: int) -> int:
    """The largest integer total c with ``c / weights <= budget_per_weight`` as Python
    computes it (a correctly rounded division): ``floor(budget * weights)`` computed exactly
    (the float's binary value times an integer), plus the few totals whose quotient rounds down
    onto the budget. So an average reported as ``c / weights`` is never above the budget, and
    a budget equal to a reported average (e.g. the minimum achievable) is met."""
    w = int(weights)
    c = math.floor(Fraction(budget_per_weight) * w)
    while (c + 1) / w <= budget_per_weight:
        c += 1
    return c


def solve_budget(
    errors: Sequence, costs: Sequence, budget: int, *, max_cells: int = DEFAULT_MAX_CELLS
) -> BudgetSolution:
    """Choose one option per layer: min ``sum errors[i, k_i]`` s.t. ``sum costs[i, k_i] <=
    budget`` (module docstring).

    Args:
      errors: (L, K) finite non-negative floats. costs: (L, K) non-negative integers.
      budget: an integer total in the costs' units.
      max_cells: the largest number of budget cells of the dynamic programme (memory
        L x cells bytes); above it costs are rounded up to a coarser unit (``exact`` False).
    Raises ValueError for bad arrays or when even the cheapest options exceed the budget
    (the message gives the minimum total).
    """
    err, cost = _checked_arrays(errors, costs)
    if isinstance(budget, bool) or not isinstance(budget, int | np.integer):
        raise ValueError(f"budget must be an integer number of cost units, got {budget!r}")
    if isinstance(max_cells, bool) or not isinstance(max_cells, int) or max_cells < 1:
        raise ValueError(f"max_cells must be a positive int, got {max_cells!r}")
    base = cost.min(axis=1)
    left = int(budget) - int(base.sum())
    if left < 0:
        raise ValueError(f"infeasible budget {budget}: the cheapest options cost {base.sum()}")
    unit, exact = cost_unit(cost, max_cells)
    steps = -(-(cost - base[:, None]) // unit)  # extra cost in units, rounded up
    cells = min(left // unit, int(steps.max(axis=1).sum())) + 1
    n_layers, n_opts = err.shape
    best = np.zeros(cells)  # best[c]: least error of the layers so far with extra cost <= c
    choice = np.zeros((n_layers, cells), np.int8)
    for i in range(n_layers):
        cand = np.full((n_opts, cells), np.inf)
        for k in range(n_opts):
            s = int(steps[i, k])
            if s < cells:
                cand[k, s:] = best[: cells - s] + err[i, k]
        choice[i] = np.argmin(cand, axis=0)
        best = cand[choice[i], np.arange(cells)]
    picked, c = [], cells - 1
    for i in range(n_layers - 1, -1, -1):
        k = int(choice[i, c])
        picked.append(k)
        c -= int(steps[i, k])
    picked.reverse()
    rows = np.arange(n_layers)
    total = int(cost[rows, picked].sum())
    assert total <= budget, (total, budget)  # rounded-up costs fit, so the real ones do
    return BudgetSolution(tuple(picked), float(err[rows, picked].sum()), total, exact, unit)


def brute_force_budget(errors: Sequence, costs: Sequence, budget: int) -> BudgetSolution | None:
    """The reference: every combination of options (K^L of them; small problems only).
    None when no combination fits the budget."""
    err, cost = _checked_arrays(errors, costs)
    best = None
    for combo in np.ndindex(*([err.shape[1]] * err.shape[0])):
        rows = np.arange(err.shape[0])
        total = int(cost[rows, combo].sum())
        if total <= budget:
            obj = float(err[rows, combo].sum())
            if best is None or obj < best.objective:
                best = BudgetSolution(tuple(combo), obj, total, True, 1)
    return best


__all__ = [
    "BudgetSolution",
    "DEFAULT_MAX_CELLS",
    "brute_force_budget",
    "budget_units",
    "cost_unit",
    "solve_budget",
]
