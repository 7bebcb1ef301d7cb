"""Number formats and quantization schemes: the only module that knows bit layouts.

A `NumberFormat` names a code grid: integers ``int2`` … ``int8``, minifloats ``fp8_e4m3``,
``fp8_e5m2``, ``fp6_e3m2``, ``fp6_e2m3``, ``fp4_e2m1``, or the formats below two bits: ``ternary``
(codes −1, 0, 1 times a scale; log2(3) bits counted, 2 stored), ``binary`` (±scale, 1 bit) and
``pruned`` (0 bits: the weight is zero, only its layout is stored; their fit is
`lcpaq.quant.levels`); `FORMATS` is their registry, looked up by
name (`get_format`, `parse_format_list`); INT code ranges are `code_range`, and the minifloat grids
decoded from these bit layouts are `lcpaq.quant.grids` (the torch side). A
`QuantScheme` says how a weight tensor is mapped onto a grid (symmetric or asymmetric INT codes,
per-tensor, per-output-channel, per-group or OCP microscaling (MX) scales, min-max, MSE or
percentile clipping, nearest or GPTQ rounding), and `scale_overhead_bits` what its scales cost in
storage. The quantizers themselves use these: `lcpaq.quant.weights` (weights, round to nearest),
`lcpaq.quant.gptq` (GPTQ rounding), `lcpaq.quant.activations` (activations at inference).
Formulas follow METHOD §0; docs/formats.md describes every case.

Plain Python, no torch: the allocation stage reads bit widths and scale costs from here
(`lcpaq.allocation.table`, `lcpaq.allocation.costs`) and must run where torch is not installed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from lcpaq.errors import InputError

Granularity = Literal["tensor", "channel", "group", "mx"]
FormatKind = Literal["int", "fp", "ternary", "binary", "pruned"]
#: Kinds below two bits: a few levels times one scale per scale group (none when pruned).
LEVEL_KINDS = ("ternary", "binary", "pruned")
Clipping = Literal["minmax", "mse", "percentile"]
Rounding = Literal["nearest", "gptq"]
CLIPPINGS = ("minmax", "mse", "percentile")
ROUNDINGS = ("nearest", "gptq")
GRANULARITIES = ("tensor", "channel", "group", "mx")
GROUP_SIZES = (32, 64, 128)

#: Size in bits of one stored scale (float32) and of one stored zero point (we store it as int16 so
#: that every asymmetric code range up to 8 bits fits; the cost model counts what is stored).
SCALE_BITS = 32
ZERO_POINT_BITS = 16
#: OCP MX: blocks of 32 consecutive elements share one E8M0 scale (8 bits, a biased exponent).
MX_BLOCK_SIZE = 32
MX_SCALE_BITS = 8
E8M0_BIAS = 127


@dataclass(frozen=True)
class NumberFormat:
    """A code grid. ``bits`` is the storage width of one code, sign included; `budget_bits` what
    average-bit budgets, BitOps and EBOPs count (log2(3) for ternary, ``bits`` otherwise).

    Minifloats (``kind="fp"``) have ``exponent_bits``, ``mantissa_bits``, exponent ``bias``, largest
    finite ``max_value`` and ``special_values``: ``"none"`` (every pattern finite), ``"fn"`` (only
    S.1…1.1…1 is NaN, no inf: OCP E4M3) or ``"ieee"`` (all-ones exponent is inf/NaN: E5M2).
    """

    name: str
    kind: FormatKind
    bits: int
    exponent_bits: int = 0
    mantissa_bits: int = 0
    bias: int = 0
    max_value: float = 0.0
    special_values: Literal["none", "fn", "ieee"] = "none"

    @property
    def budget_bits(self) -> float:
        """Information per weight: a ternary code holds log2(3) ≈ 1.585 bits (five codes fit a
        byte); the checkpoint stores it in 2 bits (`lcpaq.quant.weights.pack_codes`), which the
        size budgets count."""
        return math.log2(3) if self.kind == "ternary" else float(self.bits)


def _minifloat(
    name: str,
    exponent_bits: int,
    mantissa_bits: int,
    bias: int,
    max_value: float,
    special_values: Literal["none", "fn", "ieee"],
) -> NumberFormat:
    return NumberFormat(
        name=name,
        kind="fp",
        bits=1 + exponent_bits + mantissa_bits,
        exponent_bits=exponent_bits,
        mantissa_bits=mantissa_bits,
        bias=bias,
        max_value=max_value,
        special_values=special_values,
    )


FORMATS: dict[str, NumberFormat] = {
    **{
        f"int{bits}": NumberFormat(name=f"int{bits}", kind="int", bits=bits) for bits in range(2, 9)
    },
    "fp8_e4m3": _minifloat("fp8_e4m3", 4, 3, 7, 448.0, "fn"),
    "fp8_e5m2": _minifloat("fp8_e5m2", 5, 2, 15, 57344.0, "ieee"),
    "fp6_e3m2": _minifloat("fp6_e3m2", 3, 2, 3, 28.0, "none"),
    "fp6_e2m3": _minifloat("fp6_e2m3", 2, 3, 1, 7.5, "none"),
    "fp4_e2m1": _minifloat("fp4_e2m1", 2, 1, 1, 6.0, "none"),
    "ternary": NumberFormat(name="ternary", kind="ternary", bits=2),
    "binary": NumberFormat(name="binary", kind="binary", bits=1),
    "pruned": NumberFormat(name="pruned", kind="pruned", bits=0),
}


def get_format(name: str) -> NumberFormat:
    """Look a format up by name, with an error that lists the known ones."""
    try:
        return FORMATS[name]
    except KeyError:
        known = ", ".join(FORMATS)
        raise InputError(f"unknown number format {name!r}; known formats: {known}") from None


def parse_format_list(text: str) -> tuple[str, ...]:
    """Parse ``"int2,fp4_e2m1,int4"`` into validated, de-duplicated names sorted by the bits
    budgets count (ternary before int2)."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise InputError("the candidate format list is empty")
    formats = {get_format(name).name: get_format(name) for name in names}
    return tuple(sorted(formats, key=lambda name: (formats[name].budget_bits, name)))


