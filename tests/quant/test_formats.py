"""Quantizers in `lcpaq.quant.formats`: code ranges, rounding error, grid sizes, clipping, zero points."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

from lcpaq.errors import InputError
from lcpaq.quant.formats import (
    FORMATS,
    QuantScheme,
    code_range,
    fp_decode,
    fp_grid,
    fp_round_codes,
    get_format,
    has_zero_point,
    mx_element_emax,
    num_scale_groups,
    parse_format_list,
    round_to_grid,
    scale_overhead_bits,
)
from lcpaq.quant.gptq import gptq_round
from lcpaq.quant.weights import (
    code_offset,
    decoded_scale,
    dequantize_weight,
    fake_quantize,
    fake_quantize_formats,
    pack_codes,
    quantize_weight,
    quantize_weight_formats,
    unpack_codes,
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
    assert list(FORMATS) == [f"int{bits}" for bits in BITS] + list(FP_TABLE)
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
    with pytest.raises(InputError, match="granularity.*'block'"):
        QuantScheme(granularity="block")  # type: ignore[arg-type]
    for bad in (0, 16, 100, 256):
        with pytest.raises(InputError, match=f"group size must be one of 32, 64, 128, got {bad}"):
            QuantScheme(granularity="group", group_size=bad)
    grouped = QuantScheme(granularity="group", group_size=32)
    assert QuantScheme.from_dict(grouped.to_dict()) == grouped
    # Run configs written before group_size existed still load, with the default.
    old = {key: value for key, value in QuantScheme().to_dict().items() if key != "group_size"}
    assert QuantScheme.from_dict(old) == QuantScheme()
    with pytest.raises(ValueError, match="clipping"):
        QuantScheme(clipping="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="percentile"):
        QuantScheme(clipping="percentile", percentile=100.5)
    with pytest.raises(ValueError, match="mse_grid_points"):
        QuantScheme(mse_grid_points=0)


def test_quant_scheme_defaults_unchanged() -> None:
    scheme = QuantScheme()
    assert (scheme.symmetric, scheme.granularity, scheme.clipping) == (False, "channel", "mse")
    assert scheme.group_size == 128 and scheme.block_size is None


# ---------------------------------------------------------------------------------------------
# Floating-point formats (METHOD §0 table and §7 oracles).

#: name: (exponent bits, mantissa bits, bias, max, min normal, min subnormal, distinct finite values)
FP_TABLE = {
    "fp8_e4m3": (4, 3, 7, 448.0, 2.0**-6, 2.0**-9, 253),
    "fp8_e5m2": (5, 2, 15, 57344.0, 2.0**-14, 2.0**-16, 247),
    "fp6_e3m2": (3, 2, 3, 28.0, 0.25, 0.0625, 63),
    "fp6_e2m3": (2, 3, 1, 7.5, 1.0, 0.125, 63),
    "fp4_e2m1": (2, 1, 1, 6.0, 1.0, 0.5, 15),
}
TORCH_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


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


@pytest.mark.parametrize("name", FP_TABLE)
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_fp_minmax_scale_maps_the_largest_magnitude_to_fmax(name: str, granularity: str) -> None:
    fmt = get_format(name)
    scheme = QuantScheme(granularity=granularity, clipping="minmax", group_size=32)
    weight = _weight(80, shape=(6, 20, 3))  # fan-in 60: one full and one partial group of 32
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


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp6_e2m3", "fp4_e2m1"])
def test_fp_mse_clipping_never_worse_than_minmax(name: str) -> None:
    weight = torch.randn(6, 200, generator=torch.Generator().manual_seed(81))
    fmt = get_format(name)
    errors = {
        clipping: (fake_quantize(weight, fmt, QuantScheme(clipping=clipping)) - weight)
        .pow(2)
        .sum(1)
        for clipping in ("mse", "minmax")
    }
    assert bool((errors["mse"] <= errors["minmax"] * (1 + 1e-5)).all())


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
    weight = _weight(90, shape=(5, 30, 3, 3))  # fan-in 270: groups of 32/64/128 + a partial one
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
    weight = _weight(91, shape=(6, 10, 3, 3))  # fan-in 90: blocks of 32, 32 and 26
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
    weight = _weight(92, shape=(4, 64))
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


def test_scale_overhead_bits_per_format_and_granularity() -> None:
    shape = (16, 8, 3, 3)  # fan-in 72
    fp4, int4 = get_format("fp4_e2m1"), get_format("int4")
    channel = QuantScheme()
    assert scale_overhead_bits(shape, channel, int4) == 16 * 48
    assert scale_overhead_bits(shape, channel, fp4) == 16 * 32  # no zero point for FP
    group = QuantScheme(granularity="group", group_size=32)  # 3 groups per channel
    assert scale_overhead_bits(shape, group, int4) == 16 * 3 * 48
    assert scale_overhead_bits(shape, group, fp4) == 16 * 3 * 32
    group64 = QuantScheme(symmetric=True, granularity="group", group_size=64)
    assert scale_overhead_bits(shape, group64, int4) == 16 * 2 * 32
    mx = QuantScheme(granularity="mx")
    assert scale_overhead_bits(shape, mx, int4) == scale_overhead_bits(shape, mx, fp4) == 16 * 3 * 8
    assert num_scale_groups(shape, "mx") == 48


def test_fp_formats_parse_and_sort_by_width() -> None:
    names = parse_format_list("int8,fp8_e4m3,fp4_e2m1,int2,int4,fp6_e3m2")
    assert names == ("int2", "fp4_e2m1", "int4", "fp6_e3m2", "fp8_e4m3", "int8")
    with pytest.raises(InputError, match="unknown number format 'fp8'.*fp8_e5m2"):
        parse_format_list("fp8")


def test_code_range_rejects_fp_formats() -> None:
    with pytest.raises(InputError, match="floating-point"):
        code_range(get_format("fp8_e4m3"), True)


# ---------------------------------------------------------------------------------------------
# GPTQ rounding (`gptq_round`, ``QuantScheme(rounding="gptq")``).


def _correlated_hessian(fan_in: int, seed: int, samples: int = 256) -> torch.Tensor:
    """E[x xᵀ] of inputs with strongly correlated coordinates (X = Z·(I + 2M), M random)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.eye(fan_in) + 2 * torch.randn(fan_in, fan_in, generator=generator) / fan_in**0.5
    inputs = torch.randn(samples, fan_in, generator=generator) @ mixing
    return inputs.T @ inputs / samples


