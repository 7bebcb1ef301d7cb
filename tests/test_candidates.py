"""Candidate table in `lcpaq.candidates`: costs (code bits + scale overhead per format and
granularity) and weight errors for INT and FP candidates."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import conv_inputs, make_tiny_conv_net

from lcpaq.candidates import measure_candidates
from lcpaq.errors import InputError
from lcpaq.formats import QuantScheme, fake_quantize, get_format, scale_overhead_bits
from lcpaq.graph import discover_layers, get_module

pytestmark = pytest.mark.usefixtures("single_thread")

FORMATS = ("int2", "fp4_e2m1", "int4", "fp6_e3m2", "fp8_e4m3", "int8")
SCHEMES = [
    QuantScheme(),
    QuantScheme(symmetric=True, granularity="tensor"),
    QuantScheme(granularity="group", group_size=32),
    QuantScheme(granularity="mx"),
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s.granularity}-{s.symmetric}")
def test_costs_and_errors_per_candidate(scheme: QuantScheme) -> None:
    model = make_tiny_conv_net()
    layers = discover_layers(model, conv_inputs(2))
    diagonal = {layer.name: np.full(layer.weight_shape, 2.0) for layer in layers}
    table = measure_candidates(model, layers, FORMATS, scheme, diagonal)
    assert table.format_names == FORMATS
    assert table.bits.tolist() == [2, 4, 4, 6, 8, 8]
    for row, layer in enumerate(layers):
        weight = get_module(model, layer.name).weight.detach()
        for column, name in enumerate(FORMATS):
            fmt = get_format(name)
            n = layer.num_params
            assert table.weight_bits[row, column] == n * fmt.bits
            overhead = scale_overhead_bits(layer.weight_shape, scheme, fmt)
            assert table.size_bits[row, column] == n * fmt.bits + overhead
            delta = (fake_quantize(weight, fmt, scheme) - weight).double()
            assert table.error_sq[row, column] == pytest.approx(float(delta.pow(2).sum()))
            assert table.weighted_error[row, column] == pytest.approx(
                2 * table.error_sq[row, column]
            )
    # FP candidates never store zero points: at equal width they cost no more than asymmetric INT.
    int4, fp4 = FORMATS.index("int4"), FORMATS.index("fp4_e2m1")
    assert bool((table.size_bits[:, fp4] <= table.size_bits[:, int4]).all())
    if scheme.granularity in ("channel", "group") and not scheme.symmetric:
        assert bool((table.size_bits[:, fp4] < table.size_bits[:, int4]).all())
    # More bits, smaller error, within each kind.
    for names in (("int2", "int4", "int8"), ("fp4_e2m1", "fp6_e3m2", "fp8_e4m3")):
        columns = [FORMATS.index(name) for name in names]
        assert bool((np.diff(table.error_sq[:, columns], axis=1) < 0).all())


def test_group_and_mx_overheads_in_the_table() -> None:
    model = make_tiny_conv_net()
    layers = discover_layers(model, conv_inputs(2))
    table = measure_candidates(model, layers, ("int4", "fp4_e2m1"), QuantScheme(granularity="mx"))
    for row, layer in enumerate(layers):
        rows = layer.weight_shape[0]
        blocks = rows * -(-(layer.num_params // rows) // 32)
        assert table.size_bits[row].tolist() == [layer.num_params * 4 + 8 * blocks] * 2


def test_unknown_candidate_format() -> None:
    model = make_tiny_conv_net()
    layers = discover_layers(model, conv_inputs(2))
    with pytest.raises(InputError, match="unknown number format 'fp7'"):
        measure_candidates(model, layers, ("int4", "fp7"), QuantScheme())
    table = measure_candidates(model, layers, ("int4",), QuantScheme())
    with pytest.raises(InputError, match="fp8_e4m3"):
        table.format_index("fp8_e4m3")
