"""`lcpaq.allocation.diagnose`: why budgets cannot all be met, diagnosed once per solve, against
tiny instances whose conflicts are known by hand."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pytest
from allocation_cases import table

from lcpaq.allocation.budgets import Budget
from lcpaq.allocation.costs import BITS_PER_MB, CostModel, build_cost_model
from lcpaq.allocation.diagnose import InfeasibleBudgets, diagnose, infeasibility_report
from lcpaq.allocation.problem import AllocationProblem
from lcpaq.allocation.result import Outcome
from lcpaq.allocation.table import CandidateTable
from lcpaq.errors import InputError


def problem_for(candidates: CandidateTable, costs: CostModel) -> AllocationProblem:
    return AllocationProblem(
        candidates, candidates.error_sq, np.ones(candidates.error_sq.shape, dtype=bool), costs=costs
    )


def opposed_problem() -> tuple[AllocationProblem, Budget, Budget]:
    """Two layers, two formats: int2 costs 1 in size but 10 in BitOps, int8 the other way round;
    with the two budgets returned, each is feasible alone but not both together."""
    candidates = CandidateTable(
        layer_names=("l0", "l1"),
        format_names=("int2", "int8"),
        num_params=np.array([100, 100]),
        bits=np.array([2, 8]),
        weight_bits=np.array([[200.0, 800.0], [200.0, 800.0]]),
        size_bits=np.array([[200.0, 800.0], [200.0, 800.0]]),
        error_sq=np.ones((2, 2)),
        weighted_error=np.full((2, 2), np.nan),
    )
    costs = build_cost_model(candidates, macs_per_sample=np.array([1e9, 1e9]), activation_bits=8)
    costs = CostModel(
        costs.layer_names,
        costs.format_names,
        {**costs.coefficients, "bitops-g": np.array([[10.0, 1.0], [10.0, 1.0]])},
        costs.offsets,
    )
    problem = AllocationProblem(candidates, np.ones((2, 2)), np.ones((2, 2), bool), costs=costs)
    return problem, Budget("size-mb", 700 / BITS_PER_MB), Budget("bitops-g", 5.0)


def test_conflicting_budgets_are_named() -> None:
    problem, size, bitops = opposed_problem()
    table = problem.table
    with pytest.raises(InputError, match="cannot all be met at once") as info:
        problem.solve([size, bitops, Budget("avg-bits", 8.0)])
    message = str(info.value)
    assert f"conflicting pairs: {size} with {bitops}" in message
    assert "smallest achievable size-mb 5e-05, bitops-g 2, avg-bits 2" in message
    with pytest.raises(InputError, match="bitops-g=1 is infeasible.*smallest achievable bitops-g"):
        problem.solve([Budget("bitops-g", 1.0)])
    with pytest.raises(InputError, match="needs MACs per layer"):
        AllocationProblem(table, np.ones((2, 2)), np.ones((2, 2), bool)).solve(
            [Budget("bitops-g", 5.0)]
        )


def test_infeasible_budgets_are_explained() -> None:
    candidates = table(2)
    base = build_cost_model(candidates)
    # A measured latency table where int8 is *faster* than int2/int4 (e.g. no low-bit kernels):
    # small size and low latency pull in opposite directions.
    latency = np.array([[2.0, 2.0, 1.0], [2.0, 2.0, 1.0]])
    costs = CostModel(
        base.layer_names,
        base.format_names,
        {**base.coefficients, "latency-ms": latency},
        {**base.offsets, "latency-ms": 0.0},
    )
    problem = problem_for(candidates, costs)
    budgets = [Budget("avg-bits", 3.9), Budget("latency-ms", 3.0), Budget("size-mb", 1e-6)]
    with pytest.raises(InputError) as raised:
        problem.solve(budgets)
    explanation = infeasibility_report(problem, budgets, raised.value)
    rows = {row["metric"]: row for row in explanation["per_budget"]}
    assert rows["avg-bits"]["smallest_achievable"] == pytest.approx(2.0)
    assert rows["latency-ms"]["smallest_achievable"] == pytest.approx(2.0)
    assert rows["avg-bits"]["feasible_alone"] and rows["latency-ms"]["feasible_alone"]
    assert rows["size-mb"]["feasible_alone"] is False
    assert rows["size-mb"]["shortfall"] == pytest.approx(30 * 2 / 8e6 - 1e-6)
    # avg-bits ≤ 3.9 keeps both layers below 8 bits; latency ≤ 3 needs one int8 layer.
    assert explanation["conflicting_pairs"] == [["avg-bits=3.9", "latency-ms=3"]]
    assert explanation["budgets"] == ["avg-bits=3.9", "latency-ms=3", "size-mb=1e-06"]


def test_a_conflict_is_diagnosed_once_and_reported_from_the_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The solve that fails solves each pair once; the report reuses that diagnosis (before, the
    allocate stage solved every pair a second time)."""
    problem, size, bitops = opposed_problem()
    budgets = [size, bitops, Budget("avg-bits", 8.0)]
    calls: list[tuple[str, ...]] = []
    run = problem.solvers.run

    def counted(budgets: Sequence[Budget], factors: Mapping[str, float]) -> Outcome:
        calls.append(tuple(str(budget) for budget in budgets))
        return run(budgets, factors)

    monkeypatch.setattr(problem.solvers, "run", counted)
    with pytest.raises(InfeasibleBudgets) as raised:
        problem.solve(budgets)
    assert len(calls) == 1 + 3  # the solve, then each of the three pairs once
    assert sorted(calls[1:]) == sorted(
        [(str(a), str(b)) for a, b in [(size, bitops), (size, budgets[2]), (bitops, budgets[2])]]
    )
    report = infeasibility_report(problem, budgets, raised.value)
    assert len(calls) == 4  # nothing solved again
    assert report == raised.value.diagnosis.to_dict(str(raised.value))
    assert report == diagnose(problem, budgets).to_dict(str(raised.value))
    assert report["conflicting_pairs"] == [[str(size), str(bitops)]]
    assert [row["feasible_alone"] for row in report["per_budget"]] == [True, True, True]


def test_a_repeated_metric_counts_as_a_conflicting_pair() -> None:
    problem, size, _ = opposed_problem()
    budgets = [size, Budget("size-mb", 1.0)]
    with pytest.raises(InputError, match="each budget metric may be given once") as raised:
        problem.solve(budgets)
    report = infeasibility_report(problem, budgets, raised.value)
    assert report["conflicting_pairs"] == [[str(size), "size-mb=1"]]
