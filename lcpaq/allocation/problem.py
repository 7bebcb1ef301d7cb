"""Choose one format per layer by an integer linear program (METHOD §4), proven optimal (allocate).

Input: a `CandidateTable`, scores [L, F], an ``allowed`` mask [L, F], a `CostModel`, budgets
(`lcpaq.allocation.budgets`), tied layer groups and optional pairwise terms. Output: an `Allocation`
(``allocation.json``): the format of each layer, predicted loss increase, every cost metric, the use
of every budget, solver status and time; or a model-level Pareto curve (`pareto_curve`). Numpy and
highspy only.

Objective: minimise Σ s[u, f] + Σ_{(u,v)} C_uv(f, g) (`lcpaq.allocation.objective`) over one format
per unit of tied layers (`lcpaq.allocation.units`), every cost metric ≤ its budget (an absent budget
is an infinite bound). ``cost_weights`` {metric: λ_k ≥ 0} add Σ_k λ_k·cost_k/B_k, B_k the budget on
metric k or, without one, its largest achievable value; hard budgets stay hard. Candidates are
pruned first with the safe rule of METHOD §3 over every cost dimension
(`lcpaq.allocation.frontier.safe_pareto_mask`), and again per solve over the metrics that are
budgeted or weighted. Which exact method proves each optimum (``solver=``: ``auto``, ``dp``,
``highs``) is `lcpaq.allocation.solvers`; the HiGHS model (RLT or McCormick products) is
`lcpaq.allocation.highs`; why budgets conflict is `lcpaq.allocation.diagnose`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from lcpaq.allocation import pareto
from lcpaq.allocation.budgets import BINDING_TOLERANCE, Budget, tie_units
from lcpaq.allocation.costs import BITS_PER_MB, COST_METRICS, CostModel, build_cost_model
from lcpaq.allocation.diagnose import InfeasibleBudgets, diagnose, feasible_alone
from lcpaq.allocation.objective import objective_value, weighted_objective
from lcpaq.allocation.result import Allocation, BudgetUse, Outcome, ParetoPoint
from lcpaq.allocation.solvers import SOLVERS, Solvers
from lcpaq.allocation.table import CandidateTable
from lcpaq.allocation.units import merge_units
from lcpaq.errors import InputError

LINEARIZATIONS = ("rlt", "mccormick")


def check_pairs(
    pairwise: Mapping[tuple[int, int], np.ndarray], num_layers: int, num_formats: int
) -> dict[tuple[int, int], np.ndarray]:
    """Pairwise terms as finite [F, F] float arrays keyed (i, j), (j, i) folded into (i, j)."""
    checked: dict[tuple[int, int], np.ndarray] = {}
    for (i, j), matrix in pairwise.items():
        matrix = np.asarray(matrix, dtype=float)
        if not (0 <= i < num_layers and 0 <= j < num_layers) or i == j:
            raise ValueError(f"pairwise term ({i}, {j}) must join two different layers")
        if matrix.shape != (num_formats, num_formats) or not np.isfinite(matrix).all():
            raise ValueError(f"pairwise term ({i}, {j}) must be a finite [F, F] array")
        if (j, i) in checked:
            checked[(j, i)] = checked[(j, i)] + matrix.T
        else:
            checked[(i, j)] = checked.get((i, j), 0.0) + matrix
    return checked


class AllocationProblem:
    """The ILP for one candidate table, scores, allowed candidates, costs, ties and pairwise terms.

    Args:
        table: the candidate table [L, F].
        scores: [L, F] separable predicted loss increases.
        allowed: [L, F] candidates the solver may pick (fixed layers restricted to one format).
        constant_size_bits: the size of everything not quantized (used when ``costs`` is None).
        costs: a `CostModel`; default: ``avg-bits`` and ``size-mb`` from the table.
        pairwise: {(i, j): C [F, F]} layer-index pairs; C[f, g] is added when layer i holds f and
            layer j holds g.
        ties: groups of layer names that must share one format.
        linearization: ``rlt`` (default, tighter) or ``mccormick`` for the pairwise products.
        prune: drop candidates by the safe Pareto rule first (never changes the optimum).
        solver: ``auto`` (default): an exact dynamic program where it is fastest (pairs in a
            narrow band of layers; one budget without pairs), HiGHS otherwise; ``dp``: the dynamic
            program only (an error where the pair graph is too wide); ``highs``: HiGHS only.
        max_states: the largest dynamic-program table per layer before ``auto`` uses HiGHS.
    """

    def __init__(
        self,
        table: CandidateTable,
        scores: np.ndarray,
        allowed: np.ndarray,
        *,
        constant_size_bits: float = 0.0,
        costs: CostModel | None = None,
        pairwise: Mapping[tuple[int, int], np.ndarray] | None = None,
        ties: Sequence[Sequence[str]] = (),
        linearization: str = "rlt",
        prune: bool = True,
        time_limit_s: float = 60.0,
        mip_rel_gap: float = 1e-6,
        solver: str = "auto",
        max_states: int = 1 << 16,
    ) -> None:
        if scores.shape != allowed.shape or scores.shape != table.error_sq.shape:
            raise ValueError("scores, allowed mask and candidate table must have the same shape")
        empty = [table.layer_names[row] for row in range(len(allowed)) if not allowed[row].any()]
        if empty:
            raise InputError(f"layer {empty[0]!r} has no allowed candidate format")
        if linearization not in LINEARIZATIONS:
            raise InputError(
                f"unknown linearization {linearization!r}; known: {', '.join(LINEARIZATIONS)}"
            )
        if solver not in SOLVERS:
            raise InputError(f"unknown solver {solver!r}; known: {', '.join(SOLVERS)}")
        self.table = table
        self.scores = np.asarray(scores, dtype=float)
        self.constant_size_bits = float(constant_size_bits)
        self.costs = costs or build_cost_model(table, constant_size_bits=constant_size_bits)
        self.pairwise = check_pairs(pairwise or {}, *scores.shape)
        self.unit = tie_units(table.layer_names, ties)
        self.units = merge_units(
            table.layer_names,
            self.scores,
            allowed,
            self.costs,
            self.pairwise,
            self.unit,
            prune=prune,
        )
        self.allowed = self.units.allowed[self.unit]
        self.solvers = Solvers(
            self.units,
            solver=solver,
            max_states=max_states,
            linearization=linearization,
            mip_rel_gap=mip_rel_gap,
            time_limit_s=time_limit_s,
        )

    # -- costs and objective ---------------------------------------------------------------
    def metric_value(self, metric: str, choice: np.ndarray) -> float:
        """A cost metric of an assignment given as a format index per layer."""
        return self.costs.value(metric, choice)

    def objective(self, choice: np.ndarray) -> float:
        """Predicted loss increase: Σ scores plus the pairwise terms of the chosen formats."""
        return objective_value(self.scores, self.pairwise, choice)

    def smallest_achievable(self, metric: str) -> float:
        """The smallest value of ``metric`` any allowed assignment (ties respected) reaches."""
        self.costs.require(metric)
        coefficients = np.where(self.units.allowed, self.units.costs[metric], np.inf)
        return float(coefficients.min(axis=1).sum() + self.costs.offsets[metric])

    def largest_achievable(self, metric: str) -> float:
        """The largest value of ``metric`` any allowed assignment (ties respected) reaches."""
        self.costs.require(metric)
        coefficients = np.where(self.units.unpruned, self.units.costs[metric], -np.inf)
        return float(coefficients.max(axis=1).sum() + self.costs.offsets[metric])

    def cost_factors(
        self, budgets: Sequence[Budget], cost_weights: Mapping[str, float] | None
    ) -> dict[str, float]:
        """λ_k / B_k per weighted metric: the objective adds Σ_k λ_k·cost_k/B_k. B_k is the budget
        on metric k when one is given, else the largest value the metric can take (so λ_k reads
        as "loss per whole range" either way). Weights must be finite and ≥ 0 (a negative weight
        would reward cost and void the Pareto pruning)."""
        factors: dict[str, float] = {}
        limits = {budget.metric: budget.value for budget in budgets}
        for metric, weight in (cost_weights or {}).items():
            if metric not in COST_METRICS:
                raise InputError(
                    f"cost weight on unknown metric {metric!r}; known: {', '.join(COST_METRICS)}"
                )
            self.costs.require(metric)
            weight = float(weight)
            if not np.isfinite(weight) or weight < 0:
                raise InputError(f"cost weight {metric}={weight:g} must be a finite number >= 0")
            if weight == 0:
                continue
            scale = limits.get(metric, self.largest_achievable(metric))
            if scale <= 0:
                raise InputError(f"cost weight on {metric}: the metric is 0 for every assignment")
            factors[metric] = weight / scale
        return factors

    def weighted_objective(self, choice: np.ndarray, factors: Mapping[str, float]) -> float:
        """The minimised objective of an assignment: loss increase + Σ_k factor_k·cost_k."""
        return weighted_objective(
            self.objective(choice), lambda metric: self.metric_value(metric, choice), factors
        )

    # -- the HiGHS model, for other MIP solvers (the benchmark) --------------------------------
    def milp_arrays(self, budgets: Sequence[Budget]) -> dict[str, np.ndarray]:
        """`lcpaq.allocation.highs.HighsModel.milp_arrays` of this problem."""
        return self.solvers.highs.milp_arrays(budgets)

    def decode(self, column_values: np.ndarray) -> np.ndarray:
        """Format index per layer from a solution of `milp_arrays` (any MIP solver's)."""
        choice = self.solvers.highs.decode(column_values)
        if (choice < 0).any():
            raise ValueError("the solution is not one-hot")
        return choice[self.unit]

    # -- solves ------------------------------------------------------------------------------
    def _check_budgets(self, budgets: Sequence[Budget]) -> None:
        metrics = [budget.metric for budget in budgets]
        if len(set(metrics)) != len(metrics):
            raise InputError(
                f"each budget metric may be given once, got {', '.join(map(str, budgets))}"
            )
        problems = []
        for budget in budgets:
            smallest = self.smallest_achievable(budget.metric)
            if not feasible_alone(budget, smallest):
                problems.append(
                    f"budget {budget} is infeasible: the smallest achievable {budget.metric} with "
                    f"these candidates and layer policy is {smallest:.4g}"
                )
        if problems:
            raise InputError("; ".join(problems))

    def feasible(self, budgets: Sequence[Budget]) -> bool:
        """Whether one allowed assignment meets all ``budgets`` (each metric given once)."""
        try:
            self._check_budgets(budgets)
        except InputError:
            return False
        return self.solvers.run(budgets, {}).choice is not None

    def _allocation(
        self,
        budgets: Sequence[Budget],
        outcome: Outcome,
        factors: Mapping[str, float],
        cost_weights: Mapping[str, float] | None,
    ) -> Allocation:
        assert outcome.choice is not None
        choice = outcome.choice[self.unit]
        uses = []
        for budget in budgets:
            used = self.metric_value(budget.metric, choice)
            binding = used >= budget.value * (1 - BINDING_TOLERANCE)
            uses.append(BudgetUse(budget.metric, budget.value, used, binding))
        return Allocation(
            layer_names=self.table.layer_names,
            formats=tuple(self.table.format_names[index] for index in choice),
            bits=tuple(_whole_if_integral(float(self.table.bits[index])) for index in choice),
            predicted_loss_increase=self.objective(choice),
            average_bits=self.metric_value("avg-bits", choice),
            size_bytes=self.metric_value("size-mb", choice) * BITS_PER_MB / 8,
            budgets=tuple(uses),
            status=outcome.status,
            mip_gap=outcome.gap,
            solve_time_s=outcome.seconds,
            costs=self.costs.values(choice),
            objective=self.weighted_objective(choice, factors),
            cost_weights={k: float(v) for k, v in (cost_weights or {}).items()},
            solver=outcome.solver,
        )

    def solve(
        self, budgets: Sequence[Budget], *, cost_weights: Mapping[str, float] | None = None
    ) -> Allocation:
        """Minimise the predicted loss increase under all budgets (each a hard constraint).

        ``cost_weights`` {metric: λ_k ≥ 0} add Σ_k λ_k·cost_k/B_k to the objective (METHOD §4;
        B_k: the budget on metric k, or its largest achievable value when none is given): a
        soft preference for cheaper assignments on top of the hard budgets. Raises
        `InfeasibleBudgets` (with its `Diagnosis`) when the budgets conflict."""
        self._check_budgets(budgets)
        factors = self.cost_factors(budgets, cost_weights)
        outcome = self.solvers.run(budgets, factors)
        if outcome.choice is None:
            raise InfeasibleBudgets(diagnose(self, budgets))
        return self._allocation(budgets, outcome, factors, cost_weights)

    def pareto_curve(
        self,
        metric: str,
        num_points: int = 50,
        *,
        budgets: Sequence[Budget] = (),
        low: float | None = None,
        high: float | None = None,
        cost_weights: Mapping[str, float] | None = None,
    ) -> list[ParetoPoint]:
        """The model-level Pareto curve: every distinct optimum over ``num_points`` budgets on
        ``metric``, evenly spaced from ``high`` down to ``low``.

        ``budgets`` are other hard limits held fixed; ``cost_weights`` as in `solve` (not on the
        swept metric, whose B_k changes along the sweep). Default range: the smallest achievable
        value to the value of the optimum without a limit on ``metric``. Every point is proven
        optimal: exactly by a dynamic program (``mip_gap`` 0) or by HiGHS to ``mip_rel_gap``.
        Returns the distinct assignments, by increasing ``metric``, each with the swept values it
        is optimal for.
        """
        pareto.check_points(num_points)
        self.costs.require(metric)
        pareto.check_swept_weight(metric, cost_weights)
        others = [b for b in budgets if b.metric != metric]
        self._check_budgets(others)
        factors = self.cost_factors(others, cost_weights)
        if low is None:
            low = self.smallest_achievable(metric)
        if high is None:
            top = self.solvers.run(others, factors)
            if top.choice is None:
                raise InfeasibleBudgets(diagnose(self, others))
            high = self.units.value(metric, top.choice)
        values = pareto.sweep_values(high, low, num_points)
        outcomes = self.solvers.sweep(metric, values, others, factors)
        optima = [
            None if item is None or item.choice is None else (tuple(item.choice), item)
            for item in outcomes
        ]
        points = [
            self._point(outcome, swept, factors)
            for outcome, swept in pareto.distinct_optima(values, optima)
        ]
        return sorted(points, key=lambda point: point.costs[metric])

    def _point(
        self, outcome: Outcome, swept: list[float], factors: Mapping[str, float]
    ) -> ParetoPoint:
        assert outcome.choice is not None
        choice = outcome.choice[self.unit]
        return ParetoPoint(
            budgets=tuple(sorted(swept)),
            costs=self.costs.values(choice),
            predicted_loss_increase=self.objective(choice),
            formats=tuple(self.table.format_names[index] for index in choice),
            mip_gap=outcome.gap,
            objective=self.weighted_objective(choice, factors) if factors else None,
            solver=outcome.solver,
        )


class Allocator(Protocol):
    """What the allocate stage, its curves and its diagnosis need of a problem: implemented by
    `AllocationProblem` (exact pair products) and `lcpaq.allocation.pairwise.AugmentedProblem`."""

    @property
    def table(self) -> CandidateTable: ...

    @property
    def costs(self) -> CostModel: ...

    @property
    def allowed(self) -> np.ndarray: ...

    @property
    def pairwise(self) -> Mapping[tuple[int, int], np.ndarray]: ...

    def objective(self, choice: np.ndarray) -> float: ...

    def smallest_achievable(self, metric: str) -> float: ...

    def feasible(self, budgets: Sequence[Budget]) -> bool: ...

    def solve(
        self, budgets: Sequence[Budget], *, cost_weights: Mapping[str, float] | None = None
    ) -> Allocation: ...

    def pareto_curve(
        self,
        metric: str,
        num_points: int = 50,
        *,
        budgets: Sequence[Budget] = (),
        low: float | None = None,
        high: float | None = None,
        cost_weights: Mapping[str, float] | None = None,
    ) -> list[ParetoPoint]: ...


def allowed_candidates(
    table: CandidateTable, kept: np.ndarray, fixed: Mapping[str, str]
) -> np.ndarray:
    """The Pareto mask, with each fixed layer restricted to its one format (pruned or not)."""
    allowed = kept.copy()
    for layer_name, format_name in fixed.items():
        if layer_name not in table.layer_names:
            raise InputError(f"cannot fix layer {layer_name!r}: no such quantizable layer")
        row = table.layer_names.index(layer_name)
        allowed[row] = False
        allowed[row, table.format_index(format_name)] = True
    return allowed


def uniform_choice(table: CandidateTable, format_name: str) -> np.ndarray:
    """Format index per layer for a uniform assignment (a baseline)."""
    return np.full(len(table.layer_names), table.format_index(format_name))


def _whole_if_integral(bits: float) -> float:
    """An int where the bits are whole (INT/FP formats: allocation files keep their bytes), the
    float otherwise (ternary: log2(3))."""
    return int(bits) if bits.is_integer() else bits
