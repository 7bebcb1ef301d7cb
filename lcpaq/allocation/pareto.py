"""The model-level Pareto sweep, in one place: budgets on one metric and the distinct optima.

Input: the range of the swept metric, the number of points and a solve per budget value. Output:
every distinct optimum once, with the swept values it is optimal for, by increasing metric.
`lcpaq.allocation.problem.AllocationProblem.pareto_curve` and
`lcpaq.allocation.pairwise.AugmentedProblem.pareto_curve` differ only in how they solve. Numpy only.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from typing import TypeVar

import numpy as np

from lcpaq.errors import InputError

T = TypeVar("T")


def check_points(num_points: int) -> None:
    if num_points < 1:
        raise InputError(f"a Pareto sweep needs at least one point, got {num_points}")


def check_swept_weight(metric: str, cost_weights: Mapping[str, float] | None) -> None:
    """A cost weight on the swept metric would change the objective along the sweep."""
    if cost_weights and cost_weights.get(metric, 0):
        raise InputError(
            f"a cost weight on the swept metric {metric} would change the objective along the "
            "sweep; weight another metric or sweep without it"
        )


def sweep_values(high: float, low: float, num_points: int) -> np.ndarray:
    """``num_points`` budgets evenly spaced from ``high`` down to ``low`` (``high`` alone for 1)."""
    return np.linspace(high, low, num_points) if num_points > 1 else np.array([high])


def distinct_optima(
    values: Iterable[float], optima: Iterable[tuple[Hashable, T] | None]
) -> list[tuple[T, list[float]]]:
    """Group the optimum of each swept value (None: infeasible there) by its assignment ``key``:
    the first optimum of each assignment, with every value it is optimal for."""
    found: dict[Hashable, tuple[T, list[float]]] = {}
    for value, optimum in zip(values, optima):
        if optimum is None:
            continue
        key, item = optimum
        found.setdefault(key, (item, []))[1].append(float(value))
    return list(found.values())
