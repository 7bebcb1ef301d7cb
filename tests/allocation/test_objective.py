"""`lcpaq.allocation.objective`: Σ s + Σ C and the weighted objective, against explicit sums."""

from __future__ import annotations

import numpy as np
import pytest

from lcpaq.allocation.objective import objective_value, weighted_objective


def test_objective_adds_scores_and_the_chosen_pair_entries() -> None:
    scores = np.array([[1.0, 2.0], [10.0, 20.0], [100.0, 200.0]])
    pairs = {
        (0, 1): np.array([[0.5, -0.25], [4.0, 8.0]]),
        (0, 2): np.array([[0.0, 3.0], [0.0, 0.0]]),
    }
    choice = np.array([0, 1, 1])
    assert objective_value(scores, pairs, choice) == 1.0 + 20.0 + 200.0 - 0.25 + 3.0
    assert objective_value(scores, {}, choice) == 221.0


def test_weighted_objective_adds_factor_times_cost() -> None:
    costs = {"size-mb": 2.0, "bitops-g": 30.0}
    value = weighted_objective(1.5, costs.__getitem__, {"size-mb": 0.25, "bitops-g": 0.1})
    assert value == pytest.approx(1.5 + 0.5 + 3.0)
    assert weighted_objective(1.5, costs.__getitem__, {}) == 1.5
