"""Small candidate tables shared by the allocation tests."""

from __future__ import annotations

import numpy as np

from lcpaq.allocation.table import CandidateTable


def table(num_layers: int = 3) -> CandidateTable:
    """Layers of 10, 20, 30… weights at int2, int4, int8 (size = weight bits, no overhead)."""
    num_params = 10 * np.arange(1, num_layers + 1)
    bits = np.array([2, 4, 8])
    weight_bits = num_params[:, None] * bits[None, :].astype(float)
    rng = np.random.default_rng(3)
    error = rng.uniform(0.5, 2.0, (num_layers, 1)) * np.array([[16.0, 4.0, 0.25]])
    return CandidateTable(
        layer_names=tuple(f"layer{k}" for k in range(num_layers)),
        format_names=("int2", "int4", "int8"),
        num_params=num_params,
        bits=bits,
        weight_bits=weight_bits,
        size_bits=weight_bits,
        error_sq=error,
        weighted_error=np.full(error.shape, np.nan),
    )


def random_int_table(
    layer_names: tuple[str, ...], num_params: np.ndarray, bits: np.ndarray, rng: np.random.Generator
) -> CandidateTable:
    """Layers of ``num_params`` weights at the integer formats of ``bits``, 32 bits of overhead
    each, random squared errors drawn from ``rng`` (the solvers ignore them)."""
    weight = num_params[:, None] * bits[None, :].astype(float)
    shape = (len(layer_names), len(bits))
    return CandidateTable(
        layer_names=layer_names,
        format_names=tuple(f"int{b}" for b in bits),
        num_params=num_params,
        bits=bits,
        weight_bits=weight,
        size_bits=weight + 32.0,
        error_sq=rng.random(shape),
        weighted_error=np.zeros(shape),
    )
