"""Inter-layer dependency terms between quantized layers (METHOD §1c, §1c'): the analyze stage's one
entry point, `compute_interactions`, over the three sources.

For candidate formats f (layer i) and g (layer j), with Δw_l(f) = Q_f(W_l) − W_l:

* ``hessian`` / ``gauss-newton`` (`lcpaq.sensitivity.cross_terms`): C_ij(f, g) = Δw_i(f)ᵀ M_ij Δw_j(g)
  with M the Hessian of the mean cross-entropy (SE over batches) or the Gauss–Newton matrix (SE
  over samples).
* ``forward`` (`lcpaq.sensitivity.measured_interactions`): C_ij(f, g) = δ_ij(f, g) − δ_i(f) − δ_j(g)
  from forward passes with the quantized weights on one fixed sample (CLADO).

Pairs come from `lcpaq.sensitivity.interaction_terms.select_pairs`; formats from `pair_formats`.
Output: `InteractionTerms`, saved as ``interactions.npz``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import nn

from lcpaq.model.graph import LayerInfo
from lcpaq.quant.formats import QuantScheme, get_format
from lcpaq.sensitivity.cross_terms import hessian_cross_terms
from lcpaq.sensitivity.interaction_terms import PAIR_SOURCES, InteractionTerms, Pair, PairSource
from lcpaq.sensitivity.measured_interactions import measured_interactions


def pair_formats(format_names: Sequence[str], max_bits: int) -> tuple[str, ...]:
    """The candidate formats whose cross terms are measured: at most ``max_bits`` bits per code.

    Cross terms scale like the product of the two layers' weight errors (about 2^-(b_i + b_j)), so
    wide formats contribute little and the allocation treats their terms as 0; measuring only the
    narrow formats cuts the forward-measured cost by (F / F_narrow)² (36 → 9 blocks for INT2–8).
    """
    return tuple(name for name in format_names if get_format(name).bits <= max_bits)


def compute_interactions(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    inputs: torch.Tensor,
    labels: torch.Tensor | None,
    format_names: Sequence[str],
    *,
    source: PairSource,
    pairs: Sequence[Pair],
    scheme: QuantScheme | None = None,
    batch_size: int = 64,
    curvature_loss: Literal["cross_entropy", "mse"] = "cross_entropy",
    forward_loss: Literal["cross_entropy", "kl"] = "kl",
    input_hessians: Mapping[str, torch.Tensor] | None = None,
) -> InteractionTerms:
    """Inter-layer terms from ``source`` (``hessian``, ``gauss-newton`` or ``forward``).

    The curvature sources split ``inputs`` into batches of ``batch_size`` (the exact Hessian's
    standard error is over these batches, so give at least two); ``forward`` measures on all of
    ``inputs`` at once with ``forward_loss`` (``kl``: label-free KL to the FP32 outputs, default).
    """
    if source == "forward":
        return measured_interactions(
            model,
            layers,
            inputs,
            labels,
            format_names,
            scheme=scheme,
            pairs=pairs,
            loss=forward_loss,
            batch_size=max(batch_size, 256),
            input_hessians=input_hessians,
        )
    if source not in ("hessian", "gauss-newton"):
        raise ValueError(
            f"pairwise source must be one of {', '.join(PAIR_SOURCES[1:])}, got {source!r}"
        )
    batches = [
        (
            inputs[start : start + batch_size],
            None if labels is None else labels[start : start + batch_size],
        )
        for start in range(0, len(inputs), batch_size)
    ]
    if source == "hessian" and labels is None:
        raise ValueError("Hessian cross terms need labels (use gauss-newton or forward without)")
    return hessian_cross_terms(
        model,
        layers,
        batches,
        format_names,
        scheme=scheme,
        pairs=pairs,
        curvature="hessian" if source == "hessian" else "gauss_newton",
        loss=curvature_loss,
        input_hessians=input_hessians,
    )
