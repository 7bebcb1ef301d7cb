"""Which exact method solves an allocation, and the fallback between them (METHOD §3–§4).

Input: the `Units` of a problem, budgets and cost-weight factors. Output: an `Outcome` (a column per
unit, status, gap, time, method) per solve or per point of a budget sweep. ``solver="auto"`` uses
the fastest exact method measured in ``scripts/bench_allocate.py``: the multiple-choice knapsack DP
(`lcpaq.allocation.knapsack`) for one budget without pairs, the dynamic program of
`lcpaq.allocation.exact` for pairs in a narrow band of layers (and batched sweeps), HiGHS
(`lcpaq.allocation.highs`) otherwise, and HiGHS again whenever a dynamic program keeps too many
partial assignments. ``dp`` and ``highs`` force one method. Every solve remembers its optimum, and
later solves start from the best one that meets their budgets. Numpy and highspy; no torch.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from lcpaq.allocation.budgets import Budget
from lcpaq.allocation.exact import BUDGET_RTOL, ChainSolver, LabelLimit, StateSpaceTooLarge
from lcpaq.allocation.frontier import safe_pareto_mask
from lcpaq.allocation.highs import HighsModel, quiet_stdout
from lcpaq.allocation.knapsack import knapsack_optima
from lcpaq.allocation.result import Outcome
from lcpaq.allocation.units import Units
from lcpaq.errors import InputError

SOLVERS = ("auto", "dp", "highs")
#: Past this many Pareto points in half of the layers the knapsack DP hands over to HiGHS (54
#: ResNet-50 layers × 8 formats need about 3,000; 200 layers about 85,000, which takes seconds).
KNAPSACK_MAX_LABELS = 100_000


@dataclass
class Prepared:
    """The options per unit for one set of active metrics, and their dynamic program."""

    metrics: tuple[str, ...]
    columns: list[np.ndarray]  # option position -> format column, per unit
    costs: list[np.ndarray]  # [n_u, len(metrics)] per unit
    chain: ChainSolver | None


@dataclass(frozen=True)
class _Exact:
    """A dynamic program ready for one solve: options, the chain (None without pairs) and the
    per-unit scores with the cost weights folded in."""

    prepared: Prepared
    chain: ChainSolver | None
    scores: list[np.ndarray]


class Solvers:
    """The exact methods of one problem (see the module docstring).

    Args:
        units: the problem over units.
        solver: ``auto``, ``dp`` or ``highs``.
        max_states: the largest dynamic-program table per unit before ``auto`` uses HiGHS.
        linearization, mip_rel_gap, time_limit_s: the HiGHS model's settings.
    """

    def __init__(
        self,
        units: Units,
        *,
        solver: str,
        max_states: int,
        linearization: str,
        mip_rel_gap: float,
        time_limit_s: float,
    ) -> None:
        self.units = units
        self.solver = solver
        self.max_states = max_states
        self.linearization = linearization
        self.mip_rel_gap = mip_rel_gap
        self.time_limit_s = time_limit_s
        self.found: list[np.ndarray] = []  # unit choices of earlier solves, for warm starts
        self._highs: HighsModel | None = None
        self._prepared: dict[tuple[str, ...], Prepared] = {}

    @property
    def highs(self) -> HighsModel:
        """The HiGHS model, built on first use."""
        if self._highs is None:
            with quiet_stdout():  # HiGHS prints a banner when the first model is created
                self._highs = HighsModel(
                    self.units, self.linearization, self.mip_rel_gap, self.time_limit_s
                )
        return self._highs

    def remember(self, choice: np.ndarray) -> None:
        if not any(np.array_equal(choice, found) for found in self.found):
            self.found.append(choice)

    # -- dynamic programs ---------------------------------------------------------------------
    def prepare(self, metrics: tuple[str, ...]) -> Prepared:
        """Options per unit pruned for these cost metrics only (budgets and weights on other
        metrics are absent, so candidates that differ only there can go) and, when the pair graph
        allows, the dynamic program over them."""
        if metrics not in self._prepared:
            units = self.units
            stacked = np.zeros((*units.allowed.shape, len(metrics)))
            for k, metric in enumerate(metrics):
                stacked[..., k] = units.costs[metric]
            options = safe_pareto_mask(stacked, units.scores, units.allowed, units.pairs)
            columns = [np.flatnonzero(row) for row in options]
            pairs = {
                (u, v): matrix[np.ix_(columns[u], columns[v])]
                for (u, v), matrix in units.pairs.items()
            }
            costs = [stacked[u, cols] for u, cols in enumerate(columns)]
            try:
                chain: ChainSolver | None = ChainSolver(
                    [units.scores[u, cols] for u, cols in enumerate(columns)],
                    costs,
                    pairs,
                    max_states=self.max_states,
                )
            except StateSpaceTooLarge:
                chain = None
            self._prepared[metrics] = Prepared(metrics, columns, costs, chain)
        return self._prepared[metrics]

    def limits(self, budgets: Sequence[Budget], metrics: Sequence[str]) -> np.ndarray:
        """Budget per metric without the cost offsets (inf where none is given)."""
        offsets = self.units.offsets
        given = {budget.metric: budget.value - offsets[budget.metric] for budget in budgets}
        return np.array([given.get(metric, np.inf) for metric in metrics])

    def _exact(
        self, budgets: Sequence[Budget], factors: Mapping[str, float], *, sweep: bool = False
    ) -> _Exact | None:
        """The dynamic program for these budgets and weights, or None where ``auto`` prefers
        HiGHS: a single solve without pairs under several budgets (HiGHS' LP bound is tight there;
        a sweep still goes to the batched program, which shares its passes over the layers between
        the points: 2.4× faster than HiGHS on the 54-layer size+BitOps curve of
        scripts/bench_allocate.py), and a pair graph too wide for the table limit."""
        if self.solver == "highs":
            return None
        pairs = self.units.pairs
        if self.solver == "auto" and not pairs and len(budgets) >= 2 and not sweep:
            return None
        named = {budget.metric for budget in budgets} | set(factors)
        prepared = self.prepare(tuple(m for m in self.units.metrics if m in named))
        if prepared.chain is None and pairs:
            if self.solver == "dp":
                raise InputError(
                    "solver 'dp': the pairwise terms link too many layers at once for the dynamic "
                    f"program (more than {self.max_states} states); use solver 'auto' or 'highs'"
                )
            return None
        scores = self.units.weighted_scores(factors)
        unit_scores = [scores[u, cols] for u, cols in enumerate(prepared.columns)]
        chain = prepared.chain
        if chain is not None and factors:
            chain = chain.with_scores(unit_scores)
        return _Exact(prepared, chain, unit_scores)

    def _warm(
        self, prepared: Prepared, chain: ChainSolver, limits: np.ndarray
    ) -> tuple[np.ndarray, float] | None:
        """The best earlier optimum that meets these limits, as option positions (a bound)."""
        best = None
        for found in self.found:
            positions = []
            for u, column in enumerate(found):
                where = np.flatnonzero(prepared.columns[u] == column)
                if not len(where):
                    break
                positions.append(int(where[0]))
            else:
                choice = np.array(positions)
                if chain.meets(chain.cost(choice), limits):
                    value = chain.value(choice)
                    if best is None or value < best[1]:
                        best = (choice, value)
        return best

    def _positions(
        self, exact: _Exact, budgets: Sequence[Budget], swept: tuple[str, np.ndarray] | None
    ) -> tuple[list[np.ndarray | None], str] | None:
        """Option positions per unit of the optimum (None: infeasible) for ``budgets``, or for
        every value of ``swept`` = (metric, values without offset) with the others held, and the
        method. The knapsack DP when there is one budget and no pairs, else the chain. None when
        a DP kept too many labels: the caller falls back to HiGHS (an error for ``dp``)."""
        prepared, chain = exact.prepared, exact.chain
        limits = self.limits(budgets, prepared.metrics)
        try:
            if not self.units.pairs and len(budgets) == 1:
                metric, values = swept or (budgets[0].metric, None)
                k = prepared.metrics.index(metric)
                values = limits[k : k + 1] if values is None else values
                tolerance = BUDGET_RTOL * max(float(np.abs(values).max()), 1e-300)
                costs = [c[:, k] for c in prepared.costs]
                found = knapsack_optima(exact.scores, costs, values, tolerance, KNAPSACK_MAX_LABELS)
                return [None if item is None else item[0] for item in found], "knapsack"
            assert chain is not None
            if swept is None:
                solutions = [chain.solve(limits, upper=self._warm(prepared, chain, limits))]
            else:
                solutions = chain.sweep(prepared.metrics.index(swept[0]), swept[1], limits)
            return [None if item is None else item.choice for item in solutions], "dp"
        except LabelLimit:
            if self.solver == "dp":
                raise
            return None

    def _columns(self, prepared: Prepared, positions: np.ndarray) -> np.ndarray:
        return np.array([prepared.columns[u][j] for u, j in enumerate(positions)])

    # -- solves -----------------------------------------------------------------------------
    def run_highs(self, budgets: Sequence[Budget], factors: Mapping[str, float]) -> Outcome:
        """HiGHS under ``budgets``, from the best earlier optimum that meets them."""
        highs = self.highs
        starts = [c for c in self.found if self.units.meets(c, budgets)]
        start = min(starts, key=lambda c: self.units.weighted(c, factors)) if starts else None
        outcome = highs.run(budgets, factors, start)
        if outcome.choice is not None:
            self.remember(outcome.choice)
        return outcome

    def run(self, budgets: Sequence[Budget], factors: Mapping[str, float]) -> Outcome:
        """Solve under ``budgets`` with objective weights ``factors`` (cost weight / scale)."""
        exact = self._exact(budgets, factors)
        if exact is None:
            return self.run_highs(budgets, factors)
        start = time.perf_counter()
        answer = self._positions(exact, budgets, None)
        elapsed = time.perf_counter() - start
        if answer is None:
            return self.run_highs(budgets, factors)
        (positions,), solver = answer
        if positions is None:
            return Outcome(None, "Infeasible", 0.0, elapsed, solver)
        choice = self._columns(exact.prepared, positions)
        self.remember(choice)
        return Outcome(choice, "Optimal", 0.0, elapsed, solver)

    def _sweep_highs(
        self,
        metric: str,
        values: np.ndarray,
        others: Sequence[Budget],
        factors: Mapping[str, float],
    ) -> list[Outcome | None]:
        """HiGHS over the sweep, largest budget first. An optimum whose ``metric`` already meets
        the next (smaller) budget stays optimal there (the feasible set only shrank), so it is
        reused without a solve; otherwise HiGHS re-solves with new row bounds, warm-started."""
        results: list[Outcome | None] = []
        previous: Outcome | None = None
        for value in values:
            known = None if previous is None else previous.choice
            if known is not None and self.units.value(metric, known) <= value:
                results.append(previous)
                continue
            outcome = self.run_highs([*others, Budget(metric, float(value))], factors)
            results.append(outcome if outcome.choice is not None else None)
            previous = outcome if outcome.choice is not None else previous
        return results

    def sweep(
        self,
        metric: str,
        values: np.ndarray,
        others: Sequence[Budget],
        factors: Mapping[str, float],
    ) -> list[Outcome | None]:
        """Optima over ``values`` (descending) on ``metric``: one exact multiple-choice-knapsack
        pass for every value when there are no pairs and no other budget; the batched dynamic
        program (`ChainSolver.sweep`) when the pairs allow; HiGHS otherwise."""
        budgets = [*others, Budget(metric, float(values[0]))]
        exact = self._exact(budgets, factors, sweep=True)
        if exact is None:
            return self._sweep_highs(metric, values, others, factors)
        swept = values - self.units.offsets[metric]
        start = time.perf_counter()
        answer = self._positions(exact, budgets, (metric, swept))
        if answer is None:
            return self._sweep_highs(metric, values, others, factors)
        positions, solver = answer
        each = (time.perf_counter() - start) / max(len(values), 1)
        return [
            None
            if item is None
            else Outcome(self._columns(exact.prepared, item), "Optimal", 0.0, each, solver)
            for item in positions
        ]
