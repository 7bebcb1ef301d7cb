"""Exact allocation by dynamic programming over the layer order (METHOD §3–§4).

Why this exists: HiGHS solves the pairwise ILP by branch and bound on an LP relaxation. With pairs in
a window of three layers the pair graph has cycles, the relaxation is weak, and one solve of a
ResNet-50-sized problem takes seconds (a 100-budget sweep, minutes). But the pair graph of a network
is banded: a layer is linked only to the next few. A dynamic program over the layer order whose
state is the formats of the layers still linked to a later one minimises any objective of the form
Σ_l r_l(f_l) + Σ_pairs C exactly, in time linear in the number of layers. That gives

* a Lagrangian lower bound for any budget vector: move the budget rows into the objective with
  multipliers λ ≥ 0 (r = s + Σ_k λ_k·c_k) and minimise by the dynamic program; the best λ is found
  by walking the lower convex hull of (cost, objective) for one budget, by cutting planes for
  several; and
* an exact solve: extend partial assignments unit by unit and drop one when (a) its Lagrangian
  value plus the exact Lagrangian minimum of the remaining units exceeds a threshold, (b) its cost
  plus the cheapest rest breaks a budget, or (c) another partial assignment with the same state is
  no worse in objective and every budgeted cost. Every optimum survives (a)–(c) or is matched by
  one that does (see `lcpaq.allocation.labels.solve_points`), so once a feasible solution within the threshold is
  known the best complete survivor is optimal: a proof, not a gap.

All points of a Pareto sweep go through one loop over the units together, so numpy's per-call cost
is paid once per unit for the whole sweep, not once per point.

Without pairs and with one budget, `lcpaq.allocation.knapsack` is faster still. This module holds
the solver's data and its dynamic program; the multiplier search is `lcpaq.allocation.multipliers`,
the enumeration `lcpaq.allocation.labels`, the local search `lcpaq.allocation.local_search`.

Inputs are per *unit* (a layer, or tied layers sharing one format) and per *option* (the unit's
allowed formats): ``scores[u]`` [n_u], ``costs[u]`` [n_u, M] and ``pairs[(u, v)]`` [n_u, n_v] with
u < v. Choices are option positions per unit. Numpy only (the multiplier search solves its small
LPs with HiGHS); no torch.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Relative tolerance of budget rows (HiGHS' default primal tolerance is about as loose).
BUDGET_RTOL = 1e-10
#: Relative tolerance on objective thresholds: labels within it of the threshold are kept.
OBJECTIVE_RTOL = 1e-9


class StateSpaceTooLarge(Exception):
    """The pair graph is too wide for the dynamic program (the caller falls back to HiGHS)."""


class LabelLimit(Exception):
    """The exact enumeration kept more partial assignments than allowed."""


@dataclass(frozen=True)
class Solution:
    """An optimum (``choice``: option per unit), its objective and budgeted costs."""

    choice: np.ndarray
    value: float
    costs: np.ndarray  # [M] every metric, offsets excluded
    bound: float  # the Lagrangian lower bound used to prune
    labels: int  # the most partial assignments kept at one unit


class ChainSolver:
    """Exact minimisation of Σ scores + Σ pairs under budgets on M cost metrics.

    Args:
        scores: per unit [n_u] objective coefficients.
        costs: per unit [n_u, M] cost coefficients (offsets already removed).
        pairs: {(u, v): C [n_u, n_v]} with u < v.
        max_states: the largest dynamic-program table per unit (product of the option counts of the
            units still linked to a later one, times the unit's own options).
        max_labels: the most partial assignments the exact enumeration may keep at one unit.
    Raises:
        StateSpaceTooLarge: the pair graph is too wide in this unit order.
    """

    def __init__(
        self,
        scores: Sequence[np.ndarray],
        costs: Sequence[np.ndarray],
        pairs: Mapping[tuple[int, int], np.ndarray],
        *,
        max_states: int = 1 << 16,
        max_labels: int = 1_000_000,
    ) -> None:
        self.num_units = len(scores)
        self.sizes = [len(s) for s in scores]
        self.num_metrics = int(np.shape(costs[0])[1]) if self.num_units else 0
        self.max_labels = max_labels
        width = max(self.sizes, default=1)
        units, metrics = self.num_units, self.num_metrics
        # Padded copies for vectorised evaluation; padding never wins a minimum.
        self.padded_scores = np.full((units, width), np.inf)
        self.padded_costs = np.zeros((units, width, metrics))
        for u in range(units):
            self.padded_scores[u, : self.sizes[u]] = scores[u]
            self.padded_costs[u, : self.sizes[u]] = costs[u]
        self.unit_range = np.arange(units)
        last, incoming = self._index_pairs(pairs, width)
        # Active units after unit u: those up to u linked to a unit after u (the DP state), newest
        # first, so that a unit's own options are the first axis of its table (numpy reduces a
        # leading axis about ten times faster than a short trailing one).
        self.active = [tuple(p for p in range(u, -1, -1) if last[p] > u) for u in range(units)]
        self.separable = not pairs
        self._build_tables(incoming, max_states)
        cheapest = np.array([np.min(c, axis=0) for c in costs]).reshape(units, metrics)
        self.rest_cost = np.vstack(
            [np.cumsum(cheapest[::-1], axis=0)[::-1], np.zeros((1, metrics))]
        )
        self.cost_scale = np.abs(self.padded_costs).max(axis=1).sum(axis=0) + 1e-300
        finite_scores = np.where(np.isfinite(self.padded_scores), self.padded_scores, 0)
        spread = float(np.abs(finite_scores).max(1).sum())
        spread += float(np.abs(self.pair_matrix).max(axis=(1, 2)).sum()) if len(pairs) else 0.0
        self.objective_scale = max(spread, 1e-300)

    def _index_pairs(
        self, pairs: Mapping[tuple[int, int], np.ndarray], width: int
    ) -> tuple[list[int], list[list[tuple[int, np.ndarray]]]]:
        """Pair arrays for vectorised evaluation; per unit the last unit it is linked to and the
        pairs (earlier unit, C) that end at it."""
        last = list(range(self.num_units))
        incoming: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(self.num_units)]
        self.pair_first = np.zeros(len(pairs), dtype=np.int64)
        self.pair_second = np.zeros(len(pairs), dtype=np.int64)
        self.pair_matrix = np.zeros((len(pairs), width, width))
        for q, ((u, v), matrix) in enumerate(pairs.items()):
            if not u < v:
                raise ValueError(f"pair ({u}, {v}) must have u < v")
            matrix = np.asarray(matrix, dtype=float)
            last[u] = max(last[u], v)
            incoming[v].append((u, matrix))
            self.pair_first[q], self.pair_second[q] = u, v
            self.pair_matrix[q, : self.sizes[u], : self.sizes[v]] = matrix
        return last, incoming

    def _build_tables(self, incoming: list[list[tuple[int, np.ndarray]]], max_states: int) -> None:
        """Per unit: the shape its DP table expands to, its pair terms on that table, and the
        transitions from the states before it (pair rows, next state index, own stride)."""
        self.expand: list[tuple[int, ...]] = []
        self.pair_term: list[np.ndarray] = []
        self.pair_rows: list[np.ndarray] = []
        self.next_base: list[np.ndarray] = []
        self.own_stride: list[np.ndarray] = []
        for u in range(self.num_units):
            before = self.active[u - 1] if u else ()
            axes = (u, *before)
            shape = tuple(self.sizes[p] for p in axes)
            if int(np.prod(shape)) > max_states:
                raise StateSpaceTooLarge(
                    f"the dynamic program needs {int(np.prod(shape))} states at unit {u} "
                    f"(limit {max_states})"
                )
            self.expand.append(tuple(self.sizes[p] if p in self.active[u] else 1 for p in axes))
            # Pair terms materialised on the full table, so every table has its full shape.
            term = np.zeros(shape)
            for p, matrix in incoming[u]:
                view = [1] * len(axes)
                view[axes.index(p)], view[0] = self.sizes[p], self.sizes[u]
                term = term + matrix.T.reshape(view)  # C[p's option, u's option]
            self.pair_term.append(term)
            sizes = [self.sizes[p] for p in self.active[u]]
            strides = np.ones(len(sizes), dtype=np.int64)
            for k in range(len(sizes) - 2, -1, -1):
                strides[k] = strides[k + 1] * sizes[k + 1]
            # Transition tables over the states of the units active before u: the pair terms
            # each state adds to u's options, and the index of the state after u.
            before_shape = tuple(self.sizes[p] for p in before)
            count = int(np.prod(before_shape))
            digits = np.unravel_index(np.arange(count), before_shape) if before else ()
            rows = np.zeros((count, self.sizes[u]))
            for p, matrix in incoming[u]:
                rows += matrix[digits[before.index(p)]]
            self.pair_rows.append(rows)
            base = np.zeros(len(rows), dtype=np.int64)
            for position, p in enumerate(self.active[u]):
                if p != u:
                    base += digits[before.index(p)] * strides[position]
            self.next_base.append(base)
            own = strides[0] if self.active[u] and self.active[u][0] == u else 0
            self.own_stride.append(own * np.arange(self.sizes[u], dtype=np.int64))

    def with_scores(self, scores: Sequence[np.ndarray]) -> ChainSolver:
        """The same problem with other per-unit scores (pair tables are shared, not copied)."""
        other = copy.copy(self)
        other.padded_scores = np.full_like(self.padded_scores, np.inf)
        for u, unit_scores in enumerate(scores):
            other.padded_scores[u, : self.sizes[u]] = unit_scores
        finite = np.where(np.isfinite(other.padded_scores), other.padded_scores, 0)
        pair_spread = self.objective_scale - float(
            np.abs(np.where(np.isfinite(self.padded_scores), self.padded_scores, 0)).max(1).sum()
        )
        other.objective_scale = max(float(np.abs(finite).max(1).sum()) + pair_spread, 1e-300)
        return other

    # -- evaluation --------------------------------------------------------------------------
    def value(self, choice: np.ndarray) -> float:
        total = float(self.padded_scores[self.unit_range, choice].sum())
        if len(self.pair_first):
            pairs = np.arange(len(self.pair_first))
            first, second = choice[self.pair_first], choice[self.pair_second]
            total += float(self.pair_matrix[pairs, first, second].sum())
        return total

    def cost(self, choice: np.ndarray) -> np.ndarray:
        return self.padded_costs[self.unit_range, choice].sum(axis=0)

    def budget_tolerance(self, budgets: np.ndarray) -> np.ndarray:
        return BUDGET_RTOL * np.maximum(self.cost_scale, np.where(np.isfinite(budgets), budgets, 0))

    def meets(self, cost: np.ndarray, budgets: np.ndarray) -> bool:
        return bool(np.all(cost <= budgets + self.budget_tolerance(budgets)))

    def tolerance(self, value: float) -> float:
        return OBJECTIVE_RTOL * (abs(value) + self.objective_scale)

    # -- Lagrangian dynamic program ----------------------------------------------------------
    def minimise_many(
        self, multipliers: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """min_x Σ (scores + costs·λ) + Σ pairs for every row λ of ``multipliers`` [P, M]:
        (values [P], minimisers [P, U], rest tables). ``rest[u]`` [P, *states of active[u]] holds
        the exact minimum over the units after u. One pass over the units serves all rows."""
        lams = np.atleast_2d(multipliers)
        count = len(lams)
        reduced = self.padded_scores[None] + np.einsum(
            "uwm,pm->puw", self.padded_costs, lams
        )  # [P, U, W]
        if self.separable:
            choice = reduced.argmin(axis=2)
            lows = np.take_along_axis(reduced, choice[:, :, None], axis=2)[:, :, 0]
            suffix = np.concatenate(
                [np.cumsum(lows[:, ::-1], axis=1)[:, ::-1], np.zeros((count, 1))], axis=1
            )
            return suffix[:, 0], choice, [suffix[:, u + 1] for u in range(self.num_units)]
        tables: list[np.ndarray] = [np.zeros(())] * self.num_units
        rest: list[np.ndarray] = [np.zeros(())] * self.num_units
        low = np.zeros(count)
        for u in range(self.num_units - 1, -1, -1):
            rest[u] = low
            table = self.pair_term[u] + low.reshape((count, *self.expand[u]))
            table += reduced[:, u, : self.sizes[u]].reshape((count, -1) + (1,) * (table.ndim - 2))
            tables[u] = table
            low = table.min(axis=1)
        choice = np.zeros((count, self.num_units), dtype=np.int64)
        rows = np.arange(count)
        for u in range(self.num_units):
            before = self.active[u - 1] if u else ()
            index: tuple[Any, ...] = (rows, slice(None), *(choice[:, p] for p in before))
            row = tables[u][index]
            choice[:, u] = row.argmin(axis=1)
        return low, choice, rest

    def minimise(self, multipliers: np.ndarray) -> tuple[float, np.ndarray, list[np.ndarray]]:
        """`minimise_many` for one λ: (value, a minimiser, rest tables)."""
        totals, choices, rest = self.minimise_many(np.asarray(multipliers)[None, :])
        return float(totals[0]), choices[0], [table[0] for table in rest]

    # -- multipliers ---------------------------------------------------------------------------
    def probe(
        self,
        lam: np.ndarray,
        budgets: np.ndarray,
        found: list[tuple[float, np.ndarray, np.ndarray]],
    ) -> tuple[float, np.ndarray, float, list[np.ndarray]]:
        """One dynamic program at λ: (value, cost of the minimiser, Lagrangian bound, rest)."""
        total, choice, rest = self.minimise(lam)
        value, cost = self.value(choice), self.cost(choice)
        found.append((value, cost, choice))
        finite = np.isfinite(budgets)
        bound = total - float(lam[finite] @ budgets[finite])
        return value, cost, bound, rest

    # -- exact solve ---------------------------------------------------------------------------
    def solve_many(
        self,
        budgets: np.ndarray,
        *,
        uppers: Sequence[tuple[np.ndarray, float] | None] | None = None,
        hull: list[tuple[float, float]] | None = None,
        first_gap: float = 1e-4,
        local_search: bool = True,
    ) -> list[Solution | None]:
        """`lcpaq.allocation.labels.solve_points` on this chain: the proven optimum under each
        row of ``budgets`` [P, M], or None where no assignment meets the row."""
        from lcpaq.allocation.labels import solve_points  # labels needs this module's types

        return solve_points(
            self,
            budgets,
            uppers=uppers,
            hull=hull,
            first_gap=first_gap,
            local_search=local_search,
        )

    def solve(
        self, budgets: np.ndarray, *, upper: tuple[np.ndarray, float] | None = None
    ) -> Solution | None:
        """The optimum under ``budgets`` [M] (inf where absent), or None if none meets them."""
        return self.solve_many(np.asarray(budgets, dtype=float)[None, :], uppers=[upper])[0]

    def sweep(
        self, metric: int, values: np.ndarray | Sequence[float], budgets: np.ndarray
    ) -> list[Solution | None]:
        """Optima for the budget ``values`` on ``metric``, the other rows of ``budgets`` held.
        All points are solved together (`solve_many`); with no other budget the walks share the
        hull points they find, so neighbouring points need few dynamic programs."""
        others = np.isfinite(budgets)
        others[metric] = False
        rows = np.repeat(np.asarray(budgets, dtype=float)[None, :], len(values), axis=0)
        rows[:, metric] = values
        hull: list[tuple[float, float]] | None = None if others.any() else []
        return self.solve_many(rows, hull=hull, local_search=False)
