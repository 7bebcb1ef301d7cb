"""Exact allocation without pairs under one budget: the multiple-choice knapsack (METHOD §3).

Input: per unit scores [n_u] and costs [n_u] on one metric, and budget values. Output: the optimum
(option per unit, value) of every budget at once. The dynamic program over (cost, score) Pareto
lists (Nemhauser–Ullmann), split in two halves that meet in the middle, on the exact float costs
(nothing is rounded to a grid). `knapsack_frontier` is the whole model-level frontier (a test
oracle). Numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lcpaq.allocation.exact import LabelLimit


@dataclass
class _Half:
    """The (cost, value) Pareto list of a run of units, with back-pointers."""

    costs: np.ndarray
    values: np.ndarray
    parents: list[np.ndarray]
    options: list[np.ndarray]

    def choice(self, index: int) -> np.ndarray:
        choice = np.zeros(len(self.options), dtype=np.int64)
        for unit in range(len(self.options) - 1, -1, -1):
            choice[unit] = self.options[unit][index]
            index = int(self.parents[unit][index])
        return choice


def _pareto_list(
    scores: Sequence[np.ndarray], costs: Sequence[np.ndarray], max_labels: int | None = None
) -> _Half:
    """All (cost, value) pairs no other assignment of these units beats in both, cost ascending.
    Of equal pairs the first is kept. Raises `LabelLimit` past ``max_labels`` pairs."""
    cost, value = np.zeros(1), np.zeros(1)
    parents: list[np.ndarray] = []
    options: list[np.ndarray] = []
    for unit_scores, unit_costs in zip(scores, costs):
        n = len(unit_scores)
        new_cost = (cost[:, None] + unit_costs[None, :]).ravel()
        new_value = (value[:, None] + unit_scores[None, :]).ravel()
        parent = np.repeat(np.arange(len(cost)), n)
        option = np.tile(np.arange(n), len(cost))
        order = np.lexsort((new_value, new_cost))
        new_cost, new_value = new_cost[order], new_value[order]
        before = np.minimum.accumulate(np.r_[np.inf, new_value[:-1]])
        kept = new_value < before
        cost, value = new_cost[kept], new_value[kept]
        if max_labels is not None and len(cost) > max_labels:
            raise LabelLimit(f"{len(cost)} Pareto points after {len(parents) + 1} units")
        parents.append(parent[order][kept])
        options.append(option[order][kept])
    return _Half(cost, value, parents, options)


def knapsack_frontier(
    scores: Sequence[np.ndarray], costs: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """The exact model-level Pareto frontier of a separable objective under one cost: (costs,
    values, choices) of every assignment no other beats in both, cost ascending. A test oracle;
    its size grows with the number of distinct sums (tens of thousands for 54 layers)."""
    half = _pareto_list(scores, costs)
    return half.costs, half.values, [half.choice(k) for k in range(len(half.costs))]


def knapsack_optima(
    scores: Sequence[np.ndarray],
    costs: Sequence[np.ndarray],
    budgets: np.ndarray,
    tolerance: float = 0.0,
    max_labels: int | None = None,
) -> list[tuple[np.ndarray, float] | None]:
    """Exact optima of min Σ scores s.t. Σ costs ≤ B for every B in ``budgets`` (no pairs, one
    metric): Pareto lists of the first and second half of the units, then for each B the best
    pair (a, b) with cost_a + cost_b ≤ B. Returns (choice, value) or None (infeasible) per B.
    The lists grow with the number of distinct sums; past ``max_labels`` points, `LabelLimit`."""
    middle = len(scores) // 2
    first = _pareto_list(scores[:middle], costs[:middle], max_labels)
    second = _pareto_list(scores[middle:], costs[middle:], max_labels)
    results: list[tuple[np.ndarray, float] | None] = []
    for budget in np.asarray(budgets, dtype=float):
        room = budget + tolerance - first.costs
        # Values fall along a Pareto list, so the best partner is the dearest that fits.
        partner = np.searchsorted(second.costs, room, side="right") - 1
        fits = partner >= 0
        if not fits.any():
            results.append(None)
            continue
        totals = np.where(fits, first.values + second.values[np.maximum(partner, 0)], np.inf)
        a = int(np.argmin(totals))
        choice = np.concatenate([first.choice(a), second.choice(int(partner[a]))])
        results.append((choice, float(totals[a])))
    return results
