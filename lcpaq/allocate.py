"""Stage 3: choose one format per layer with an integer linear program solved by HiGHS (METHOD §4).

Input: a `CandidateTable`, scores [L, F], the Pareto ``kept`` mask, budgets and fixed layers. Output:
an `Allocation` (``allocation.json``): the format of each layer, predicted loss increase, the use of
every budget, solver status and time. Numpy and highspy only — no torch.

Model: binary x[l, f] for every allowed candidate; Σ_f x[l, f] = 1 per layer; one ≤ row per budget;
minimise Σ score[l, f]·x[l, f]. The model is built once per `AllocationProblem` and only the budget
rows' bounds change between solves, so a budget sweep re-solves without rebuilding.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass

import highspy
import numpy as np

from lcpaq.candidates import CandidateTable
from lcpaq.errors import InputError

BITS_PER_MB = 8e6  # sizes are reported in MB = 10^6 bytes

BUDGET_METRICS = ("avg-bits", "size-mb")


@dataclass(frozen=True)
class Budget:
    """A hard limit: ``avg-bits`` (weight bits per quantized parameter, weighted by parameter count)
    or ``size-mb`` (the whole checkpoint: codes, scales, zero points and unquantized tensors)."""

    metric: str
    value: float

    def __str__(self) -> str:
        return f"{self.metric}={self.value:g}"


def parse_budget(text: str) -> Budget:
    """Parse ``avg-bits=3`` or ``size-mb=0.12``."""
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

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["assignment"] = dict(zip(self.layer_names, self.formats))
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Allocation:
        values = {key: data[key] for key in cls.__dataclass_fields__}
        values["layer_names"] = tuple(values["layer_names"])  # type: ignore[arg-type]
        values["formats"] = tuple(values["formats"])  # type: ignore[arg-type]
        values["bits"] = tuple(values["bits"])  # type: ignore[arg-type]
        values["budgets"] = tuple(BudgetUse(**use) for use in values["budgets"])  # type: ignore[union-attr]
        return cls(**values)  # type: ignore[arg-type]


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """HiGHS' MIP solver can print a line on the C-level stdout even with output off; keep ours clean."""
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


