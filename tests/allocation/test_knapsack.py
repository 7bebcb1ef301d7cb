"""`lcpaq.allocation.knapsack`: the multiple-choice knapsack optima and frontier against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from lcpaq.allocation.exact import LabelLimit
from lcpaq.allocation.knapsack import knapsack_frontier, knapsack_optima


@pytest.mark.parametrize("seed", range(20))
def test_knapsack_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(200 + seed)
    num_units = int(rng.integers(1, 7))
    sizes = rng.integers(1, 4, num_units)
    # Integer costs and scores give many exact ties.
    scores = [rng.integers(0, 5, n).astype(float) for n in sizes]
    costs = [rng.integers(0, 5, n).astype(float) for n in sizes]
    choices = np.array(list(itertools.product(*(range(n) for n in sizes))))
    units = np.arange(num_units)
    pad = max(sizes)
    score_table = np.array([np.pad(s, (0, pad - len(s))) for s in scores])
    cost_table = np.array([np.pad(c, (0, pad - len(c))) for c in costs])
    values = score_table[units, choices].sum(1)
    totals = cost_table[units, choices].sum(1)
    budgets = np.arange(-1.0, totals.max() + 2.0, 0.5)
    for budget, found in zip(budgets, knapsack_optima(scores, costs, budgets)):
        feasible = totals <= budget
        if not feasible.any():
            assert found is None
            continue
        assert found is not None
        choice, value = found
        assert value == values[feasible].min()
        assert score_table[units, choice].sum() == value
        assert cost_table[units, choice].sum() <= budget
    # The frontier: every point non-dominated, and every non-dominated (cost, value) present.
    frontier_costs, frontier_values, frontier_choices = knapsack_frontier(scores, costs)
    assert np.all(np.diff(frontier_costs) > 0) and np.all(np.diff(frontier_values) < 0)
    pairs = set(zip(totals.tolist(), values.tolist()))
    undominated = {
        (c, v)
        for c, v in pairs
        if not any(c2 <= c and v2 <= v and (c2, v2) != (c, v) for c2, v2 in pairs)
    }
    assert set(zip(frontier_costs.tolist(), frontier_values.tolist())) == undominated
    for cost, value, choice in zip(frontier_costs, frontier_values, frontier_choices):
        assert (cost_table[units, choice].sum(), score_table[units, choice].sum()) == (cost, value)


def test_knapsack_label_limit_and_tolerance() -> None:
    scores = [np.array([0.0, 1.0, 2.0, 3.0])] * 6
    costs = [np.array([3.0, 2.0, 1.0, 0.0]) + 0.1 * k for k in range(6)]
    with pytest.raises(LabelLimit):
        knapsack_optima(scores, costs, np.array([5.0]), max_labels=3)
    # A budget a hair below the cheapest total is met within the tolerance, not otherwise.
    cheapest = sum(float(c.min()) for c in costs)
    assert knapsack_optima(scores, costs, np.array([cheapest - 1e-9]))[0] is None
    found = knapsack_optima(scores, costs, np.array([cheapest - 1e-9]), tolerance=1e-8)[0]
    assert found is not None and found[1] == pytest.approx(18.0)
