"""Measure what each (layer, candidate) costs and how much it perturbs the weights (analyze).

A *candidate* is a (weight format, activation format) pair. Input: the model, its layers, the weight
formats, the activation formats, the `QuantScheme` and (optionally) the curvature diagonal. Output:
a `lcpaq.allocation.table.CandidateTable` of plain numpy arrays (``candidates.npz``), from which
scoring, frontiers and allocation run without torch, so re-allocating under a new budget takes
seconds.

Activation formats (columns named ``weight/activation``, see `lcpaq.allocation.table`) feed BitOps,
EBOPs and the roofline latency, and the activation sensitivity score when the analysis measured one;
export quantizes each layer's input to the activation half of its candidate
(`lcpaq.quant.activations.ActivationQuantizer`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from lcpaq.allocation.table import CandidateTable, activation_bits, pair_candidates
from lcpaq.model.graph import LayerInfo, failing_layer, weight_of
from lcpaq.quant.formats import QuantScheme, get_format, scale_overhead_bits
from lcpaq.quant.weights import fake_quantize_formats


def output_error(delta: torch.Tensor, input_hessian: torch.Tensor) -> float:
    """Σ_g tr(Δ_g S_g Δ_gᵀ) / s̄: the layer's mean squared output error E‖ΔW x‖² over its input
    positions (S_g = E[x xᵀ] of group g, `lcpaq.quant.input_stats.collect_input_hessians`), divided by the
    mean input energy per element s̄ = Σ_g tr(S_g) / (G·k), so that white inputs (S = σ²I) give
    exactly ‖ΔW‖²: the unit of the HAWQ-V2 score, which this refines with the input correlations
    (GPTQ moves its error where the inputs are small)."""
    hessian = input_hessian.double()
    if hessian.dim() == 2:
        hessian = hessian[None]
    groups, row_length = hessian.shape[0], hessian.shape[-1]
    rows = delta.double().reshape(groups, -1, row_length)
    energy = float(torch.einsum("gri,gij,grj->", rows, hessian, rows))
    per_element = float(hessian.diagonal(dim1=1, dim2=2).sum()) / (groups * row_length)
    return energy / per_element if per_element > 0 else 0.0


def layer_errors(
    weight: torch.Tensor,
    quantized: Sequence[torch.Tensor],
    curvature: torch.Tensor | None = None,
    input_hessian: torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[F] ``error_sq``, ``weighted_error`` (NaN without the curvature diagonal) and
    ``output_error`` (NaN without input second moments) of one layer's quantized weights."""
    count = len(quantized)
    error_sq, weighted, output = np.zeros(count), np.full(count, np.nan), np.full(count, np.nan)
    for column, values in enumerate(quantized):
        delta = (values - weight).double()
        error_sq[column] = float(delta.pow(2).sum())
        if curvature is not None:
            weighted[column] = float((curvature.double() * delta.pow(2)).sum())
        if input_hessian is not None:
            output[column] = output_error(delta, input_hessian)
    return error_sq, weighted, output


@torch.no_grad()
def measure_candidates(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    format_names: Sequence[str],
    scheme: QuantScheme,
    diagonal: dict[str, np.ndarray] | None = None,
    activation_formats: Sequence[str] = (),
    input_hessians: Mapping[str, torch.Tensor] | None = None,
) -> CandidateTable:
    """Quantize every layer to every weight format once and record cost and weight error; with
    ``activation_formats``, pair each weight format with each of them (`pair_candidates`).
    ``input_hessians``: per-layer input second moments, for ``scheme.rounding == "gptq"``."""
    for name in activation_formats:
        activation_bits(name)  # an unknown name fails before any work
    weights, quantized = quantize_candidates(model, layers, format_names, scheme, input_hessians)
    return table_from_weights(
        layers,
        weights,
        quantized,
        format_names,
        scheme,
        diagonal,
        activation_formats,
        input_hessians,
    )


def quantize_candidates(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    format_names: Sequence[str],
    scheme: QuantScheme,
    input_hessians: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]:
    """Every layer's weight and its fake-quantized values in each of ``format_names``."""
    formats = [get_format(name) for name in format_names]
    weights = {layer.name: weight_of(model, layer).detach() for layer in layers}
    quantized = {}
    for layer in layers:
        with failing_layer(layer.name, layer.kind, "quantizing"):
            quantized[layer.name] = fake_quantize_formats(
                weights[layer.name],
                formats,
                scheme,
                input_hessians.get(layer.name) if input_hessians else None,
            )
    return weights, quantized


def table_from_weights(
    layers: Sequence[LayerInfo],
    weights: Mapping[str, torch.Tensor],
    quantized: Mapping[str, Sequence[torch.Tensor]],
    format_names: Sequence[str],
    scheme: QuantScheme,
    diagonal: Mapping[str, np.ndarray] | None = None,
    activation_formats: Sequence[str] = (),
    input_hessians: Mapping[str, torch.Tensor] | None = None,
) -> CandidateTable:
    """The candidate table of already quantized weights (``quantized[layer][k]``: the layer's
    weight in ``format_names[k]``): costs and `layer_errors` per layer and format."""
    shape = (len(layers), len(format_names))
    error_sq, weighted_error, output = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    for row, layer in enumerate(layers):
        weight = weights[layer.name]
        curvature = (
            torch.as_tensor(diagonal[layer.name], device=weight.device)
            if diagonal and layer.name in diagonal
            else None
        )
        hessian = input_hessians.get(layer.name) if input_hessians else None
        error_sq[row], weighted_error[row], output[row] = layer_errors(
            weight, quantized[layer.name], curvature, hessian
        )
    costs = cost_table(layers, format_names, scheme)
    table = dataclasses.replace(
        costs, error_sq=error_sq, weighted_error=weighted_error, output_error=output
    )
    return pair_candidates(table, activation_formats)


def cost_table(
    layers: Sequence[LayerInfo],
    format_names: Sequence[str],
    scheme: QuantScheme,
    activation_formats: Sequence[str] = (),
) -> CandidateTable:
    """The candidates' costs from layer shapes alone (errors zero): what a budget's feasibility
    depends on, known before any measurement."""
    formats = [get_format(name) for name in format_names]
    for name in activation_formats:
        activation_bits(name)  # an unknown name fails before any work
    shape = (len(layers), len(formats))
    weight_bits, size_bits = np.zeros(shape), np.zeros(shape)
    for row, layer in enumerate(layers):
        for column, fmt in enumerate(formats):
            # Budgets count information (log2(3) bits per ternary code), sizes what is stored
            # (2 bits per ternary code, `lcpaq.quant.weights.pack_codes`).
            weight_bits[row, column] = layer.num_params * fmt.budget_bits
            size_bits[row, column] = layer.num_params * fmt.bits + scale_overhead_bits(
                layer.weight_shape, scheme, fmt
            )
    table = CandidateTable(
        layer_names=tuple(layer.name for layer in layers),
        format_names=tuple(format_names),
        num_params=np.array([layer.num_params for layer in layers], dtype=np.int64),
        bits=np.array([fmt.budget_bits for fmt in formats], dtype=np.float64),
        weight_bits=weight_bits,
        size_bits=size_bits,
        error_sq=np.zeros(shape),
        weighted_error=np.zeros(shape),
        output_error=np.zeros(shape),
    )
    return pair_candidates(table, activation_formats)