def mx_element_emax(fmt: NumberFormat) -> int:
    """OCP MX emax_elem: exponent of the largest power of two in the element format.

    8/15/4/2/2 for E4M3/E5M2/E3M2/E2M3/E2M1. INT formats under MX follow OCP MXINT8, generalised to
    b bits: the element is code·2^-(b-2) with code in ±(2^(b-1)-1), so emax_elem = 0.
    """
    return 0 if fmt.kind == "int" else math.floor(math.log2(fmt.max_value))


# ---------------------------------------------------------------------------------------------
# Schemes.


@dataclass(frozen=True)
class QuantScheme:
    """How weights are mapped onto a format's grid (shared by all layers of one run).

    Defaults are the measured best on ResNet20 (asymmetric + MSE clipping: 90.3 % at 3 average bits
    vs 89.3 % for symmetric min-max, both after statistics correction; docs/results.md).
    ``symmetric`` only concerns INT formats with float scales: minifloats are sign-magnitude and MX
    has no zero points. ``group_size`` is used by ``granularity="group"`` only (MX blocks are 32).
    ``clipping`` does not apply to MX, whose scale is fixed by the block's largest magnitude.
    ``percentile`` is p of ``clipping="percentile"``: the range of each scale group is cut at the
    p-th percentile of |w| (symmetric INT, FP) or at the (100−p)-th and p-th percentiles of w
    (asymmetric INT), linear interpolation between order statistics; p = 100 is min-max.
    ``rounding="gptq"`` keeps the clipping's scales but chooses the codes by GPTQ's
    error-compensating rounding against the layer's input second moments
    (`lcpaq.quant.gptq.gptq_round`); it needs them (`lcpaq.quant.input_stats.collect_input_hessians`).
    ``gptq_damp`` is GPTQ's dampening: this fraction of the mean diagonal of H is added to its
    diagonal.
    """

    symmetric: bool = False
    granularity: Granularity = "channel"
    clipping: Clipping = "mse"
    #: Number of candidate clipping ratios t/T·max|w| searched by MSE clipping (METHOD §0, T=100).
    mse_grid_points: int = 100
    group_size: int = 128
    #: p of percentile clipping, in (50, 100]; ignored by the other clipping methods.
    percentile: float = 99.9
    rounding: Rounding = "nearest"
    gptq_damp: float = 0.01

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise InputError(
                f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}"
            )
        if self.clipping not in CLIPPINGS:
            raise InputError(
                f"clipping must be one of {', '.join(CLIPPINGS)}, got {self.clipping!r}"
            )
        if self.rounding not in ROUNDINGS:
            raise InputError(
                f"rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}"
            )
        if not 0.0 < self.gptq_damp <= 1.0:
            raise InputError(f"gptq damping must be in (0, 1], got {self.gptq_damp!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise InputError(f"clipping percentile must be in (50, 100], got {self.percentile!r}")
        if self.mse_grid_points < 1:
            raise InputError(f"mse_grid_points must be >= 1, got {self.mse_grid_points}")
        if self.group_size not in GROUP_SIZES:
            sizes = ", ".join(map(str, GROUP_SIZES))
            raise InputError(f"group size must be one of {sizes}, got {self.group_size!r}")

    @property
    def block_size(self) -> int | None:
        """Elements per scale along the fan-in: group_size, 32 for MX, None for tensor/channel."""
        if self.granularity == "group":
            return self.group_size
        return MX_BLOCK_SIZE if self.granularity == "mx" else None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantScheme:
        """Read `to_dict`'s output; `__post_init__` validates the values."""
        return cls(**data)


def code_range(fmt: NumberFormat, symmetric: bool) -> tuple[int, int]:
    """Smallest and largest INT code. Symmetric uses the restricted range ±(2^(b-1)-1). Ternary
    codes are −1 … 1 whatever the scheme (symmetric by construction, no zero point)."""
    if fmt.kind == "ternary":
        return -1, 1
    if fmt.kind != "int":
        raise InputError(f"{fmt.name} is a floating-point format; it has no integer code range")
    if symmetric:
        limit = 2 ** (fmt.bits - 1) - 1
        return -limit, limit
    return 0, 2**fmt.bits - 1


def has_zero_point(fmt: NumberFormat, scheme: QuantScheme) -> bool:
    return fmt.kind == "int" and not scheme.symmetric and scheme.granularity != "mx"


def fan_in(weight_shape: tuple[int, ...]) -> int:
    """Elements per output channel: the product of all axes but the first (1 for a 1-d weight)."""
    return math.prod(weight_shape[1:]) if len(weight_shape) > 1 else 1


def num_scale_groups(
    weight_shape: tuple[int, ...], granularity: Granularity, group_size: int | None = None
) -> int:
    """Number of scales: 1 per tensor, C_out per channel, C_out · ceil(fan_in / g) per group/MX."""
    if granularity == "tensor":
        return 1
    rows = int(weight_shape[0])
    if granularity == "channel":
        return rows
    block = MX_BLOCK_SIZE if granularity == "mx" else group_size
    if block is None:
        raise InputError("group granularity needs a group size")
    return rows * math.ceil(fan_in(weight_shape) / block)


def scale_overhead_bits(
    weight_shape: tuple[int, ...], scheme: QuantScheme, fmt: NumberFormat | None = None
) -> int:
    """Bits stored besides the codes: per scale 32 (float32) + 16 per zero point (asymmetric INT);
    MX: 8 (E8M0) per block of 32; nothing for a pruned weight. ``fmt`` None counts as an INT
    format."""
    if fmt is not None:
        check_scheme_fits(fmt, scheme)
        if fmt.kind == "pruned":
            return 0
    groups = num_scale_groups(weight_shape, scheme.granularity, scheme.group_size)
    if scheme.granularity == "mx":
        return groups * MX_SCALE_BITS
    zero = not scheme.symmetric if fmt is None else has_zero_point(fmt, scheme)
    return groups * (SCALE_BITS + (ZERO_POINT_BITS if zero else 0))


def check_scheme_fits(fmt: NumberFormat, scheme: QuantScheme) -> None:
    """Refuse the formats below two bits under MX: OCP MX defines power-of-two block scales for
    INT8 and minifloat elements only, and a ternary/binary scale is fitted, not a power of two."""
    if fmt.kind in LEVEL_KINDS and scheme.granularity == "mx":
        raise InputError(
            f"{fmt.name} weights take per-tensor, per-channel or per-group scales, not MX blocks"
        )
