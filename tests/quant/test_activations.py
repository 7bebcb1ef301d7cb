"""Static activation quantization in `lcpaq.quant.activations`: the grid of one calibrated range,
MSE-clipped ranges, range statistics over batches, quantizers and the hooks that apply them."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import conv_inputs, make_tiny_conv_net

from lcpaq.errors import InputError
from lcpaq.model.graph import discover_layers
from lcpaq.quant.activations import (
    ActivationQuantizer,
    activation_mse_range,
    activation_quantizers,
    activation_scale_and_zero,
    attach_activation_quantizers,
    batch_ranges,
    clipped_ranges,
    fake_quantize_activation,
    quantize_activation,
    range_statistics,
)
from lcpaq.quant.formats import get_format

pytestmark = pytest.mark.usefixtures("single_thread")


def test_int_activation_grid_is_the_calibrated_range() -> None:
    """Asymmetric INT4 on [0, 1.5]: scale 0.1, zero point 0, codes 0 … 15, saturating outside."""
    scale, zero = activation_scale_and_zero(get_format("int4"), 0.0, 1.5)
    assert scale == pytest.approx(0.1, rel=1e-12) and zero == 0.0
    values = torch.tensor([-0.3, 0.0, 0.04, 0.06, 0.77, 1.5, 2.0], dtype=torch.float64)
    expected = torch.tensor([0.0, 0.0, 0.0, 0.1, 0.8, 1.5, 1.5], dtype=torch.float64)
    got = fake_quantize_activation(values, get_format("int4"), 0.0, 1.5)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    # A range across zero moves the zero point so that 0 stays exact; symmetric has none.
    scale, zero = activation_scale_and_zero(get_format("int8"), -1.0, 3.0)
    assert (scale, zero) == (pytest.approx(4 / 255), 64.0)
    assert float(fake_quantize_activation(torch.zeros(1), get_format("int8"), -1.0, 3.0)) == 0.0
    scale, zero = activation_scale_and_zero(get_format("int8"), -1.0, 3.0, symmetric=True)
    assert (scale, zero) == (pytest.approx(3 / 127), 0.0)


def test_fp_activation_grid_maps_the_range_to_the_largest_value() -> None:
    """FP8 E4M3 on [-2, 4]: scale 4/448, so 4 is the format's largest value and more saturates."""
    fmt = get_format("fp8_e4m3")
    scale, zero = activation_scale_and_zero(fmt, -2.0, 4.0)
    assert scale == pytest.approx(4 / 448) and zero == 0.0
    values = torch.tensor([-9.0, -2.0, 0.0, 1.0, 4.0, 5.0])
    got = fake_quantize_activation(values, fmt, -2.0, 4.0)
    expected = (values.clamp(-4.0, 4.0) / scale).to(torch.float8_e4m3fn).float() * scale
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got.dtype == values.dtype


def test_float_activation_formats_are_casts() -> None:
    values = torch.tensor([1.0 + 2**-12, 3.0])
    assert torch.equal(quantize_activation(values, "fp32", 0.0, 0.0), values)
    assert torch.equal(quantize_activation(values, "bf16", 0.0, 0.0), torch.tensor([1.0, 3.0]))


def test_activation_quantizer_round_trip_and_bad_input() -> None:
    quantizer = ActivationQuantizer("int4", -0.5, 2.0, symmetric=True)
    assert ActivationQuantizer.from_dict(quantizer.to_dict(), "m.json") == quantizer
    with pytest.raises(InputError, match="m.json, layer 'fc': unknown activation format 'int9'"):
        ActivationQuantizer.from_dict({"format": "int9", "low": 0, "high": 1}, "m.json, layer 'fc'")
    with pytest.raises(InputError, match="m.json: bad activation quantizer"):
        ActivationQuantizer.from_dict({"format": "int8", "low": 0}, "m.json")
    with pytest.raises(InputError, match="not a finite interval"):
        ActivationQuantizer("int8", 2.0, 1.0)
    with pytest.raises(InputError, match="not a finite interval"):
        ActivationQuantizer("int8", 0.0, float("nan"))


@dataclass(frozen=True)
class _Ranges:
    """A stand-in for an analysis result (`CalibratedRanges`): every layer gets [-1, 2]."""

    layer_names: tuple[str, ...] = ("conv1", "fc")
    symmetric: bool = True

    def range_of(self, row: int, format_name: str) -> tuple[float, float]:
        return -1.0 - row, 2.0


