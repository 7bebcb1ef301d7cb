"""Weights and scheme lists shared by the quantizer tests in this folder."""

from __future__ import annotations

import itertools

import torch

from lcpaq.quant.formats import QuantScheme

BITS = range(2, 9)
SCHEMES = [
    QuantScheme(symmetric=symmetric, granularity=granularity, clipping=clipping)
    for symmetric, granularity, clipping in itertools.product(
        (True, False), ("channel", "tensor"), ("minmax", "mse")
    )
]


def spread_weight(seed: int = 0, shape: tuple[int, ...] = (6, 3, 3, 3)) -> torch.Tensor:
    """A conv-shaped weight whose channels have very different ranges, one all-positive and one
    all-negative (asymmetric zero points then sit at the ends of the code range)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator)
    weight = weight * torch.logspace(-2, 1, shape[0])[(slice(None),) + (None,) * (len(shape) - 1)]
    weight[1] = weight[1].abs() + 0.01
    weight[2] = -weight[2].abs() - 0.01
    return weight


def scheme_id(scheme: QuantScheme) -> str:
    return f"{'sym' if scheme.symmetric else 'asym'}-{scheme.granularity}-{scheme.clipping}"


#: name: (exponent bits, mantissa bits, bias, max, min normal, min subnormal, distinct finite values)
FP_TABLE = {
    "fp8_e4m3": (4, 3, 7, 448.0, 2.0**-6, 2.0**-9, 253),
    "fp8_e5m2": (5, 2, 15, 57344.0, 2.0**-14, 2.0**-16, 247),
    "fp6_e3m2": (3, 2, 3, 28.0, 0.25, 0.0625, 63),
    "fp6_e2m3": (2, 3, 1, 7.5, 1.0, 0.125, 63),
    "fp4_e2m1": (2, 1, 1, 6.0, 1.0, 0.5, 15),
}
TORCH_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
