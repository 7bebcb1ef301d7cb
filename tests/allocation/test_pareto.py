"""`lcpaq.allocation.pareto`: the swept budgets and the grouping of optima into distinct points."""

from __future__ import annotations

import numpy as np
import pytest

from lcpaq.allocation.pareto import check_points, check_swept_weight, distinct_optima, sweep_values
from lcpaq.errors import InputError


def test_sweep_values_run_from_high_to_low() -> None:
    np.testing.assert_allclose(sweep_values(4.0, 2.0, 5), [4.0, 3.5, 3.0, 2.5, 2.0])
    np.testing.assert_array_equal(sweep_values(4.0, 2.0, 1), [4.0])


def test_distinct_optima_keep_the_first_optimum_and_every_value() -> None:
    values = [4.0, 3.0, 2.0, 1.0]
    optima = [(("a",), "first"), (("a",), "second"), None, (("b",), "third")]
    assert distinct_optima(values, optima) == [("first", [4.0, 3.0]), ("third", [1.0])]


def test_sweep_checks() -> None:
    with pytest.raises(InputError, match="at least one point"):
        check_points(0)
    with pytest.raises(InputError, match="cost weight on the swept metric avg-bits"):
        check_swept_weight("avg-bits", {"avg-bits": 1.0})
    check_swept_weight("avg-bits", {"avg-bits": 0.0, "size-mb": 1.0})
