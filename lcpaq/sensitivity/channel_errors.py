"""Per-output-channel weight errors of every candidate format: what choosing a format per group of
output channels is scored with (``--allocate-per channel-group[:G]``,
`lcpaq.allocation.channel_groups`).

Every row of a layer's weight (an output channel) is quantized independently of the others under
per-channel or per-group scales, and GPTQ compensates each row's error within that row, so the
weight of a layer whose channel groups take different formats is, row for row, the weight each
format gives the whole layer (`lcpaq.quant.mixed`). The errors below therefore add up exactly:
summed over a layer's channels they are `lcpaq.sensitivity.candidates.layer_errors`.

``channel_errors.npz`` holds, per layer, [C_out, F] arrays ``<layer>/error_sq``,
``<layer>/weighted_error`` (Σ diag(G) ⊙ Δw² over the channel's weights; NaN without the curvature
diagonal), ``<layer>/output_error`` (δ_r S δ_rᵀ / s̄ of row r, NaN without input second moments)
and ``<layer>/trace`` [C_out] (the channel's share of the Gauss–Newton trace: Σ of its diagonal).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from lcpaq.allocation.channel_groups import FIELDS, ChannelErrors
from lcpaq.model.graph import LayerInfo


def row_errors(
    weight: torch.Tensor,
    values: torch.Tensor,
    curvature: torch.Tensor | None,
    input_hessian: torch.Tensor | None,
) -> dict[str, np.ndarray]:
    """[C_out] ``error_sq``, ``weighted_error``, ``output_error`` of one quantized weight."""
    rows = weight.shape[0]
    delta = (values - weight).double().reshape(rows, -1)
    result = {
        "error_sq": delta.pow(2).sum(dim=1).numpy(),
        "weighted_error": np.full(rows, np.nan),
        "output_error": np.full(rows, np.nan),
    }
    if curvature is not None:
        weighted = curvature.double().reshape(rows, -1) * delta.pow(2)
        result["weighted_error"] = weighted.sum(dim=1).numpy()
    if input_hessian is not None:
        hessian = input_hessian.double()
        hessian = hessian[None] if hessian.dim() == 2 else hessian
        groups, length = hessian.shape[0], hessian.shape[-1]
        per_group = delta.reshape(groups, -1, length)
        energy = torch.einsum("gri,gij,grj->gr", per_group, hessian, per_group).reshape(rows)
        per_element = float(hessian.diagonal(dim1=1, dim2=2).sum()) / (groups * length)
        result["output_error"] = (energy / per_element if per_element > 0 else energy * 0).numpy()
    return result


def measure_channel_errors(
    layers: Sequence[LayerInfo],
    weights: Mapping[str, torch.Tensor],
    quantized: Mapping[str, Sequence[torch.Tensor]],
    format_names: Sequence[str],
    diagonal: Mapping[str, np.ndarray] | None = None,
    input_hessians: Mapping[str, torch.Tensor] | None = None,
) -> ChannelErrors:
    """`ChannelErrors` of already quantized weights (``quantized[layer][k]`` in
    ``format_names[k]``), as `lcpaq.sensitivity.candidates.table_from_weights` gets them."""
    errors: dict[str, dict[str, np.ndarray]] = {}
    trace: dict[str, np.ndarray] = {}
    for layer in layers:
        weight = weights[layer.name].detach().cpu()
        rows = weight.shape[0]
        curvature = None
        if diagonal and layer.name in diagonal:
            curvature = torch.as_tensor(diagonal[layer.name]).double()
            trace[layer.name] = curvature.reshape(rows, -1).sum(dim=1).numpy()
        else:
            trace[layer.name] = np.full(rows, np.nan)
        hessian = input_hessians.get(layer.name) if input_hessians else None
        columns = [
            row_errors(weight, values.detach().cpu(), curvature, hessian)
            for values in quantized[layer.name]
        ]
        errors[layer.name] = {
            name: np.stack([column[name] for column in columns], axis=1) for name in FIELDS
        }
    return ChannelErrors(tuple(format_names), errors, trace)
