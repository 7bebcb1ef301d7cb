"""The format registry and schemes in `lcpaq.quant.formats`: names, code ranges, scheme
validation, storage sizes."""

from __future__ import annotations

import pytest
from quant_cases import BITS, FP_TABLE

from lcpaq.errors import InputError
from lcpaq.quant.formats import (
    FORMATS,
    QuantScheme,
    code_range,
    get_format,
    num_scale_groups,
    parse_format_list,
    scale_overhead_bits,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def test_format_registry() -> None:
    below_two = ["ternary", "binary", "pruned"]
    assert list(FORMATS) == [f"int{bits}" for bits in BITS] + list(FP_TABLE) + below_two
    for bits in BITS:
        fmt = get_format(f"int{bits}")
        assert (fmt.name, fmt.kind, fmt.bits) == (f"int{bits}", "int", bits)
        assert code_range(fmt, True) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
        assert code_range(fmt, False) == (0, 2**bits - 1)


def test_formats_below_two_bits() -> None:
    """Stored bits vs counted bits, code ranges, sorting, scale costs, MX refused."""
    ternary, binary, pruned = (get_format(name) for name in ("ternary", "binary", "pruned"))
    assert (ternary.bits, binary.bits, pruned.bits) == (2, 1, 0)
    assert ternary.budget_bits == pytest.approx(1.5849625007)
    assert (binary.budget_bits, pruned.budget_bits, get_format("int2").budget_bits) == (1, 0, 2)
    assert code_range(ternary, False) == code_range(ternary, True) == (-1, 1)
    assert parse_format_list("int2,ternary,int3,pruned,binary") == (
        "pruned",
        "binary",
        "ternary",
        "int2",
        "int3",
    )
    shape = (16, 8, 3, 3)
    scheme = QuantScheme(symmetric=False, granularity="channel")
    assert scale_overhead_bits(shape, scheme, ternary) == 16 * 32  # no zero point
    assert scale_overhead_bits(shape, scheme, binary) == 16 * 32
    assert scale_overhead_bits(shape, scheme, pruned) == 0
    with pytest.raises(InputError, match="not MX blocks"):
        scale_overhead_bits(shape, QuantScheme(granularity="mx"), ternary)


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
