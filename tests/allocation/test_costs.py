"""Cost vectors in `lcpaq.allocation.costs` against hand-computed values."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import conv_inputs, make_tiny_conv_net

from lcpaq.allocation.costs import (
    COST_METRICS,
    Roofline,
    build_cost_model,
    load_latency_table,
    shape_key,
)
from lcpaq.allocation.table import CandidateTable
from lcpaq.errors import InputError
from lcpaq.model.graph import discover_layers
from lcpaq.quant.formats import QuantScheme
from lcpaq.sensitivity.candidates import measure_candidates


def two_layer_table() -> CandidateTable:
    """conv (64 params, 2 output channels) and fc (100 params, 10 outputs) at int4 and int8."""
    num_params = np.array([64, 100])
    bits = np.array([4, 8])
    weight_bits = num_params[:, None] * bits[None, :].astype(float)
    overhead = np.array([[2 * 48.0], [10 * 48.0]])  # scale + zero point per output channel
    return CandidateTable(
        layer_names=("conv", "fc"),
        format_names=("int4", "int8"),
        num_params=num_params,
        bits=bits,
        weight_bits=weight_bits,
        size_bits=weight_bits + overhead,
        error_sq=np.zeros((2, 2)),
        weighted_error=np.full((2, 2), np.nan),
    )


def test_costs_match_hand_computed_values() -> None:
    table = two_layer_table()
    costs = build_cost_model(
        table,
        constant_size_bits=1000.0,
        fp32_size_bits=164 * 32 + 1000.0,
        macs_per_sample=np.array([2048.0, 100.0]),
        activation_bits=np.array([8.0, 4.0]),
        weight_sign_bits=np.array([1.0, 0.0]),
    )
    assert costs.metrics == COST_METRICS
    choice = np.array([0, 1])  # conv int4 (activations 8), fc int8 (activations 4)
    assert costs.value("avg-bits", choice) == pytest.approx((64 * 4 + 100 * 8) / 164)
    size_bits = 64 * 4 + 96 + 100 * 8 + 480 + 1000
    assert costs.value("size-mb", choice) == pytest.approx(size_bits / 8e6)
    assert costs.value("size-frac", choice) == pytest.approx(size_bits / (164 * 32 + 1000))
    assert costs.value("bitops-g", choice) == pytest.approx((2048 * 4 * 8 + 100 * 8 * 4) / 1e9)
    # EBOPs: int4 carries a sign bit here (3 magnitude bits), int8 does not.
    assert costs.value("ebops-g", choice) == pytest.approx((2048 * 3 * 8 + 100 * 8 * 4) / 1e9)
    # Roofline defaults: 1e12 MAC/s at 8 bits (×8/max(b_w, b_a)), 100 GB/s.
    conv = max(2048 / (1e12 * 8 / 8), (64 * 4 + 96) / 8 / 100e9)
    fc = max(100 / (1e12 * 8 / 8), (100 * 8 + 480) / 8 / 100e9)
    assert costs.value("latency-ms", choice) == pytest.approx(1e3 * (conv + fc))
    assert costs.values(choice)["avg-bits"] == costs.value("avg-bits", choice)


def test_roofline_peaks_are_user_given() -> None:
    roofline = Roofline(
        peak_macs_per_s_8bit=2e9, bandwidth_bytes_per_s=1e3, peak_macs_per_s={"int8": 5e8}
    )
    latency = roofline.latency_ms(
        np.array([1e6]),
        np.array([[8.0, 16.0]]),
        ("int4", "int8"),
        np.array([4, 8]),
        np.array([4, 8]),
    )
    # int4: compute 1e6 / (2e9 * 2) = 0.25 ms vs memory 1 byte / 1e3 B/s = 1 ms: memory-bound.
    # int8: compute 1e6 / 5e8 = 2 ms (the override) vs memory 2 ms.
    np.testing.assert_allclose(latency, [[1.0, 2.0]])


def test_latency_table_by_name_and_shape(tmp_path) -> None:
    table = two_layer_table()
    csv_path = tmp_path / "latency.csv"
    csv_path.write_text(
        "layer,format,ms\nconv,int4,0.5\nconv,int8,0.7\n10x10,int4,1\n10x10,int8,2\n"
    )
    loaded = load_latency_table(csv_path)
    assert loaded == {"conv": {"int4": 0.5, "int8": 0.7}, "10x10": {"int4": 1.0, "int8": 2.0}}
    json_path = tmp_path / "latency.json"
    json_path.write_text(json.dumps(loaded))
    assert load_latency_table(json_path) == loaded
    costs = build_cost_model(table, weight_shapes=[(2, 32), (10, 10)], latency_table=loaded)
    assert costs.value("latency-ms", np.array([1, 0])) == pytest.approx(1.7)
    assert "bitops-g" not in costs.metrics and "size-frac" not in costs.metrics
    with pytest.raises(InputError, match="no entry for layer 'fc' \\(10x10\\) and format 'int8'"):
        build_cost_model(
            table,
            weight_shapes=[(2, 32), (10, 10)],
            latency_table={**loaded, "10x10": {"int4": 1.0}},
        )
    with pytest.raises(InputError, match="needs the FP32 size"):
        costs.value("size-frac", np.array([0, 0]))
    bad = tmp_path / "bad.csv"
    bad.write_text("name,ms\nconv,1\n")
    with pytest.raises(InputError, match="malformed"):
        load_latency_table(bad)
    with pytest.raises(InputError, match="does not exist"):
        load_latency_table(tmp_path / "missing.json")
    assert shape_key((64, 64, 3, 3)) == "64x64x3x3"


def test_bitops_of_weight_activation_pairs_on_a_tiny_model() -> None:
    """TinyConvNet: conv1 4×(1·3·3) on a 6×6 output = 1296 MACs, conv2 (grouped, stride 2)
    6×(2·3·3) on 3×3 = 972 MACs, fc 54→3 = 162 MACs per sample."""
    model = make_tiny_conv_net()
    layers = discover_layers(model, conv_inputs(2))
    macs = np.array([layer.macs_per_sample for layer in layers], dtype=float)
    assert macs.tolist() == [1296, 972, 162]
    table = measure_candidates(
        model,
        layers,
        ("int4", "fp8_e4m3"),
        QuantScheme(),
        activation_formats=("int4", "fp8_e5m2", "fp32"),
    )
    costs = build_cost_model(
        table, macs_per_sample=macs, weight_sign_bits=np.array([0, 0, 0, 1, 1, 1])
    )
    choice = np.array(
        [
            table.format_index("int4/int4"),
            table.format_index("fp8_e4m3/fp8_e5m2"),
            table.format_index("int4/fp32"),
        ]
    )
    assert costs.value("bitops-g", choice) * 1e9 == pytest.approx(
        1296 * 4 * 4 + 972 * 8 * 8 + 162 * 4 * 32
    )
    # EBOPs drop the sign bit of FP weights and FP activations; INT activations are unsigned.
    assert costs.value("ebops-g", choice) * 1e9 == pytest.approx(
        1296 * 4 * 4 + 972 * 7 * 7 + 162 * 4 * 31
    )
    # Roofline compute rate follows the wider operand: 8/max(b_w, b_a) × the 8-bit peak.
    conv2 = costs.coefficients["latency-ms"][1, choice[1]]
    memory = table.size_bits[1, choice[1]] / 8 / 100e9
    assert conv2 == pytest.approx(1e3 * max(972 / 1e12, memory))


def test_unpaired_tables_keep_the_8_bit_activation_assumption() -> None:
    model = make_tiny_conv_net()
    layers = discover_layers(model, conv_inputs(2))
    macs = np.array([layer.macs_per_sample for layer in layers], dtype=float)
    table = measure_candidates(model, layers, ("int2", "int8"), QuantScheme())
    costs = build_cost_model(table, macs_per_sample=macs)
    np.testing.assert_allclose(
        costs.coefficients["bitops-g"] * 1e9, macs[:, None] * np.array([[2 * 8, 8 * 8]])
    )
    np.testing.assert_allclose(costs.coefficients["ebops-g"], costs.coefficients["bitops-g"])
