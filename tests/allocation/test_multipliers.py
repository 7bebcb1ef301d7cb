"""`lcpaq.allocation.multipliers`: the Lagrangian bound never exceeds the optimum (weak duality)
and, for one budget, the hull walk finds the best multiplier."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from lcpaq.allocation.exact import ChainSolver
from lcpaq.allocation.multipliers import Found, multipliers


@pytest.mark.parametrize("metrics", [1, 2])
@pytest.mark.parametrize("seed", range(8))
def test_bound_is_below_the_optimum(metrics: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    units, options = 5, 3
    scores = [rng.random(options) for _ in range(units)]
    costs = [rng.random((options, metrics)) for _ in range(units)]
    pairs = {(u, u + 1): 0.2 * rng.normal(size=(options, options)) for u in range(units - 1)}
    chain = ChainSolver(scores, costs, pairs)
    choices = [np.array(c) for c in itertools.product(range(options), repeat=units)]
    totals = np.array([chain.cost(c) for c in choices])
    budgets = np.quantile(totals, 0.4, axis=0)
    feasible = [c for c, t in zip(choices, totals) if np.all(t <= budgets)]
    optimum = min(chain.value(c) for c in feasible)
    found: Found = []
    lam, bound, _ = multipliers(chain, budgets, found)
    assert np.all(lam >= 0)
    assert bound <= optimum + 1e-9
    if metrics == 1:  # the best λ: the bound is the lower convex hull at the budget
        points = sorted((float(t[0]), chain.value(c)) for c, t in zip(choices, totals))
        best = max(
            min(v + mu * (c - budgets[0]) for c, v in points)
            for mu in np.linspace(0, float(lam[0]) * 2 + 1, 2001)
        )
        assert bound >= best - 1e-6
