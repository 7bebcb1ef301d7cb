"""`lcpaq.allocation.solvers`: which exact method solves, and the one fallback to HiGHS when a
dynamic program keeps too many partial assignments."""

from __future__ import annotations

import numpy as np
import pytest
from allocation_cases import random_int_table

from lcpaq.allocation import solvers
from lcpaq.allocation.budgets import Budget
from lcpaq.allocation.exact import LabelLimit
from lcpaq.allocation.problem import AllocationProblem

pytestmark = pytest.mark.usefixtures("single_thread")


def problem_with(solver: str) -> AllocationProblem:
    rng = np.random.default_rng(11)
    bits = np.array([2, 3, 4, 8])
    params = rng.integers(50, 500, 6)
    table = random_int_table(tuple(f"l{k}" for k in range(6)), params, bits, rng)
    scores = 2.0 ** -bits[None, :] * rng.uniform(0.5, 2.0, (6, 4))
    return AllocationProblem(table, scores, np.ones((6, 4), bool), solver=solver)


def test_one_budget_without_pairs_is_a_knapsack() -> None:
    allocation = problem_with("auto").solve([Budget("avg-bits", 4.0)])
    assert allocation.solver == "knapsack"
    several = problem_with("auto").solve([Budget("avg-bits", 4.0), Budget("size-mb", 1.0)])
    assert several.solver == "highs"  # HiGHS' LP bound is tight there


def test_too_many_labels_fall_back_to_highs_unless_dp_is_forced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    budget = [Budget("avg-bits", 4.0)]
    exact = problem_with("auto").solve(budget)
    curve = problem_with("auto").pareto_curve("avg-bits", 6)
    monkeypatch.setattr(solvers, "KNAPSACK_MAX_LABELS", 2)
    fallback = problem_with("auto").solve(budget)
    assert fallback.solver == "highs" and fallback.formats == exact.formats
    swept = problem_with("auto").pareto_curve("avg-bits", 6)
    assert {point.solver for point in swept} == {"highs"}
    assert [p.formats for p in swept] == [p.formats for p in curve]
    with pytest.raises(LabelLimit):
        problem_with("dp").solve(budget)
    with pytest.raises(LabelLimit):
        problem_with("dp").pareto_curve("avg-bits", 6)
