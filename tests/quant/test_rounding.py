"""Clipping ranges in `lcpaq.quant.rounding`: the MSE search never loses to min-max and pays off
where it should."""

from __future__ import annotations

import pytest
import torch
from quant_cases import BITS, spread_weight

from lcpaq.quant.formats import (
    QuantScheme,
    get_format,
)
from lcpaq.quant.weights import (
    fake_quantize,
)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
@pytest.mark.parametrize("bits", BITS)
def test_mse_clipping_never_worse_than_minmax(bits: int, symmetric: bool, granularity: str) -> None:
    weight = spread_weight(40 + bits)
    fmt = get_format(f"int{bits}")
    rows = weight.shape[0] if granularity == "channel" else 1

    def group_errors(clipping: str) -> torch.Tensor:
        scheme = QuantScheme(symmetric=symmetric, granularity=granularity, clipping=clipping)
        delta = (fake_quantize(weight, fmt, scheme) - weight).double()
        return delta.reshape(rows, -1).pow(2).sum(1)

    mse, minmax = group_errors("mse"), group_errors("minmax")
    # The MSE grid contains ratio 1 (min-max), so it can only be better.
    assert bool((mse <= minmax * (1 + 1e-5) + 1e-12).all())


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3])
def test_mse_clipping_pays_off_on_gaussian_weights(bits: int, symmetric: bool) -> None:
    """At 2-3 bits the min-max range wastes grid points on the tails of a Gaussian."""
    weight = torch.randn(6, 200, generator=torch.Generator().manual_seed(70))
    fmt = get_format(f"int{bits}")
    errors = {
        clipping: (fake_quantize(weight, fmt, QuantScheme(symmetric=symmetric, clipping=clipping)))
        .sub(weight)
        .pow(2)
        .sum(1)
        for clipping in ("mse", "minmax")
    }
    assert bool((errors["mse"] < 0.95 * errors["minmax"]).all())


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp6_e2m3", "fp4_e2m1"])
def test_fp_mse_clipping_never_worse_than_minmax(name: str) -> None:
    weight = torch.randn(6, 200, generator=torch.Generator().manual_seed(81))
    fmt = get_format(name)
    errors = {
        clipping: (fake_quantize(weight, fmt, QuantScheme(clipping=clipping)) - weight)
        .pow(2)
        .sum(1)
        for clipping in ("mse", "minmax")
    }
    assert bool((errors["mse"] <= errors["minmax"] * (1 + 1e-5)).all())
