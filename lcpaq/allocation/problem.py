"""Stage 3: choose one format per layer by an integer linear program (METHOD §4), proven optimal.

Input: a `CandidateTable`, scores [L, F], an ``allowed`` mask [L, F], a `CostModel`, budgets, tied
layer groups and optional pairwise terms. Output: an `Allocation` (``allocation.json``): the format of
each layer, predicted loss increase, every cost metric, the use of every budget, solver status and
time; or a model-level Pareto curve (`AllocationProblem.pareto_curve`). Numpy and highspy only.

Model. Tied layers (x_{i,f} = x_{j,f}) are merged into one *unit* that shares its variables, which
is the tie constraint with fewer rows. Binary x[u, f] for every kept candidate of unit u;
Σ_f x[u, f] = 1; one ≤ row per cost metric (all present, an absent budget has an infinite bound);
minimise Σ s[u, f]·x[u, f] + Σ_{(u,v)} Σ_{f,g} C_uv(f, g)·y[uv, fg] with y ∈ [0, 1] continuous and the
product y = x[u, f]·x[v, g] linearised exactly: RLT (default) Σ_g y[uv, fg] = x[u, f],
Σ_f y[uv, fg] = x[v, g]; or McCormick y ≤ x[u, f], y ≤ x[v, g], y ≥ x[u, f] + x[v, g] − 1.
Objective weights (METHOD §4): ``cost_weights`` {metric: λ_k ≥ 0} add Σ_k λ_k·cost_k/B_k, B_k the
budget on metric k or, without one, its largest achievable value; hard budgets stay hard.
Candidates are pruned first with the safe rule of METHOD §3 over every cost dimension
(`lcpaq.allocation.frontier.safe_pareto_mask`), and again per solve over the metrics that are budgeted or
weighted. The HiGHS model is built once; a new budget changes row bounds only (weights change column
costs), and each solve starts from the best earlier solution that meets the new budgets.

Solvers (``solver=``): ``auto`` proves each optimum with the fastest exact method measured in
``scripts/bench_allocate.py``: the dynamic program of `lcpaq.allocation.exact` when there are pairwise terms
in a narrow band of layers, the multiple-choice knapsack DP for one budget without pairs, HiGHS
otherwise (several budgets without pairs, where its LP bound is tight; pair graphs too wide for the
dynamic program). ``dp`` and ``highs`` force one method.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import highspy
import numpy as np
from scipy import sparse

from lcpaq.allocation.costs import (
    ACTIVATION_METRICS,
    BITS_PER_MB,
    COST_METRICS,
    CostModel,
    build_cost_model,
)
from lcpaq.allocation.exact import (
    BUDGET_RTOL,
    ChainSolver,
    LabelLimit,
    StateSpaceTooLarge,
    knapsack_optima,
)
from lcpaq.allocation.exact import quiet_stdout as _quiet_stdout
from lcpaq.allocation.frontier import safe_pareto_mask
from lcpaq.allocation.table import CandidateTable
from lcpaq.errors import InputError

BUDGET_METRICS = COST_METRICS
LINEARIZATIONS = ("rlt", "mccormick")
SOLVERS = ("auto", "dp", "highs")
#: Past this many Pareto points in half of the layers the knapsack DP hands over to HiGHS (54
#: ResNet-50 layers × 8 formats need about 3,000; 200 layers about 85,000, which takes seconds).
KNAPSACK_MAX_LABELS = 100_000
TIE_RULES = ("none", "downsample")
#: Budget rows are scaled so that their largest coefficient is this (HiGHS tolerances are absolute).
_ROW_SCALE = 1e3


@dataclass(frozen=True)
class Budget:
    """A hard limit on one metric of `lcpaq.allocation.costs.COST_METRICS`: ``avg-bits`` (weight bits per
    quantized parameter), ``size-mb`` (the whole checkpoint), ``size-frac`` (of the FP32 checkpoint),
    ``bitops-g`` / ``ebops-g`` (GBOPs per sample) or ``latency-ms``."""

    metric: str
    value: float

    def __str__(self) -> str:
        return f"{self.metric}={self.value:g}"


def counts_activation_bits(budgets: Sequence[str]) -> bool:
    """Whether one of the ``--budget`` texts counts activation bits (BitOps, EBOPs, latency)."""
    return any(parse_budget(text).metric in ACTIVATION_METRICS for text in budgets)


def parse_budget(text: str) -> Budget:
    """Parse ``avg-bits=3``, ``size-mb=0.12``, ``size-frac=0.25``, ``bitops-g=1.5``, …"""
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep:
        raise InputError(f"--budget {text!r}: expected METRIC=VALUE, e.g. avg-bits=3")
    if key not in BUDGET_METRICS:
        raise InputError(
            f"--budget {text!r}: unknown metric {key!r}; known: {', '.join(BUDGET_METRICS)}"
        )
    try:
        value = float(value_text)
    except ValueError:
        raise InputError(f"--budget {text!r}: {value_text!r} is not a number") from None
    if not np.isfinite(value) or value <= 0:
        raise InputError(f"--budget {text!r}: the value must be a positive number")
    return Budget(key, value)


def parse_tie(text: str) -> tuple[str, ...]:
    """Parse ``--tie layer1.0.conv1,layer1.0.conv2`` into layer names (at least two)."""
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if len(names) < 2:
        raise InputError(f"--tie {text!r}: give at least two layer names separated by commas")
    return names


def tie_rule_groups(layer_names: Sequence[str], rule: str) -> list[tuple[str, ...]]:
    """Layer groups a rule ties. ``none``: nothing. ``downsample``: a residual shortcut conv
    (a name with a ``downsample`` or ``shortcut`` component) shares the format of the first layer of
    its block (the same name prefix), which reads the same input (HAWQ's ResNet ties)."""
    if rule == "none":
        return []
    if rule != "downsample":
        raise InputError(f"unknown tie rule {rule!r}; known: {', '.join(TIE_RULES)}")
    groups = []
    for name in layer_names:
        parts = name.split(".")
        marks = [k for k, part in enumerate(parts) if part in ("downsample", "shortcut")]
        if not marks:
            continue
        prefix = ".".join(parts[: marks[0]]) + "."
        partner = next(
            (other for other in layer_names if other.startswith(prefix) and other != name), None
        )
        if partner is not None:
            groups.append((partner, name))
    return groups


@dataclass(frozen=True)
class BudgetUse:
    metric: str
    limit: float
    used: float
    binding: bool


@dataclass(frozen=True)
class Allocation:
    """The chosen format per layer (in ``layer_names`` order) and what it costs."""

    layer_names: tuple[str, ...]
    formats: tuple[str, ...]
    bits: tuple[int, ...]
    predicted_loss_increase: float
    average_bits: float
    size_bytes: float
    budgets: tuple[BudgetUse, ...]
    status: str
    mip_gap: float
    solve_time_s: float
    costs: dict[str, float] = field(default_factory=dict)
    #: The minimised objective: the predicted loss increase plus Σ_k λ_k·cost_k/B_k (METHOD §4).
    objective: float | None = None
    cost_weights: dict[str, float] = field(default_factory=dict)
    #: Which exact method proved the optimum: ``highs`` (MIP), ``dp`` (dynamic program with
    #: Lagrangian bounds, `lcpaq.allocation.exact`) or ``knapsack`` (multiple-choice knapsack DP).
    solver: str = "highs"

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["assignment"] = dict(zip(self.layer_names, self.formats))
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Allocation:
        values = {key: data[key] for key in cls.__dataclass_fields__ if key in data}
        values["layer_names"] = tuple(values["layer_names"])  # type: ignore[arg-type]
        values["formats"] = tuple(values["formats"])  # type: ignore[arg-type]
        values["bits"] = tuple(values["bits"])  # type: ignore[arg-type]
        values["budgets"] = tuple(BudgetUse(**use) for use in values["budgets"])  # type: ignore[union-attr]
        return cls(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ParetoPoint:
    """One optimum of a budget sweep: its costs, predicted loss increase and assignment."""

    budgets: tuple[float, ...]  # the swept values this assignment is optimal for
    costs: dict[str, float]
    predicted_loss_increase: float
    formats: tuple[str, ...]
    mip_gap: float  # 0 when a dynamic program proved the optimum exactly
    objective: float | None = None  # with cost weights: the weighted objective
    solver: str = "highs"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _tie_units(layer_names: Sequence[str], ties: Sequence[Sequence[str]]) -> np.ndarray:
    """Unit index per layer: tied layers (transitively) share one unit, numbered by first layer."""
    parent = list(range(len(layer_names)))

    def root(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for group in ties:
        indices = []
        for name in group:
            if name not in layer_names:
                raise InputError(f"cannot tie layer {name!r}: no such quantizable layer")
            indices.append(layer_names.index(name))
        for other in indices[1:]:
            a, b = sorted((root(indices[0]), root(other)))
            parent[b] = a
    roots = [root(k) for k in range(len(layer_names))]
    _, unit = np.unique(roots, return_inverse=True)
    return unit


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
        self.solver = solver
        self.max_states = max_states
        self.table = table
        self.scores = np.asarray(scores, dtype=float)
        self.constant_size_bits = float(constant_size_bits)
        self.costs = costs or build_cost_model(table, constant_size_bits=constant_size_bits)
        self.linearization = linearization
        self.time_limit_s = time_limit_s
        self.mip_rel_gap = mip_rel_gap
        num_layers, num_formats = scores.shape
        self.pairwise = self._check_pairs(pairwise or {}, num_layers, num_formats)
        self.unit = _tie_units(table.layer_names, ties)
        num_units = int(self.unit.max()) + 1 if num_layers else 0
        members = [np.flatnonzero(self.unit == u) for u in range(num_units)]
        unit_allowed = np.array([allowed[rows].all(axis=0) for rows in members], dtype=bool)
        for u, rows in enumerate(members):
            if not unit_allowed[u].any():
                names = ", ".join(table.layer_names[row] for row in rows)
                raise InputError(f"tied layers {names} have no allowed format in common")
        self.unit_scores = np.array([self.scores[rows].sum(axis=0) for rows in members])
        self.unit_costs = {
            metric: np.array([coef[rows].sum(axis=0) for rows in members])
            for metric, coef in self.costs.coefficients.items()
        }
        self.unit_pairs: dict[tuple[int, int], np.ndarray] = {}
        for (i, j), matrix in self.pairwise.items():
            u, v = int(self.unit[i]), int(self.unit[j])
            if u == v:  # both layers of a tied unit hold the same format f
                self.unit_scores[u] += np.diag(matrix)
                continue
            key, block = ((u, v), matrix) if u < v else ((v, u), matrix.T)
            self.unit_pairs[key] = self.unit_pairs.get(key, 0.0) + block
        self._unpruned = unit_allowed  # the largest achievable costs need the pruned ones too
        if prune:
            stacked = np.stack([self.unit_costs[m] for m in self.costs.metrics], axis=-1)
            unit_allowed = safe_pareto_mask(
                stacked, self.unit_scores, unit_allowed, self.unit_pairs
            )
        self.unit_allowed = unit_allowed
        self.allowed = unit_allowed[self.unit]
        self._highs: highspy.Highs | None = None
        self._highs_factors: dict[str, float] = {}  # cost weights the HiGHS objective holds
        self._found: list[np.ndarray] = []  # unit choices of earlier solves, for warm starts
        self._prepared: dict[tuple[str, ...], _Prepared] = {}

    @staticmethod
    def _check_pairs(
        pairwise: Mapping[tuple[int, int], np.ndarray], num_layers: int, num_formats: int
    ) -> dict[tuple[int, int], np.ndarray]:
        checked = {}
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

    # -- costs -----------------------------------------------------------------------------
    def metric_value(self, metric: str, choice: np.ndarray) -> float:
        """A cost metric of an assignment given as a format index per layer."""
        return self.costs.value(metric, choice)

    def objective(self, choice: np.ndarray) -> float:
        """Predicted loss increase: Σ scores plus the pairwise terms of the chosen formats."""
        rows = np.arange(len(choice))
        total = float(self.scores[rows, choice].sum())
        for (i, j), matrix in self.pairwise.items():
            total += float(matrix[choice[i], choice[j]])
        return total

    def smallest_achievable(self, metric: str) -> float:
        """The smallest value of ``metric`` any allowed assignment (ties respected) reaches."""
        self.costs.require(metric)
        coefficients = np.where(self.unit_allowed, self.unit_costs[metric], np.inf)
        return float(coefficients.min(axis=1).sum() + self.costs.offsets[metric])

    # -- model -----------------------------------------------------------------------------
    def _build(self) -> highspy.Highs:
        units, columns = np.nonzero(self.unit_allowed)
        num_units = self.unit_allowed.shape[0]
        x_index = -np.ones(self.unit_allowed.shape, dtype=np.int64)
        x_index[units, columns] = np.arange(len(units))
        self._x = (units, columns, x_index)
        metrics = self.costs.metrics
        self._metric_rows = {metric: num_units + k for k, metric in enumerate(metrics)}
        self._row_scale = {}
        entries: list[tuple[int, int, float]] = []  # (row, column, value)
        cost = list(self.unit_scores[units, columns])
        lower = [1.0] * num_units + [-highspy.kHighsInf] * len(metrics)
        upper = [1.0] * num_units + [highspy.kHighsInf] * len(metrics)
        entries += [(int(u), k, 1.0) for k, u in enumerate(units)]
        for metric, row in self._metric_rows.items():
            values = self.unit_costs[metric][units, columns]
            largest = float(np.abs(values).max()) if len(values) else 0.0
            self._row_scale[metric] = _ROW_SCALE / largest if largest > 0 else 1.0
            scaled = values * self._row_scale[metric]
            entries += [(row, k, float(value)) for k, value in enumerate(scaled) if value != 0]
        # Pairwise products y = x[u, f]·x[v, g].
        self._y: list[tuple[int, int, int, int, int]] = []  # (column, u, f, v, g)
        num_columns = len(units)
        row = len(lower)
        for (u, v), matrix in self.unit_pairs.items():
            fs, gs = np.flatnonzero(self.unit_allowed[u]), np.flatnonzero(self.unit_allowed[v])
            y_index = {}
            for f, g in itertools.product(fs, gs):
                if self.linearization == "mccormick" and matrix[f, g] == 0:
                    continue  # a zero-cost product never changes the objective
                y_index[f, g] = num_columns
                self._y.append((num_columns, u, int(f), v, int(g)))
                cost.append(float(matrix[f, g]))
                num_columns += 1
            if self.linearization == "rlt":
                for unit, own, other, first in ((u, fs, gs, True), (v, gs, fs, False)):
                    for a in own:
                        for b in other:
                            entries.append((row, y_index[(a, b) if first else (b, a)], 1.0))
                        entries.append((row, int(x_index[unit, a]), -1.0))
                        lower.append(0.0)
                        upper.append(0.0)
                        row += 1
            else:
                for (f, g), column in y_index.items():
                    xf, xg = int(x_index[u, f]), int(x_index[v, g])
                    entries += [(row, column, 1.0), (row, xf, -1.0)]
                    entries += [(row + 1, column, 1.0), (row + 1, xg, -1.0)]
                    entries += [(row + 2, column, 1.0), (row + 2, xf, -1.0), (row + 2, xg, -1.0)]
                    lower += [-highspy.kHighsInf, -highspy.kHighsInf, -1.0]
                    upper += [0.0, 0.0, highspy.kHighsInf]
                    row += 3
        cost_array = np.asarray(cost, dtype=float)
        # HiGHS' tolerances are absolute: scale the objective to a largest coefficient of 1.
        largest = float(np.abs(cost_array).max()) if len(cost_array) else 0.0
        self._objective_scale = 1.0 / largest if largest > 0 else 1.0
        rows_, cols_, vals_ = (np.array(part) for part in zip(*entries))
        matrix = sparse.csc_matrix((vals_, (rows_, cols_)), shape=(row, num_columns))
        self.model_arrays = {
            "cost": cost_array * self._objective_scale,
            "matrix": matrix,
            "row_lower": np.array(lower),
            "row_upper": np.array(upper),
            "integrality": np.r_[np.ones(len(units)), np.zeros(num_columns - len(units))],
        }
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = num_columns, row
        lp.col_cost_ = self.model_arrays["cost"]
        lp.col_lower_ = np.zeros(num_columns)
        lp.col_upper_ = np.ones(num_columns)
        lp.row_lower_, lp.row_upper_ = (
            self.model_arrays["row_lower"],
            self.model_arrays["row_upper"],
        )
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_ = matrix.indptr
        lp.a_matrix_.index_ = matrix.indices
        lp.a_matrix_.value_ = matrix.data
        lp.integrality_ = [highspy.HighsVarType.kInteger] * len(units) + [
            highspy.HighsVarType.kContinuous
        ] * (num_columns - len(units))
        highs = highspy.Highs()
        highs.setOptionValue("output_flag", False)
        highs.setOptionValue("mip_rel_gap", self.mip_rel_gap)
        highs.setOptionValue("mip_abs_gap", 0.0)
        highs.setOptionValue("time_limit", self.time_limit_s)
        highs.setOptionValue("threads", 1)
        highs.passModel(lp)
        return highs

    def _ensure_model(self) -> highspy.Highs:
        if self._highs is None:
            with _quiet_stdout():  # HiGHS prints a banner when the first model is created
                self._highs = self._build()
        return self._highs

    def row_bounds(self, budgets: Sequence[Budget]) -> dict[int, float]:
        """Upper bound of every budget row (scaled) for these budgets; others are infinite."""
        self._ensure_model()
        bounds = {row: highspy.kHighsInf for row in self._metric_rows.values()}
        for budget in budgets:
            scale = self._row_scale[budget.metric]
            limit = budget.value - self.costs.offsets[budget.metric]
            bounds[self._metric_rows[budget.metric]] = limit * scale
        return bounds

    def milp_arrays(self, budgets: Sequence[Budget]) -> dict[str, np.ndarray]:
        """The HiGHS model as arrays, with these budgets' row bounds, for other MIP solvers (the
        benchmark): minimise cost·x s.t. row_lower ≤ matrix·x ≤ row_upper, 0 ≤ x ≤ 1, x binary
        where ``integrality`` is 1. ``cost`` is the objective times ``objective_scale``."""
        self._ensure_model()
        arrays = dict(self.model_arrays)
        upper = arrays["row_upper"].copy()
        for row, bound in self.row_bounds(budgets).items():
            upper[row] = bound
        arrays["row_upper"] = upper
        arrays["objective_scale"] = np.array(self._objective_scale)
        return arrays

    def decode(self, column_values: np.ndarray) -> np.ndarray:
        """Format index per layer from a solution of `model_arrays` (any MIP solver's)."""
        self._ensure_model()
        units, columns, _ = self._x
        picked = np.asarray(column_values)[: len(units)] > 0.5
        choice = np.full(self.unit_allowed.shape[0], -1)
        choice[units[picked]] = columns[picked]
        if (choice < 0).any():
            raise ValueError("the solution is not one-hot")
        return choice[self.unit]

    def _column_values(self, unit_choice: np.ndarray) -> np.ndarray:
        units, columns, x_index = self._x
        values = np.zeros(len(units) + len(self._y))
        values[x_index[np.arange(len(unit_choice)), unit_choice]] = 1.0
        for column, u, f, v, g in self._y:
            values[column] = float(unit_choice[u] == f and unit_choice[v] == g)
        return values

    def _unit_value(self, metric: str, unit_choice: np.ndarray) -> float:
        coefficients = self.unit_costs[metric][np.arange(len(unit_choice)), unit_choice]
        return float(coefficients.sum() + self.costs.offsets[metric])

    def _meets(self, unit_choice: np.ndarray, budgets: Sequence[Budget]) -> bool:
        return all(self._unit_value(b.metric, unit_choice) <= b.value for b in budgets)

    def _unit_objective(self, unit_choice: np.ndarray) -> float:
        total = float(self.unit_scores[np.arange(len(unit_choice)), unit_choice].sum())
        for (u, v), matrix in self.unit_pairs.items():
            total += float(matrix[unit_choice[u], unit_choice[v]])
        return total

    def largest_achievable(self, metric: str) -> float:
        """The largest value of ``metric`` any allowed assignment (ties respected) reaches."""
        self.costs.require(metric)
        coefficients = np.where(self._unpruned, self.unit_costs[metric], -np.inf)
        return float(coefficients.max(axis=1).sum() + self.costs.offsets[metric])

    # -- objective weights (METHOD §4) -------------------------------------------------------
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
        total = self.objective(choice)
        for metric, factor in factors.items():
            total += factor * self.metric_value(metric, choice)
        return total

    def _unit_scores(self, factors: Mapping[str, float]) -> np.ndarray:
        scores = self.unit_scores.copy()
        for metric, factor in factors.items():
            scores = scores + factor * self.unit_costs[metric]
        return scores

    # -- exact dynamic programs ---------------------------------------------------------------
    def _prepare(self, metrics: tuple[str, ...]) -> _Prepared:
        """Options per unit pruned for these cost metrics only (budgets and weights on other
        metrics are absent, so candidates that differ only there can go) and, when the pair graph
        allows, the dynamic program over them."""
        if metrics not in self._prepared:
            stacked = np.zeros((*self.unit_allowed.shape, len(metrics)))
            for k, metric in enumerate(metrics):
                stacked[..., k] = self.unit_costs[metric]
            options = safe_pareto_mask(
                stacked, self.unit_scores, self.unit_allowed, self.unit_pairs
            )
            columns = [np.flatnonzero(row) for row in options]
            pairs = {
                (u, v): matrix[np.ix_(columns[u], columns[v])]
                for (u, v), matrix in self.unit_pairs.items()
            }
            costs = [stacked[u, cols] for u, cols in enumerate(columns)]
            try:
                chain: ChainSolver | None = ChainSolver(
                    [self.unit_scores[u, cols] for u, cols in enumerate(columns)],
                    costs,
                    pairs,
                    max_states=self.max_states,
                )
            except StateSpaceTooLarge:
                chain = None
            self._prepared[metrics] = _Prepared(metrics, columns, costs, chain)
        return self._prepared[metrics]

    def _active_metrics(
        self, budgets: Sequence[Budget], factors: Mapping[str, float]
    ) -> tuple[str, ...]:
        named = {budget.metric for budget in budgets} | set(factors)
        return tuple(metric for metric in self.costs.metrics if metric in named)

    def _limits(self, budgets: Sequence[Budget], metrics: Sequence[str]) -> np.ndarray:
        given = {
            budget.metric: budget.value - self.costs.offsets[budget.metric] for budget in budgets
        }
        return np.array([given.get(metric, np.inf) for metric in metrics])

    def _exact(
        self, budgets: Sequence[Budget], factors: Mapping[str, float], *, sweep: bool = False
    ) -> tuple[_Prepared, ChainSolver | None, list[np.ndarray]] | None:
        """The dynamic program for these budgets and weights, or None where ``auto`` prefers
        HiGHS: a single solve without pairs under several budgets (HiGHS' LP bound is tight there;
        a sweep still goes to the batched program, which shares its passes over the layers between
        the points: 2.4× faster than HiGHS on the 54-layer size+BitOps curve of
        scripts/bench_allocate.py), and a pair graph too wide for the table limit."""
        if self.solver == "highs":
            return None
        if self.solver == "auto" and not self.unit_pairs and len(budgets) >= 2 and not sweep:
            return None
        prepared = self._prepare(self._active_metrics(budgets, factors))
        if prepared.chain is None and self.unit_pairs:
            if self.solver == "dp":
                raise InputError(
                    "solver 'dp': the pairwise terms link too many layers at once for the dynamic "
                    f"program (more than {self.max_states} states); use solver 'auto' or 'highs'"
                )
            return None
        scores = self._unit_scores(factors)
        unit_scores = [scores[u, cols] for u, cols in enumerate(prepared.columns)]
        chain = prepared.chain
        if chain is not None and factors:
            chain = chain.with_scores(unit_scores)
        return prepared, chain, unit_scores

    def _warm(self, prepared: _Prepared, chain: ChainSolver, limits: np.ndarray) -> tuple | None:
        """The best earlier optimum that meets these limits, as option positions (a bound)."""
        best = None
        for found in self._found:
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

    def _run_exact(
        self, budgets: Sequence[Budget], factors: Mapping[str, float]
    ) -> _Outcome | None:
        exact = self._exact(budgets, factors)
        if exact is None:
            return None
        prepared, chain, unit_scores = exact
        limits = self._limits(budgets, prepared.metrics)
        start = time.perf_counter()
        if not self.unit_pairs and len(budgets) == 1:
            k = prepared.metrics.index(budgets[0].metric)
            tolerance = BUDGET_RTOL * max(abs(limits[k]), 1e-300)
            try:
                found = knapsack_optima(
                    unit_scores,
                    [c[:, k] for c in prepared.costs],
                    limits[k : k + 1],
                    tolerance,
                    KNAPSACK_MAX_LABELS,
                )[0]
            except LabelLimit:
                if self.solver == "dp":
                    raise
                return None
            positions = None if found is None else found[0]
            solver = "knapsack"
        else:
            assert chain is not None
            try:
                solution = chain.solve(limits, upper=self._warm(prepared, chain, limits))
            except LabelLimit:
                if self.solver == "dp":
                    raise
                return None
            positions = None if solution is None else solution.choice
            solver = "dp"
        elapsed = time.perf_counter() - start
        if positions is None:
            return _Outcome(None, "Infeasible", 0.0, elapsed, solver)
        choice = np.array([prepared.columns[u][k] for u, k in enumerate(positions)])
        self._remember(choice)
        return _Outcome(choice, "Optimal", 0.0, elapsed, solver)

    # -- HiGHS -------------------------------------------------------------------------------
    def _set_highs_objective(self, highs: highspy.Highs, factors: Mapping[str, float]) -> None:
        """Cost weights change the x columns' objective coefficients only."""
        if dict(factors) == self._highs_factors:
            return
        units, columns, _ = self._x
        cost = self._unit_scores(factors)[units, columns] * self._objective_scale
        indices = np.arange(len(units), dtype=np.int32)
        highs.changeColsCost(len(units), indices, cost)
        self._highs_factors = dict(factors)

    def _remember(self, choice: np.ndarray) -> None:
        if not any(np.array_equal(choice, found) for found in self._found):
            self._found.append(choice)

    def _run_highs(self, budgets: Sequence[Budget], factors: Mapping[str, float]) -> _Outcome:
        highs = self._ensure_model()
        for row, upper in self.row_bounds(budgets).items():
            highs.changeRowBounds(row, -highspy.kHighsInf, upper)
        self._set_highs_objective(highs, factors)
        starts = [c for c in self._found if self._meets(c, budgets)]
        if starts:
            best = min(starts, key=lambda c: self._unit_weighted(c, factors))
            solution = highspy.HighsSolution()
            solution.col_value = self._column_values(best)
            solution.value_valid = True
            highs.setSolution(solution)
        start = time.perf_counter()
        with _quiet_stdout():
            highs.run()
            original_cost = self._rescaled_rerun(highs)
        elapsed = time.perf_counter() - start
        model_status = highs.getModelStatus()
        status = highs.modelStatusToString(model_status)
        gap = float(highs.getInfo().mip_gap)
        values = np.array(highs.getSolution().col_value)
        if original_cost is not None:  # changing the model clears HiGHS' results: read them first
            indices = np.arange(len(original_cost), dtype=np.int32)
            highs.changeColsCost(len(original_cost), indices, original_cost)
        if model_status == highspy.HighsModelStatus.kInfeasible:
            return _Outcome(None, status, 0.0, elapsed, "highs")
        if values.size == 0:
            raise RuntimeError(f"HiGHS returned no solution (status: {status})")
        units, columns, _ = self._x
        choice = np.full(self.unit_allowed.shape[0], -1)
        picked = values[: len(units)] > 0.5
        choice[units[picked]] = columns[picked]
        if (choice < 0).any():
            raise RuntimeError(f"HiGHS solution is not one-hot (status: {status})")
        self._remember(choice)
        return _Outcome(choice, status, gap, elapsed, "highs")

    @staticmethod
    def _rescaled_rerun(highs: highspy.Highs) -> np.ndarray | None:
        """Re-solve with the objective scaled to an optimum near 1 when it came out far below 1.

        The model's objective is scaled to a largest coefficient of 1, but at generous budgets
        the optimum is a small fraction of that, and HiGHS' tolerances are absolute: measured in
        scripts/bench_allocate.py, HiGHS (and CBC, and scipy's milp) then stopped at "optimal"
        assignments 7e-5 above the optimum. The second run starts from the first one's solution,
        so it only has to close the gap at the right scale. Returns the original costs, which the
        caller restores once it has read the results, or None when nothing was changed."""
        if highs.getModelStatus() != highspy.HighsModelStatus.kOptimal:
            return None
        value = abs(highs.getInfo().objective_function_value)
        if not 0 < value < 0.1:
            return None
        cost = np.array(highs.getLp().col_cost_)
        indices = np.arange(len(cost), dtype=np.int32)
        start = highspy.HighsSolution()
        start.col_value = list(highs.getSolution().col_value)
        start.value_valid = True
        highs.changeColsCost(len(cost), indices, cost / value)
        highs.setSolution(start)
        highs.run()
        return cost

    def _unit_weighted(self, unit_choice: np.ndarray, factors: Mapping[str, float]) -> float:
        total = self._unit_objective(unit_choice)
        for metric, factor in factors.items():
            total += factor * self._unit_value(metric, unit_choice)
        return total

    def _run(
        self, budgets: Sequence[Budget], factors: Mapping[str, float] | None = None
    ) -> _Outcome:
        """Solve under ``budgets`` with objective weights ``factors`` (`cost_factors`)."""
        factors = factors or {}
        outcome = self._run_exact(budgets, factors)
        return outcome if outcome is not None else self._run_highs(budgets, factors)

    def _check_budgets(self, budgets: Sequence[Budget]) -> None:
        metrics = [budget.metric for budget in budgets]
        if len(set(metrics)) != len(metrics):
            raise InputError(
                f"each budget metric may be given once, got {', '.join(map(str, budgets))}"
            )
        problems = []
        for budget in budgets:
            smallest = self.smallest_achievable(budget.metric)
            if budget.value < smallest - 1e-9 * abs(smallest):
                problems.append(
                    f"budget {budget} is infeasible: the smallest achievable {budget.metric} with "
                    f"these candidates and layer policy is {smallest:.4g}"
                )
        if problems:
            raise InputError("; ".join(problems))

    def _explain_conflict(self, budgets: Sequence[Budget]) -> InputError:
        """Which budgets conflict: solve every pair of them."""
        alone = ", ".join(f"{b.metric} {self.smallest_achievable(b.metric):.4g}" for b in budgets)
        pairs = [
            f"{a} with {b}"
            for a, b in itertools.combinations(budgets, 2)
            if self._run([a, b]).choice is None
        ]
        conflict = (
            "conflicting pairs: " + "; ".join(pairs)
            if pairs
            else "no two of them conflict, only all together"
        )
        return InputError(
            "budgets "
            + ", ".join(map(str, budgets))
            + " cannot all be met at once: each is feasible alone (smallest achievable "
            + alone
            + ") but together they conflict ("
            + conflict
            + ")"
        )

    def _allocation(
        self,
        budgets: Sequence[Budget],
        outcome: _Outcome,
        factors: Mapping[str, float],
        cost_weights: Mapping[str, float] | None,
    ) -> Allocation:
        assert outcome.choice is not None
        choice = outcome.choice[self.unit]
        uses = []
        for budget in budgets:
            used = self.metric_value(budget.metric, choice)
            uses.append(
                BudgetUse(budget.metric, budget.value, used, used >= budget.value * (1 - 1e-3))
            )
        return Allocation(
            layer_names=self.table.layer_names,
            formats=tuple(self.table.format_names[index] for index in choice),
            bits=tuple(int(self.table.bits[index]) for index in choice),
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
        soft preference for cheaper assignments on top of the hard budgets."""
        self._check_budgets(budgets)
        factors = self.cost_factors(budgets, cost_weights)
        outcome = self._run(budgets, factors)
        if outcome.choice is None:
            raise self._explain_conflict(budgets)
        return self._allocation(budgets, outcome, factors, cost_weights)

    def _sweep_highs(
        self,
        metric: str,
        values: np.ndarray,
        others: Sequence[Budget],
        factors: Mapping[str, float],
    ) -> list[_Outcome | None]:
        """HiGHS over the sweep, largest budget first. An optimum whose ``metric`` already meets
        the next (smaller) budget stays optimal there (the feasible set only shrank), so it is
        reused without a solve; otherwise HiGHS re-solves with new row bounds, warm-started."""
        results: list[_Outcome | None] = []
        previous: _Outcome | None = None
        for value in values:
            if previous is not None and self._unit_value(metric, previous.choice) <= value:
                results.append(previous)
                continue
            outcome = self._run_highs([*others, Budget(metric, float(value))], factors)
            results.append(outcome if outcome.choice is not None else None)
            previous = outcome if outcome.choice is not None else previous
        return results

    def _sweep(
        self,
        metric: str,
        values: np.ndarray,
        others: Sequence[Budget],
        factors: Mapping[str, float],
    ) -> list[_Outcome | None]:
        """Optima over ``values`` (descending) on ``metric``: one exact multiple-choice-knapsack
        pass for every value when there are no pairs and no other budget; the batched dynamic
        program (`ChainSolver.sweep`) when the pairs allow; HiGHS otherwise."""
        budgets = [*others, Budget(metric, float(values[0]))]
        exact = self._exact(budgets, factors, sweep=True)
        if exact is None:
            return self._sweep_highs(metric, values, others, factors)
        prepared, chain, unit_scores = exact
        limits = self._limits(budgets, prepared.metrics)
        k = prepared.metrics.index(metric)
        swept = values - self.costs.offsets[metric]
        start = time.perf_counter()
        if not self.unit_pairs and not others:
            tolerance = BUDGET_RTOL * max(float(np.abs(swept).max()), 1e-300)
            try:
                found = knapsack_optima(
                    unit_scores,
                    [c[:, k] for c in prepared.costs],
                    swept,
                    tolerance,
                    KNAPSACK_MAX_LABELS,
                )
            except LabelLimit:
                if self.solver == "dp":
                    raise
                return self._sweep_highs(metric, values, others, factors)
            positions = [None if item is None else item[0] for item in found]
            solver = "knapsack"
        else:
            assert chain is not None
            try:
                solutions = chain.sweep(k, swept, limits)
            except LabelLimit:
                if self.solver == "dp":
                    raise
                return self._sweep_highs(metric, values, others, factors)
            positions = [None if item is None else item.choice for item in solutions]
            solver = "dp"
        each = (time.perf_counter() - start) / max(len(values), 1)
        results: list[_Outcome | None] = []
        for item in positions:
            if item is None:
                results.append(None)
                continue
            choice = np.array([prepared.columns[u][j] for u, j in enumerate(item)])
            results.append(_Outcome(choice, "Optimal", 0.0, each, solver))
        return results

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
        if num_points < 1:
            raise InputError(f"a Pareto sweep needs at least one point, got {num_points}")
        self.costs.require(metric)
        if cost_weights and cost_weights.get(metric, 0):
            raise InputError(
                f"a cost weight on the swept metric {metric} would change the objective along the "
                "sweep; weight another metric or sweep without it"
            )
        others = [b for b in budgets if b.metric != metric]
        self._check_budgets(others)
        factors = self.cost_factors(others, cost_weights)
        if low is None:
            low = self.smallest_achievable(metric)
        if high is None:
            top = self._run(others, factors)
            if top.choice is None:
                raise self._explain_conflict(others)
            high = self._unit_value(metric, top.choice)
        values = np.linspace(high, low, num_points) if num_points > 1 else np.array([high])
        points: dict[tuple[int, ...], tuple[_Outcome, list[float]]] = {}
        for value, outcome in zip(values, self._sweep(metric, values, others, factors)):
            if outcome is None:
                continue
            entry = points.setdefault(tuple(outcome.choice), (outcome, []))
            entry[1].append(float(value))
        result = []
        for key, (outcome, swept) in points.items():
            choice = np.asarray(key)[self.unit]
            result.append(
                ParetoPoint(
                    budgets=tuple(sorted(swept)),
                    costs=self.costs.values(choice),
                    predicted_loss_increase=self.objective(choice),
                    formats=tuple(self.table.format_names[index] for index in choice),
                    mip_gap=outcome.gap,
                    objective=self.weighted_objective(choice, factors) if factors else None,
                    solver=outcome.solver,
                )
            )
        return sorted(result, key=lambda point: point.costs[metric])


@dataclass(frozen=True)
class _Outcome:
    """One solve: the format column per unit (None if infeasible), status, gap, time, method."""

    choice: np.ndarray | None
    status: str
    gap: float
    seconds: float
    solver: str


@dataclass
class _Prepared:
    """The options per unit for one set of active metrics, and their dynamic program."""

    metrics: tuple[str, ...]
    columns: list[np.ndarray]  # option position -> format column, per unit
    costs: list[np.ndarray]  # [n_u, len(metrics)] per unit
    chain: ChainSolver | None


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
