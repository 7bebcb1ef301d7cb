"""Weight quantization in `lcpaq.quant.weights`: codes in range, rounding error, grid sizes, zero
points, per-group and MX scales, bit packing."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from quant_cases import BITS, FP_TABLE, SCHEMES, scheme_id, spread_weight

from lcpaq.quant.formats import (
    FORMATS,
    LEVEL_KINDS,
    QuantScheme,
    code_range,
    get_format,
    has_zero_point,
    mx_element_emax,
    num_scale_groups,
    scale_overhead_bits,
)
from lcpaq.quant.grids import fp_grid, round_to_grid
from lcpaq.quant.weights import (
    code_offset,
    code_step,
    decoded_scale,
    dequantize_weight,
    fake_quantize,
    pack_codes,
    quantize_weight,
    unpack_codes,
)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("scheme", SCHEMES, ids=scheme_id)
@pytest.mark.parametrize("bits", BITS)
def test_codes_within_code_range(bits: int, scheme: QuantScheme) -> None:
    weight = spread_weight(bits)
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


@pytest.mark.parametrize("scheme", SCHEMES, ids=scheme_id)
@pytest.mark.parametrize("bits", BITS)
def test_dequantize_of_quantize_is_fake_quantize(bits: int, scheme: QuantScheme) -> None:
    weight = spread_weight(10 + bits)
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
    weight = spread_weight(20 + bits)
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


@pytest.mark.parametrize("scheme", SCHEMES, ids=scheme_id)
@pytest.mark.parametrize("bits", BITS)
def test_at_most_two_to_the_bits_values_per_group(bits: int, scheme: QuantScheme) -> None:
    weight = spread_weight(30 + bits, shape=(4, 64, 5))  # 320 elements per channel > 2^8
    restored = fake_quantize(weight, get_format(f"int{bits}"), scheme)
    rows = weight.shape[0] if scheme.granularity == "channel" else 1
    limit = 2**bits - 1 if scheme.symmetric else 2**bits
    for row in restored.reshape(rows, -1):
        assert len(torch.unique(row)) <= limit
    # The grid is actually used: 8-bit channels of 320 Gaussian weights take many values.
    if bits == 8:
        assert len(torch.unique(restored.reshape(rows, -1)[0])) > 64


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
@pytest.mark.parametrize("clipping", ["minmax", "mse"])
@pytest.mark.parametrize("bits", BITS)
def test_asymmetric_zero_point_represents_zero_exactly(
    bits: int, clipping: str, granularity: str
) -> None:
    scheme = QuantScheme(symmetric=False, granularity=granularity, clipping=clipping)
    weight = spread_weight(50 + bits)
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


@pytest.mark.parametrize("scheme", SCHEMES, ids=scheme_id)
def test_all_zero_weight_stays_zero(scheme: QuantScheme) -> None:
    weight = torch.zeros(3, 4)
    restored = fake_quantize(weight, get_format("int4"), scheme)
    assert torch.equal(restored, weight)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_raises(bad: float) -> None:
    weight = spread_weight(60)
    weight[0, 1, 2, 0] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_weight(weight, get_format("int4"), QuantScheme())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fake_quantize_keeps_dtype_and_shape(dtype: torch.dtype) -> None:
    weight = spread_weight(61, shape=(5, 7)).to(dtype)
    restored = fake_quantize(weight, get_format("int3"), QuantScheme())
    assert restored.dtype == dtype
    assert restored.shape == weight.shape


def test_symmetric_minmax_reaches_the_channel_maximum() -> None:
    """Symmetric min-max: the largest |w| of each channel is a grid point (code +-qmax)."""
    weight = spread_weight(62)
    fmt = get_format("int4")
    quantized = quantize_weight(weight, fmt, QuantScheme(symmetric=True, clipping="minmax"))
    alpha = weight.reshape(weight.shape[0], -1).abs().amax(1)
    assert torch.equal(quantized.scale, alpha / 7)
    restored = dequantize_weight(quantized).reshape(weight.shape[0], -1).abs().amax(1)
    assert torch.allclose(restored, alpha, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", FP_TABLE)
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_fp_minmax_scale_maps_the_largest_magnitude_to_fmax(name: str, granularity: str) -> None:
    fmt = get_format(name)
    scheme = QuantScheme(granularity=granularity, clipping="minmax", group_size=32)
    weight = spread_weight(80, shape=(6, 20, 3))  # fan-in 60: one full and one partial group of 32
    quantized = quantize_weight(weight, fmt, scheme)
    assert quantized.codes.dtype == torch.uint8 and quantized.codes.shape == weight.shape
    assert quantized.zero_point is None
    grouped = weight.reshape(6, -1)
    if granularity == "tensor":
        alpha = weight.abs().amax().reshape(1)
    elif granularity == "channel":
        alpha = grouped.abs().amax(1)
    else:
        alpha = torch.stack([grouped[:, :32].abs().amax(1), grouped[:, 32:].abs().amax(1)], 1)
    assert torch.equal(quantized.scale, alpha / fmt.max_value)
    restored = dequantize_weight(quantized)
    assert torch.equal(restored, fake_quantize(weight, fmt, scheme))
    assert torch.allclose(restored.abs().amax(), weight.abs().amax(), rtol=1e-6, atol=0)
    # Each element is the nearest grid value of w / s, times s.
    scale = quantized.scale if granularity != "group" else quantized.scale.repeat_interleave(32, 1)
    scale = scale.reshape(-1, 1) if granularity != "group" else scale[:, :60]
    scaled = (weight.reshape(scale.shape[0], -1) / scale).reshape(weight.shape)
    expected = round_to_grid(scaled, fmt).reshape(scale.shape[0], -1) * scale
    assert torch.equal(restored, expected.reshape(weight.shape))


# ---------------------------------------------------------------------------------------------
# Per-group scales and OCP microscaling.

GROUP_FORMATS = ["int2", "int4", "int8", "fp8_e4m3", "fp6_e3m2", "fp4_e2m1"]


def _values_per_format(name: str, scheme: QuantScheme) -> int:
    fmt = get_format(name)
    if fmt.kind == "fp":
        return len(fp_grid(fmt))
    return 2**fmt.bits if scheme.granularity != "mx" and not scheme.symmetric else 2**fmt.bits - 1


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("name", GROUP_FORMATS)
def test_group_quantization(name: str, symmetric: bool, group_size: int) -> None:
    fmt = get_format(name)
    scheme = QuantScheme(symmetric=symmetric, granularity="group", group_size=group_size)
    # fan-in 270: groups of 32/64/128 + a partial one
    weight = spread_weight(90, shape=(5, 30, 3, 3))
    quantized = quantize_weight(weight, fmt, scheme)
    groups = -(-270 // group_size)
    assert quantized.scale.shape == (5, groups) and quantized.group_size == group_size
    assert num_scale_groups(tuple(weight.shape), "group", group_size) == 5 * groups
    if has_zero_point(fmt, scheme):
        assert quantized.zero_point is not None and quantized.zero_point.shape == (5, groups)
    else:
        assert quantized.zero_point is None
    restored = dequantize_weight(quantized)
    assert torch.equal(restored, fake_quantize(weight, fmt, scheme))
    limit = _values_per_format(name, scheme)
    flat = restored.reshape(5, -1)
    for start in range(0, 270, group_size):
        for row in flat[:, start : start + group_size]:
            assert len(torch.unique(row)) <= limit
    # A group is quantized exactly as if it were a channel of its own (padding changes nothing).
    channel = QuantScheme(symmetric=symmetric, granularity="channel")
    last = (groups - 1) * group_size
    alone = fake_quantize(weight.reshape(5, -1)[:, last:].contiguous(), fmt, channel)
    assert torch.equal(flat[:, last:], alone)
    # Finer scales are never worse than one per channel with min-max.
    by_channel = fake_quantize(weight, fmt, QuantScheme(symmetric=symmetric, clipping="minmax"))
    grouped = fake_quantize(
        weight, fmt, QuantScheme(symmetric=symmetric, granularity="group", group_size=32)
    )
    assert (grouped - weight).pow(2).sum() <= (by_channel - weight).pow(2).sum() * (1 + 1e-5)


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1"])
def test_mx_blocks_of_32_share_a_power_of_two_scale(name: str) -> None:
    fmt = get_format(name)
    emax = {"fp8_e4m3": 8, "fp8_e5m2": 15, "fp6_e3m2": 4, "fp6_e2m3": 2, "fp4_e2m1": 2}[name]
    assert mx_element_emax(fmt) == emax
    weight = spread_weight(91, shape=(6, 10, 3, 3))  # fan-in 90: blocks of 32, 32 and 26
    weight[4] = 0.0  # an all-zero channel
    scheme = QuantScheme(granularity="mx")
    quantized = quantize_weight(weight, fmt, scheme)
    assert quantized.scale.dtype == torch.uint8 and quantized.scale.shape == (6, 3)
    assert quantized.group_size == 32 and quantized.zero_point is None
    assert int(quantized.scale.max()) <= 254  # 255 is the E8M0 NaN
    scale = decoded_scale(quantized)
    mantissa, _ = torch.frexp(scale)
    assert bool((mantissa == 0.5).all())  # powers of two
    blocks = torch.nn.functional.pad(weight.reshape(6, -1), (0, 6)).reshape(6, 3, 32)
    amax = blocks.abs().amax(2)
    nonzero = amax > 0
    expected = torch.exp2(torch.floor(torch.log2(amax[nonzero])) - emax)
    assert torch.equal(scale[nonzero], expected)
    restored = dequantize_weight(quantized)
    assert torch.equal(restored, fake_quantize(weight, fmt, scheme))
    assert torch.equal(restored[4], weight[4])
    # Each element is round-to-nearest-even of x / X on the element grid, saturating at fmax.
    per_element = scale.repeat_interleave(32, 1)[:, :90].reshape(weight.shape)
    assert torch.equal(restored, round_to_grid(weight / per_element, fmt) * per_element)
    for block in restored.reshape(6, -1).split(32, dim=1):
        for row in block:
            assert len(torch.unique(row)) <= len(fp_grid(fmt))
    assert scale_overhead_bits(tuple(weight.shape), scheme, fmt) == 6 * 3 * 8


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_int_under_mx_is_mxint(bits: int, symmetric: bool) -> None:
    """INT formats under MX: symmetric codes ±(2^(b-1)-1), element code·2^-(b-2), no zero point
    (OCP MXINT8 generalised), whatever `symmetric` says."""
    fmt = get_format(f"int{bits}")
    weight = spread_weight(92, shape=(4, 64))
    quantized = quantize_weight(weight, fmt, QuantScheme(symmetric=symmetric, granularity="mx"))
    assert quantized.codes.dtype == torch.int8 and quantized.zero_point is None
    limit = 2 ** (bits - 1) - 1
    assert int(quantized.codes.abs().max()) <= limit
    scale = decoded_scale(quantized)
    amax = weight.reshape(4, 2, 32).abs().amax(2)
    assert torch.equal(scale, torch.exp2(torch.floor(torch.log2(amax))))
    element = quantized.codes.float().reshape(4, 2, 32) * 2.0 ** -(bits - 2)
    assert torch.equal(dequantize_weight(quantized), (element * scale[..., None]).reshape(4, 64))
    if bits == 8:  # MXINT8: 8-bit codes resolve every block to within 2^-7 of its scale
        error = (dequantize_weight(quantized) - weight).reshape(4, 2, 32).abs()
        assert bool((error <= scale[..., None] * 2.0**-6).all())


@pytest.mark.parametrize("name", list(FORMATS))
def test_packed_codes_unpack_exactly(name: str) -> None:
    """Every format, signed and unsigned codes, counts that do not fill the last byte."""
    fmt = get_format(name)
    generator = torch.Generator().manual_seed(3)
    schemes = [QuantScheme(), QuantScheme(symmetric=True), QuantScheme(granularity="group")]
    if fmt.kind not in LEVEL_KINDS:  # no MX form below two bits
        schemes.append(QuantScheme(granularity="mx"))
    for scheme in schemes:
        for shape in ((5, 3, 3, 3), (7, 1), (1, 1)):
            weight = torch.randn(shape, generator=generator)
            quantized = quantize_weight(weight, fmt, scheme)
            packed = pack_codes(quantized)
            assert packed.dtype == torch.uint8
            assert packed.numel() == -(-weight.numel() * fmt.bits // 8)
            codes = unpack_codes(
                packed,
                fmt.bits,
                shape,
                quantized.codes.dtype,
                code_offset(quantized),
                code_step(quantized),
            )
            assert codes.dtype == quantized.codes.dtype
            assert torch.equal(codes, quantized.codes)


def test_packing_refuses_codes_wider_than_the_format() -> None:
    quantized = quantize_weight(torch.randn(4, 4), get_format("int3"), QuantScheme())
    wide = replace(quantized, codes=quantized.codes + 8)
    with pytest.raises(ValueError, match="int3 codes do not fit 3 bits"):
        pack_codes(wide)
    with pytest.raises(ValueError, match="2 bytes cannot hold 16 codes of 3 bits"):
        unpack_codes(torch.zeros(2, dtype=torch.uint8), 3, (4, 4), torch.uint8, 0)
