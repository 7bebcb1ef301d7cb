"""Weight quantization: a conv/linear weight to stored codes plus scales, and back.

`quantize_weight` maps a weight (output channels on axis 0) onto a `NumberFormat`'s grid under a
`QuantScheme` and returns a `QuantizedWeight`: the codes (INT values, or FP bit patterns) plus the
scales and zero points that the exported checkpoint stores; `dequantize_weight` inverts it and
`fake_quantize` does both. Rounding is to nearest (`lcpaq.quant.rounding`) or GPTQ's
(`lcpaq.quant.gptq`). `pack_codes` / `unpack_codes` store codes at their bit width. Formulas follow
METHOD §0; docs/formats.md describes every case.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from lcpaq.errors import InputError
from lcpaq.quant.formats import (
    E8M0_BIAS,
    LEVEL_KINDS,
    Granularity,
    NumberFormat,
    QuantScheme,
    fan_in,
    get_format,
    has_zero_point,
    num_scale_groups,
)
from lcpaq.quant.gptq import gptq_codes
from lcpaq.quant.grids import fp_decode
from lcpaq.quant.levels import fit_levels
from lcpaq.quant.rounding import (
    from_groups,
    mse_ranges,
    mx_codes,
    percentile_ranges,
    powers_of_two,
    round_trip,
    scale_and_zero,
    to_groups,
)


@dataclass(frozen=True)
class QuantizedWeight:
    """Codes of one weight tensor and what is needed to decode them.

    ``codes`` has the weight's shape: int8 for symmetric INT (and INT under MX), uint8 for asymmetric
    INT, uint8 bit patterns for minifloats, int8 −1/0/1 for ternary, ±1 for binary, 0 for pruned.
    ``scale`` (and ``zero_point``, int16, asymmetric INT only) has shape [1] per tensor, [C_out]
    per channel, [C_out, ceil(fan_in / group_size)] per group; float32, except MX: uint8 E8M0
    biased exponents (scale = 2^(e − 127)); empty for pruned. INT, ternary and binary decode as
    ``scale · (code − zero_point)``, FP as ``scale · value(code)``, INT under MX as
    ``scale · code · 2^-(bits−2)``, pruned as zeros.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    format_name: str
    granularity: Granularity
    group_size: int | None = None


def _code_dtype(fmt: NumberFormat, scheme: QuantScheme) -> torch.dtype:
    """Signed codes where the range is symmetric (±(2^(b-1)-1), MX INT, below two bits),
    unsigned otherwise."""
    if fmt.kind in LEVEL_KINDS:
        return torch.int8
    if fmt.kind == "fp":
        return torch.uint8
    return torch.uint8 if has_zero_point(fmt, scheme) else torch.int8


def _scale_shape(weight_shape: tuple[int, ...], scheme: QuantScheme) -> tuple[int, ...]:
    """The stored scale's shape: [1] or [C_out], or [C_out, blocks] per group/MX block."""
    if scheme.block_size is None:
        return (num_scale_groups(weight_shape, scheme.granularity),)
    return (int(weight_shape[0]), math.ceil(fan_in(weight_shape) / scheme.block_size))