def _output_error(weight: torch.Tensor, restored: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W − Q) H (W − Q)ᵀ) = E‖(W − Q) x‖², in float64."""
    delta = (weight - restored).reshape(weight.shape[0], -1).double()
    return float(torch.einsum("oi,ij,oj->", delta, hessian.double(), delta))


def _integer_rounder(low: float, high: float):
    """``round_column`` for the integer grid [low, high] with scale 1; records every call."""
    calls: list[tuple[int, torch.Tensor]] = []

    def round_column(values: torch.Tensor, column: int) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append((column, values.clone()))
        codes = torch.clamp(torch.round(values), low, high)
        return codes, codes

    return round_column, calls


def _stored_grid_rounder(quantized, fmt, scheme: QuantScheme, rows: slice = slice(None)):
    """``round_column`` onto the grid a stored `QuantizedWeight` decodes to (docstring of
    `QuantizedWeight`): per-element scales from the stored scales, in float32 as stored."""
    codes = quantized.codes
    fan_in = codes[0].numel()
    scale = decoded_scale(quantized)
    if scheme.granularity in ("group", "mx"):
        scale = scale.repeat_interleave(quantized.group_size, dim=1)[:, :fan_in]
        zero = quantized.zero_point
        zero = None if zero is None else zero.repeat_interleave(quantized.group_size, 1)[:, :fan_in]
    else:
        scale = scale.reshape(-1, 1).expand(codes.shape[0], fan_in)
        zero = quantized.zero_point
        zero = None if zero is None else zero.reshape(-1, 1).expand(codes.shape[0], fan_in)
    scale = scale[rows]
    zero = torch.zeros_like(scale) if zero is None else zero[rows].float()

    def round_column(values: torch.Tensor, column: int) -> tuple[torch.Tensor, torch.Tensor]:
        values, step, offset = values.float(), scale[:, column], zero[:, column]
        if fmt.kind == "fp":
            element = fp_round_codes(values / step, fmt)
            return element, fp_decode(element, fmt) * step
        if scheme.granularity == "mx":
            unit = step * 2.0 ** -(fmt.bits - 2)
            limit = 2 ** (fmt.bits - 1) - 1
            element = torch.clamp(torch.round(values / unit), -limit, limit)
            return element, element * unit
        qmin, qmax = code_range(fmt, scheme.symmetric)
        element = torch.clamp(torch.round(values / step) + offset, qmin, qmax)
        return element, (element - offset) * step

    return round_column


def _obq_reference(
    matrix: torch.Tensor, hessian: torch.Tensor, round_column, damp: float
) -> torch.Tensor:
    """GPTQ written the slow OBQ way (Frantar & Alistarh 2022, eq. 2-3): after rounding column i,
    w_F −= (w_i − q_i) / [H⁻¹]_ii · [H⁻¹]_{i,F} and H⁻¹ loses row and column i by Gaussian
    elimination; columns in order of decreasing H_ii, H damped by δ·mean(diag H)."""
    hessian = hessian.double().clone()
    dead = hessian.diagonal() <= 0
    hessian.diagonal()[dead] = 1.0
    order = torch.argsort(hessian.diagonal(), descending=True, stable=True).tolist()
    damped = hessian + damp * float(hessian.diagonal().mean()) * torch.eye(len(hessian)).double()
    inverse = torch.linalg.inv(damped)
    work = matrix.double().clone()
    codes = torch.empty_like(work)
    for step, column in enumerate(order):
        rest = order[step + 1 :]
        column_codes, decoded = round_column(work[:, column], column)
        codes[:, column] = column_codes.double()
        error = (work[:, column] - decoded.double()) / inverse[column, column]
        work[:, rest] -= error[:, None] * inverse[column, rest][None, :]
        inverse = (
            inverse
            - inverse[:, column : column + 1]
            @ inverse[column : column + 1]
            / (inverse[column, column])
        )
    return codes


def _gptq(scheme: QuantScheme, **changes) -> QuantScheme:
    return QuantScheme(**{**scheme.to_dict(), "rounding": "gptq", **changes})


#: (format, scheme) pairs covering every code path of the quantizer: INT asymmetric/symmetric per
#: channel, per group (with a partial group), per tensor, a minifloat, and MX for INT and FP.
GPTQ_CASES = [
    ("int4", QuantScheme(symmetric=False, granularity="channel")),
    ("int3", QuantScheme(symmetric=True, granularity="channel", clipping="minmax")),
    ("int4", QuantScheme(symmetric=False, granularity="group", group_size=32)),
    ("int3", QuantScheme(symmetric=True, granularity="group", group_size=32)),
    ("int2", QuantScheme(symmetric=False, granularity="tensor", clipping="percentile")),
    ("int4", QuantScheme(symmetric=True, granularity="tensor")),
    ("fp4_e2m1", QuantScheme(granularity="channel")),
    ("fp6_e3m2", QuantScheme(granularity="group", group_size=32)),
    ("int8", QuantScheme(granularity="mx")),
    ("int4", QuantScheme(granularity="mx")),
    ("fp4_e2m1", QuantScheme(granularity="mx")),
]


def _case_id(case: tuple[str, QuantScheme]) -> str:
    name, scheme = case
    return f"{name}-{_scheme_id(scheme)}"


@pytest.mark.parametrize("case", GPTQ_CASES, ids=_case_id)
def test_gptq_with_uncorrelated_inputs_is_round_to_nearest(case) -> None:
    """With a diagonal H no error is ever propagated: GPTQ's codes are exactly the nearest ones,
    whatever the order of the columns (the diagonal is not sorted) and with a dead input."""
    name, scheme = case
    fmt = get_format(name)
    weight = _weight(93, shape=(6, 10, 2, 2))  # fan-in 40: one full group of 32 + a partial one
    generator = torch.Generator().manual_seed(94)
    diagonal = torch.rand(40, generator=generator) * 3 + 0.1
    diagonal[7] = 0.0  # an input that is always zero
    nearest = quantize_weight(weight, fmt, scheme)
    gptq = quantize_weight(weight, fmt, _gptq(scheme), torch.diag(diagonal))
    assert gptq.codes.dtype == nearest.codes.dtype
    assert torch.equal(gptq.codes, nearest.codes)
    assert torch.equal(gptq.scale, nearest.scale)
    if nearest.zero_point is None:
        assert gptq.zero_point is None
    else:
        assert torch.equal(gptq.zero_point, nearest.zero_point)


@pytest.mark.parametrize("case", GPTQ_CASES, ids=_case_id)
def test_gptq_codes_lie_on_the_stored_grid_and_follow_the_reference(case) -> None:
    """On a correlated H the codes are the reference GPTQ's on the grid of the stored scales and
    zero points (the nearest quantizer's: GPTQ changes codes only), and they decode to
    `fake_quantize` with the same Hessian."""
    name, scheme = case
    fmt = get_format(name)
    weight = _weight(95, shape=(6, 10, 2, 2))
    hessian = _correlated_hessian(40, seed=96)
    scheme_gptq = _gptq(scheme)
    nearest = quantize_weight(weight, fmt, scheme)
    quantized = quantize_weight(weight, fmt, scheme_gptq, hessian)
    assert torch.equal(quantized.scale, nearest.scale)
    assert (quantized.zero_point is None) == (nearest.zero_point is None)
    if nearest.zero_point is not None:
        assert torch.equal(quantized.zero_point, nearest.zero_point)
    assert (quantized.granularity, quantized.group_size) == (
        nearest.granularity,
        nearest.group_size,
    )
    assert not torch.equal(quantized.codes, nearest.codes)  # the compensation did change codes
    expected = _obq_reference(
        weight.reshape(6, -1),
        hessian,
        _stored_grid_rounder(quantized, fmt, scheme),
        scheme.gptq_damp,
    )
    assert torch.equal(quantized.codes.reshape(6, -1).double(), expected)
    codes = quantized.codes.long()
    if fmt.kind == "int" and scheme.granularity != "mx":
        qmin, qmax = code_range(fmt, scheme.symmetric)
    elif fmt.kind == "int":
        qmin, qmax = -(2 ** (fmt.bits - 1) - 1), 2 ** (fmt.bits - 1) - 1
    else:  # minifloat bit patterns: every one must decode to a finite value
        qmin, qmax = 0, 2**fmt.bits - 1
        assert bool(torch.isfinite(fp_decode(codes, fmt)).all())
    assert qmin <= int(codes.min()) and int(codes.max()) <= qmax
    assert torch.equal(
        dequantize_weight(quantized), fake_quantize(weight, fmt, scheme_gptq, hessian)
    )


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["channel", "group", "tensor"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_lowers_the_output_error_on_correlated_inputs(
    bits: int, granularity: str, symmetric: bool
) -> None:
    """tr((W − Q) H (W − Q)ᵀ), the error GPTQ minimises, is well below round-to-nearest's on
    correlated inputs (measured ratios 0.45-0.73; the bound leaves a margin), on every seed."""
    fmt = get_format(f"int{bits}")
    scheme = QuantScheme(symmetric=symmetric, granularity=granularity, group_size=32)
    for seed in range(3):
        weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(100 + seed))
        hessian = _correlated_hessian(64, seed)
        nearest = quantize_weight(weight, fmt, scheme)
        gptq = quantize_weight(weight, fmt, _gptq(scheme), hessian)
        assert torch.equal(gptq.scale, nearest.scale)
        if nearest.zero_point is not None:
            assert torch.equal(gptq.zero_point, nearest.zero_point)
        qmin, qmax = code_range(fmt, symmetric)
        assert qmin <= int(gptq.codes.min()) and int(gptq.codes.max()) <= qmax
        error_nearest = _output_error(weight, dequantize_weight(nearest), hessian)
        error_gptq = _output_error(weight, dequantize_weight(gptq), hessian)
        assert error_gptq < 0.8 * error_nearest, (seed, error_gptq / error_nearest)


@pytest.mark.parametrize(
    ("damp", "compensated", "code"),
    [(0.01, 0.3 + 0.4 * 1.5 / 1.025, 1.0), (1.0, 0.3 + 0.4 * 1.5 / 3.5, 0.0)],
)
def test_gptq_round_two_columns_by_hand(damp: float, compensated: float, code: float) -> None:
    """W = [w1 w2] = [0.4 0.3], H = [[a, b], [b, c]] = [[4, 1.5], [1.5, 1]], integer grid.

    Column 1 goes first (H_11 > H_22) and rounds to q1 = 0. With H' = H + δ·mean(a, c)·I,
    [H'⁻¹]_12 / [H'⁻¹]_11 = −b / c' (c' = c + 2.5δ), so w2 becomes w2 + (w1 − q1)·b / c'. For
    δ = 0.01 that is 0.3 + 0.4·1.5/1.025 = 0.885 → q2 = 1, where round-to-nearest gives 0; for
    δ = 1 it is 0.3 + 0.4·1.5/3.5 = 0.471 → q2 = 0.
    """
    hessian = torch.tensor([[4.0, 1.5], [1.5, 1.0]])
    round_column, calls = _integer_rounder(-8, 7)
    codes = gptq_round(
        torch.tensor([[0.4, 0.3]], dtype=torch.float64), hessian, round_column, damp=damp
    )
    assert [column for column, _ in calls] == [0, 1]
    assert float(calls[0][1]) == 0.4
    assert float(calls[1][1]) == pytest.approx(compensated, abs=1e-12)
    assert codes.tolist() == [[0.0, code]]
    # With the larger input second in line the order flips: column 2 is rounded first.
    round_column, calls = _integer_rounder(-8, 7)
    flipped = hessian.flip(0).flip(1)
    codes = gptq_round(
        torch.tensor([[0.3, 0.4]], dtype=torch.float64), flipped, round_column, damp=damp
    )
    assert [column for column, _ in calls] == [1, 0]
    assert float(calls[1][1]) == pytest.approx(compensated, abs=1e-12)
    assert codes.tolist() == [[code, 0.0]]


@pytest.mark.parametrize("block", [1, 3, 128])
def test_gptq_round_matches_the_obq_reference_for_any_block(block: int) -> None:
    """Lazy block updates change nothing: every block size gives the reference's codes, here
    with clamping at the grid's ends (the error of a saturated column is propagated too)."""
    generator = torch.Generator().manual_seed(97)
    matrix = torch.randn(5, 20, generator=generator) * 3
    hessian = _correlated_hessian(20, seed=98)
    hessian[4] = hessian[:, 4] = 0.0  # a dead input
    round_column, _ = _integer_rounder(-3, 3)
    codes = gptq_round(matrix, hessian, round_column, damp=0.05, block=block)
    reference_round, _ = _integer_rounder(-3, 3)
    assert torch.equal(codes, _obq_reference(matrix, hessian, reference_round, 0.05))
    assert bool((codes.abs() == 3).any())  # some columns did saturate
    assert torch.equal(codes[:, 4], torch.clamp(torch.round(matrix[:, 4].double()), -3, 3))


