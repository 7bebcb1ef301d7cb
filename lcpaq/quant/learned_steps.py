"""A weight quantized at given per-output-channel step sizes (``--learn-scales``).

The steps come from `lcpaq.sensitivity.limpq` (LIMPQ's learned step sizes, learned on the signed
grid of `lcpaq.sensitivity.limpq.code_bounds`). Under the asymmetric scheme that grid is the
scheme's codes [0, 2^b − 1] with the zero point fixed at 2^(b−1); under ``--symmetric`` it is the
restricted ±(2^(b−1) − 1) with no zero point. So the result is an ordinary `QuantizedWeight` that
the checkpoint, `load_quantized` and the ONNX export read like any other; only the scales differ
from the scheme's clipping. Codes are rounded as the scheme says: to nearest, or by GPTQ on the
learned grid.
"""

from __future__ import annotations

import torch

from lcpaq.errors import InputError
from lcpaq.quant.formats import NumberFormat, QuantScheme, code_range, has_zero_point
from lcpaq.quant.gptq import gptq_codes
from lcpaq.quant.rounding import integer_codes
from lcpaq.quant.weights import QuantizedWeight


def quantize_at_steps(
    weight: torch.Tensor,
    fmt: NumberFormat,
    scheme: QuantScheme,
    steps: torch.Tensor,
    input_hessian: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Codes of ``weight`` (output channels on axis 0) on the grid of ``steps`` [C_out]."""
    if fmt.kind != "int" or scheme.granularity != "channel":
        raise InputError(
            f"learned step sizes quantize integer formats with per-channel scales; got {fmt.name} "
            f"with --granularity {scheme.granularity}"
        )
    rows = int(weight.shape[0])
    if tuple(steps.shape) != (rows,):
        raise InputError(f"{rows} output channels but {tuple(steps.shape)} learned steps")
    scale = steps.detach().float().to(weight.device)
    zero_value = 2 ** (fmt.bits - 1) if has_zero_point(fmt, scheme) else 0
    zero = torch.full_like(scale, float(zero_value))
    matrix = weight.detach().float().reshape(rows, -1)
    if scheme.rounding == "gptq":
        if input_hessian is None:
            raise InputError("rounding 'gptq' needs the layer's input Hessian; none given")
        codes = gptq_codes(weight, [fmt], scheme, [scale], [zero], input_hessian)[0]
    else:
        low, high = code_range(fmt, scheme.symmetric)
        codes, _ = integer_codes(matrix, scale[:, None], zero[:, None], low, high)
    dtype = torch.uint8 if zero_value else torch.int8
    return QuantizedWeight(
        codes=codes.reshape(weight.shape).to(dtype),
        scale=scale,
        zero_point=zero.to(torch.int16) if zero_value else None,
        format_name=fmt.name,
        granularity="channel",
    )
