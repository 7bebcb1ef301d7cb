"""The allocation problem over units: tied layers merged into one unit that shares its format.

Input: per-layer scores [L, F], an allowed mask [L, F], a `CostModel`, the pairwise terms between
layers and the unit of every layer (`lcpaq.allocation.budgets.tie_units`). Output: `Units`, the same
problem with one row per unit (scores and costs summed over the unit's layers, pair terms inside a
unit moved onto its diagonal, candidates pruned by the safe Pareto rule), and what an assignment of
a column per unit costs and scores. Tying by shared variables is the tie constraint
x_{i,f} = x_{j,f} with fewer rows. Numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from lcpaq.allocation.budgets import Budget
from lcpaq.allocation.costs import CostModel
from lcpaq.allocation.frontier import safe_pareto_mask
from lcpaq.allocation.objective import PairTerms, objective_value, weighted_objective
from lcpaq.errors import InputError


@dataclass(frozen=True)
class Units:
    """Scores [U, F], costs {metric: [U, F]}, pairs {(u, v): [F, F]} with u < v, the allowed
    mask [U, F] after pruning (``unpruned``: before, which the largest achievable costs need) and
    the cost model's metrics and offsets."""

    scores: np.ndarray
    costs: Mapping[str, np.ndarray]
    pairs: Mapping[tuple[int, int], np.ndarray]
    allowed: np.ndarray
    unpruned: np.ndarray
    metrics: tuple[str, ...]
    offsets: Mapping[str, float]

    def value(self, metric: str, choice: np.ndarray) -> float:
        """A cost metric of a column per unit (offset included)."""
        coefficients = self.costs[metric][np.arange(len(choice)), choice]
        return float(coefficients.sum() + self.offsets[metric])

    def meets(self, choice: np.ndarray, budgets: Sequence[Budget]) -> bool:
        return all(self.value(b.metric, choice) <= b.value for b in budgets)

    def objective(self, choice: np.ndarray) -> float:
        return objective_value(self.scores, self.pairs, choice)

    def weighted(self, choice: np.ndarray, factors: Mapping[str, float]) -> float:
        return weighted_objective(
            self.objective(choice), lambda metric: self.value(metric, choice), factors
        )

    def weighted_scores(self, factors: Mapping[str, float]) -> np.ndarray:
        """Scores with Σ_k factor_k·cost_k added per candidate (the separable part of the
        weighted objective)."""
        scores = self.scores.copy()
        for metric, factor in factors.items():
            scores = scores + factor * self.costs[metric]
        return scores


def merge_units(
    layer_names: Sequence[str],
    scores: np.ndarray,
    allowed: np.ndarray,
    costs: CostModel,
    pairwise: PairTerms,
    unit: np.ndarray,
    *,
    prune: bool,
) -> Units:
    """The `Units` of layers numbered by ``unit`` (a unit index per layer)."""
    num_units = int(unit.max()) + 1 if len(unit) else 0
    members = [np.flatnonzero(unit == u) for u in range(num_units)]
    unit_allowed = np.array([allowed[rows].all(axis=0) for rows in members], dtype=bool)
    for u, rows in enumerate(members):
        if not unit_allowed[u].any():
            names = ", ".join(layer_names[int(row)] for row in rows)
            raise InputError(f"tied layers {names} have no allowed format in common")
    unit_scores = np.array([scores[rows].sum(axis=0) for rows in members])
    unit_costs = {
        metric: np.array([coef[rows].sum(axis=0) for rows in members])
        for metric, coef in costs.coefficients.items()
    }
    unit_pairs: dict[tuple[int, int], np.ndarray] = {}
    for (i, j), matrix in pairwise.items():
        u, v = int(unit[i]), int(unit[j])
        if u == v:  # both layers of a tied unit hold the same format f
            unit_scores[u] += np.diag(matrix)
            continue
        key, block = ((u, v), matrix) if u < v else ((v, u), matrix.T)
        unit_pairs[key] = unit_pairs.get(key, 0.0) + block
    kept = unit_allowed
    if prune:
        stacked = np.stack([unit_costs[m] for m in costs.metrics], axis=-1)
        kept = safe_pareto_mask(stacked, unit_scores, unit_allowed, unit_pairs)
    return Units(
        scores=unit_scores,
        costs=unit_costs,
        pairs=unit_pairs,
        allowed=kept,
        unpruned=unit_allowed,
        metrics=costs.metrics,
        offsets=costs.offsets,
    )