def test_gptq_on_a_grouped_convolution() -> None:
    """A grouped conv has one H per group ([groups, k, k]): each group of output channels is
    rounded against its own H, exactly as if it were a layer of its own; [1, k, k] is [k, k]."""
    fmt = get_format("int2")
    scheme = QuantScheme(granularity="channel", rounding="gptq")
    weight = _weight(99, shape=(6, 2, 3, 3))  # Conv2d(4, 6, 3, groups=2): fan-in 18 per group
    hessians = torch.stack([_correlated_hessian(18, seed=100), _correlated_hessian(18, seed=101)])
    quantized = quantize_weight(weight, fmt, scheme, hessians)
    for group in range(2):
        rows = slice(3 * group, 3 * group + 3)
        alone = quantize_weight(weight[rows], fmt, scheme, hessians[group])
        assert torch.equal(quantized.codes[rows], alone.codes)
    shared = quantize_weight(weight, fmt, scheme, hessians[0])
    assert not torch.equal(shared.codes[3:], quantized.codes[3:])  # the second H was used
    assert torch.equal(shared.codes, quantize_weight(weight, fmt, scheme, hessians[:1]).codes)
    nearest = fake_quantize(weight, fmt, QuantScheme(granularity="channel"))
    restored = dequantize_weight(quantized)
    for group in range(2):
        rows = slice(3 * group, 3 * group + 3)
        assert _output_error(weight[rows], restored[rows], hessians[group]) < _output_error(
            weight[rows], nearest[rows], hessians[group]
        )


