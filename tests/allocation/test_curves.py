"""`lcpaq.allocation.curves`: model-level curves over any budget metric, uniform baselines, the budget slack
table, against brute force on tiny instances."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from allocation_cases import table

from lcpaq.allocation.budgets import Budget
from lcpaq.allocation.costs import CostModel, build_cost_model
from lcpaq.allocation.curves import (
    baseline_columns,
    budget_table,
    sweep_metric,
    uniform_points,
)
from lcpaq.allocation.problem import AllocationProblem
from lcpaq.allocation.table import CandidateTable, pair_candidates
from lcpaq.errors import InputError


def problem_for(candidates: CandidateTable, costs: CostModel | None = None) -> AllocationProblem:
    return AllocationProblem(
        candidates,
        candidates.error_sq,
        np.ones(candidates.error_sq.shape, dtype=bool),
        costs=costs
        or build_cost_model(
            candidates, macs_per_sample=100.0 * np.arange(1, len(candidates.layer_names) + 1)
        ),
    )


def brute_force(problem: AllocationProblem, budgets: list[Budget]) -> float:
    best = np.inf
    for choice in itertools.product(range(problem.scores.shape[1]), repeat=len(problem.scores)):
        choice_array = np.array(choice)
        if all(problem.metric_value(b.metric, choice_array) <= b.value + 1e-12 for b in budgets):
            best = min(best, problem.objective(choice_array))
    return best


@pytest.mark.parametrize("metric", ["avg-bits", "bitops-g", "size-mb"])
def test_sweep_of_any_metric_returns_optima(metric: str) -> None:
    problem = problem_for(table())
    fixed = [Budget("avg-bits", 7.0)] if metric != "avg-bits" else []
    points = sweep_metric(problem, metric, 12, fixed=fixed)
    values = [point["costs"][metric] for point in points]
    assert values == sorted(values) and len(points) >= 3
    assert len({tuple(point["formats"]) for point in points}) == len(points)
    for point in points:
        assert point["metric"] == metric and point["top1"] is None
        assert point["avg_bits"] == pytest.approx(point["costs"]["avg-bits"])
        assert point["avg_bits"] <= 7.0 + 1e-9 or metric == "avg-bits"
        for budget in point["budgets"]:  # optimal at every budget it is listed for
            optimum = brute_force(problem, [*fixed, Budget(metric, budget)])
            assert point["predicted_loss_increase"] == pytest.approx(optimum, rel=1e-9)
    with pytest.raises(InputError, match="at least 2 points"):
        sweep_metric(problem, metric, 1)


def test_uniform_baselines_pair_each_weight_format_with_itself() -> None:
    paired = pair_candidates(table(), ("int4", "int8"))
    assert [paired.format_names[c] for c in baseline_columns(paired)] == [
        "int2/int8",  # no int2 activations: the widest one
        "int4/int4",
        "int8/int8",
    ]
    problem = problem_for(paired)
    points = uniform_points(problem, paired)
    assert [point["format"] for point in points] == ["int2/int8", "int4/int4", "int8/int8"]
    macs = 100.0 * np.array([1, 2, 3])
    assert points[1]["costs"]["bitops-g"] == pytest.approx(macs.sum() * 4 * 4 / 1e9)
    assert points[0]["costs"]["bitops-g"] == pytest.approx(macs.sum() * 2 * 8 / 1e9)
    assert points[2]["predicted_loss_increase"] == pytest.approx(paired.error_sq[:, -1].sum())
    assert all(point["in_candidates"] for point in points)


def test_budget_table_slack_binding_and_limiting() -> None:
    candidates = table(2)  # 10 and 20 weights
    problem = problem_for(candidates)
    # 30 weights, at most 6 bits each on average: only the 10-weight layer can take int8.
    budgets = [Budget("avg-bits", 6.0), Budget("size-mb", 1.0)]
    allocation = problem.solve(budgets)
    rows = budget_table(problem, budgets, allocation)
    used_bits = allocation.costs["avg-bits"]
    assert rows[0]["metric"] == "avg-bits" and rows[0]["limit"] == 6.0
    assert rows[0]["used"] == pytest.approx(used_bits)
    assert rows[0]["slack"] == pytest.approx(6.0 - used_bits)
    assert rows[0]["slack_frac"] == pytest.approx((6.0 - used_bits) / 6.0)
    assert rows[0]["limiting"] is True  # without it both layers take int8
    assert rows[0]["predicted_loss_without"] == pytest.approx(candidates.error_sq[:, 2].sum())
    size_bytes = allocation.costs["size-mb"]
    assert rows[1]["slack"] == pytest.approx(1.0 - size_bytes)
    assert rows[1]["binding"] is False and rows[1]["limiting"] is False
    # A budget met exactly is binding: the optimum at avg-bits = its own value.
    exact = [Budget("avg-bits", used_bits)]
    rows = budget_table(problem, exact, problem.solve(exact))
    assert rows[0]["binding"] is True and rows[0]["slack"] == pytest.approx(0.0, abs=1e-12)


def test_cost_weights_carry_into_the_curve_and_the_budget_table() -> None:
    problem = problem_for(table())
    weights = {"bitops-g": 0.05, "avg-bits": 1.0}  # the avg-bits weight is dropped when swept
    points = sweep_metric(problem, "avg-bits", 6, cost_weights=weights)
    for point in points:
        for budget in point["budgets"]:
            expected = problem.solve([Budget("avg-bits", budget)], cost_weights={"bitops-g": 0.05})
            assert point["formats"] == list(expected.formats)
    budgets = [Budget("avg-bits", 5.0)]
    allocation = problem.solve(budgets, cost_weights=weights)
    (row,) = budget_table(problem, budgets, allocation, weights)
    without = problem.solve([], cost_weights=weights)
    assert row["predicted_loss_without"] == pytest.approx(without.predicted_loss_increase)
    assert row["limiting"] == (without.objective < allocation.objective * (1 - 1e-9))
