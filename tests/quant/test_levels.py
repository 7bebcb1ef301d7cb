"""The formats below two bits in `lcpaq.quant.levels`: the scale fit against brute force over every
code vector, importance from input second moments, GPTQ on their grids, pruned weights."""

from __future__ import annotations

import itertools

import pytest
import torch

from lcpaq.quant.formats import QuantScheme, get_format
from lcpaq.quant.levels import column_importance, fit_binary, fit_levels, fit_ternary
from lcpaq.quant.weights import dequantize_weight, quantize_weight

pytestmark = pytest.mark.usefixtures("single_thread")


def _best_error(weights: torch.Tensor, importance: torch.Tensor, levels: tuple[int, ...]) -> float:
    """min over codes t ∈ levelsⁿ and α of Σ h (w − α t)²: for fixed t the best α is
    Σ h w t / Σ h t², leaving Σ h w² − (Σ h w t)² / Σ h t²."""
    w, h = weights.double(), importance.double()
    best = float((h * w * w).sum())  # all codes 0 (or α = 0)
    for codes in itertools.product(levels, repeat=len(w)):
        t = torch.tensor(codes, dtype=torch.float64)
        denominator = float((h * t * t).sum())
        if denominator > 0:
            best = min(best, float((h * w * w).sum() - (h * w * t).sum() ** 2 / denominator))
    return best


def _fitted_error(
    weights: torch.Tensor, importance: torch.Tensor, scale: float, levels: str
) -> float:
    """Σ h (w − α t)² of the fitted α with codes rounded to nearest on α·levels."""
    w = weights.double()
    if levels == "ternary":
        codes = torch.clamp(torch.round(w / scale), -1, 1)
    else:
        codes = torch.where(w >= 0, 1.0, -1.0).double()
    return float((importance.double() * (w - scale * codes) ** 2).sum())


