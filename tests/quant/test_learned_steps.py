"""Weights quantized at given per-channel steps (`lcpaq.quant.learned_steps`): the codes decode to
LSQ's fake quantization on the same grid, in the scheme's storage, and GPTQ rounds on that grid."""

from __future__ import annotations

import pytest
import torch

from lcpaq.errors import InputError
from lcpaq.quant.formats import QuantScheme, get_format
from lcpaq.quant.learned_steps import quantize_at_steps
from lcpaq.quant.weights import dequantize_weight
from lcpaq.sensitivity.limpq import code_bounds, lsq_quantize

pytestmark = pytest.mark.usefixtures("single_thread")


def _weight() -> torch.Tensor:
    # Multiples of 0.1 plus 0.013 keep w/s away from rounding ties for the steps below.
    generator = torch.Generator().manual_seed(0)
    return torch.randint(-40, 40, (4, 3, 2, 2), generator=generator).float() * 0.1 + 0.013


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("name", ["int2", "int3", "int8"])
def test_codes_decode_to_lsq_fake_quantization(name: str, symmetric: bool) -> None:
    weight = _weight()
    steps = torch.tensor([0.5, 0.25, 1.0, 0.05])
    scheme = QuantScheme(symmetric=symmetric, rounding="nearest")
    quantized = quantize_at_steps(weight, get_format(name), scheme, steps)
    expected = lsq_quantize(weight, steps, *code_bounds(name, symmetric))
    torch.testing.assert_close(dequantize_weight(quantized, torch.float32), expected)
    torch.testing.assert_close(quantized.scale, steps)
    if symmetric:
        assert quantized.codes.dtype == torch.int8 and quantized.zero_point is None
    else:
        assert quantized.codes.dtype == torch.uint8
        assert (quantized.zero_point == 2 ** (get_format(name).bits - 1)).all()


def test_gptq_on_the_learned_grid_with_white_inputs_is_nearest() -> None:
    """With E[x xᵀ] = I no column's error can be compensated by another: GPTQ rounds to nearest."""
    weight = _weight()
    steps = torch.tensor([0.5, 0.25, 1.0, 0.05])
    fmt = get_format("int3")
    gptq = quantize_at_steps(weight, fmt, QuantScheme(rounding="gptq"), steps, torch.eye(12))
    nearest = quantize_at_steps(weight, fmt, QuantScheme(rounding="nearest"), steps)
    torch.testing.assert_close(gptq.codes, nearest.codes)


def test_rejects_what_a_per_channel_step_cannot_express() -> None:
    steps = torch.ones(4)
    with pytest.raises(InputError, match="per-channel"):
        quantize_at_steps(_weight(), get_format("int4"), QuantScheme(granularity="tensor"), steps)
    with pytest.raises(InputError, match="fp8_e4m3"):
        quantize_at_steps(_weight(), get_format("fp8_e4m3"), QuantScheme(), steps)
    with pytest.raises(InputError, match="learned steps"):
        quantize_at_steps(_weight(), get_format("int4"), QuantScheme(), torch.ones(3))
