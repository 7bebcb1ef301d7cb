"""`lcpaq.allocation.local_search`: the greedy improvement stays feasible and never gets worse."""

from __future__ import annotations

import numpy as np
import pytest

from lcpaq.allocation.exact import ChainSolver
from lcpaq.allocation.local_search import improve


@pytest.mark.parametrize("seed", range(10))
def test_improve_keeps_budgets_and_lowers_the_objective(seed: int) -> None:
    rng = np.random.default_rng(seed)
    units, options = 7, 4
    scores = [np.sort(rng.random(options))[::-1] for _ in range(units)]  # dearer is better
    costs = [np.sort(rng.random((options, 2)), axis=0) for _ in range(units)]
    pairs = {(u, u + 1): 0.1 * rng.normal(size=(options, options)) for u in range(units - 1)}
    chain = ChainSolver(scores, costs, pairs)
    start = np.zeros(units, dtype=np.int64)  # the cheapest: feasible under any budget that is
    budgets = chain.cost(start) + np.array([1.0, 1.5])
    choice, value = improve(chain, start, budgets)
    assert value == chain.value(choice) <= chain.value(start)
    assert chain.meets(chain.cost(choice), budgets)
    optimum = chain.solve(budgets)
    assert optimum is not None and optimum.value <= value + 1e-12
