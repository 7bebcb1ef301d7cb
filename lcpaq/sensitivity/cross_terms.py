"""Inter-layer terms from the curvature of the mean loss (METHOD §1c): C_ij(f, g) = Δw_i(f)ᵀ M_ij Δw_j(g).

For candidate formats f (layer i) and g (layer j), with Δw_l(f) = Q_f(W_l) − W_l:

* ``curvature="hessian"``: M the Hessian of the mean cross-entropy. One HVP with Δw_j(g) placed on
  layer j gives H_{·j}Δw_j(g) for every partner i at once, so the cost is one HVP per
  (layer, format) and batch. Standard errors are over batches.
* ``curvature="gauss_newton"``: M = G = (1/N) Σ_n J_nᵀH_out,nJ_n. One forward-mode product (JVP) per
  (layer, format) gives each sample's logit change dz_n = J_n,jΔw_j; every pair is then
  dz_n,iᵀ H_out,n dz_n,j, so standard errors are per sample.

Input: the FP32 model, its layers, (inputs, labels) batches and candidate formats. Output:
`InteractionTerms` (the analyze stage's ``interactions.npz``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lcpaq.model.graph import LayerInfo, layer_parameter, weight_of, weight_view
from lcpaq.quant.formats import QuantScheme, get_format
from lcpaq.quant.weights import fake_quantize_formats
from lcpaq.sensitivity.interaction_terms import (
    InteractionTerms,
    Pair,
    check_pairs,
    select_pairs,
)


def weight_perturbations(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    format_names: Sequence[str],
    scheme: QuantScheme,
    input_hessians: Mapping[str, torch.Tensor] | None = None,
) -> list[list[torch.Tensor]]:
    """Δw[l][f] = Q_f(W_l) − W_l, on the weight's device and dtype, in the parameter's own layout
    (``input_hessians``: what GPTQ rounding needs, see `lcpaq.quant.weights.quantize_weight`)."""
    result = []
    for layer in layers:
        weight = weight_of(model, layer).detach()
        hessian = input_hessians.get(layer.name) if input_hessians else None
        result.append(
            [
                weight_view(quantized - weight, layer.kind)
                for quantized in fake_quantize_formats(
                    weight, [get_format(name) for name in format_names], scheme, hessian
                )
            ]
        )
    return result


def _mean_and_stderr(
    sums: np.ndarray, squares: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray]:
    mean = sums / count
    if count < 2:
        return mean, np.full_like(mean, np.nan)
    variance = np.maximum(squares / count - mean**2, 0.0) * count / (count - 1)
    return mean, np.sqrt(variance / count)


def hessian_cross_terms(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
    format_names: Sequence[str],
    *,
    scheme: QuantScheme | None = None,
    pairs: Sequence[Pair] | None = None,
    curvature: Literal["hessian", "gauss_newton"] = "hessian",
    loss: Literal["cross_entropy", "mse"] = "cross_entropy",
    input_hessians: Mapping[str, torch.Tensor] | None = None,
) -> InteractionTerms:
    """C_ij(f, g) = Δw_i(f)ᵀ M_ij Δw_j(g) with M the Hessian or Gauss–Newton matrix of the mean loss.

    Args:
        model: FP32 model (put in eval mode); its weights are not changed.
        layers: layers from `lcpaq.model.graph.discover_layers`; pair indices refer to this order.
        batches: (inputs, labels) on any device; labels are used by the exact Hessian only
            (the Gauss–Newton matrix of cross-entropy does not depend on them).
        format_names: candidate formats, e.g. ``("int2", "int4")``.
        scheme: the quantizer (default `QuantScheme()`).
        pairs: (i, j) with i < j; default ``select_pairs(len(layers))`` (window of 3).
        curvature: ``hessian`` (SE over batches, NaN with one batch) or ``gauss_newton`` (SE over
            samples).
        loss: ``cross_entropy`` or, for ``gauss_newton`` only, ``mse`` (mean over outputs).
        input_hessians: per-layer input second moments, for ``scheme.rounding == "gptq"``.
    Returns:
        `InteractionTerms` with ``diagonal[l, f] = Δw_l(f)ᵀ M_ll Δw_l(f)``.
    """
    model.eval()
    scheme = scheme or QuantScheme()
    pairs = check_pairs(pairs if pairs is not None else select_pairs(len(layers)), len(layers))
    deltas = weight_perturbations(model, layers, format_names, scheme, input_hessians)
    if curvature == "hessian":
        if loss != "cross_entropy":
            raise ValueError("the exact Hessian cross terms support loss='cross_entropy' only")
        means, errors, count = _hessian_products(model, layers, batches, deltas, pairs)
    elif curvature == "gauss_newton":
        means, errors, count = _gauss_newton_products(model, layers, batches, deltas, pairs, loss)
    else:
        raise ValueError(f"curvature must be 'hessian' or 'gauss_newton', got {curvature!r}")
    num_formats = len(format_names)
    diagonal = np.array([np.diagonal(means[(k, k)]) for k in range(len(layers))])
    diagonal_stderr = np.array([np.diagonal(errors[(k, k)]) for k in range(len(layers))])
    return InteractionTerms(
        layer_names=tuple(layer.name for layer in layers),
        format_names=tuple(format_names),
        cross={pair: means[pair] for pair in pairs},
        stderr={pair: errors[pair] for pair in pairs},
        diagonal=diagonal.reshape(len(layers), num_formats),
        diagonal_stderr=diagonal_stderr.reshape(len(layers), num_formats),
        method=curvature,
        num_samples=count,
    )


def _hessian_products(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
    deltas: list[list[torch.Tensor]],
    pairs: tuple[Pair, ...],
) -> tuple[dict[Pair, np.ndarray], dict[Pair, np.ndarray], int]:
    """Mean-loss terms and standard errors over batches.

    Each batch gives its own estimate Δw_iᵀ H_ij^(b) Δw_j of its mean loss; weighted by batch size
    they average to the term of the mean loss over all samples, and their spread gives the SE.
    """
    weights = [layer_parameter(model, layer) for layer in layers]
    flags = [weight.requires_grad for weight in weights]
    partners: dict[int, list[int]] = {j: [j] for j in range(len(layers))}
    for i, j in pairs:
        partners[j].append(i)
    sums: dict[Pair, np.ndarray] = {}
    squares: dict[Pair, np.ndarray] = {}
    num_formats = len(deltas[0])
    count = num_batches = 0
    for weight in weights:
        weight.requires_grad_(True)
    try:
        for inputs, labels in batches:
            device = weights[0].device
            if labels is None:
                raise ValueError("the exact Hessian cross terms need labels")
            inputs, labels = inputs.to(device), labels.to(device)
            batch_loss = F.cross_entropy(model(inputs), labels)
            grads = torch.autograd.grad(batch_loss, weights, create_graph=True)
            values: dict[Pair, np.ndarray] = {}
            for j, others in partners.items():
                for g in range(num_formats):
                    products = torch.autograd.grad(
                        grads[j],
                        [weights[i] for i in others],
                        grad_outputs=deltas[j][g],
                        retain_graph=True,
                        allow_unused=True,
                    )
                    for i, product in zip(others, products):
                        block = values.setdefault((i, j), np.zeros((num_formats, num_formats)))
                        if product is None:  # layer i does not reach layer j's gradient
                            continue
                        for f in range(num_formats):
                            block[f, g] = float((deltas[i][f] * product).sum())
            del grads, batch_loss
            size = int(inputs.shape[0])
            for pair, block in values.items():
                sums[pair] = sums.get(pair, 0.0) + size * block
                squares[pair] = squares.get(pair, 0.0) + size * block**2
            count += size
            num_batches += 1
    finally:
        for weight, flag in zip(weights, flags):
            weight.requires_grad_(flag)
    if count == 0:
        raise ValueError("no calibration samples were given")
    means = {pair: value / count for pair, value in sums.items()}
    errors = {}
    for pair, mean in means.items():  # sample-size-weighted spread of the batch estimates
        spread = np.maximum(squares[pair] / count - mean**2, 0.0)
        errors[pair] = (
            np.sqrt(spread / (num_batches - 1)) if num_batches > 1 else np.full_like(mean, np.nan)
        )
    return means, errors, count


def _gauss_newton_products(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
    deltas: list[list[torch.Tensor]],
    pairs: tuple[Pair, ...],
    loss: str,
) -> tuple[dict[Pair, np.ndarray], dict[Pair, np.ndarray], int]:
    """Per-sample sums of dz_iᵀ H_out dz_j with dz = J Δw from one JVP per (layer, format)."""
    wanted = [(k, k) for k in range(len(layers))] + list(pairs)
    sums: dict[Pair, np.ndarray] = {}
    squares: dict[Pair, np.ndarray] = {}
    count = 0
    device = deltas[0][0].device
    for batch in batches:
        inputs = (batch[0] if isinstance(batch, (tuple, list)) else batch).to(device)
        changes = []  # changes[l][f]: [N, C] logit change J_l Δw_l(f)
        for layer, layer_deltas in zip(layers, deltas):
            weight = layer_parameter(model, layer).detach()
            key = layer.weight_key

            def logits_of(
                w: torch.Tensor, key: str = key, inputs: torch.Tensor = inputs
            ) -> torch.Tensor:
                return torch.func.functional_call(model, {key: w}, (inputs,))

            per_format = []
            for delta in layer_deltas:
                primal_and_tangent = torch.func.jvp(logits_of, (weight,), (delta,))
                logits, change = primal_and_tangent[0], primal_and_tangent[1]
                per_format.append(change.detach())
            changes.append(torch.stack(per_format))  # [F, N, C]
        logits = logits.detach()
        num_classes = logits.shape[-1]
        if loss == "mse":
            weighted = [(2.0 / num_classes) * change for change in changes]
            projections = None
        else:
            probs = torch.softmax(logits, dim=-1)
            weighted = [probs * change for change in changes]
            projections = [(change * probs).sum(-1) for change in changes]  # [F, N]
        for i, j in wanted:
            per_sample = torch.einsum("fnc,gnc->nfg", weighted[i], changes[j])
            if projections is not None:
                per_sample = per_sample - projections[i].T[:, :, None] * projections[j].T[:, None]
            values = per_sample.double().cpu().numpy()
            sums[(i, j)] = sums.get((i, j), 0.0) + values.sum(0)
            squares[(i, j)] = squares.get((i, j), 0.0) + (values**2).sum(0)
        count += inputs.shape[0]
    if count == 0:
        raise ValueError("no calibration samples were given")
    means, errors = {}, {}
    for pair in sums:
        means[pair], errors[pair] = _mean_and_stderr(sums[pair], squares[pair], count)
    return means, errors, count