@pytest.mark.parametrize(
    "shape", [(17, 17), (18,), (2, 18, 17), (4, 18, 18), (6, 6, 18, 18), (18, 27)]
)
def test_gptq_rejects_a_hessian_that_does_not_fit(shape: tuple[int, ...]) -> None:
    weight = _weight(102, shape=(6, 2, 3, 3))
    scheme = QuantScheme(rounding="gptq")
    with pytest.raises(InputError) as error:
        quantize_weight(weight, get_format("int4"), scheme, torch.ones(shape))
    message = str(error.value)
    assert f"input Hessian of shape {shape}" in message
    assert "weight of shape (6, 2, 3, 3)" in message and "[18, 18]" in message


def test_gptq_needs_a_hessian_and_a_valid_scheme() -> None:
    weight = _weight(103)
    for granularity in ("channel", "mx"):
        with pytest.raises(InputError, match="rounding 'gptq' needs the layer's input Hessian"):
            fake_quantize(
                weight, get_format("int4"), QuantScheme(granularity=granularity, rounding="gptq")
            )
    # Round-to-nearest ignores a Hessian, even one that does not fit.
    assert torch.equal(
        fake_quantize(weight, get_format("int4"), QuantScheme(), torch.ones(3)),
        fake_quantize(weight, get_format("int4"), QuantScheme()),
    )
    with pytest.raises(InputError, match="rounding must be one of nearest, gptq, got 'bogus'"):
        QuantScheme(rounding="bogus")  # type: ignore[arg-type]
    for damp in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(InputError, match="gptq damping must be in"):
            QuantScheme(rounding="gptq", gptq_damp=damp)
    scheme = QuantScheme(rounding="gptq", gptq_damp=0.1)
    assert QuantScheme.from_dict(scheme.to_dict()) == scheme
    # Run configs written before GPTQ existed still load, rounding to nearest.
    old = {
        key: value
        for key, value in QuantScheme().to_dict().items()
        if key not in ("rounding", "gptq_damp")
    }
    assert QuantScheme.from_dict(old) == QuantScheme()