def quantize_weight(
    weight: torch.Tensor,
    fmt: NumberFormat,
    scheme: QuantScheme,
    input_hessian: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Quantize a conv/linear weight (output channels on axis 0) to codes plus scales.

    With ``scheme.rounding == "gptq"`` the codes come from `lcpaq.quant.gptq.gptq_round` against
    ``input_hessian``: E[x xᵀ] of the layer's input patches, [fan_in, fan_in], or
    [groups, fan_in, fan_in] for a grouped convolution
    (`lcpaq.quant.input_stats.collect_input_hessians`). It is ignored otherwise.
    """
    return quantize_weight_formats(weight, (fmt,), scheme, input_hessian)[0]


def quantize_weight_formats(
    weight: torch.Tensor,
    fmts: Sequence[NumberFormat],
    scheme: QuantScheme,
    input_hessian: torch.Tensor | None = None,
) -> list[QuantizedWeight]:
    """`quantize_weight` for each of ``fmts``. Under GPTQ rounding the INT formats (outside MX)
    are rounded together: one column loop over their stacked rows instead of one per format."""
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or Inf values; cannot quantize")
    if scheme.rounding == "gptq" and input_hessian is None:
        raise InputError(
            "rounding 'gptq' needs the layer's input Hessian from calibration inputs; none given"
        )
    grids = [_nearest_grid(weight, fmt, scheme, input_hessian) for fmt in fmts]
    # A pruned weight has no grid to round onto: its codes stay zero.
    rounded = [i for i, fmt in enumerate(fmts) if fmt.kind != "pruned"]
    if scheme.rounding != "gptq" or input_hessian is None or not rounded:
        return [grid.quantized for grid in grids]
    codes = gptq_codes(
        weight,
        [fmts[i] for i in rounded],
        scheme,
        [grids[i].group_scale for i in rounded],
        [grids[i].group_zero for i in rounded],
        input_hessian,
    )
    results = [grid.quantized for grid in grids]
    for i, code in zip(rounded, codes):
        results[i] = replace(
            results[i], codes=code.reshape(weight.shape).to(results[i].codes.dtype)
        )
    return results


@dataclass(frozen=True)
class _Grid:
    """Round-to-nearest result of one format, with its per-scale-group scale and zero point
    (float, MX exponents decoded) that GPTQ rounds onto."""

    quantized: QuantizedWeight
    group_scale: torch.Tensor
    group_zero: torch.Tensor


def _nearest_grid(
    weight: torch.Tensor,
    fmt: NumberFormat,
    scheme: QuantScheme,
    input_hessian: torch.Tensor | None = None,
) -> _Grid:
    """Scales from the scheme's clipping (MX: from each block's largest magnitude; below two bits:
    the importance-weighted fit of `lcpaq.quant.levels`, importance from ``input_hessian``), then
    codes by rounding to nearest."""
    grouped = to_groups(weight, scheme)
    shape = _scale_shape(tuple(weight.shape), scheme)
    if fmt.kind in LEVEL_KINDS:
        group_scale, codes = fit_levels(weight, fmt, scheme, input_hessian)
        group_zero = torch.zeros_like(group_scale)
        scale = group_scale.reshape(shape) if fmt.kind != "pruned" else group_scale
        zero_point = None
    elif scheme.granularity == "mx":
        codes, exponents = mx_codes(grouped, fmt)
        scale = exponents.reshape(shape).to(torch.uint8)
        zero_point = None
        group_scale = powers_of_two(exponents - E8M0_BIAS)
        group_zero = torch.zeros_like(group_scale)
    else:
        if scheme.clipping == "mse":
            low, high = mse_ranges(grouped, fmt, scheme)
        elif scheme.clipping == "percentile":
            low, high = percentile_ranges(weight, grouped, fmt, scheme)
        else:
            low, high = grouped.min(dim=1).values, grouped.max(dim=1).values
        group_scale, group_zero = scale_and_zero(low, high, fmt, scheme)
        codes, _ = round_trip(grouped, group_scale[:, None], group_zero[:, None], fmt, scheme)
        scale = group_scale.reshape(shape)
        zero_point = (
            group_zero.to(torch.int16).reshape(shape) if has_zero_point(fmt, scheme) else None
        )
    quantized = QuantizedWeight(
        codes=from_groups(codes, weight.shape).to(_code_dtype(fmt, scheme)),
        scale=scale,
        zero_point=zero_point,
        format_name=fmt.name,
        granularity=scheme.granularity,
        group_size=scheme.block_size,
    )
    return _Grid(quantized, group_scale, group_zero)


def decoded_scale(quantized: QuantizedWeight) -> torch.Tensor:
    """float32 scales (MX: 2^(e − 127) from the stored E8M0 exponents), in the stored shape."""
    if quantized.granularity != "mx":
        return quantized.scale.float()
    return powers_of_two(quantized.scale.long() - E8M0_BIAS)


def dequantize_weight(
    quantized: QuantizedWeight, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Decode the codes back to a float tensor of the weight's shape (every format/granularity)."""
    fmt = get_format(quantized.format_name)
    shape = quantized.codes.shape
    if fmt.kind == "pruned":
        return torch.zeros(shape, dtype=dtype, device=quantized.codes.device)
    if quantized.granularity in ("group", "mx"):
        if quantized.group_size is None:
            raise InputError(f"{quantized.granularity} quantized weight without a group size")
        rows = shape[0]
        codes = quantized.codes.reshape(rows, -1)
        padding = -codes.shape[1] % quantized.group_size
        codes = torch.nn.functional.pad(codes, (0, padding)) if padding else codes
        codes = codes.reshape(-1, quantized.group_size)
    else:
        codes = quantized.codes.reshape(quantized.scale.numel(), -1)
    scale = decoded_scale(quantized).reshape(-1, 1)
    if fmt.kind == "fp":
        elements = fp_decode(codes, fmt)
    elif quantized.granularity == "mx":
        elements = codes.float() * 2.0 ** -(fmt.bits - 2)
    else:
        elements = codes.float()
        if quantized.zero_point is not None:
            elements = elements - quantized.zero_point.float().reshape(-1, 1)
    return from_groups(elements * scale, shape).to(dtype)


