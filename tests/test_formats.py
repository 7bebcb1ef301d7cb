"""Quantizers in `lcpaq.formats`: code ranges, rounding error, grid sizes, clipping, zero points."""

from __future__ import annotations

import itertools

import pytest
import torch

from lcpaq.formats import (
    FORMATS,
    QuantScheme,
    code_range,
    dequantize_weight,
    fake_quantize,
    get_format,
    num_scale_groups,
    parse_format_list,
    quantize_weight,
    scale_overhead_bits,
)

pytestmark = pytest.mark.usefixtures("single_thread")

BITS = range(2, 9)
SCHEMES = [
    QuantScheme(symmetric=symmetric, granularity=granularity, clipping=clipping)
    for symmetric, granularity, clipping in itertools.product(
        (True, False), ("channel", "tensor"), ("minmax", "mse")
    )
]


def _weight(seed: int = 0, shape: tuple[int, ...] = (6, 3, 3, 3)) -> torch.Tensor:
    """A conv-shaped weight whose channels have very different ranges, one all-positive and one
    all-negative (asymmetric zero points then sit at the ends of the code range)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator)
    weight = weight * torch.logspace(-2, 1, shape[0])[(slice(None),) + (None,) * (len(shape) - 1)]
    weight[1] = weight[1].abs() + 0.01
    weight[2] = -weight[2].abs() - 0.01
    return weight


def _scheme_id(scheme: QuantScheme) -> str:
    return f"{'sym' if scheme.symmetric else 'asym'}-{scheme.granularity}-{scheme.clipping}"


def test_format_registry() -> None:
    assert list(FORMATS) == [f"int{bits}" for bits in BITS]
    for bits in BITS:
        fmt = get_format(f"int{bits}")
        assert (fmt.name, fmt.kind, fmt.bits) == (f"int{bits}", "int", bits)
        assert code_range(fmt, True) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
        assert code_range(fmt, False) == (0, 2**bits - 1)


@pytest.mark.parametrize("scheme", SCHEMES, ids=_scheme_id)
@pytest.mark.parametrize("bits", BITS)
def test_codes_within_code_range(bits: int, scheme: QuantScheme) -> None:
    weight = _weight(bits)
    fmt = get_format(f"int{bits}")
    quantized = quantize_weight(weight, fmt, scheme)
    qmin, qmax = code_range(fmt, scheme.symmetric)
    assert quantized.codes.shape == weight.shape
    assert quantized.codes.dtype == (torch.int8 if scheme.symmetric else torch.uint8)
    codes = quantized.codes.int()
    assert int(codes.min()) >= qmin
    assert int(codes.max()) <= qmax
    groups = num_scale_groups(tuple(weight.shape), scheme.granularity)
    assert quantized.scale.shape == (groups,)
    assert bool((quantized.scale > 0).all())
    if scheme.symmetric:
        assert quantized.zero_point is None
    else:
        assert quantized.zero_point is not None
        assert quantized.zero_point.dtype == torch.int16
        assert quantized.zero_point.shape == (groups,)
        assert int(quantized.zero_point.min()) >= qmin
        assert int(quantized.zero_point.max()) <= qmax
    assert quantized.format_name == fmt.name
    assert quantized.granularity == scheme.granularity


@pytest.mark.parametrize("scheme", SCHEMES, ids=_scheme_id)
@pytest.mark.parametrize("bits", BITS)
def test_dequantize_of_quantize_is_fake_quantize(bits: int, scheme: QuantScheme) -> None:
    weight = _weight(10 + bits)
    fmt = get_format(f"int{bits}")
    restored = dequantize_weight(quantize_weight(weight, fmt, scheme))
    assert torch.equal(restored, fake_quantize(weight, fmt, scheme))
    # Decoding by hand: w = scale * (code - zero) per group.
    quantized = quantize_weight(weight, fmt, scheme)
    rows = quantized.scale.numel()
    zero = 0.0 if quantized.zero_point is None else quantized.zero_point.float()[:, None]
    by_hand = (quantized.codes.reshape(rows, -1).float() - zero) * quantized.scale[:, None]
    assert torch.equal(restored, by_hand.reshape(weight.shape))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
@pytest.mark.parametrize("bits", BITS)
def test_minmax_error_at_most_half_a_step(bits: int, symmetric: bool, granularity: str) -> None:
    scheme = QuantScheme(symmetric=symmetric, granularity=granularity, clipping="minmax")
    weight = _weight(20 + bits)
    fmt = get_format(f"int{bits}")
    quantized = quantize_weight(weight, fmt, scheme)
    qmin, qmax = code_range(fmt, symmetric)
    rows = quantized.scale.numel()
    grouped = weight.reshape(rows, -1).double()
    scale = quantized.scale.double()[:, None]
    zero = 0.0 if quantized.zero_point is None else quantized.zero_point.double()[:, None]
    low, high = scale * (qmin - zero), scale * (qmax - zero)
    error = (dequantize_weight(quantized).reshape(rows, -1).double() - grouped).abs()
    # float32 rounding of scale * qmax around the channel extremes
    slack = 1e-6 * scale * (qmax - qmin)
    inside = (grouped >= low - slack) & (grouped <= high + slack)
    if symmetric:  # min-max symmetric: every element lies inside [-alpha, alpha]
        assert bool(inside.all())
    else:  # only the rounding of the zero point can push an edge element out of range
        assert inside.float().mean() > 0.9
    bound = scale / 2 * (1 + 1e-5) + 1e-7 * grouped.abs()
    assert bool((error <= bound)[inside].all())
    # Outside the representable range the value saturates at the nearest end, never beyond it.
    clipped = torch.minimum((grouped - low).abs(), (grouped - high).abs())
    assert bool((error <= clipped + bound)[~inside].all())


@pytest.mark.parametrize("scheme", SCHEMES, ids=_scheme_id)
@pytest.mark.parametrize("bits", BITS)
def test_at_most_two_to_the_bits_values_per_group(bits: int, scheme: QuantScheme) -> None:
    weight = _weight(30 + bits, shape=(4, 64, 5))  # 320 elements per channel > 2^8
    restored = fake_quantize(weight, get_format(f"int{bits}"), scheme)
    rows = weight.shape[0] if scheme.granularity == "channel" else 1
    limit = 2**bits - 1 if scheme.symmetric else 2**bits
    for row in restored.reshape(rows, -1):
        assert len(torch.unique(row)) <= limit
    # The grid is actually used: 8-bit channels of 320 Gaussian weights take many values.
    if bits == 8:
        assert len(torch.unique(restored.reshape(rows, -1)[0])) > 64


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
@pytest.mark.parametrize("bits", BITS)
def test_mse_clipping_never_worse_than_minmax(bits: int, symmetric: bool, granularity: str) -> None:
    weight = _weight(40 + bits)
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


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
@pytest.mark.parametrize("clipping", ["minmax", "mse"])
@pytest.mark.parametrize("bits", BITS)
def test_asymmetric_zero_point_represents_zero_exactly(
    bits: int, clipping: str, granularity: str
) -> None:
    scheme = QuantScheme(symmetric=False, granularity=granularity, clipping=clipping)
    weight = _weight(50 + bits)
    weight.view(weight.shape[0], -1)[:, ::4] = 0.0  # zeros in every channel
    weight[3] = 0.0  # and one all-zero channel
    fmt = get_format(f"int{bits}")
    quantized = quantize_weight(weight, fmt, scheme)
    restored = dequantize_weight(quantized)
    assert bool((restored[weight == 0] == 0).all())
    assert bool(torch.isfinite(restored).all())
    # The code stored for w = 0 is the zero point itself.
    rows = quantized.scale.numel()
    codes = quantized.codes.reshape(rows, -1).int()
    zero = quantized.zero_point.int()[:, None].expand_as(codes)
    is_zero = (weight == 0).reshape(rows, -1)
    assert torch.equal(codes[is_zero], zero[is_zero])
    if granularity == "channel":
        qmin, qmax = code_range(fmt, False)
        assert int(quantized.zero_point[1]) == qmin  # all-positive channel: lo = 0
        assert int(quantized.zero_point[2]) == qmax  # all-negative channel: hi = 0


@pytest.mark.parametrize("scheme", SCHEMES, ids=_scheme_id)
def test_all_zero_weight_stays_zero(scheme: QuantScheme) -> None:
    weight = torch.zeros(3, 4)
    restored = fake_quantize(weight, get_format("int4"), scheme)
    assert torch.equal(restored, weight)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_raises(bad: float) -> None:
    weight = _weight(60)
    weight[0, 1, 2, 0] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_weight(weight, get_format("int4"), QuantScheme())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fake_quantize_keeps_dtype_and_shape(dtype: torch.dtype) -> None:
    weight = _weight(61, shape=(5, 7)).to(dtype)
    restored = fake_quantize(weight, get_format("int3"), QuantScheme())
    assert restored.dtype == dtype
    assert restored.shape == weight.shape


def test_symmetric_minmax_reaches_the_channel_maximum() -> None:
    """Symmetric min-max: the largest |w| of each channel is a grid point (code +-qmax)."""
    weight = _weight(62)
    fmt = get_format("int4")
    quantized = quantize_weight(weight, fmt, QuantScheme(symmetric=True, clipping="minmax"))
    alpha = weight.reshape(weight.shape[0], -1).abs().amax(1)
    assert torch.equal(quantized.scale, alpha / 7)
    restored = dequantize_weight(quantized).reshape(weight.shape[0], -1).abs().amax(1)
    assert torch.allclose(restored, alpha, rtol=1e-6, atol=0)


def test_get_format_unknown_name_lists_known_formats() -> None:
    with pytest.raises(ValueError, match="unknown number format 'int9'") as info:
        get_format("int9")
    for name in FORMATS:
        assert name in str(info.value)


def test_parse_format_list_sorts_and_dedups() -> None:
    assert parse_format_list("int8, int2,int4,int2 ,int8") == ("int2", "int4", "int8")
    assert parse_format_list("int3") == ("int3",)
    assert parse_format_list("int6,int5,,") == ("int5", "int6")


@pytest.mark.parametrize("text", ["", " , ,", "int2,fp4", "INT4"])
def test_parse_format_list_rejects_bad_lists(text: str) -> None:
    with pytest.raises(ValueError):
        parse_format_list(text)


def test_scale_overhead_bits() -> None:
    shape = (16, 8, 3, 3)
    assert scale_overhead_bits(shape, QuantScheme(symmetric=True, granularity="channel")) == 16 * 32
    assert scale_overhead_bits(shape, QuantScheme(symmetric=False, granularity="channel")) == (
        16 * 48
    )
    assert scale_overhead_bits(shape, QuantScheme(symmetric=True, granularity="tensor")) == 32
    assert scale_overhead_bits(shape, QuantScheme(symmetric=False, granularity="tensor")) == 48


def test_quant_scheme_validation_and_round_trip() -> None:
    scheme = QuantScheme(
        symmetric=False, granularity="tensor", clipping="minmax", mse_grid_points=7
    )
    assert QuantScheme.from_dict(scheme.to_dict()) == scheme
    with pytest.raises(ValueError, match="granularity"):
        QuantScheme(granularity="group")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="clipping"):
        QuantScheme(clipping="percentile")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mse_grid_points"):
        QuantScheme(mse_grid_points=0)
