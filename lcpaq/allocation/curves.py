"""Model-level curves and budget accounting over a solved allocation problem (METHOD §3, §4).

* `sweep_metric`: the model-level Pareto curve along one cost metric (any of
  `lcpaq.allocation.costs.COST_METRICS`), the run's other budgets held fixed, from
  `lcpaq.allocation.problem.AllocationProblem.pareto_curve` (every distinct optimum once).
* `uniform_points`: single-format baselines (every weight format of the table, plus INT8, INT4 and
  FP8 when the caller measured them), with every cost metric, so they sit on the same axes.
* `budget_table`: per budget its limit, used value, slack, whether it is binding (used up to 0.1 %)
  and whether it is *limiting* (dropping it alone would lower the predicted loss increase).

Numpy only; the problem is any `lcpaq.allocation.problem.Allocator` (why budgets conflict is
`lcpaq.allocation.diagnose`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lcpaq.allocation.budgets import BINDING_TOLERANCE, Budget
from lcpaq.allocation.costs import BITS_PER_MB, CostModel
from lcpaq.allocation.problem import Allocator
from lcpaq.allocation.result import Allocation
from lcpaq.allocation.table import CandidateTable
from lcpaq.errors import InputError

#: Uniform baselines drawn on every model-level curve (the issue's INT8 / INT4 / FP8).
BASELINE_FORMATS = ("int8", "int4", "fp8_e4m3")


def _point(costs: Mapping[str, float], predicted: float) -> dict[str, Any]:
    return {
        "costs": {metric: float(value) for metric, value in costs.items()},
        "avg_bits": float(costs["avg-bits"]),
        "size_bytes": float(costs["size-mb"]) * BITS_PER_MB / 8,
        "predicted_loss_increase": float(predicted),
        "top1": None,
    }


def sweep_metric(
    problem: Allocator,
    metric: str,
    num_points: int,
    *,
    fixed: Sequence[Budget] = (),
    low: float | None = None,
    high: float | None = None,
    cost_weights: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Distinct optima over ``num_points`` budgets on ``metric`` (increasing ``metric``).

    Each point: ``metric``, ``budgets`` (the swept values it is optimal for), ``costs`` (every
    metric), ``avg_bits``, ``size_bytes``, ``predicted_loss_increase`` (pairwise terms included),
    ``formats`` (candidate per layer), ``mip_gap`` and ``top1`` (None until measured).
    ``fixed`` budgets on other metrics are held as hard limits; ``cost_weights`` (the run's λ) are
    kept on the other metrics (a weight on the swept metric would change along the sweep).
    """
    if num_points < 2:
        raise InputError(f"a model-level curve needs at least 2 points, got {num_points}")
    problem.costs.require(metric)
    others = [budget for budget in fixed if budget.metric != metric]
    if low is not None:
        low = max(low, problem.smallest_achievable(metric))
    weights = {k: v for k, v in (cost_weights or {}).items() if k != metric and v}
    points = []
    curve = problem.pareto_curve(
        metric, num_points, budgets=others, low=low, high=high, cost_weights=weights or None
    )
    for point in curve:
        choice = np.array([problem.table.format_index(name) for name in point.formats])
        entry = _point(point.costs, problem.objective(choice))
        entry.update(
            metric=metric,
            budgets=[float(value) for value in point.budgets],
            formats=list(point.formats),
            mip_gap=float(point.mip_gap),
        )
        points.append(entry)
    return points


def baseline_columns(table: CandidateTable) -> list[int]:
    """One uniform baseline per weight format: the candidate whose activation format is the
    weight format itself when the table has it (W8A8, W4A4), else the widest activation."""
    columns = []
    for weight in dict.fromkeys(table.weight_formats):
        same = [
            c
            for c, (w, a) in enumerate(zip(table.weight_formats, table.activation_formats))
            if w == weight and a == weight
        ]
        columns.append(same[0] if same else table.candidate_index(weight))
    return columns


def uniform_points(problem: Allocator, table: CandidateTable) -> list[dict[str, Any]]:
    """Uniform assignments of `baseline_columns`, each with every cost metric."""
    points = []
    for column in baseline_columns(table):
        choice = np.full(len(table.layer_names), column)
        entry = _point(problem.costs.values(choice), problem.objective(choice))
        entry.update(
            format=table.format_names[column],
            weight_format=table.weight_formats[column],
            activation_format=table.activation_formats[column],
            in_candidates=True,
        )
        points.append(entry)
    return points


def extra_uniform_points(
    table: CandidateTable, costs: CostModel, scores: np.ndarray
) -> list[dict[str, Any]]:
    """Uniform points of formats measured outside the candidate set (baselines only): ``table``,
    ``costs`` and ``scores`` describe them alone; no pairwise terms."""
    points = []
    for column, name in enumerate(table.format_names):
        choice = np.full(len(table.layer_names), column)
        entry = _point(costs.values(choice), float(scores[:, column].sum()))
        entry.update(
            format=name,
            weight_format=table.weight_formats[column],
            activation_format=table.activation_formats[column],
            in_candidates=False,
        )
        points.append(entry)
    return points


def budget_table(
    problem: Allocator,
    budgets: Sequence[Budget],
    allocation: Allocation,
    cost_weights: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Limit, used value, slack and binding/limiting status of every budget.

    ``slack`` = limit − used (in the metric's unit), ``slack_frac`` = slack / limit. ``binding``:
    used ≥ limit·(1 − 0.1 %). ``limiting``: re-solving without this budget (the others kept)
    lowers the predicted loss increase by more than 10⁻⁹ relative, i.e. the budget decides the
    allocation; a binding budget need not be limiting (another budget may force the same choice).
    With ``cost_weights`` (λ) the re-solve keeps them and the minimised objective is compared.
    """
    weights = {k: v for k, v in (cost_weights or {}).items() if v}

    def value(result: Allocation) -> float:
        objective = result.objective
        return result.predicted_loss_increase if objective is None or not weights else objective

    rows = []
    for budget in budgets:
        choice = np.array([problem.table.format_index(name) for name in allocation.formats])
        used = problem.costs.value(budget.metric, choice)
        without = problem.solve(
            [other for other in budgets if other is not budget], cost_weights=weights or None
        )
        gain = value(allocation) - value(without)
        scale = max(abs(value(allocation)), 1e-300)
        rows.append(
            {
                "metric": budget.metric,
                "limit": budget.value,
                "used": used,
                "slack": budget.value - used,
                "slack_frac": (budget.value - used) / budget.value,
                "binding": used >= budget.value * (1 - BINDING_TOLERANCE),
                "limiting": gain > 1e-9 * scale,
                "predicted_loss_without": without.predicted_loss_increase,
            }
        )
    return rows
