"""Stage 2a: what each (layer, format) candidate costs and how much it perturbs the weights.

Input: the model, its layers, the candidate formats, the `QuantScheme` and (optionally) the curvature
diagonal. Output: a `CandidateTable` of plain numpy arrays (``candidates.npz``), from which scoring,
frontiers and allocation run without torch, so re-allocating under a new budget takes seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lcpaq.errors import InputError
from lcpaq.formats import QuantScheme, fake_quantize, get_format, scale_overhead_bits
from lcpaq.graph import LayerInfo, get_module


@dataclass(frozen=True)
class CandidateTable:
    """Arrays [L, F] over ``layer_names`` × ``format_names``.

    ``weight_bits`` = n_l · b_f (what average bits count); ``size_bits`` adds the stored scales and
    zero points (`lcpaq.formats.scale_overhead_bits`, which depends on the format: FP formats and MX
    have no zero points); ``error_sq`` = ‖Q_f(W_l) − W_l‖²; ``weighted_error`` = Σ diag(G_ll) ⊙ (Q_f(W_l) − W_l)²
    (NaN when no curvature diagonal was measured). ``bits[f]`` is the code width of format f.
    """

    layer_names: tuple[str, ...]
    format_names: tuple[str, ...]
    num_params: np.ndarray
    bits: np.ndarray
    weight_bits: np.ndarray
    size_bits: np.ndarray
    error_sq: np.ndarray
    weighted_error: np.ndarray

    def format_index(self, name: str) -> int:
        try:
            return self.format_names.index(name)
        except ValueError:
            raise InputError(
                f"format {name!r} is not among the analysed candidates {list(self.format_names)}"
            ) from None


@torch.no_grad()
def measure_candidates(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    format_names: Sequence[str],
    scheme: QuantScheme,
    diagonal: dict[str, np.ndarray] | None = None,
) -> CandidateTable:
    """Quantize every layer to every format once and record cost and weight error."""
    formats = [get_format(name) for name in format_names]
    shape = (len(layers), len(formats))
    error_sq, weighted_error = np.zeros(shape), np.full(shape, np.nan)
    weight_bits, size_bits = np.zeros(shape), np.zeros(shape)
    for row, layer in enumerate(layers):
        weight = get_module(model, layer.name).weight.detach()
        curvature = (
            torch.as_tensor(diagonal[layer.name], device=weight.device)
            if diagonal and layer.name in diagonal
            else None
        )
        for column, fmt in enumerate(formats):
            overhead = scale_overhead_bits(layer.weight_shape, scheme, fmt)
            delta = (fake_quantize(weight, fmt, scheme) - weight).double()
            error_sq[row, column] = float(delta.pow(2).sum())
            if curvature is not None:
                weighted_error[row, column] = float((curvature.double() * delta.pow(2)).sum())
            weight_bits[row, column] = layer.num_params * fmt.bits
            size_bits[row, column] = layer.num_params * fmt.bits + overhead
    return CandidateTable(
        layer_names=tuple(layer.name for layer in layers),
        format_names=tuple(format_names),
        num_params=np.array([layer.num_params for layer in layers], dtype=np.int64),
        bits=np.array([fmt.bits for fmt in formats], dtype=np.int64),
        weight_bits=weight_bits,
        size_bits=size_bits,
        error_sq=error_sq,
        weighted_error=weighted_error,
    )
