"""GPTQ rounding: codes that keep a layer's output error small, not each weight's.

`gptq_round` is GPTQ (Frantar et al., ICLR 2023) over one matrix and the second moments of its
input; `gptq_codes` applies it to a weight on the grids round-to-nearest clipping fixed (scales and
zero points stay those of `lcpaq.quant.weights`, only the codes change). The input second moments
come from `lcpaq.quant.input_stats.collect_input_hessians`; `lcpaq.quant.weights.quantize_weight` calls
this under ``QuantScheme(rounding="gptq")``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lcpaq.errors import InputError
from lcpaq.quant.formats import NumberFormat, QuantScheme, code_range
from lcpaq.quant.rounding import from_groups, integer_codes, round_trip, to_groups


def _round_elements(
    values: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    fmt: NumberFormat,
    scheme: QuantScheme,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and decoded values of elements that each carry their own scale (and zero point)."""
    if scheme.granularity == "mx" and fmt.kind == "int":  # code · 2^-(b−2) · X, no zero point
        limit = 2 ** (fmt.bits - 1) - 1
        return integer_codes(values, scale * 2.0 ** -(fmt.bits - 2), zero, -limit, limit)
    return round_trip(values, scale, zero, fmt, scheme)


def _per_element(
    per_group: torch.Tensor, weight: torch.Tensor, scheme: QuantScheme
) -> torch.Tensor:
    """A per-scale-group value spread over the elements: [C_out, fan_in]."""
    grouped = to_groups(weight, scheme)
    spread = per_group.reshape(-1, 1).expand(grouped.shape)
    return from_groups(spread, weight.shape).reshape(weight.shape[0], -1)


