"""Per-sample weight gradients of a layer from the operation calls its weight met.

Input: the `lcpaq.model.op_capture.OpCall` records of a layer (what ``F.linear`` / ``F.conv*`` /
``torch.addmm`` received, with the call's own stride, padding, dilation and groups) and gradients
with respect to each call's output [K, *output.shape]. Output: per-sample weight gradients
[K, N, *weight_shape] (the layer's [out, in, ...] view, `lcpaq.model.graph.weight_of`), or, for
Linear-like layers when the per-element diagonal is not needed, only their squared norms from token
Gram matrices (METHOD §8): ‖Σ_t g_t x_tᵀ‖² = ⟨Σ_k G_g, G_x⟩ with G_g = g gᵀ, G_x = x xᵀ over the
sample's tokens, without forming the [out, in] gradient.
Used by the exact Gauss–Newton traces (`lcpaq.sensitivity.gauss_newton`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lcpaq.model.op_capture import LINEAR_OPS, OpCall, conv_padding, samples_first

#: Per-sample gradients are formed in micro-batches of at most this many float32 elements.
PER_SAMPLE_ELEMENTS_LIMIT = 1 << 25


def module_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a Linear or convolution module, typed as the tensor it is."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def input_columns(call: OpCall, kernel: Sequence[int], count: int) -> torch.Tensor:
    """The call's input arranged so that per-sample weight gradients are one contraction away.

    Linear: [N, T, in]. Convolution (``kernel``: the weight's spatial shape): the padded, unfolded
    input [N, groups, in/groups x kernel, positions].
    """
    if call.op in LINEAR_OPS:
        return samples_first(call.input, call, count)
    inputs = call.input
    stride, dilation = call.stride, call.dilation
    padding = conv_padding(call, kernel)
    if call.op == "conv1d":  # as a 2-d convolution of height 1
        inputs, padding = inputs.unsqueeze(2), (*padding, 0, 0)
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
    if any(padding):
        inputs = F.pad(inputs, padding)
    columns = F.unfold(inputs, tuple(kernel), dilation=dilation, stride=stride)  # [N, Cin*k, P]
    return columns.reshape(inputs.shape[0], call.groups, -1, columns.shape[-1])


def output_grads(call: OpCall, grad_outputs: torch.Tensor, count: int) -> torch.Tensor:
    """Gradients of the call's output [K, *output.shape], samples first: [K, N, T, out] for a
    Linear call, unchanged [K, N, out, ...] for a convolution."""
    if call.op not in LINEAR_OPS:
        return grad_outputs
    factors = grad_outputs.shape[0]
    rows = samples_first(grad_outputs, call, count, lead=1)
    return rows.reshape(factors, count, -1, rows.shape[-1])


def per_sample_grads_from_columns(
    call: OpCall, columns: torch.Tensor, grads: torch.Tensor, weight_shape: Sequence[int]
) -> torch.Tensor:
    """Per-sample weight gradients [K, n, *weight_shape] from `input_columns` and `output_grads`
    restricted to the same n samples."""
    factors, count = grads.shape[:2]
    if call.op in LINEAR_OPS:
        return torch.einsum("knto,nti->knoi", grads, columns)
    groups = call.groups
    grads = grads.reshape(factors, count, groups, weight_shape[0] // groups, -1)
    per_sample = torch.einsum("kngop,ngqp->kngoq", grads, columns)
    return per_sample.reshape(factors, count, *weight_shape)


def gram_squared_norms(columns: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Σ_k ‖Σ_t g_kt x_tᵀ‖² per sample [n] from columns [n, T, in] and grads [K, n, T, out]:
    ⟨Σ_k g_k g_kᵀ, x xᵀ⟩ over token pairs, never forming the [out, in] gradient (METHOD §8)."""
    gram_inputs = columns @ columns.transpose(1, 2)  # [n, T, T]
    gram_grads = torch.einsum("knto,knso->nts", grads, grads)
    return (gram_inputs * gram_grads).flatten(1).sum(1)


def gram_is_cheaper(tokens: int, inputs: int, outputs: int) -> bool:
    """T²(in + out) multiply-adds for the Gram form against T·in·out for the materialised one."""
    return tokens > 1 and tokens * (inputs + outputs) < inputs * outputs


def per_sample_weight_grads(
    call: OpCall, grad_output: torch.Tensor, weight_shape: Sequence[int], count: int
) -> torch.Tensor:
    """Per-sample ∂/∂W of Σ (grad_output · output) for one call of ``count`` samples,
    [N, *weight_shape]."""
    columns = input_columns(call, tuple(weight_shape[2:]), count)
    grads = output_grads(call, grad_output[None], count)
    return per_sample_grads_from_columns(call, columns, grads, weight_shape)[0]


def micro_batches(count: int, elements_per_sample: int) -> list[slice]:
    """Sample slices whose per-sample gradients stay under `PER_SAMPLE_ELEMENTS_LIMIT` elements."""
    size = max(1, PER_SAMPLE_ELEMENTS_LIMIT // max(1, elements_per_sample))
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]
