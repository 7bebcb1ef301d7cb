"""GPTQ rounding in `lcpaq.quant.gptq` (``QuantScheme(rounding="gptq")``): against round to nearest,
an OBQ reference and hand-computed cases."""

from __future__ import annotations

import pytest
import torch
from quant_cases import scheme_id, spread_weight

from lcpaq.errors import InputError
from lcpaq.quant.formats import QuantScheme, code_range, get_format
from lcpaq.quant.gptq import gptq_round
from lcpaq.quant.grids import fp_decode, fp_round_codes
from lcpaq.quant.weights import (
    decoded_scale,
    dequantize_weight,
    fake_quantize,
    fake_quantize_formats,
    quantize_weight,
    quantize_weight_formats,
)

pytestmark = pytest.mark.usefixtures("single_thread")


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
    return f"{name}-{scheme_id(scheme)}"


@pytest.mark.parametrize("case", GPTQ_CASES, ids=_case_id)
def test_gptq_with_uncorrelated_inputs_is_round_to_nearest(case) -> None:
    """With a diagonal H no error is ever propagated: GPTQ's codes are exactly the nearest ones,
    whatever the order of the columns (the diagonal is not sorted) and with a dead input."""
    name, scheme = case
    fmt = get_format(name)
    # fan-in 40: one full group of 32 + a partial one
    weight = spread_weight(93, shape=(6, 10, 2, 2))
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
    weight = spread_weight(95, shape=(6, 10, 2, 2))
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
    weight = spread_weight(99, shape=(6, 2, 3, 3))  # Conv2d(4, 6, 3, groups=2): fan-in 18 per group
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
    weight = spread_weight(102, shape=(6, 2, 3, 3))
    scheme = QuantScheme(rounding="gptq")
    with pytest.raises(InputError) as error:
        quantize_weight(weight, get_format("int4"), scheme, torch.ones(shape))
    message = str(error.value)
    assert f"input Hessian of shape {shape}" in message
    assert "weight of shape (6, 2, 3, 3)" in message and "[18, 18]" in message


def test_gptq_needs_a_hessian_and_a_valid_scheme() -> None:
    weight = spread_weight(103)
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
    weight = spread_weight(104, shape=(4, 3, 2, 2)).double()
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