def test_activation_quantizers_from_calibrated_ranges() -> None:
    quantizers = activation_quantizers(_Ranges(), {"fc": "int4", "conv1": "fp32"})
    assert quantizers == {"fc": ActivationQuantizer("int4", -2.0, 2.0, symmetric=True)}
    with pytest.raises(InputError, match="layer 'conv9' has no activation range"):
        activation_quantizers(_Ranges(), {"conv9": "int8"})


def test_hooks_quantize_inputs_until_removed() -> None:
    """A hooked layer receives Q(its input); the model still deep-copies (the hook is a plain
    object); removing the handles restores the FP32 model."""
    model, inputs = make_tiny_conv_net(), conv_inputs(4)
    with torch.no_grad():
        reference = model(inputs)
    quantizer = ActivationQuantizer("int4", float(inputs.min()), float(inputs.max()))
    handles = attach_activation_quantizers(model, {"conv1": quantizer})
    seen: list[torch.Tensor] = []  # registered after the quantizer: sees what conv1 receives
    recorder = model.conv1.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        quantized = model(inputs)
        copied = copy.deepcopy(model)(inputs)
    assert torch.equal(seen[0], quantizer(inputs)) and not torch.equal(quantized, reference)
    assert torch.equal(copied, quantized)
    for handle in [*handles, recorder]:
        handle.remove()
    with torch.no_grad():
        assert torch.equal(model(inputs), reference)


def test_range_statistics_over_batches() -> None:
    """Min/max over batches equal those of one batch holding them all; the value samples are
    reproducible (seeded per batch index) and drawn from the layer's input."""
    model, inputs = make_tiny_conv_net(), conv_inputs(8)
    layers = discover_layers(model, inputs)
    whole_low, whole_high, _ = batch_ranges(model, layers, inputs)
    batches = [(0, inputs[:3]), (1, inputs[3:])]
    low, high, samples = range_statistics(model, layers, batches, keep=50, seed=7)
    np.testing.assert_array_equal(low, whole_low)
    np.testing.assert_array_equal(high, whole_high)
    again = range_statistics(model, layers, batches, keep=50, seed=7)[2]
    assert len(samples) == 2 and all(len(batch) == len(layers) for batch in samples)
    for batch, repeated in zip(samples, again):
        for row, (values, same) in enumerate(zip(batch, repeated)):
            np.testing.assert_array_equal(values, same)
            assert values.shape == (50,)
            assert low[row] <= values.min() and values.max() <= high[row]
    # Min-max clipping is the observed range for every format; MSE narrows INT4's.
    clip_low, clip_high = clipped_ranges(low, high, samples, ("int4", "bf16"), "minmax")
    np.testing.assert_array_equal(clip_high, np.stack([high, high], axis=1))
    _, mse_high = clipped_ranges(low, high, samples, ("int4", "bf16"), "mse")
    assert np.all(mse_high[:, 0] <= high) and np.array_equal(mse_high[:, 1], high)
    with pytest.raises(InputError, match="unknown activation clipping 'kl'"):
        clipped_ranges(low, high, samples, ("int4",), "kl")


def _brute_force_range_error(sample: torch.Tensor, format_name: str, points: int = 400) -> float:
    """The least squared error of Q over ratios t/points of the min-max range (a finer grid than
    the coarse-to-fine search walks)."""
    low, high = float(sample.min()), float(sample.max())
    low, high = min(low, 0.0), max(high, 0.0)
    return min(
        float((quantize_activation(sample, format_name, low * t, high * t) - sample).pow(2).sum())
        for t in np.arange(1, points + 1) / points
    )


@pytest.mark.parametrize("format_name", ["int4", "int8", "fp4_e2m1", "fp8_e4m3"])
def test_mse_range_is_near_the_brute_force_optimum(format_name: str) -> None:
    """A post-ReLU-like sample with a few outliers: the MSE range clips them (4-bit formats
    hard), cuts the error below min-max's and comes within 1 % of a 400-point brute force."""
    generator = torch.Generator().manual_seed(5)
    sample = torch.relu(torch.randn(4000, generator=generator, dtype=torch.float64))
    sample[:4] = torch.tensor([9.0, 11.0, 12.5, 14.0], dtype=torch.float64)
    low, high = float(sample.min()), float(sample.max())
    clip_low, clip_high = activation_mse_range(sample, get_format(format_name), low, high)
    assert clip_low == 0.0 and clip_high < (0.8 if get_format(format_name).bits == 4 else 1) * high
    error = float(
        (quantize_activation(sample, format_name, clip_low, clip_high) - sample).pow(2).sum()
    )
    minmax = float((quantize_activation(sample, format_name, low, high) - sample).pow(2).sum())
    assert error < minmax
    assert error <= 1.01 * _brute_force_range_error(sample, format_name)
