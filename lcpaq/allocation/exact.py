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
  one that does (see `ChainSolver.solve_many`), so once a feasible solution within the threshold is
  known the best complete survivor is optimal: a proof, not a gap.

All points of a Pareto sweep go through one loop over the units together, so numpy's per-call cost
is paid once per unit for the whole sweep, not once per point.

Without pairs and with one budget, `knapsack_optima` is the exact multiple-choice-knapsack dynamic
program over (cost, score) Pareto lists (Nemhauser–Ullmann), split in two halves that meet in the
middle: every budget of a sweep at once, on the exact float costs (nothing is rounded to a grid).

Inputs are per *unit* (a layer, or tied layers sharing one format) and per *option* (the unit's
allowed formats): ``scores[u]`` [n_u], ``costs[u]`` [n_u, M] and ``pairs[(u, v)]`` [n_u, n_v] with
u < v. Choices are option positions per unit. Numpy, and highspy for the few-variable LPs of the
multiplier search; no torch.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import highspy
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


def _undominated(values: np.ndarray, new_group: np.ndarray) -> np.ndarray:
    """Positions whose value is below every earlier value of the same group (groups are runs
    flagged by ``new_group``). Exact: a segmented prefix minimum by doubling steps (min and
    comparisons only, no arithmetic on the values), log2(largest group) vector passes."""
    count = len(values)
    positions = np.arange(count)
    start = np.maximum.accumulate(np.where(new_group, positions, 0))  # first index of the group
    longest = int((positions - start).max()) + 1 if count else 0
    running = values.copy()
    step = 1
    while step < longest:
        inside = positions[step:] - step >= start[step:]
        shifted = np.minimum(running[step:], running[:-step])
        running[step:] = np.where(inside, shifted, running[step:])
        step *= 2
    before = np.concatenate([[np.inf], running[:-1]])
    return new_group | (values < before)


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
        self._scores = np.full((units, width), np.inf)
        self._costs = np.zeros((units, width, metrics))
        for u in range(units):
            self._scores[u, : self.sizes[u]] = scores[u]
            self._costs[u, : self.sizes[u]] = costs[u]
        self._units = np.arange(units)
        last = list(range(units))
        incoming: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(units)]
        self._pair_first = np.zeros(len(pairs), dtype=np.int64)
        self._pair_second = np.zeros(len(pairs), dtype=np.int64)
        self._pair_matrix = np.zeros((len(pairs), width, width))
        for q, ((u, v), matrix) in enumerate(pairs.items()):
            if not u < v:
                raise ValueError(f"pair ({u}, {v}) must have u < v")
            matrix = np.asarray(matrix, dtype=float)
            last[u] = max(last[u], v)
            incoming[v].append((u, matrix))
            self._pair_first[q], self._pair_second[q] = u, v
            self._pair_matrix[q, : self.sizes[u], : self.sizes[v]] = matrix
        # Active units after unit u: those up to u linked to a unit after u (the DP state), newest
        # first, so that a unit's own options are the first axis of its table (numpy reduces a
        # leading axis about ten times faster than a short trailing one).
        self.active = [tuple(p for p in range(u, -1, -1) if last[p] > u) for u in range(units)]
        self.separable = not pairs
        self._expand: list[tuple[int, ...]] = []
        self._pair_term: list[np.ndarray] = []
        self._pair_rows: list[np.ndarray] = []
        self._next_base: list[np.ndarray] = []
        self._own_stride: list[np.ndarray] = []
        for u in range(units):
            before = self.active[u - 1] if u else ()
            axes = (u, *before)
            shape = tuple(self.sizes[p] for p in axes)
            if int(np.prod(shape)) > max_states:
                raise StateSpaceTooLarge(
                    f"the dynamic program needs {int(np.prod(shape))} states at unit {u} "
                    f"(limit {max_states})"
                )
            self._expand.append(tuple(self.sizes[p] if p in self.active[u] else 1 for p in axes))
            # Pair terms materialised on the full table, so every table has its full shape.
            term = np.zeros(shape)
            for p, matrix in incoming[u]:
                view = [1] * len(axes)
                view[axes.index(p)], view[0] = self.sizes[p], self.sizes[u]
                term = term + matrix.T.reshape(view)  # C[p's option, u's option]
            self._pair_term.append(term)
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
            self._pair_rows.append(rows)
            base = np.zeros(len(rows), dtype=np.int64)
            for position, p in enumerate(self.active[u]):
                if p != u:
                    base += digits[before.index(p)] * strides[position]
            self._next_base.append(base)
            own = strides[0] if self.active[u] and self.active[u][0] == u else 0
            self._own_stride.append(own * np.arange(self.sizes[u], dtype=np.int64))
        cheapest = np.array([np.min(c, axis=0) for c in costs]).reshape(units, metrics)
        self._rest_cost = np.vstack(
            [np.cumsum(cheapest[::-1], axis=0)[::-1], np.zeros((1, metrics))]
        )
        self._cost_scale = np.abs(self._costs).max(axis=1).sum(axis=0) + 1e-300
        spread = float(np.abs(np.where(np.isfinite(self._scores), self._scores, 0)).max(1).sum())
        spread += float(np.abs(self._pair_matrix).max(axis=(1, 2)).sum()) if len(pairs) else 0.0
        self._objective_scale = max(spread, 1e-300)

    def with_scores(self, scores: Sequence[np.ndarray]) -> ChainSolver:
        """The same problem with other per-unit scores (pair tables are shared, not copied)."""
        other = copy.copy(self)
        other._scores = np.full_like(self._scores, np.inf)
        for u, unit_scores in enumerate(scores):
            other._scores[u, : self.sizes[u]] = unit_scores
        finite = np.where(np.isfinite(other._scores), other._scores, 0)
        pair_spread = self._objective_scale - float(
            np.abs(np.where(np.isfinite(self._scores), self._scores, 0)).max(1).sum()
        )
        other._objective_scale = max(float(np.abs(finite).max(1).sum()) + pair_spread, 1e-300)
        return other

    # -- evaluation --------------------------------------------------------------------------
    def value(self, choice: np.ndarray) -> float:
        total = float(self._scores[self._units, choice].sum())
        if len(self._pair_first):
            pairs = np.arange(len(self._pair_first))
            first, second = choice[self._pair_first], choice[self._pair_second]
            total += float(self._pair_matrix[pairs, first, second].sum())
        return total

    def cost(self, choice: np.ndarray) -> np.ndarray:
        return self._costs[self._units, choice].sum(axis=0)

    def budget_tolerance(self, budgets: np.ndarray) -> np.ndarray:
        return BUDGET_RTOL * np.maximum(
            self._cost_scale, np.where(np.isfinite(budgets), budgets, 0)
        )

    def meets(self, cost: np.ndarray, budgets: np.ndarray) -> bool:
        return bool(np.all(cost <= budgets + self.budget_tolerance(budgets)))

    def _tolerance(self, value: float) -> float:
        return OBJECTIVE_RTOL * (abs(value) + self._objective_scale)

    # -- Lagrangian dynamic program ----------------------------------------------------------
    def minimise_many(
        self, multipliers: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """min_x Σ (scores + costs·λ) + Σ pairs for every row λ of ``multipliers`` [P, M]:
        (values [P], minimisers [P, U], rest tables). ``rest[u]`` [P, *states of active[u]] holds
        the exact minimum over the units after u. One pass over the units serves all rows."""
        lams = np.atleast_2d(multipliers)
        count = len(lams)
        reduced = self._scores[None] + np.einsum("uwm,pm->puw", self._costs, lams)  # [P, U, W]
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
            table = self._pair_term[u] + low.reshape((count, *self._expand[u]))
            table += reduced[:, u, : self.sizes[u]].reshape((count, -1) + (1,) * (table.ndim - 2))
            tables[u] = table
            low = table.min(axis=1)
        choice = np.zeros((count, self.num_units), dtype=np.int64)
        rows = np.arange(count)
        for u in range(self.num_units):
            before = self.active[u - 1] if u else ()
            row = tables[u][(rows, slice(None), *(choice[:, p] for p in before))]
            choice[:, u] = row.argmin(axis=1)
        return low, choice, rest

    def minimise(self, multipliers: np.ndarray) -> tuple[float, np.ndarray, list[np.ndarray]]:
        """`minimise_many` for one λ: (value, a minimiser, rest tables)."""
        totals, choices, rest = self.minimise_many(np.asarray(multipliers)[None, :])
        return float(totals[0]), choices[0], [table[0] for table in rest]

    # -- multipliers ---------------------------------------------------------------------------
    def _probe(
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

    def _walk(
        self,
        multipliers: np.ndarray,
        k: int,
        budgets: np.ndarray,
        found: list[tuple[float, np.ndarray, np.ndarray]],
        hull: list[tuple[float, float]] | None = None,
    ) -> tuple[np.ndarray, float, list[np.ndarray]]:
        """Maximise the Lagrangian over λ_k (the others fixed) by walking the lower convex hull of
        (c_k, value + Σ_{j≠k} λ_j c_j): exact, one dynamic program per step.

        ``found`` collects every minimiser (value, cost, choice); ``hull`` (for single-budget
        sweeps, where the others are absent) holds known hull points (c_k, value) to start from."""
        lam = multipliers.copy()
        others = np.isfinite(budgets)
        others[k] = False

        def probe(t: float) -> tuple[float, float, float, list[np.ndarray]]:
            lam[k] = t
            value, cost, bound, rest = self._probe(lam, budgets, found)
            if hull is not None:
                hull.append((float(cost[k]), value))
            return float(cost[k]), value + float(lam[others] @ cost[others]), bound, rest

        limit = budgets[k] + self.budget_tolerance(budgets)[k]
        low = high = None
        if hull:
            over = [p for p in hull if p[0] > limit]
            under = [p for p in hull if p[0] <= limit]
            if over and under:
                low, high = min(over), max(under)
        if low is None or high is None:
            cost0, base0, bound, rest = probe(0.0)
            if cost0 <= limit:
                return lam, bound, rest
            low = (cost0, base0)
            t = max(abs(base0), self._objective_scale) / max(cost0 - budgets[k], 1e-300)
            for _ in range(200):
                cost_t, base_t, bound, rest = probe(t)
                if cost_t <= limit:
                    high = (cost_t, base_t)
                    break
                low = (cost_t, base_t)
                t *= 16.0
            else:
                raise RuntimeError("no multiplier meets the budget; check feasibility first")
        bound, rest = -np.inf, []
        for _ in range(1000):
            t = (high[1] - low[1]) / (low[0] - high[0])
            cost_t, base_t, bound, rest = probe(t)
            line = low[1] + t * low[0]
            if base_t + t * cost_t >= line - self._tolerance(line) or cost_t in (low[0], high[0]):
                break  # no hull point below the segment: t is the best λ_k
            if cost_t <= limit:
                high = (cost_t, base_t)
            else:
                low = (cost_t, base_t)
        return lam, bound, rest

    def _cutting_planes(
        self,
        lam: np.ndarray,
        bound: float,
        rest: list[np.ndarray],
        budgets: np.ndarray,
        found: list[tuple[float, np.ndarray, np.ndarray]],
        iterations: int = 40,
        stop: float = 1e-4,
    ) -> tuple[np.ndarray, float, list[np.ndarray]]:
        """Several budgets: maximise the Lagrangian over all λ by Kelley's cutting planes (the
        dual of Dantzig–Wolfe): a small LP over the minimisers found so far proposes λ, one
        dynamic program adds its minimiser, until the LP's value is within ``stop`` (relative) of
        the best bound. The bound need not be the best possible: the enumeration is exact for
        any λ ≥ 0, a better λ only keeps fewer partial assignments."""
        active = np.flatnonzero(np.isfinite(budgets))
        scale_c = self._cost_scale[active]
        scale_v = self._objective_scale
        best = (lam.copy(), bound, rest)
        box = 1e6  # μ = λ·scale_c/scale_v: λ in units of objective scale per cost scale
        for _ in range(iterations):
            values = np.array([item[0] for item in found]) / scale_v
            slopes = (np.array([item[1][active] for item in found]) - budgets[active]) / scale_c
            solved = _max_min_lp(values, slopes, box)
            if solved is None:
                break
            model, mu = solved[0] * scale_v, solved[1]
            trial = np.zeros(self.num_metrics)
            trial[active] = mu * scale_v / scale_c
            _, _, trial_bound, trial_rest = self._probe(trial, budgets, found)
            if trial_bound > best[1]:
                best = (trial, trial_bound, trial_rest)
            if model - best[1] <= max(stop * abs(best[1]), self._tolerance(best[1]) * 10):
                break
        return best

    def _hull_multipliers(
        self, k: int, budgets: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, list[list[np.ndarray]], list[tuple[np.ndarray, float]]]:
        """Exact best multipliers for many single-budget points at once (only metric k finite):
        walk the lower convex hull of (c_k, value) for all points together. Each round brackets
        every pending point by the nearest hull points found so far and runs one batched dynamic
        program at the slopes of those brackets; a bracket with nothing below it is a hull edge,
        its slope the best λ_k of every point inside. Returns λ [P, M], bounds [P], rest tables
        per point and the best hull point within each budget (choice, value)."""
        count = len(budgets)
        limits = budgets[:, k] + np.array([self.budget_tolerance(b)[k] for b in budgets])
        hull_cost: list[float] = []
        hull_value: list[float] = []
        hull_choice: list[np.ndarray] = []

        def probe(ts: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
            lams = np.zeros((len(ts), self.num_metrics))
            lams[:, k] = ts
            totals, choices, rest = self.minimise_many(lams)
            for choice in choices:
                hull_cost.append(float(self.cost(choice)[k]))
                hull_value.append(self.value(choice))
                hull_choice.append(choice)
            return totals, rest

        lams = np.zeros((count, self.num_metrics))
        bounds = np.full(count, -np.inf)
        rests: list[list[np.ndarray]] = [[] for _ in range(count)]
        totals, rest = probe(np.zeros(1))
        done = limits >= hull_cost[0]
        for row in np.flatnonzero(done):
            bounds[row], rests[row] = totals[0], [table[0] for table in rest]
        if not done.all():
            t = self._objective_scale / max(hull_cost[0] - float(limits[~done].min()), 1e-300)
            for _ in range(200):  # a multiplier large enough for the smallest pending budget
                probe(np.array([t]))
                if hull_cost[-1] <= limits[~done].min():
                    break
                t *= 16.0
            else:
                raise RuntimeError("no multiplier meets the budget; check feasibility first")
        for _ in range(10_000):
            pending = np.flatnonzero(~done)
            if not len(pending):
                break
            costs, values = np.array(hull_cost), np.array(hull_value)
            brackets = {}
            for row in pending:
                over = np.flatnonzero(costs > limits[row])
                under = np.flatnonzero(costs <= limits[row])
                low = over[np.lexsort((values[over], costs[over]))[0]]
                high = under[np.lexsort((values[under], -costs[under]))[0]]
                brackets.setdefault((int(low), int(high)), []).append(row)
            keys = list(brackets)
            slopes = np.array(
                [(values[high] - values[low]) / (costs[low] - costs[high]) for low, high in keys]
            )
            first = len(hull_cost)
            totals, rest = probe(slopes)
            for position, (low, high) in enumerate(keys):
                t = slopes[position]
                cost_t, value_t = hull_cost[first + position], hull_value[first + position]
                line = values[low] + t * costs[low]
                edge = value_t + t * cost_t >= line - self._tolerance(line)
                if edge or cost_t in (costs[low], costs[high]):
                    for row in brackets[(low, high)]:
                        lams[row, k] = t
                        bounds[row] = totals[position] - t * budgets[row, k]
                        rests[row] = [table[position] for table in rest]
                        done[row] = True
        costs, values = np.array(hull_cost), np.array(hull_value)
        uppers = []
        for row in range(count):
            fits = np.flatnonzero(costs <= limits[row])
            best = fits[np.argmin(values[fits])]
            uppers.append((hull_choice[best], float(values[best])))
        return lams, bounds, rests, uppers

    def multipliers(
        self,
        budgets: np.ndarray,
        found: list[tuple[float, np.ndarray, np.ndarray]],
        *,
        hull: list[tuple[float, float]] | None = None,
    ) -> tuple[np.ndarray, float, list[np.ndarray]]:
        """Lagrange multipliers for the budget rows: exact hull walk for one budget; for several,
        one walk per budget then cutting planes. Returns (λ [M], lower bound, rest tables)."""
        lam = np.zeros(self.num_metrics)
        active = np.flatnonzero(np.isfinite(budgets))
        if not len(active):
            _, _, bound, rest = self._probe(lam, budgets, found)
            return lam, bound, rest
        bound, rest = -np.inf, []
        for k in active:
            lam, bound, rest = self._walk(lam, int(k), budgets, found, hull)
        if len(active) > 1:
            lam, bound, rest = self._cutting_planes(lam, bound, rest, budgets, found)
        return lam, bound, rest

    # -- upper bounds --------------------------------------------------------------------------
    def _move_deltas(self, choice: np.ndarray) -> np.ndarray:
        """[U, W] objective change of moving unit u alone to option f (pairs included)."""
        delta = self._scores - self._scores[self._units, choice][:, None]
        if len(self._pair_first):
            pairs = np.arange(len(self._pair_first))
            first, second = choice[self._pair_first], choice[self._pair_second]
            now = self._pair_matrix[pairs, first, second][:, None]
            np.add.at(delta, self._pair_first, self._pair_matrix[pairs, :, second] - now)
            np.add.at(delta, self._pair_second, self._pair_matrix[pairs, first, :] - now)
        return delta

    def improve(
        self, choice: np.ndarray, budgets: np.ndarray, multipliers: np.ndarray | None = None
    ) -> tuple[np.ndarray, float]:
        """Greedy local search from a feasible choice: the best single-unit change, else the best
        change of two units at once (one may pay for the other), while the objective falls and the
        budgets hold."""
        choice = choice.copy()
        limit = budgets + self.budget_tolerance(budgets)
        width = self._scores.shape[1]
        lam = np.zeros(self.num_metrics) if multipliers is None else multipliers
        value = self.value(choice)
        for _ in range(4 * self.num_units + 4):
            delta = self._move_deltas(choice)
            cost = self.cost(choice)
            step = self._costs - self._costs[self._units, choice][:, None, :]
            fits = np.all(cost + step <= limit, axis=-1) & np.isfinite(delta)
            single = np.where(fits, delta, np.inf)
            u, f = np.unravel_index(int(np.argmin(single)), single.shape)
            tolerance = self._tolerance(value)
            if single[u, f] < -tolerance:
                choice[u] = f
                value = self.value(choice)
                continue
            # Two units: pool the moves best by objective and by Lagrangian-reduced objective.
            flat = np.where(np.isfinite(delta), delta, np.inf).ravel()
            flat_step = step.reshape(-1, self.num_metrics)
            reduced = flat + np.where(np.isfinite(flat), flat_step @ lam, 0)
            pool = np.unique(np.r_[np.argsort(flat)[:48], np.argsort(reduced)[:48]])
            pool = pool[np.isfinite(flat[pool])]
            total = flat[pool][:, None] + flat[pool][None, :]
            fits2 = np.all(
                cost + flat_step[pool][:, None, :] + flat_step[pool][None, :, :] <= limit, axis=-1
            )
            owner = pool // width
            total = np.where(fits2 & (owner[:, None] != owner[None, :]), total, np.inf)
            moved = False
            for index in np.argsort(total, axis=None)[:8]:
                a, b = np.unravel_index(int(index), total.shape)
                if not total[a, b] < 0:
                    break
                trial = choice.copy()
                trial[owner[a]], trial[owner[b]] = pool[a] % width, pool[b] % width
                trial_value = self.value(trial)
                if trial_value < value - tolerance and self.meets(self.cost(trial), budgets):
                    choice, value, moved = trial, trial_value, True
                    break
            if not moved:
                break
        return choice, value

    # -- exact solve ---------------------------------------------------------------------------
    def _enumerate(
        self,
        multipliers: np.ndarray,
        rests: Sequence[np.ndarray],
        budgets: np.ndarray,
        thresholds: np.ndarray,
    ) -> tuple[list[tuple[np.ndarray, float] | None], int]:
        """For P budget points at once (rows of ``multipliers`` [P, M], ``budgets`` [P, M] with the
        same metrics finite in every row, and of the rest tables ``rests[u]`` [P, states after u]):
        every partial assignment that can still complete to a
        solution with Lagrangian value ≤ the point's threshold within its budgets, up to dominance
        within a state (see `solve`). Points share the unit loop, so the per-unit overhead of
        numpy calls is paid once for the whole sweep. Returns the best complete survivor per
        point (choice, value) or None, and the most labels kept at one unit."""
        points = len(thresholds)
        active = np.flatnonzero(np.isfinite(budgets[0]))
        lam = multipliers
        shift = (lam[:, active] * budgets[:, active]).sum(axis=1)  # [P]
        limit = (
            budgets[:, active] + np.array([self.budget_tolerance(b) for b in budgets])[:, active]
        )
        tolerance = np.array([self._tolerance(t) for t in thresholds])
        cutoff = thresholds + tolerance + shift  # compare Lagrangian value + rest with this
        unit_reduced = np.einsum("uwm,pm->puw", self._costs, lam)  # [P, U, W]
        room = limit[:, None, :] - self._rest_cost[None, 1:, active]  # [P, U, K]
        point = np.arange(points)  # the budget point of each label
        flat = np.zeros(points, dtype=np.int64)  # state index over the active units
        values = np.zeros(points)  # objective of the prefix
        reduced = np.zeros(points)  # its Lagrangian value: objective + λ·costs
        costs = np.zeros((points, self.num_metrics))
        parents, options = [], []
        most = 1
        for u in range(self.num_units):
            n = self.sizes[u]
            unit_costs = self._costs[u, :n]
            states_after = len(self._next_base[u + 1]) if u + 1 < self.num_units else 1
            # One flat table per unit: rest minimum by (point, state after u).
            rest_flat = rests[u].ravel()
            grid = self._scores[u, :n] + self._pair_rows[u][flat]  # [labels, n]
            next_flat = self._next_base[u][flat][:, None] + self._own_stride[u]
            bound = grid + unit_reduced[:, u, :n][point]
            bound += (reduced - cutoff[point])[:, None]
            bound += rest_flat[(point * states_after)[:, None] + next_flat]
            keep = bound <= 0
            for position, k in enumerate(active):
                keep &= unit_costs[None, :, k] <= (room[point, u, position] - costs[:, k])[:, None]
            parent, option = np.nonzero(keep)
            step = grid[parent, option]
            point = point[parent]
            values = values[parent] + step
            reduced = reduced[parent] + step + unit_reduced[point, u, option]
            flat = next_flat[parent, option]
            costs = costs[parent] + unit_costs[option]
            if len(values) > 16:
                kept = _dominance(point * states_after + flat, costs[:, active], values)
                parent, option, values, point = (
                    parent[kept],
                    option[kept],
                    values[kept],
                    point[kept],
                )
                reduced, flat, costs = reduced[kept], flat[kept], costs[kept]
            parents.append(parent)
            options.append(option)
            most = max(most, len(values))
            if len(values) > self.max_labels:
                raise LabelLimit(f"{len(values)} partial assignments at unit {u}")
        best: list[tuple[np.ndarray, float] | None] = [None] * points
        if len(values):
            order = np.lexsort((values, point))
            first = order[np.concatenate([[True], point[order][1:] != point[order][:-1]])]
            for index in first:
                choice = np.zeros(self.num_units, dtype=np.int64)
                label = int(index)
                for unit in range(self.num_units - 1, -1, -1):
                    choice[unit] = options[unit][label]
                    label = int(parents[unit][label])
                best[int(point[index])] = (choice, float(values[index]))
        return best, most

    def solve_many(
        self,
        budgets: np.ndarray,
        *,
        uppers: Sequence[tuple[np.ndarray, float] | None] | None = None,
        hull: list[tuple[float, float]] | None = None,
        first_gap: float = 1e-4,
        local_search: bool = True,
    ) -> list[Solution | None]:
        """The optimum under each row of ``budgets`` [P, M] (inf where absent; the same metrics
        finite in every row), or None where no assignment meets the row. ``uppers``: known
        feasible (choice, value) per row. ``hull``: shared hull points for single-budget sweeps.

        Why it is exact: let x* be optimal. For feasible x, L(x) = value(x) + Σ λ_k (c_k(x) − B_k)
        ≤ value(x). A prefix of x* has Lagrangian value plus the exact rest minimum ≤ L(x*) ≤
        value(x*), and its cost plus the cheapest rest meets every budget, so at any threshold
        T ≥ value(x*) neither test drops it; a prefix dropped by dominance is replaced by one with
        the same state and no larger value and costs, whose completion by x*'s rest is as good and
        as cheap. So once some feasible solution has value ≤ T, the best survivor is optimal.
        Thresholds start just above the bound (few survivors when the bound is tight) and double
        towards the best known value; with none known, until the enumeration is complete.
        """
        budgets = np.atleast_2d(np.asarray(budgets, dtype=float))
        # Rows where one budget alone is below its cheapest assignment have no solution.
        tolerance = np.array([self.budget_tolerance(row) for row in budgets])
        possible = np.all(budgets + tolerance >= self._rest_cost[0], axis=1)
        if not possible.all():
            results: list[Solution | None] = [None] * len(budgets)
            if possible.any():
                rows = np.flatnonzero(possible)
                solved = self.solve_many(
                    budgets[rows],
                    uppers=None if uppers is None else [uppers[row] for row in rows],
                    hull=hull,
                    first_gap=first_gap,
                    local_search=local_search,
                )
                for row, solution in zip(rows, solved):
                    results[row] = solution
            return results
        count = len(budgets)
        lams, bounds, rests = [], np.zeros(count), []
        best: list[tuple[np.ndarray, float] | None] = [None] * count
        finite = np.isfinite(budgets)
        if count > 1 and (finite == finite[0]).all() and finite[0].sum() == 1:
            k = int(np.flatnonzero(finite[0])[0])
            lam_rows, bounds, rests, best = self._hull_multipliers(k, budgets)
            lams = list(lam_rows)
            if uppers is not None:
                for row, upper in enumerate(uppers):
                    if upper is not None and upper[1] < best[row][1]:
                        best[row] = upper
        for row, point in enumerate(budgets if not len(lams) else []):
            found: list[tuple[float, np.ndarray, np.ndarray]] = []
            lam, bounds[row], rest = self.multipliers(point, found, hull=hull)
            lams.append(lam)
            rests.append(rest)
            if not np.isfinite(point).any():  # no budget: the minimiser is optimal
                best[row] = (found[-1][2], found[-1][0])
                continue
            feasible = [item for item in found if self.meets(item[1], point)]
            if feasible:
                _, _, choice = min(feasible, key=lambda item: item[0])
                best[row] = (
                    self.improve(choice, point, lam)
                    if local_search
                    else (choice, self.value(choice))
                )
            upper = None if uppers is None else uppers[row]
            if upper is not None and (best[row] is None or upper[1] < best[row][1]):
                best[row] = upper
        gaps = np.maximum(first_gap * np.abs(bounds), [self._tolerance(b) for b in bounds])
        labels = np.ones(count, dtype=np.int64)
        pending = [row for row in range(count) if np.isfinite(budgets[row]).any()]
        # Rest tables per unit for all points at once: [points, states after the unit].
        stacked = [
            np.stack([np.asarray(rest[u]).ravel() for rest in rests]) for u in range(self.num_units)
        ]
        infeasible: set[int] = set()
        while pending:
            thresholds = bounds[pending] + gaps[pending]
            for position, row in enumerate(pending):
                if best[row] is not None and best[row][1] <= thresholds[position] + 1e-12 * abs(
                    thresholds[position]
                ):
                    thresholds[position] = best[row][1]
            found_best, most = self._enumerate(
                np.array([lams[row] for row in pending]),
                [table[pending] for table in stacked],
                budgets[pending],
                thresholds,
            )
            still = []
            for position, row in enumerate(pending):
                labels[row] = max(labels[row], most)
                candidate = found_best[position]
                if candidate is not None and (best[row] is None or candidate[1] < best[row][1]):
                    best[row] = candidate
                if best[row] is not None and best[row][1] <= thresholds[position]:
                    continue  # every solution with value <= threshold was enumerated
                if best[row] is None and thresholds[position] > abs(bounds[row]) + 2 * (
                    self._objective_scale
                ):
                    infeasible.add(row)  # the enumeration was complete and found nothing
                    continue
                gaps[row] = (
                    2 * gaps[row]
                    if best[row] is None
                    else min(2 * gaps[row], best[row][1] - bounds[row])
                )
                still.append(row)
            pending = still
        results: list[Solution | None] = []
        for row in range(count):
            if row in infeasible or best[row] is None:
                results.append(None)
                continue
            choice = best[row][0]
            results.append(
                Solution(
                    choice, self.value(choice), self.cost(choice), bounds[row], int(labels[row])
                )
            )
        return results

    def solve(
        self, budgets: np.ndarray, *, upper: tuple[np.ndarray, float] | None = None
    ) -> Solution | None:
        """The optimum under ``budgets`` [M] (inf where absent), or None if none meets them."""
        return self.solve_many(np.asarray(budgets, dtype=float)[None, :], uppers=[upper])[0]

    def sweep(
        self, metric: int, values: Sequence[float], budgets: np.ndarray
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


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """HiGHS prints a banner when the first solver object is created, and its MIP solver can print
    a line on the C-level stdout even with output off; keep ours clean."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)


def _max_min_lp(
    values: np.ndarray, slopes: np.ndarray, box: float
) -> tuple[float, np.ndarray] | None:
    """max_{0 ≤ μ ≤ box} min_i values_i + slopes_i·μ, as the LP max z s.t. z − slopes_i·μ ≤ values_i
    (HiGHS; a few columns, one row per cut). Returns (max, μ) or None if HiGHS fails."""
    cuts, dims = slopes.shape
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = dims + 1, cuts
    lp.col_cost_ = np.r_[np.zeros(dims), -1.0]
    lp.col_lower_ = np.r_[np.zeros(dims), -highspy.kHighsInf]
    lp.col_upper_ = np.r_[np.full(dims, box), highspy.kHighsInf]
    lp.row_lower_ = np.full(cuts, -highspy.kHighsInf)
    lp.row_upper_ = values
    matrix = np.column_stack([-slopes, np.ones(cuts)])
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.start_ = np.arange(0, cuts * (dims + 1) + 1, dims + 1)
    lp.a_matrix_.index_ = np.tile(np.arange(dims + 1), cuts)
    lp.a_matrix_.value_ = matrix.ravel()
    with quiet_stdout():
        highs = highspy.Highs()
        highs.setOptionValue("output_flag", False)
        # HiGHS keeps one thread scheduler per process, fixed by the first solve: use the same
        # single thread as the allocation MIP (lcpaq.allocation.problem), or that one fails later.
        highs.setOptionValue("threads", 1)
        highs.passModel(lp)
        highs.run()
    if highs.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        return None
    solution = np.asarray(highs.getSolution().col_value)
    return float(solution[-1]), solution[:-1]


def _dominance(groups: np.ndarray, costs: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Which labels to keep: drop a label when another of the same group is no worse in every
    cost and the value (of identical labels the first stays). Exact for one cost; for several,
    each label is checked against its group's best-valued earlier label in two cost orders and
    against its nearest neighbours, which finds most dominated labels and never a wrong one."""
    count = len(values)
    num_costs = costs.shape[1]
    base = np.arange(count)
    if num_costs == 0:
        order = np.lexsort((base, values, groups))
        first = np.concatenate([[True], groups[order][1:] != groups[order][:-1]])
        kept = np.zeros(count, dtype=bool)
        kept[order[first]] = True
        return kept
    if num_costs == 1:
        # Equal costs in either order are fine: the later one may survive, never wrongly go.
        order = np.lexsort((costs[:, 0], groups))
        sorted_groups = groups[order]
        new_group = np.concatenate([[True], sorted_groups[1:] != sorted_groups[:-1]])
        kept = np.zeros(count, dtype=bool)
        kept[order[_undominated(values[order], new_group)]] = True
        return kept
    dominated = np.zeros(count, dtype=bool)
    for lead in range(2):
        keys = [base, values] + [costs[:, (lead + k) % num_costs] for k in range(num_costs)][::-1]
        order = np.lexsort((*keys, groups))
        sorted_groups, sorted_values = groups[order], values[order]
        sorted_costs = costs[order]
        new_group = np.concatenate([[True], sorted_groups[1:] != sorted_groups[:-1]])
        # The best-valued earlier label of the group (ties: the earliest), via exact ranks.
        rank = np.empty(count, dtype=np.int64)
        rank[np.argsort(sorted_values, kind="stable")] = np.arange(count)
        group = np.cumsum(new_group) - 1
        key = rank - group * (count + 1)
        running = np.minimum.accumulate(key)
        before = np.concatenate([[np.iinfo(np.int64).max], running[:-1]])
        has = ~new_group
        by_rank = np.empty(count, dtype=np.int64)
        by_rank[rank] = np.arange(count)
        candidate = np.where(has, by_rank[np.clip(before + group * (count + 1), 0, count - 1)], 0)
        check = has & (sorted_values[candidate] <= sorted_values)
        check &= np.all(sorted_costs[candidate] <= sorted_costs, axis=1)
        dominated[order[check]] = True
        if lead == 0:
            for lag in range(1, 5):
                if lag >= count:
                    break
                same = sorted_groups[lag:] == sorted_groups[:-lag]
                worse = np.all(sorted_costs[lag:] >= sorted_costs[:-lag], axis=1)
                worse &= sorted_values[lag:] >= sorted_values[:-lag]
                dominated[order[lag:][same & worse]] = True
    return ~dominated


# -- multiple-choice knapsack without pairs ---------------------------------------------------


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
    parents, options = [], []
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
