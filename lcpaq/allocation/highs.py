"""The HiGHS model of the allocation ILP (METHOD §4), built and set up in one place.

Input: the units of an `lcpaq.allocation.units.Units` (allowed candidates, scores, costs per metric,
pairwise terms) and the linearization of the pair products. Output: a `HighsModel` that solves under
new budgets by changing row bounds only, under new cost weights by changing column costs, warm
started from a known assignment, and returns the format column per unit; `milp_arrays` gives the
same model to other MIP solvers (the benchmark).

Model: binary x[u, f] per allowed candidate, Σ_f x[u, f] = 1; one ≤ row per cost metric; pairwise
products y[uv, fg] ∈ [0, 1] linearised exactly, RLT (Σ_g y = x[u, f], Σ_f y = x[v, g]) or McCormick
(y ≤ x[u, f], y ≤ x[v, g], y ≥ x[u, f] + x[v, g] − 1). Rows and objective are scaled (HiGHS'
tolerances are absolute). `new_highs` is the one place that sets HiGHS' options; `quiet_stdout`
keeps its banner off our stdout. highspy, scipy.sparse and numpy; no torch.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, cast

import highspy
import numpy as np
from scipy import sparse

from lcpaq.allocation.result import Outcome

if TYPE_CHECKING:
    from lcpaq.allocation.budgets import Budget
    from lcpaq.allocation.units import Units

#: Budget rows are scaled so that their largest coefficient is this (HiGHS tolerances are absolute).
ROW_SCALE = 1e3


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


def new_highs(**options: float) -> highspy.Highs:
    """A HiGHS solver with output off and one thread, plus ``options``. HiGHS keeps one thread
    scheduler per process, fixed by the first solve: every solver here uses the same single thread,
    or a later one fails. Create it inside `quiet_stdout` (the first one prints a banner)."""
    highs = highspy.Highs()
    highs.setOptionValue("output_flag", False)
    for name, value in options.items():
        highs.setOptionValue(name, value)
    highs.setOptionValue("threads", 1)
    return highs


def one_hot_units(
    values: np.ndarray, units: np.ndarray, columns: np.ndarray, num_units: int
) -> np.ndarray:
    """Column per unit from x values (the first ``len(units)`` entries; x[k] is unit ``units[k]``
    holding column ``columns[k]``); -1 where no x of the unit is set (the caller raises)."""
    choice = np.full(num_units, -1)
    picked = np.asarray(values)[: len(units)] > 0.5
    choice[units[picked]] = columns[picked]
    return choice


class HighsModel:
    """The allocation ILP in HiGHS for one set of units; budgets and weights change in place.

    Args:
        units: the problem's units (allowed candidates, scores, costs, pairwise terms).
        linearization: ``rlt`` or ``mccormick`` for the pair products.
        mip_rel_gap: HiGHS' relative MIP gap (the absolute gap is 0).
        time_limit_s: HiGHS' time limit per solve.
    """

    def __init__(
        self, units: Units, linearization: str, mip_rel_gap: float, time_limit_s: float
    ) -> None:
        self.units = units
        self.linearization = linearization
        self.factors: dict[str, float] = {}  # cost weights the objective holds
        x_units, x_columns = np.nonzero(units.allowed)
        self.x_units, self.x_columns = x_units, x_columns
        self.x_index = -np.ones(units.allowed.shape, dtype=np.int64)
        self.x_index[x_units, x_columns] = np.arange(len(x_units))
        num_units = units.allowed.shape[0]
        self.metric_rows = {metric: num_units + k for k, metric in enumerate(units.metrics)}
        self.row_scale: dict[str, float] = {}
        self.y: list[tuple[int, int, int, int, int]] = []  # (column, u, f, v, g)
        self.model_arrays = self._arrays()
        lp = highspy.HighsLp()
        num_columns = len(self.model_arrays["cost"])
        matrix = cast(sparse.csc_matrix, self.model_arrays["matrix"])
        lp.num_col_, lp.num_row_ = num_columns, matrix.shape[0]
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
        lp.a_matrix_.value_ = np.asarray(matrix.data)
        lp.integrality_ = [highspy.HighsVarType.kInteger] * len(x_units) + [
            highspy.HighsVarType.kContinuous
        ] * (num_columns - len(x_units))
        self.highs = new_highs(mip_rel_gap=mip_rel_gap, mip_abs_gap=0.0, time_limit=time_limit_s)
        self.highs.passModel(lp)

    def _arrays(self) -> dict[str, np.ndarray]:
        """cost, matrix (CSC), row bounds and integrality of the whole model."""
        units, x_units, x_columns = self.units, self.x_units, self.x_columns
        num_units = units.allowed.shape[0]
        entries: list[tuple[int, int, float]] = []  # (row, column, value)
        cost = list(units.scores[x_units, x_columns])
        lower = [1.0] * num_units + [-highspy.kHighsInf] * len(self.metric_rows)
        upper = [1.0] * num_units + [highspy.kHighsInf] * len(self.metric_rows)
        entries += [(int(u), k, 1.0) for k, u in enumerate(x_units)]
        for metric, row in self.metric_rows.items():
            values = units.costs[metric][x_units, x_columns]
            largest = float(np.abs(values).max()) if len(values) else 0.0
            self.row_scale[metric] = ROW_SCALE / largest if largest > 0 else 1.0
            scaled = values * self.row_scale[metric]
            entries += [(row, k, float(value)) for k, value in enumerate(scaled) if value != 0]
        num_columns = self._pair_products(entries, cost, lower, upper)
        cost_array = np.asarray(cost, dtype=float)
        # HiGHS' tolerances are absolute: scale the objective to a largest coefficient of 1.
        largest = float(np.abs(cost_array).max()) if len(cost_array) else 0.0
        self.objective_scale = 1.0 / largest if largest > 0 else 1.0
        rows_, cols_, vals_ = (np.array(part) for part in zip(*entries))
        matrix = sparse.csc_matrix((vals_, (rows_, cols_)), shape=(len(lower), num_columns))
        return {
            "cost": cost_array * self.objective_scale,
            "matrix": matrix,
            "row_lower": np.array(lower),
            "row_upper": np.array(upper),
            "integrality": np.r_[np.ones(len(x_units)), np.zeros(num_columns - len(x_units))],
        }

    def _pair_products(
        self,
        entries: list[tuple[int, int, float]],
        cost: list[float],
        lower: list[float],
        upper: list[float],
    ) -> int:
        """Append the columns and rows of the products y = x[u, f]·x[v, g]; the column count."""
        num_columns = len(self.x_units)
        row = len(lower)
        allowed, x_index = self.units.allowed, self.x_index
        for (u, v), matrix in self.units.pairs.items():
            fs, gs = np.flatnonzero(allowed[u]), np.flatnonzero(allowed[v])
            y_index = {}
            for f, g in itertools.product(fs, gs):
                if self.linearization == "mccormick" and matrix[f, g] == 0:
                    continue  # a zero-cost product never changes the objective
                y_index[f, g] = num_columns
                self.y.append((num_columns, u, int(f), v, int(g)))
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
        return num_columns

    def row_bounds(self, budgets: Sequence[Budget]) -> dict[int, float]:
        """Upper bound of every budget row (scaled) for these budgets; others are infinite."""
        bounds = {row: highspy.kHighsInf for row in self.metric_rows.values()}
        for budget in budgets:
            scale = self.row_scale[budget.metric]
            limit = budget.value - self.units.offsets[budget.metric]
            bounds[self.metric_rows[budget.metric]] = limit * scale
        return bounds

    def milp_arrays(self, budgets: Sequence[Budget]) -> dict[str, np.ndarray]:
        """The model as arrays, with these budgets' row bounds, for other MIP solvers (the
        benchmark): minimise cost·x s.t. row_lower ≤ matrix·x ≤ row_upper, 0 ≤ x ≤ 1, x binary
        where ``integrality`` is 1. ``cost`` is the objective times ``objective_scale``."""
        arrays = dict(self.model_arrays)
        upper = arrays["row_upper"].copy()
        for row, bound in self.row_bounds(budgets).items():
            upper[row] = bound
        arrays["row_upper"] = upper
        arrays["objective_scale"] = np.array(self.objective_scale)
        return arrays

    def decode(self, column_values: np.ndarray) -> np.ndarray:
        """Column per unit of a solution of `model_arrays`; -1 where it is not one-hot."""
        return one_hot_units(
            column_values, self.x_units, self.x_columns, self.units.allowed.shape[0]
        )

    def column_values(self, unit_choice: np.ndarray) -> np.ndarray:
        """The x and y values of an assignment (a column per unit): a start for HiGHS."""
        values = np.zeros(len(self.x_units) + len(self.y))
        values[self.x_index[np.arange(len(unit_choice)), unit_choice]] = 1.0
        for column, u, f, v, g in self.y:
            values[column] = float(unit_choice[u] == f and unit_choice[v] == g)
        return values

    def _set_objective(self, factors: Mapping[str, float]) -> None:
        """Cost weights change the x columns' objective coefficients only."""
        if dict(factors) == self.factors:
            return
        x_units, x_columns = self.x_units, self.x_columns
        cost = self.units.weighted_scores(factors)[x_units, x_columns] * self.objective_scale
        indices = np.arange(len(x_units), dtype=np.int32)
        self.highs.changeColsCost(len(x_units), indices, cost)
        self.factors = dict(factors)

    def run(
        self,
        budgets: Sequence[Budget],
        factors: Mapping[str, float],
        start: np.ndarray | None = None,
    ) -> Outcome:
        """Solve under ``budgets`` with objective weights ``factors``, from the assignment
        ``start`` (a column per unit) when one is given."""
        highs = self.highs
        for row, upper in self.row_bounds(budgets).items():
            highs.changeRowBounds(row, -highspy.kHighsInf, upper)
        self._set_objective(factors)
        if start is not None:
            solution = highspy.HighsSolution()
            solution.col_value = self.column_values(start)
            solution.value_valid = True
            highs.setSolution(solution)
        begin = time.perf_counter()
        with quiet_stdout():
            highs.run()
            original_cost = _rescaled_rerun(highs)
        elapsed = time.perf_counter() - begin
        model_status = highs.getModelStatus()
        status = highs.modelStatusToString(model_status)
        gap = float(highs.getInfo().mip_gap)
        values = np.array(highs.getSolution().col_value)
        if original_cost is not None:  # changing the model clears HiGHS' results: read them first
            indices = np.arange(len(original_cost), dtype=np.int32)
            highs.changeColsCost(len(original_cost), indices, original_cost)
        if model_status == highspy.HighsModelStatus.kInfeasible:
            return Outcome(None, status, 0.0, elapsed, "highs")
        if values.size == 0:
            raise RuntimeError(f"HiGHS returned no solution (status: {status})")
        choice = self.decode(values)
        if (choice < 0).any():
            raise RuntimeError(f"HiGHS solution is not one-hot (status: {status})")
        return Outcome(choice, status, gap, elapsed, "highs")


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
