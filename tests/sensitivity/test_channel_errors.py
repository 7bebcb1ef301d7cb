"""Per-channel errors in `lcpaq.sensitivity.channel_errors`: summed over a layer's channels they
are the candidate table's layer errors (weight, curvature-weighted and output error)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import conv_inputs, make_tiny_conv_net

from lcpaq.model.graph import discover_layers
from lcpaq.quant.formats import QuantScheme
from lcpaq.quant.input_stats import collect_input_hessians
from lcpaq.sensitivity.candidates import quantize_candidates, table_from_weights
from lcpaq.sensitivity.channel_errors import measure_channel_errors

pytestmark = pytest.mark.usefixtures("single_thread")


def test_channel_errors_add_up_to_layer_errors() -> None:
    model = make_tiny_conv_net()
    inputs = conv_inputs(32)
    layers = discover_layers(model, inputs[:2])
    hessians = collect_input_hessians(model, [layer.name for layer in layers], inputs)
    generator = torch.Generator().manual_seed(0)
    diagonal = {
        layer.name: torch.rand(layer.weight_shape, generator=generator).numpy() for layer in layers
    }
    formats = ("ternary", "int2", "int4")
    scheme = QuantScheme(rounding="gptq")
    weights, quantized = quantize_candidates(model, layers, formats, scheme, hessians)
    table = table_from_weights(layers, weights, quantized, formats, scheme, diagonal, (), hessians)
    channels = measure_channel_errors(layers, weights, quantized, formats, diagonal, hessians)
    for row, layer in enumerate(layers):
        for field in ("error_sq", "weighted_error", "output_error"):
            per_channel = channels.errors[layer.name][field]
            assert per_channel.shape == (layer.weight_shape[0], len(formats))
            assert np.allclose(per_channel.sum(0), getattr(table, field)[row], rtol=1e-9)
        assert np.isclose(channels.trace[layer.name].sum(), diagonal[layer.name].sum())