def test_gptq_on_an_indefinite_hessian_raises_input_error() -> None:
    """Damping grows tenfold up to 10⁵·δ; a Hessian that stays indefinite is refused clearly."""
    hessian = torch.tensor([[1.0, 1e6], [1e6, 1.0]])
    with pytest.raises(InputError, match="not positive definite even with damping 1000"):
        quantize_weight(
            torch.randn(3, 2), get_format("int4"), QuantScheme(rounding="gptq"), hessian
        )
    # Singular but positive semi-definite (collinear inputs) is fine: δ makes it definite.
    row = torch.tensor([[1.0, 2.0, -1.0]])
    codes = quantize_weight(
        torch.randn(3, 3), get_format("int4"), QuantScheme(rounding="gptq"), row.T @ row
    ).codes
    assert codes.shape == (3, 3)


def test_gptq_keeps_dtype_and_shape() -> None:
    weight = _weight(104, shape=(4, 3, 2, 2)).double()
    hessian = _correlated_hessian(12, seed=105)
    scheme = QuantScheme(rounding="gptq")
    restored = fake_quantize(weight, get_format("int4"), scheme, hessian)
    assert restored.dtype == torch.float64 and restored.shape == weight.shape
    assert torch.equal(
        restored, fake_quantize(weight.float(), get_format("int4"), scheme, hessian).double()
    )