@pytest.mark.parametrize("seed", range(12))
def test_ternary_fit_is_the_brute_force_optimum(seed: int) -> None:
    """3ⁿ code vectors per group, n ≤ 7, with random positive importances (and some zeros)."""
    generator = torch.Generator().manual_seed(seed)
    size = 3 + seed % 5
    weights = torch.randn(4, size, generator=generator) * torch.rand(4, 1, generator=generator)
    importance = torch.rand(4, size, generator=generator) * 3
    importance[0, 0] = 0.0  # a weight whose input is always zero
    scale = fit_ternary(weights, importance)
    for row in range(4):
        best = _best_error(weights[row], importance[row], (-1, 0, 1))
        fitted = _fitted_error(weights[row], importance[row], float(scale[row]), "ternary")
        assert fitted == pytest.approx(best, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_binary_fit_is_the_brute_force_optimum(seed: int) -> None:
    generator = torch.Generator().manual_seed(100 + seed)
    weights = torch.randn(3, 6, generator=generator)
    importance = torch.rand(3, 6, generator=generator)
    scale = fit_binary(weights, importance)
    for row in range(3):
        best = _best_error(weights[row], importance[row], (-1, 1))
        fitted = _fitted_error(weights[row], importance[row], float(scale[row]), "binary")
        assert fitted == pytest.approx(best, rel=1e-6, abs=1e-12)


def test_uniform_ternary_matches_a_hand_computed_case() -> None:
    """w = (3, 2.9, 0.1, −0.1): the best support is the two large weights, α = 2.95."""
    scale = fit_ternary(torch.tensor([[3.0, 2.9, 0.1, -0.1]]), torch.ones(1, 4))
    assert float(scale[0]) == pytest.approx(2.95)


def test_all_zero_groups_keep_a_positive_scale() -> None:
    """Ternary codes all 0; binary has no 0 and decodes to ±(smallest float32)."""
    weight = torch.zeros(2, 5)
    ternary = quantize_weight(weight, get_format("ternary"), QuantScheme())
    assert torch.equal(dequantize_weight(ternary), weight)
    binary = quantize_weight(weight, get_format("binary"), QuantScheme())
    assert float(dequantize_weight(binary).abs().max()) == torch.finfo(torch.float32).tiny
    assert bool((ternary.scale > 0).all()) and bool((binary.scale > 0).all())


def test_importance_is_the_input_second_moment_of_each_column() -> None:
    """Grouped convolution: rows of group g read the diagonal of H_g, plus the damping."""
    hessian = torch.stack([torch.diag(torch.tensor([1.0, 2.0, 3.0])), 2 * torch.eye(3)])
    weight = torch.zeros(4, 3)  # 2 groups of 2 output channels, fan-in 3
    scheme = QuantScheme(gptq_damp=0.5)
    importance = column_importance(weight, scheme, hessian)
    first = torch.tensor([1.0, 2.0, 3.0]) + 0.5 * 2.0
    second = torch.full((3,), 2.0 + 0.5 * 2.0)
    assert torch.allclose(importance, torch.stack([first, first, second, second]))
    assert torch.equal(column_importance(weight, scheme, None), torch.ones(4, 3))


def test_importance_moves_the_scale_towards_the_weights_whose_inputs_are_large() -> None:
    weight = torch.tensor([[1.0, 3.0]])
    plain = fit_binary(weight, torch.ones(1, 2))
    weighted = fit_binary(weight, torch.tensor([[1.0, 9.0]]))
    assert float(plain[0]) == pytest.approx(2.0)
    assert float(weighted[0]) == pytest.approx((1 + 27) / 10)


def test_partial_last_group_padding_does_not_change_the_fit() -> None:
    """fan-in 40 in groups of 32: the second group's fit sees its 8 real weights only."""
    weight = torch.randn(3, 40, generator=torch.Generator().manual_seed(5))
    scale, _ = fit_levels(
        weight, get_format("ternary"), QuantScheme(granularity="group", group_size=32)
    )
    tail = fit_ternary(weight[:, 32:], torch.ones(3, 8))
    assert torch.allclose(scale.reshape(3, 2)[:, 1], tail)


@pytest.mark.parametrize("name", ["ternary", "binary"])
def test_gptq_with_uncorrelated_inputs_is_rounding_to_nearest(name: str) -> None:
    """A diagonal input Hessian leaves GPTQ nothing to compensate: same codes as nearest; with
    correlated inputs GPTQ lowers the output error on the same grid."""
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(6, 12, generator=generator)
    fmt = get_format(name)
    diagonal = torch.diag(torch.rand(12, generator=generator) + 0.5)
    nearest = quantize_weight(weight, fmt, QuantScheme(), diagonal)
    gptq = quantize_weight(weight, fmt, QuantScheme(rounding="gptq"), diagonal)
    assert set(gptq.codes.unique().tolist()) <= {-1, 0, 1}
    assert torch.equal(gptq.codes, nearest.codes) and torch.equal(gptq.scale, nearest.scale)
    inputs = torch.randn(400, 4, generator=generator) @ torch.randn(4, 12, generator=generator)
    inputs = inputs + 0.1 * torch.randn(400, 12, generator=generator)
    hessian = inputs.T @ inputs / 400

    def output_error(quantized: object) -> float:
        delta = dequantize_weight(quantized) - weight  # type: ignore[arg-type]
        return float(torch.einsum("ri,ij,rj->", delta, hessian, delta))

    nearest = quantize_weight(weight, fmt, QuantScheme(), hessian)
    gptq = quantize_weight(weight, fmt, QuantScheme(rounding="gptq"), hessian)
    assert output_error(gptq) < output_error(nearest)


def test_pruned_weights_are_zero_with_nothing_stored() -> None:
    weight = torch.randn(4, 3, 3, 3)
    for scheme in (QuantScheme(), QuantScheme(rounding="gptq")):
        quantized = quantize_weight(weight, get_format("pruned"), scheme, torch.eye(27))
        assert quantized.scale.numel() == 0 and quantized.zero_point is None
        assert torch.equal(dequantize_weight(quantized), torch.zeros_like(weight))