class AllocationProblem:
    """The ILP for one candidate table, scores and set of allowed candidates.

    ``allowed`` [L, F] marks candidates the solver may pick (the Pareto frontier, restricted further
    for fixed layers). ``constant_size_bits`` is the size of everything not quantized.
    """

    def __init__(
        self,
        table: CandidateTable,
        scores: np.ndarray,
        allowed: np.ndarray,
        *,
        constant_size_bits: float,
        time_limit_s: float = 60.0,
        mip_rel_gap: float = 1e-6,
    ) -> None:
        if scores.shape != allowed.shape or scores.shape != table.error_sq.shape:
            raise ValueError("scores, allowed mask and candidate table must have the same shape")
        empty = [table.layer_names[row] for row in range(len(allowed)) if not allowed[row].any()]
        if empty:
            raise InputError(f"layer {empty[0]!r} has no allowed candidate format")
        self.table = table
        self.scores = scores
        self.allowed = allowed
        self.constant_size_bits = float(constant_size_bits)
        self.time_limit_s = time_limit_s
        self.mip_rel_gap = mip_rel_gap
        self._highs: highspy.Highs | None = None

    # -- costs -----------------------------------------------------------------------------
    def _budget_row(self, metric: str) -> tuple[np.ndarray, float]:
        """Per-candidate coefficients and scale so that Σ coef·x ≤ limit·scale − offset."""
        if metric == "avg-bits":
            return self.table.weight_bits, float(self.table.num_params.sum())
        if metric == "size-mb":
            return self.table.size_bits, BITS_PER_MB
        raise InputError(f"unknown budget metric {metric!r}")

    def _row_upper(self, budget: Budget) -> float:
        _, scale = self._budget_row(budget.metric)
        offset = self.constant_size_bits if budget.metric == "size-mb" else 0.0
        return budget.value * scale - offset

    def metric_value(self, metric: str, choice: np.ndarray) -> float:
        """The metric (avg-bits or size-mb) of an assignment given as a format index per layer."""
        coefficients, scale = self._budget_row(metric)
        total = coefficients[np.arange(len(choice)), choice].sum()
        if metric == "size-mb":
            total += self.constant_size_bits
        return float(total / scale)

    def smallest_achievable(self, metric: str) -> float:
        coefficients, scale = self._budget_row(metric)
        total = np.where(self.allowed, coefficients, np.inf).min(axis=1).sum()
        if metric == "size-mb":
            total += self.constant_size_bits
        return float(total / scale)

    # -- model -----------------------------------------------------------------------------
    def _build(self) -> highspy.Highs:
        rows, columns = np.nonzero(self.allowed)
        self._columns = (rows, columns)
        num_layers = len(self.table.layer_names)
        lp = highspy.HighsLp()
        lp.num_col_ = len(rows)
        lp.num_row_ = num_layers + len(BUDGET_METRICS)
        # HiGHS' tolerances are absolute (dual feasibility 1e-7): scores of 1e-7 would all look
        # equal, so the objective is scaled to a largest coefficient of 1 (same optimum).
        costs = self.scores[rows, columns].astype(float)
        largest = float(np.abs(costs).max())
        lp.col_cost_ = costs / largest if largest > 0 else costs
        lp.col_lower_ = np.zeros(len(rows))
        lp.col_upper_ = np.ones(len(rows))
        lp.row_lower_ = np.concatenate(
            [np.ones(num_layers), np.full(len(BUDGET_METRICS), -highspy.kHighsInf)]
        )
        lp.row_upper_ = np.concatenate(
            [np.ones(num_layers), np.full(len(BUDGET_METRICS), highspy.kHighsInf)]
        )
        # Column-wise matrix: each candidate sits in its layer's one-hot row and in every budget row.
        starts, indices, values = [0], [], []
        for layer, fmt in zip(rows, columns):
            indices.append(layer)
            values.append(1.0)
            for offset, metric in enumerate(BUDGET_METRICS):
                coefficients, _ = self._budget_row(metric)
                indices.append(num_layers + offset)
                values.append(float(coefficients[layer, fmt]))
            starts.append(len(indices))
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_ = starts
        lp.a_matrix_.index_ = indices
        lp.a_matrix_.value_ = values
        lp.integrality_ = [highspy.HighsVarType.kInteger] * len(rows)
        highs = highspy.Highs()
        highs.setOptionValue("output_flag", False)
        highs.setOptionValue("mip_rel_gap", self.mip_rel_gap)
        highs.setOptionValue("mip_abs_gap", 0.0)
        highs.setOptionValue("time_limit", self.time_limit_s)
        highs.setOptionValue("threads", 1)
        highs.passModel(lp)
        return highs

    def solve(self, budgets: Sequence[Budget]) -> Allocation:
        """Minimise the predicted loss increase under all budgets (each a hard constraint)."""
        metrics = [budget.metric for budget in budgets]
        if len(set(metrics)) != len(metrics):
            raise InputError(
                f"each budget metric may be given once, got {', '.join(map(str, budgets))}"
            )
        for budget in budgets:
            smallest = self.smallest_achievable(budget.metric)
            if budget.value < smallest - 1e-9:
                raise InputError(
                    f"budget {budget} is infeasible: the smallest achievable {budget.metric} with "
                    f"these candidates and layer policy is {smallest:.4g}"
                )
        if self._highs is None:
            with _quiet_stdout():  # HiGHS prints a banner when the first model is created
                self._highs = self._build()
        highs = self._highs
        num_layers = len(self.table.layer_names)
        for offset, metric in enumerate(BUDGET_METRICS):
            given = [budget for budget in budgets if budget.metric == metric]
            upper = self._row_upper(given[0]) if given else highspy.kHighsInf
            highs.changeRowBounds(num_layers + offset, -highspy.kHighsInf, upper)
        start = time.perf_counter()
        with _quiet_stdout():
            highs.run()
        elapsed = time.perf_counter() - start
        status = highs.modelStatusToString(highs.getModelStatus())
        if highs.getModelStatus() == highspy.HighsModelStatus.kInfeasible:
            raise InputError(
                "budgets "
                + ", ".join(map(str, budgets))
                + " cannot all be met at once: each is feasible alone but together they conflict"
            )
        values = np.asarray(highs.getSolution().col_value)
        if values.size == 0:
            raise RuntimeError(f"HiGHS returned no solution (status: {status})")
        rows, columns = self._columns
        choice = np.full(num_layers, -1)
        picked = values > 0.5
        choice[rows[picked]] = columns[picked]
        if (choice < 0).any():
            raise RuntimeError(f"HiGHS solution is not one-hot (status: {status})")
        uses = []
        for budget in budgets:
            used = self.metric_value(budget.metric, choice)
            uses.append(
                BudgetUse(budget.metric, budget.value, used, used >= budget.value * (1 - 1e-3))
            )
        info = highs.getInfo()
        return Allocation(
            layer_names=self.table.layer_names,
            formats=tuple(self.table.format_names[index] for index in choice),
            bits=tuple(int(self.table.bits[index]) for index in choice),
            predicted_loss_increase=float(self.scores[np.arange(num_layers), choice].sum()),
            average_bits=self.metric_value("avg-bits", choice),
            size_bytes=self.metric_value("size-mb", choice) * BITS_PER_MB / 8,
            budgets=tuple(uses),
            status=status,
            mip_gap=float(info.mip_gap),
            solve_time_s=elapsed,
        )


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
