"""Minifloat grids (METHOD §0): every bit pattern of a `lcpaq.quant.formats.NumberFormat` decoded
once, rounding to the grid by bucketize on midpoints (ties to even mantissa, saturating), and
torch's own float8 cast where it rounds the same way. The torch half of the format registry:
`lcpaq.quant.formats` holds the bit layouts, this module the values they decode to.
"""

from __future__ import annotations

import functools
import math

import torch

from lcpaq.errors import InputError
from lcpaq.quant.formats import NumberFormat, get_format


def _decode_pattern(fmt: NumberFormat, code: int) -> float:
    """The value of one bit pattern S.E…E.M…M (NaN/inf for the special patterns)."""
    e_bits, m_bits = fmt.exponent_bits, fmt.mantissa_bits
    sign = -1.0 if code >> (e_bits + m_bits) & 1 else 1.0
    exponent = (code >> m_bits) & ((1 << e_bits) - 1)
    mantissa = code & ((1 << m_bits) - 1)
    all_ones = exponent == (1 << e_bits) - 1
    if fmt.special_values == "ieee" and all_ones:
        return sign * math.inf if mantissa == 0 else math.nan
    if fmt.special_values == "fn" and all_ones and mantissa == (1 << m_bits) - 1:
        return math.nan
    if exponent == 0:  # subnormal: 2^(1-bias) · m / 2^M
        return sign * 2.0 ** (1 - fmt.bias) * mantissa / 2**m_bits
    return sign * 2.0 ** (exponent - fmt.bias) * (1 + mantissa / 2**m_bits)


@functools.cache
def _decode_table(name: str) -> torch.Tensor:
    """float64 [2^bits]: the value of every code (bit pattern), NaN/inf where the format has them."""
    fmt = get_format(name)
    return torch.tensor([_decode_pattern(fmt, code) for code in range(2**fmt.bits)])


@functools.cache
def _positive_grid(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The finite values ≥ 0 (float64, ascending; index = magnitude code) and their midpoints."""
    table = _decode_table(name)
    fmt = get_format(name)
    magnitudes = table[: 2 ** (fmt.bits - 1)]
    grid = magnitudes[torch.isfinite(magnitudes)]
    # Sign-magnitude with a biased exponent: magnitude codes are in value order, NaN/inf last.
    assert bool((grid[1:] > grid[:-1]).all()) and float(grid[-1]) == fmt.max_value
    return grid, (grid[1:] + grid[:-1]) / 2


def fp_grid(fmt: NumberFormat) -> torch.Tensor:
    """All distinct finite values of a minifloat, ascending (float64; ±0 counted once)."""
    if fmt.kind != "fp":
        raise InputError(f"{fmt.name} is not a floating-point format")
    positive, _ = _positive_grid(fmt.name)
    return torch.cat([-positive[1:].flip(0), positive])


#: Minifloats torch has as dtypes, with our bit layout (sign, biased exponent, mantissa).
_TORCH_MINIFLOATS: dict[str, torch.dtype] = {
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


def fp_round_codes(values: torch.Tensor, fmt: NumberFormat) -> torch.Tensor:
    """Bit patterns (int64) of the nearest grid value, ties to even mantissa, saturating at ±max.

    Values that round to zero get +0 (code 0). ``values`` must be finite.
    """
    cast = _torch_cast(values, fmt)
    if cast is not None:
        codes = cast.view(torch.uint8).long()
        return torch.where(codes == 1 << (fmt.bits - 1), 0, codes)  # -0 -> +0
    grid, midpoints = _positive_grid(fmt.name)
    magnitude = values.abs().double()
    index = torch.bucketize(magnitude, midpoints.to(values.device))  # a tie goes down here ...
    at_tie = magnitude == midpoints.to(values.device)[index.clamp(max=len(midpoints) - 1)]
    # ... and up instead when the lower neighbour's mantissa is odd: consecutive magnitude codes
    # alternate in their last (mantissa) bit, so "even code" is "even mantissa".
    index = index + (at_tie & (index % 2 == 1)).long()
    negative = (values < 0) & (index > 0)
    return index + negative.long() * (1 << (fmt.bits - 1))


def _torch_cast(values: torch.Tensor, fmt: NumberFormat) -> torch.Tensor | None:
    """``values`` rounded by torch's own float8 cast where it rounds as `fp_round_codes` does
    (float32 values: to nearest, ties to even; the clamp saturates), 3-10x faster (FP8
    activations at inference); None elsewhere. Not for float64: torch casts via float32, and
    rounding twice can move a value just off a midpoint onto it."""
    if values.dtype != torch.float32 or fmt.name not in _TORCH_MINIFLOATS:
        return None
    return values.clamp(-fmt.max_value, fmt.max_value).to(_TORCH_MINIFLOATS[fmt.name])


def fp_decode(codes: torch.Tensor, fmt: NumberFormat) -> torch.Tensor:
    """float32 values of minifloat bit patterns (any integer dtype)."""
    table = _decode_table(fmt.name).float().to(codes.device)
    return table[codes.long()]


def round_to_grid(values: torch.Tensor, fmt: NumberFormat) -> torch.Tensor:
    """Round float values (scale 1) to the nearest minifloat value, ties to even, saturating."""
    cast = _torch_cast(values, fmt)
    if cast is not None:
        return cast.to(values.dtype) + 0.0  # + 0.0: -0 -> +0, as the codes store it
    return fp_decode(fp_round_codes(values, fmt), fmt).to(values.dtype)