# ---------------------------------------------------------------------------------------------
# Bit packing of stored codes.


def code_offset(quantized: QuantizedWeight) -> int:
    """What `pack_codes` adds to every code to make it a ``bits``-bit unsigned number: 2^(b-1) for
    signed INT codes (symmetric, MX; ±(2^(b-1)-1) becomes 1 … 2^b-1; ternary −1 … 1 becomes
    1 … 3), 1 for binary (then halved by `code_step`: −1, 1 become 0, 1), 0 otherwise (pruned)."""
    fmt = get_format(quantized.format_name)
    if fmt.kind == "pruned":
        return 0
    return 2 ** (fmt.bits - 1) if quantized.codes.is_signed() else 0


def code_step(quantized: QuantizedWeight) -> int:
    """Distance between consecutive codes: 2 for binary (−1, 1), 1 otherwise; `pack_codes`
    divides by it after adding `code_offset`."""
    return 2 if get_format(quantized.format_name).kind == "binary" else 1


def pack_codes(quantized: QuantizedWeight) -> torch.Tensor:
    """The codes at their format's bit width, most significant bit first, in uint8 bytes
    (ceil(n·bits / 8) of them; none for pruned): what a checkpoint stores, so its file is as
    small as the size the budgets count."""
    import numpy as np

    bits = get_format(quantized.format_name).bits
    shifted = quantized.codes.reshape(-1).long().cpu() + code_offset(quantized)
    step = code_step(quantized)
    if bool((shifted % step != 0).any()):
        raise ValueError(f"{quantized.format_name} codes are not multiples of {step} apart")
    values = (shifted // step).numpy()
    if values.size and (values.min() < 0 or values.max() >= 2**bits):
        raise ValueError(f"{quantized.format_name} codes do not fit {bits} bits")
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint8)
    planes = (values.astype(np.uint8)[:, None] >> shifts) & 1
    return torch.from_numpy(np.packbits(planes.reshape(-1)))


def unpack_codes(
    packed: torch.Tensor,
    bits: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    offset: int,
    step: int = 1,
) -> torch.Tensor:
    """Inverse of `pack_codes`: the codes of ``shape`` in ``dtype`` (int8 or uint8)."""
    import numpy as np

    count = math.prod(shape)
    if packed.numel() * 8 < count * bits:
        raise ValueError(f"{packed.numel()} bytes cannot hold {count} codes of {bits} bits")
    planes = np.unpackbits(packed.numpy(), count=count * bits).reshape(count, bits)
    values = planes.astype(np.int16) @ (1 << np.arange(bits - 1, -1, -1, dtype=np.int16))
    return torch.from_numpy(values * step - offset).to(dtype).reshape(tuple(shape))


def fake_quantize(
    weight: torch.Tensor,
    fmt: NumberFormat,
    scheme: QuantScheme,
    input_hessian: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize then dequantize, keeping the weight's dtype and device."""
    return dequantize_weight(quantize_weight(weight, fmt, scheme, input_hessian), weight.dtype)


def fake_quantize_formats(
    weight: torch.Tensor,
    fmts: Sequence[NumberFormat],
    scheme: QuantScheme,
    input_hessian: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """`fake_quantize` for each of ``fmts`` (GPTQ: INT formats rounded together)."""
    return [
        dequantize_weight(quantized, weight.dtype)
        for quantized in quantize_weight_formats(weight, fmts, scheme, input_hessian)
    ]
