"""`lcpaq.allocation.units`: tied layers merged into units (scores and costs summed, pair terms
inside a unit moved onto its diagonal) and what an assignment of units scores and costs."""

from __future__ import annotations

import numpy as np
import pytest

from lcpaq.allocation.costs import CostModel
from lcpaq.allocation.units import merge_units
from lcpaq.errors import InputError


def cost_model() -> CostModel:
    size = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    return CostModel(("a", "b", "c"), ("f", "g"), {"size-mb": size}, {"size-mb": 0.5})


def test_tied_layers_become_one_unit() -> None:
    scores = np.array([[1.0, 2.0], [10.0, 20.0], [100.0, 200.0]])
    inside = np.array([[0.5, 7.0], [7.0, 0.25]])  # layers a, b: both hold the same format
    across = np.array([[1.0, 2.0], [3.0, 4.0]])  # C[c's format, a's format]
    units = merge_units(
        ("a", "b", "c"),
        scores,
        np.ones((3, 2), bool),
        cost_model(),
        {(0, 1): inside, (2, 0): across},
        np.array([0, 0, 1]),
        prune=False,
    )
    np.testing.assert_allclose(units.scores, [[11.5, 22.25], [100.0, 200.0]])
    np.testing.assert_allclose(units.costs["size-mb"], [[4.0, 6.0], [5.0, 6.0]])
    assert list(units.pairs) == [(0, 1)]
    np.testing.assert_allclose(units.pairs[(0, 1)], across.T)
    choice = np.array([1, 0])
    assert units.objective(choice) == 22.25 + 100.0 + across[0, 1]
    assert units.value("size-mb", choice) == 6.0 + 5.0 + 0.5
    assert units.weighted(choice, {"size-mb": 2.0}) == units.objective(choice) + 2 * 11.5
    np.testing.assert_allclose(
        units.weighted_scores({"size-mb": 2.0}), units.scores + 2 * units.costs["size-mb"]
    )


def test_tied_layers_need_a_common_format() -> None:
    allowed = np.array([[True, False], [False, True], [True, True]])
    with pytest.raises(InputError, match="tied layers a, b have no allowed format in common"):
        merge_units(
            ("a", "b", "c"),
            np.zeros((3, 2)),
            allowed,
            cost_model(),
            {},
            np.array([0, 0, 1]),
            prune=False,
        )
