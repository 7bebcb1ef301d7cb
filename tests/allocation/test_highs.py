"""`lcpaq.allocation.highs`: the HiGHS model's arrays, starts and decoding, and HiGHS' process-wide
thread scheduler (one thread everywhere)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from allocation_cases import random_int_table

from lcpaq.allocation.budgets import Budget
from lcpaq.allocation.problem import AllocationProblem

pytestmark = pytest.mark.usefixtures("single_thread")
REPO = Path(__file__).resolve().parents[2]


def small_problem(linearization: str) -> AllocationProblem:
    rng = np.random.default_rng(7)
    bits = np.array([2, 4, 8])
    params = np.array([100, 300, 200])
    table = random_int_table(("a", "b", "c"), params, bits, rng)
    scores = 2.0 ** -bits[None, :] * rng.uniform(0.5, 2.0, (3, 3))
    pairs = {(0, 1): rng.normal(0, 0.01, (3, 3)), (1, 2): rng.normal(0, 0.01, (3, 3))}
    allowed = np.ones((3, 3), bool)
    return AllocationProblem(
        table, scores, allowed, pairwise=pairs, solver="highs", linearization=linearization
    )


@pytest.mark.parametrize("linearization", ["rlt", "mccormick"])
def test_every_assignment_meets_the_model_rows_exactly(linearization: str) -> None:
    """The start values of every assignment satisfy the model's rows, its objective is the
    problem's (times the objective scale), and decoding gives the assignment back."""
    problem = small_problem(linearization)
    budgets = [Budget("avg-bits", 5.1)]  # no assignment sits exactly on it (thirds)
    arrays = problem.milp_arrays(budgets)
    model = problem.solvers.highs
    for choice in np.ndindex(3, 3, 3):
        x = model.column_values(np.array(choice))
        rows = arrays["matrix"] @ x
        meets = problem.metric_value("avg-bits", np.array(choice)) <= 5.1
        inside = np.all(rows >= arrays["row_lower"] - 1e-9)
        below = np.all(rows <= arrays["row_upper"] + 1e-9)
        assert inside and below == meets
        objective = float(arrays["cost"] @ x) / float(arrays["objective_scale"])
        assert objective == pytest.approx(problem.objective(np.array(choice)), rel=1e-9, abs=1e-12)
        np.testing.assert_array_equal(problem.decode(x), choice)
    with pytest.raises(ValueError, match="not one-hot"):
        problem.decode(np.zeros(len(arrays["cost"])))


def test_dynamic_program_then_highs_in_a_fresh_process() -> None:
    """HiGHS fixes one thread scheduler per process at the first solve; the multiplier LPs of the
    dynamic program must use the MIP's single thread, or a later HiGHS solve fails."""
    script = """
import numpy as np
from lcpaq.allocation.budgets import Budget
from lcpaq.allocation.problem import AllocationProblem
from lcpaq.allocation.costs import build_cost_model
from lcpaq.allocation.table import CandidateTable
rng = np.random.default_rng(0)
bits = np.array([2, 4, 8])
params = rng.integers(100, 1000, 4)
weight = params[:, None] * bits[None, :].astype(float)
table = CandidateTable(layer_names=tuple(f"l{k}" for k in range(4)),
    format_names=("int2", "int4", "int8"), num_params=params, bits=bits, weight_bits=weight,
    size_bits=weight + 64.0, error_sq=rng.random((4, 3)), weighted_error=np.zeros((4, 3)))
# Activation bits given: the format registry (which imports torch) is not needed.
costs = build_cost_model(table, macs_per_sample=rng.integers(100, 1000, 4).astype(float),
    activation_bits=8, activation_sign_bits=0)
scores = 2.0 ** -bits[None, :] * rng.uniform(0.5, 2.0, (4, 3))
pairs = {(0, 1): rng.normal(0, 0.01, (3, 3))}
budgets = [Budget("avg-bits", 5.0), Budget("bitops-g", float(costs.value("bitops-g", np.ones(4, int))))]
allowed = np.ones((4, 3), bool)
dp = AllocationProblem(table, scores, allowed, costs=costs, pairwise=pairs, solver="dp").solve(budgets)
hs = AllocationProblem(table, scores, allowed, costs=costs, pairwise=pairs, solver="highs").solve(budgets)
assert dp.formats == hs.formats, (dp.formats, hs.formats)
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok\n"  # nothing else: HiGHS' banner and MIP lines stay off stdout
