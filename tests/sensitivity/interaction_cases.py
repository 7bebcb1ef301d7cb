"""Tiny float64 models with doubled weights (logits far from uniform) and labels, shared by the
inter-layer term tests (test_cross_terms, test_measured_interactions, test_interaction_terms,
test_interactions)."""

from __future__ import annotations

import torch
from conftest import make_tiny_conv_net, make_tiny_mlp
from torch import nn

FORMATS = ("int2", "int3", "int4")


def model_and_data(kind: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(31)
    if kind == "mlp":
        model = make_tiny_mlp(torch.float64)
        inputs = torch.randn(10, 5, generator=generator, dtype=torch.float64)
    else:
        model = make_tiny_conv_net(torch.float64)
        inputs = torch.randn(10, 1, 6, 6, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(2.0)
    labels = torch.randint(0, 3, (10,), generator=generator)
    return model, inputs, labels