def _upper_inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + δ·mean(diag H)·I)⁻¹; δ grows tenfold until H is positive
    definite (collinear inputs, few calibration samples)."""
    if not torch.isfinite(hessian).all():
        raise InputError("input Hessian contains NaN or Inf values")
    identity = torch.eye(len(hessian), dtype=hessian.dtype, device=hessian.device)
    mean_diagonal = float(hessian.diagonal().mean())
    for attempt in range(6):
        damped = hessian + damp * 10**attempt * mean_diagonal * identity
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
            if int(info) == 0:
                return upper
    raise InputError(f"input Hessian is not positive definite even with damping {damp * 1e5:g}")


def gptq_round(
    matrix: torch.Tensor,
    hessian: torch.Tensor,
    round_column: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]],
    damp: float = 0.01,
    block: int = 128,
) -> torch.Tensor:
    """GPTQ (Frantar et al., ICLR 2023): codes [rows, cols] for ``matrix`` that keep the output
    error ‖(W − Q) X‖² small for inputs with second moments ``hessian`` = E[x xᵀ] [cols, cols].

    Columns are rounded one at a time (``round_column(values, column)`` → codes, decoded values),
    in order of decreasing H_ii ("act-order": the columns whose inputs are largest go first, while
    the most columns are left to absorb their error); each column's rounding error is spread over
    the columns not yet rounded through the Cholesky factor of H⁻¹, lazily in blocks of ``block``
    columns. Columns whose input is always 0 (H_ii = 0) are rounded to nearest.
    """
    cols = matrix.shape[1]
    hessian = hessian.double().clone()
    dead = hessian.diagonal() <= 0
    hessian.diagonal()[dead] = 1.0
    order = torch.argsort(hessian.diagonal(), descending=True, stable=True)
    hessian = hessian[order][:, order]
    work = matrix.double()[:, order].clone()
    upper = _upper_inverse_cholesky(hessian, damp)
    codes = torch.empty_like(work)
    for start in range(0, cols, block):
        stop = min(start + block, cols)
        part = work[:, start:stop]
        errors = torch.empty_like(part)
        for offset in range(stop - start):
            column = start + offset
            column_codes, decoded = round_column(part[:, offset], int(order[column]))
            codes[:, column] = column_codes.double()
            error = (part[:, offset] - decoded.double()) / upper[column, column]
            part[:, offset:] -= error[:, None] * upper[column, column:stop][None, :]
            errors[:, offset] = error
        work[:, stop:] -= errors @ upper[start:stop, stop:]
    restored = torch.empty_like(codes)
    restored[:, order] = codes
    return restored


def gptq_codes(
    weight: torch.Tensor,
    fmts: list[NumberFormat],
    scheme: QuantScheme,
    group_scales: list[torch.Tensor],
    group_zeros: list[torch.Tensor],
    input_hessian: torch.Tensor,
) -> list[torch.Tensor]:
    """GPTQ codes [C_out, fan_in] per format, on the grids the clipping fixed (per-scale-group
    float scales and zero points, MX exponents decoded). The INT formats
    (outside MX) share one `gptq_round` over their stacked rows, each row clamped to its own code
    range (ternary: −1 … 1); a minifloat, binary or MX format is rounded alone. Pruned weights
    have no grid: leave them out."""
    matrix = weight.detach().float().reshape(weight.shape[0], -1)
    rows, fan_in = matrix.shape
    hessian = input_hessian.to(matrix.device)
    hessian = hessian[None] if hessian.dim() == 2 else hessian
    if hessian.dim() != 3 or hessian.shape[1:] != (fan_in, fan_in) or rows % len(hessian):
        raise InputError(
            f"input Hessian of shape {tuple(input_hessian.shape)} does not fit a weight of shape "
            f"{tuple(weight.shape)} (expected [{fan_in}, {fan_in}] or [groups, {fan_in}, {fan_in}])"
        )
    # Ternary codes are INT codes clamped to [−1, 1]: they join the stacked INT rows.
    integer = [
        i
        for i, fmt in enumerate(fmts)
        if fmt.kind in ("int", "ternary") and scheme.granularity != "mx"
    ]
    batches = ([integer] if integer else []) + [[i] for i in range(len(fmts)) if i not in integer]
    scales = [_per_element(scale, weight, scheme) for scale in group_scales]
    zeros = [_per_element(zero.to(matrix.device), weight, scheme) for zero in group_zeros]
    codes = [torch.empty_like(matrix) for _ in fmts]
    rows_per_group = rows // len(hessian)
    for group, group_hessian in enumerate(hessian):
        chosen = slice(group * rows_per_group, (group + 1) * rows_per_group)
        for batch in batches:
            scale = torch.cat([scales[i][chosen] for i in batch])
            zero = torch.cat([zeros[i][chosen] for i in batch])
            if batch is integer:
                ranges = [code_range(fmts[i], scheme.symmetric) for i in batch]
                bounds = torch.tensor(ranges, dtype=torch.float32, device=matrix.device)
                low, high = bounds.repeat_interleave(rows_per_group, dim=0).unbind(1)
                round_column = _integer_rounder(scale, zero, low, high)
            else:
                round_column = _format_rounder(scale, zero, fmts[batch[0]], scheme)
            stacked = matrix[chosen].repeat(len(batch), 1)
            result = gptq_round(stacked, group_hessian, round_column, scheme.gptq_damp)
            for position, i in enumerate(batch):
                codes[i][chosen] = result[
                    position * rows_per_group : (position + 1) * rows_per_group
                ]
    return codes


def _integer_rounder(
    scale: torch.Tensor, zero: torch.Tensor, low: torch.Tensor, high: torch.Tensor
) -> Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]:
    """Round column ``column`` of stacked INT rows, each row with its own code range."""

    def round_column(values: torch.Tensor, column: int) -> tuple[torch.Tensor, torch.Tensor]:
        return integer_codes(values.float(), scale[:, column], zero[:, column], low, high)

    return round_column


def _format_rounder(
    scale: torch.Tensor, zero: torch.Tensor, fmt: NumberFormat, scheme: QuantScheme
) -> Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]:
    def round_column(values: torch.Tensor, column: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _round_elements(values.float(), scale[:, column], zero[:, column], fmt, scheme)

    return round_column