@pytest.mark.parametrize(
    "scheme",
    [
        QuantScheme(rounding="gptq"),
        QuantScheme(rounding="gptq", symmetric=True, clipping="minmax"),
        QuantScheme(rounding="gptq", granularity="group", group_size=32),
        QuantScheme(rounding="gptq", granularity="mx"),
    ],
    ids=["asym-channel", "sym-channel", "group32", "mx"],
)
def test_gptq_formats_together_equal_one_at_a_time(scheme):
    """INT formats share one GPTQ pass over their stacked rows; rows never interact, so every
    format gets the codes it gets alone."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(6, 4, 3, 3, generator=generator)
    mixing = torch.randn(36, 36, generator=generator)
    inputs = torch.randn(400, 36, generator=generator) @ mixing
    hessian = inputs.T @ inputs / len(inputs)
    fmts = [get_format(name) for name in ("int2", "int3", "fp4_e2m1", "int8", "int5")]
    together = quantize_weight_formats(weight, fmts, scheme, hessian)
    for fmt, batched in zip(fmts, together):
        alone = quantize_weight(weight, fmt, scheme, hessian)
        assert batched.format_name == fmt.name
        assert torch.equal(batched.codes, alone.codes)
        assert torch.equal(batched.scale, alone.scale)
    fake = fake_quantize_formats(weight, fmts, scheme, hessian)
    for fmt, decoded in zip(fmts, fake):
        assert torch.equal(decoded, fake_quantize(weight, fmt, scheme, hessian))


@pytest.mark.parametrize("name", list(FORMATS))
def test_packed_codes_unpack_exactly(name: str) -> None:
    """Every format, signed and unsigned codes, counts that do not fill the last byte."""
    fmt = get_format(name)
    generator = torch.Generator().manual_seed(3)
    for scheme in (QuantScheme(), QuantScheme(symmetric=True), QuantScheme(granularity="mx")):
        for shape in ((5, 3, 3, 3), (7, 1), (1, 1)):
            weight = torch.randn(shape, generator=generator)
            quantized = quantize_weight(weight, fmt, scheme)
            packed = pack_codes(quantized)
            assert packed.dtype == torch.uint8
            assert packed.numel() == -(-weight.numel() * fmt.bits // 8)
            codes = unpack_codes(
                packed, fmt.bits, shape, quantized.codes.dtype, code_offset(quantized)
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
