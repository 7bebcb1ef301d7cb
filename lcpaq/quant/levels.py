"""The formats below two bits: ternary {−α, 0, α}, binary {−α, α} and pruned (all zero).

Each scale group (a tensor, an output channel or a group of its fan-in, `to_groups`) gets the
scale α that minimises the importance-weighted squared error Σ hᵢ (wᵢ − α·tᵢ)² jointly with the
codes tᵢ, exactly:

* binary: tᵢ = sign(wᵢ) (the best code for any α > 0), α = Σ hᵢ|wᵢ| / Σ hᵢ;
* ternary: for a fixed α the best code is sign(wᵢ) where |wᵢ| > α/2 and 0 elsewhere, so the
  non-zero codes of an optimum sit on the k largest |wᵢ| for some k; for that support the best α
  is the weighted mean of those |wᵢ|, and the error is Σ hw² − (Σ_top-k h|w|)² / Σ_top-k h. Every k
  is tried at once with cumulative sums over the sorted magnitudes (O(n log n) per group), the
  fixed point TWN's 0.7·mean|w| threshold approximates;
* pruned: nothing to fit.

The importance hᵢ of a weight is the input second moment E[x_j²] of its fan-in column j (the
diagonal of the layer's input Hessian, what GPTQ rounds against: the output error of a diagonal
model), dampened like GPTQ's by ``gptq_damp`` · its mean; 1 without input statistics. GPTQ then
rounds onto the fitted grid (`lcpaq.quant.gptq`); ternary rounding to nearest is INT rounding with
codes clamped to [−1, 1].
"""

from __future__ import annotations

import torch

from lcpaq.quant.formats import NumberFormat, QuantScheme, check_scheme_fits
from lcpaq.quant.rounding import round_trip, to_groups


def column_importance(
    weight: torch.Tensor, scheme: QuantScheme, input_hessian: torch.Tensor | None
) -> torch.Tensor:
    """hᵢ per weight element, weight-shaped: E[x_j²] of its input column j (grouped convolutions:
    of its group's Hessian), plus ``gptq_damp`` · mean so no weight is free; ones without
    statistics."""
    if input_hessian is None:
        return torch.ones_like(weight, dtype=torch.float32)
    hessian = input_hessian.float().to(weight.device)
    hessian = hessian[None] if hessian.dim() == 2 else hessian
    diagonal = hessian.diagonal(dim1=1, dim2=2).clamp(min=0.0)  # [groups, fan_in]
    diagonal = diagonal + scheme.gptq_damp * diagonal.mean(dim=1, keepdim=True)
    rows = weight.shape[0]
    per_row = diagonal.repeat_interleave(rows // len(diagonal), dim=0)
    return per_row.reshape(weight.shape)


def fit_ternary(grouped: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """The scale α [G] minimising Σ hᵢ (wᵢ − α·tᵢ)² over α and tᵢ ∈ {−1, 0, 1} in each group
    (rows of ``grouped`` [G, n]; ``importance`` hᵢ ≥ 0, same shape; padding has hᵢ = 0).

    A group whose best is all zeros (no weight, or no importance) gets the smallest positive
    float32: every code then rounds to 0.
    """
    magnitude = grouped.abs().double()
    order = magnitude.argsort(dim=1, descending=True)
    sorted_magnitude = magnitude.gather(1, order)
    sorted_importance = importance.double().gather(1, order)
    weighted_sum = (sorted_importance * sorted_magnitude).cumsum(dim=1)
    importance_sum = sorted_importance.cumsum(dim=1)
    positive = importance_sum > 0
    # Error reduction of the top-k support over all-zero codes: (Σ h|w|)² / Σ h.
    gain = torch.where(positive, weighted_sum.pow(2) / importance_sum.clamp(min=1e-300), 0.0)
    best = gain.argmax(dim=1, keepdim=True)
    scale = (weighted_sum.gather(1, best) / importance_sum.gather(1, best).clamp(min=1e-300))[:, 0]
    return _positive(scale.float())


def fit_binary(grouped: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """The scale α [G] minimising Σ hᵢ (wᵢ − α·sign(wᵢ))²: the importance-weighted mean of |w|."""
    weights = importance.double()
    total = weights.sum(dim=1)
    scale = (weights * grouped.abs().double()).sum(dim=1) / total.clamp(min=1e-300)
    return _positive(torch.where(total > 0, scale, 0.0).float())


def _positive(scale: torch.Tensor) -> torch.Tensor:
    return torch.clamp(scale, min=torch.finfo(torch.float32).tiny)


def fit_levels(
    weight: torch.Tensor,
    fmt: NumberFormat,
    scheme: QuantScheme,
    input_hessian: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-scale-group scale [G] (empty when pruned) and rounded-to-nearest codes [G, n] of a
    weight in a format below two bits (the scheme's clipping does not apply: the fit is the
    optimum)."""
    check_scheme_fits(fmt, scheme)
    grouped = to_groups(weight, scheme)
    if fmt.kind == "pruned":
        return torch.zeros(0, device=weight.device), torch.zeros_like(grouped)
    # Padding of a partial last group is zero in the importance too: it does not pull α down.
    importance = to_groups(column_importance(weight, scheme, input_hessian), scheme)
    fit = fit_ternary if fmt.kind == "ternary" else fit_binary
    scale = fit(grouped, importance)
    codes, _ = round_trip(grouped, scale[:, None], torch.zeros_like(scale)[:, None], fmt, scheme)
    return scale, codes
