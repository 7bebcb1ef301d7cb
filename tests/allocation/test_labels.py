"""`lcpaq.allocation.labels`: the dominance filter against brute force (the exact solve through
it is tested against enumeration in test_exact.py)."""

from __future__ import annotations

import numpy as np
import pytest

from lcpaq.allocation.labels import dominance


def dominated_by_another(groups: np.ndarray, costs: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Brute force: a label some other label of its group beats or equals in every cost and the
    value (of identical labels, all but the first)."""
    count = len(values)
    result = np.zeros(count, dtype=bool)
    for i in range(count):
        for j in range(count):
            if i == j or groups[i] != groups[j]:
                continue
            no_worse = np.all(costs[j] <= costs[i]) and values[j] <= values[i]
            identical = np.all(costs[j] == costs[i]) and values[j] == values[i]
            if no_worse and (not identical or j < i):
                result[i] = True
    return result


@pytest.mark.parametrize("num_costs", [0, 1, 2, 3])
@pytest.mark.parametrize("seed", range(10))
def test_dominance_drops_only_dominated_labels(num_costs: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    count = int(rng.integers(20, 60))
    groups = np.sort(rng.integers(0, 4, count))
    costs = rng.integers(0, 4, (count, num_costs)).astype(float)  # small integers: many ties
    if num_costs == 1:  # exact for one cost up to equal costs (the later one may survive)
        costs = rng.permutation(count)[:, None].astype(float)
    values = rng.integers(0, 6, count).astype(float)
    kept = dominance(groups, costs, values)
    dominated = dominated_by_another(groups, costs, values)
    assert not np.any(~kept & ~dominated)  # never a wrong drop
    if num_costs <= 1:  # exact there: every dominated label goes
        np.testing.assert_array_equal(kept, ~dominated)
