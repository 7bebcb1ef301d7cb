"""Minifloat grids in `lcpaq.quant.grids`: every bit pattern decoded (METHOD §0 table), rounding to
nearest with ties to even and saturation, and torch's float8 cast where it rounds the same (§7)."""

from __future__ import annotations

import pytest
import torch
from quant_cases import FP_TABLE, TORCH_DTYPES

from lcpaq.quant.formats import get_format
from lcpaq.quant.grids import fp_decode, fp_grid, fp_round_codes, round_to_grid

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("name", FP_TABLE)
def test_fp_grid_matches_the_method_table(name: str) -> None:
    e_bits, m_bits, bias, fmax, min_normal, min_subnormal, count = FP_TABLE[name]
    fmt = get_format(name)
    assert (fmt.kind, fmt.bits, fmt.exponent_bits, fmt.mantissa_bits) == (
        "fp",
        1 + e_bits + m_bits,
        e_bits,
        m_bits,
    )
    assert (fmt.bias, fmt.max_value) == (bias, fmax)
    grid = fp_grid(fmt)
    assert len(grid) == count == len(torch.unique(grid))
    assert float(grid.max()) == fmax and float(grid.min()) == -fmax
    assert torch.equal(grid, -grid.flip(0))
    positive = grid[grid > 0]
    assert float(positive.min()) == min_subnormal
    # The smallest normal: exponent field 1, mantissa 0.
    assert float(fp_decode(torch.tensor(1 << m_bits), fmt)) == min_normal
    assert 0.0 in grid.tolist()


def test_fp4_e2m1_positive_grid() -> None:
    grid = fp_grid(get_format("fp4_e2m1"))
    assert grid[grid >= 0].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


@pytest.mark.parametrize("name", FP_TABLE)
def test_every_grid_value_round_trips_exactly(name: str) -> None:
    fmt = get_format(name)
    grid = fp_grid(fmt).float()
    codes = fp_round_codes(grid, fmt)
    assert int(codes.min()) >= 0 and int(codes.max()) < 2**fmt.bits
    assert torch.equal(fp_decode(codes, fmt), grid)
    assert torch.equal(round_to_grid(grid, fmt), grid)
    # Every finite bit pattern decodes to a grid value and re-encodes to itself (except -0 -> +0).
    patterns = torch.arange(2**fmt.bits)
    values = fp_decode(patterns, fmt)
    finite = torch.isfinite(values) & (values != 0)
    assert torch.equal(fp_round_codes(values[finite], fmt), patterns[finite])


@pytest.mark.parametrize("name", TORCH_DTYPES)
def test_fp8_grid_equals_torch_on_every_bit_pattern(name: str) -> None:
    fmt = get_format(name)
    patterns = torch.arange(256, dtype=torch.uint8)
    expected = patterns.view(TORCH_DTYPES[name]).float()
    ours = fp_decode(patterns, fmt)
    assert torch.equal(torch.isnan(ours), torch.isnan(expected))
    assert torch.equal(ours[~torch.isnan(ours)], expected[~torch.isnan(expected)])
    finite = expected[torch.isfinite(expected)]
    assert torch.equal(torch.unique(finite).double(), fp_grid(fmt))


@pytest.mark.parametrize("name", TORCH_DTYPES)
def test_fp8_rounding_equals_torch_cast(name: str) -> None:
    """Random in-range values over many binades, every midpoint (ties) and every grid value: our
    round-to-nearest-even equals torch's float32 -> float8 cast, values and bit patterns."""
    fmt = get_format(name)
    generator = torch.Generator().manual_seed(0)
    magnitude = torch.exp2(torch.empty(200_000).uniform_(-20, 17, generator=generator))
    values = torch.randn(200_000, generator=generator).sign() * magnitude
    grid = fp_grid(fmt).float()
    midpoints = (grid[1:] + grid[:-1]) / 2
    values = torch.cat([values.clamp(-fmt.max_value, fmt.max_value), midpoints, grid])
    ours = round_to_grid(values.double(), fmt)  # float64: the grid search, not torch's cast
    cast = values.to(TORCH_DTYPES[name])
    assert torch.equal(ours, cast.double())
    nonzero = ours != 0  # torch keeps the sign of -0, we store +0
    codes = fp_round_codes(values.double(), fmt)
    assert torch.equal(codes[nonzero], cast.view(torch.uint8).long()[nonzero])


@pytest.mark.parametrize("name", TORCH_DTYPES)
def test_fp8_float32_fast_path_equals_the_grid_search(name: str) -> None:
    """float32 values take torch's cast; its codes equal the float64 grid search's, including
    saturation beyond ±max, ties, and +0 for negative values that round to zero."""
    fmt = get_format(name)
    generator = torch.Generator().manual_seed(1)
    magnitude = torch.exp2(torch.empty(100_000).uniform_(-30, 20, generator=generator))
    values = torch.randn(100_000, generator=generator).sign() * magnitude
    grid = fp_grid(fmt).float()
    tiny = float(grid[grid > 0].min()) / 4
    extremes = torch.tensor([0.0, -0.0, tiny, -tiny, 3 * fmt.max_value, -3 * fmt.max_value])
    values = torch.cat([values, (grid[1:] + grid[:-1]) / 2, grid, extremes])
    assert torch.equal(fp_round_codes(values, fmt), fp_round_codes(values.double(), fmt))
    assert torch.equal(round_to_grid(values, fmt).double(), round_to_grid(values.double(), fmt))
    assert fp_round_codes(torch.tensor([-tiny]), fmt).item() == 0
    assert not torch.signbit(round_to_grid(torch.tensor([-tiny]), fmt)).item()


@pytest.mark.parametrize("name", FP_TABLE)
def test_fp_rounding_saturates_at_max(name: str) -> None:
    fmt = get_format(name)
    fmax = fmt.max_value
    values = torch.tensor([fmax, fmax * 1.01, fmax * 1.5, 1e30, -fmax * 1.2, -3e38])
    expected = torch.tensor([fmax, fmax, fmax, fmax, -fmax, -fmax])
    assert torch.equal(round_to_grid(values, fmt), expected)


def test_fp_ties_go_to_even_mantissa() -> None:
    fmt = get_format("fp4_e2m1")  # grid 0, .5, 1, 1.5, 2, 3, 4, 6
    values = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -1.25, -5.0])
    expected = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.0, -1.0, -4.0])
    assert torch.equal(round_to_grid(values, fmt), expected)
    # Just off the midpoint: plain nearest.
    assert round_to_grid(torch.tensor([2.5001, 4.9999]), fmt).tolist() == [3.0, 4.0]
    e4m3 = get_format("fp8_e4m3")  # 1 + 1/16 lies between 1 (mantissa 000) and 1.125 (001)
    assert round_to_grid(torch.tensor([1.0625, 1.1875]), e4m3).tolist() == [1.0, 1.25]
