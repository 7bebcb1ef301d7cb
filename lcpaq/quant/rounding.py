"""Round to nearest onto a format's grid: the arithmetic every quantizer shares.

Takes values viewed as scale groups ([groups, elements], `to_groups` / `from_groups`), chooses each
group's range (min-max, `mse_ranges`, `percentile_ranges`) and turns ranges into float scales and
zero points (`scale_and_zero`), then rounds (`round_trip`, `integer_codes`; OCP MX blocks:
`mx_codes`). Weights (`lcpaq.quant.weights`), GPTQ (`lcpaq.quant.gptq`) and activations
(`lcpaq.quant.activations`) all round here, so the three agree on every grid. Formulas follow
METHOD §0.
"""

from __future__ import annotations

import math
from typing import TypeVar

import torch

from lcpaq.quant.formats import (
    E8M0_BIAS,
    NumberFormat,
    QuantScheme,
    code_range,
    has_zero_point,
    mx_element_emax,
)
from lcpaq.quant.grids import fp_decode, fp_round_codes

#: Bounds of INT codes: both numbers (one code range) or both tensors (a range per row).
CodeBound = TypeVar("CodeBound", float, torch.Tensor)


def to_groups(weight: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """View the weight as [groups, elements per group] in float32.

    Group/MX: each output channel's flattened fan-in is cut into blocks of consecutive elements; a
    partial last block is padded with zeros. Zeros never change a block's scale (asymmetric ranges
    are widened to contain 0 anyway, symmetric ones depend on max|w|) and every grid represents 0
    exactly, so padding changes neither the codes nor the clipping errors of the real elements.
    """
    flat = weight.detach().float()
    block = scheme.block_size
    if block is None:
        rows = weight.shape[0] if scheme.granularity == "channel" else 1
        return flat.reshape(rows, -1)
    flat = flat.reshape(weight.shape[0], -1)
    padding = -flat.shape[1] % block
    if padding:
        flat = torch.nn.functional.pad(flat, (0, padding))
    return flat.reshape(-1, block)


def scale_and_zero(
    low: torch.Tensor, high: torch.Tensor, fmt: NumberFormat, scheme: QuantScheme
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float scales and zero points for per-group ranges [low, high] (METHOD §0)."""
    tiny = torch.full_like(high, torch.finfo(torch.float32).tiny)
    if fmt.kind == "fp":  # s = α / fmax, α = max|x|
        return torch.maximum(torch.maximum(-low, high) / fmt.max_value, tiny), torch.zeros_like(
            high
        )
    qmin, qmax = code_range(fmt, scheme.symmetric)
    if scheme.symmetric:
        scale = torch.maximum(torch.maximum(-low, high) / qmax, tiny)
        return scale, torch.zeros_like(scale)
    low = torch.clamp(low, max=0.0)
    high = torch.clamp(high, min=0.0)
    scale = torch.maximum((high - low) / (qmax - qmin), tiny)
    zero = torch.clamp(torch.round(-low / scale), qmin, qmax)
    return scale, zero


def round_trip(
    values: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    fmt: NumberFormat,
    scheme: QuantScheme,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantized values; ``scale``/``zero`` broadcast over the last axis. Ternary
    rounds as INT codes clamped to [−1, 1]; binary to the sign (0 to +1), the nearest of ±scale."""
    if fmt.kind == "binary":
        codes = torch.where(values >= 0, 1.0, -1.0).to(values.dtype)
        return codes, codes * scale
    if fmt.kind == "fp":
        codes = fp_round_codes(values / scale, fmt)
        return codes, fp_decode(codes, fmt) * scale
    qmin, qmax = code_range(fmt, scheme.symmetric)
    return integer_codes(values, scale, zero, qmin, qmax)


def integer_codes(
    values: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    low: CodeBound,
    high: CodeBound,
) -> tuple[torch.Tensor, torch.Tensor]:
    """INT codes clamped to [low, high] (numbers, or tensors broadcast like ``values``) and their
    decoded values."""
    codes = torch.clamp(torch.round(values / scale) + zero, low, high)
    return codes, (codes - zero) * scale


def _clipping_errors(
    grouped: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    ratios: torch.Tensor,
    fmt: NumberFormat,
    scheme: QuantScheme,
) -> torch.Tensor:
    """||Q(w) - w||^2 per group [R, G] for clipping ranges ratio·[low, high], ratios [R, G].

    Ratios are processed in chunks so memory stays O(chunk x weight size) for large layers.
    """
    chunk = max(1, (1 << 24) // max(1, grouped.numel()))
    errors = []
    for start in range(0, len(ratios), chunk):
        part = ratios[start : start + chunk]
        scale, zero = scale_and_zero(low * part, high * part, fmt, scheme)
        _, restored = round_trip(grouped[None], scale[..., None], zero[..., None], fmt, scheme)
        errors.append((restored - grouped[None]).pow(2).sum(dim=2))
    return torch.cat(errors)


#: Coarse grid of the MSE clipping search; the fine grid (1/mse_grid_points) is searched around
#: the coarse optimum. 20 + 9 evaluations instead of 100: ~3.5x faster, same resolution.
MSE_COARSE_POINTS = 20


def mse_ranges(
    grouped: torch.Tensor,
    fmt: NumberFormat,
    scheme: QuantScheme,
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group clipping range minimising ||Q(w) - w||^2 over ratios t/T of the min-max range
    (METHOD §0, T = mse_grid_points; ``bounds``: that range when ``grouped`` is only a sample),
    searched coarse-to-fine."""
    low, high = bounds or (grouped.min(dim=1).values, grouped.max(dim=1).values)
    if has_zero_point(fmt, scheme):
        low, high = torch.clamp(low, max=0.0), torch.clamp(high, min=0.0)
    points = scheme.mse_grid_points
    groups = len(low)
    coarse_points = min(points, MSE_COARSE_POINTS)
    coarse = torch.arange(1, coarse_points + 1, device=grouped.device).float() / coarse_points
    coarse = coarse[:, None].expand(-1, groups)
    errors = _clipping_errors(grouped, low, high, coarse, fmt, scheme)
    best_error, best_index = errors.min(dim=0)
    best_ratio = coarse[best_index, torch.arange(groups)]
    # Fine grid: the points of the 1/T grid between the coarse optimum's neighbours.
    span = max(0, points // coarse_points - 1)
    if span:
        centre = torch.round(best_ratio * points)
        offsets = torch.arange(-span, span + 1, device=grouped.device).float()[:, None]
        fine = (centre[None] + offsets).clamp(1, points) / points
        fine_errors = _clipping_errors(grouped, low, high, fine, fmt, scheme)
        fine_best, fine_index = fine_errors.min(dim=0)
        improved = fine_best < best_error
        best_ratio = torch.where(improved, fine[fine_index, torch.arange(groups)], best_ratio)
    return low * best_ratio, high * best_ratio


def percentile_ranges(
    weight: torch.Tensor, grouped: torch.Tensor, fmt: NumberFormat, scheme: QuantScheme
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group clipping range at the ``scheme.percentile``-th percentile (METHOD §0), over the
    real elements of each group only: the zero padding of a partial last block is excluded."""
    valid = to_groups(torch.ones_like(weight), scheme) > 0
    counts = valid.sum(dim=1)
    fraction = scheme.percentile / 100.0

    def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
        # Padding sorts last (+inf), so positions 0 … count−1 are the real order statistics.
        ordered = torch.where(valid, values, torch.inf).sort(dim=1).values.double()
        position = q * (counts - 1).double()
        below = position.floor().long()
        above = torch.minimum(below + 1, counts - 1)
        weight_above = position - below.double()
        lower = ordered.gather(1, below[:, None])[:, 0]
        upper = ordered.gather(1, above[:, None])[:, 0]
        return (lower + weight_above * (upper - lower)).float()

    if has_zero_point(fmt, scheme):
        return quantile(grouped, 1.0 - fraction), quantile(grouped, fraction)
    alpha = quantile(grouped.abs(), fraction)
    return -alpha, alpha


def powers_of_two(exponents: torch.Tensor) -> torch.Tensor:
    """Exact float32 2^e for integer e in [-127, 127] (2^-127 is a float32 subnormal)."""
    return torch.pow(2.0, exponents.double()).float()


def mx_codes(grouped: torch.Tensor, fmt: NumberFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """OCP MX: per block X = 2^(floor(log2 amax) − emax_elem), elements quantized from x / X.

    Returns (codes [blocks, 32], E8M0 exponents [blocks] as int64 in 0..254).
    """
    amax = grouped.abs().amax(dim=1)
    _, exponent = torch.frexp(amax)  # amax = m · 2^e, m in [0.5, 1): floor(log2 amax) = e − 1
    shared = torch.where(amax > 0, exponent.long() - 1 - mx_element_emax(fmt), -E8M0_BIAS)
    shared = shared.clamp(-E8M0_BIAS, E8M0_BIAS)  # E8M0 encodes 2^-127 … 2^127 (255 is NaN)
    scale = powers_of_two(shared)[:, None]
    if fmt.kind == "fp":
        return fp_round_codes(grouped / scale, fmt), shared + E8M0_BIAS
    limit = 2 ** (fmt.bits - 1) - 1
    element = grouped / scale * 2.0 ** (fmt.bits - 2)
    return torch.clamp(torch.round(element), -limit, limit), shared + E8M0_BIAS


def from_groups(grouped: torch.Tensor, weight_shape: torch.Size) -> torch.Tensor:
    """Inverse of `to_groups`: drop the block padding and restore the weight's shape."""
    rows = weight_shape[0] if len(weight_shape) else 1
    fan_in = math.prod(weight_shape) // max(1, rows)
    return grouped.reshape(rows, -1)[:, :fan_in].reshape(weight_shape)
