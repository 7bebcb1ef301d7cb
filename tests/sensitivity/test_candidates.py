"""Candidate table in `lcpaq.sensitivity.candidates`: costs (code bits + scale overhead per format and
granularity) and weight errors for INT and FP candidates."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import conv_inputs, make_tiny_conv_net

from lcpaq.allocation.table import (
    DEFAULT_ACTIVATION_FORMAT,
    activation_bits,
    activation_format_of,
    activation_score_matrix,
    activation_sign_bits,
    expand_weight_matrix,
    parse_activation_formats,
    weight_format_of,
)
from lcpaq.config import AnalysisConfig
from lcpaq.errors import InputError
from lcpaq.model.graph import discover_layers, get_module
from lcpaq.quant.formats import QuantScheme, get_format, scale_overhead_bits
from lcpaq.quant.input_stats import collect_input_hessians
from lcpaq.quant.weights import fake_quantize
from lcpaq.runfolder import load_candidates, save_candidates
from lcpaq.sensitivity.candidates import measure_candidates, output_error

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


# -- (weight, activation) candidate pairs ------------------------------------------------------

ACTS = ("int4", "fp8_e4m3", "int8")


def test_pairs_repeat_the_weight_measurements_per_activation_format() -> None:
    model = make_tiny_conv_net()
    layers = discover_layers(model, conv_inputs(2))
    weights = ("int2", "fp4_e2m1", "int8")
    plain = measure_candidates(model, layers, weights, QuantScheme())
    paired = measure_candidates(model, layers, weights, QuantScheme(), activation_formats=ACTS)
    assert not plain.paired and paired.paired
    assert plain.activation_formats == ("int8",) * 3  # the cost models' old 8-bit assumption
    assert paired.format_names == tuple(f"{w}/{a}" for w in weights for a in ACTS)
    assert paired.weight_formats == tuple(w for w in weights for _ in ACTS)
    assert paired.activation_formats == ACTS * 3
    assert paired.activation_bits.tolist() == [4, 8, 8] * 3
    assert paired.activation_sign_bits.tolist() == [0, 1, 0] * 3
    for column, name in enumerate(paired.format_names):
        source = plain.format_index(weight_format_of(name))
        assert activation_format_of(name) == paired.activation_formats[column]
        assert paired.bits[column] == plain.bits[source]
        for field in ("weight_bits", "size_bits", "error_sq", "weighted_error"):
            np.testing.assert_array_equal(
                getattr(paired, field)[:, column], getattr(plain, field)[:, source]
            )
    assert activation_format_of("int4") == DEFAULT_ACTIVATION_FORMAT
    # keep-8bit picks 8-bit weights with the widest activation format, int8 over fp8 at a tie.
    assert paired.format_names[paired.candidate_index("int8")] == "int8/int8"
    assert paired.format_names[paired.candidate_index("int2", "int4")] == "int2/int4"
    with pytest.raises(InputError, match="'int3/int4' is not among"):
        paired.candidate_index("int3", "int4")


def test_parse_activation_formats() -> None:
    assert parse_activation_formats("int8, fp8_e4m3,int4,int8") == ("int4", "fp8_e4m3", "int8")
    assert parse_activation_formats("fp32,int8") == ("int8", "fp32")
    assert activation_bits("fp16") == 16 and activation_sign_bits("fp32") == 1
    with pytest.raises(InputError, match="unknown activation format 'int9'"):
        parse_activation_formats("int8,int9")
    with pytest.raises(InputError, match="empty"):
        parse_activation_formats(" , ")
    model = make_tiny_conv_net()
    layers = discover_layers(model, conv_inputs(2))
    with pytest.raises(InputError, match="unknown activation format 'a7'"):
        measure_candidates(model, layers, ("int4",), QuantScheme(), activation_formats=("a7",))
    with pytest.raises(InputError, match="unknown activation format 'int9'"):
        AnalysisConfig(model="m", checkpoint=None, calib="c", act_formats=("int8", "int9"))


def test_select_and_pairwise_expansion() -> None:
    model = make_tiny_conv_net()
    layers = discover_layers(model, conv_inputs(2))
    table = measure_candidates(
        model,
        layers,
        ("int2", "fp4_e2m1", "int8"),
        QuantScheme(),
        activation_formats=("int4", "int8"),
    )
    ints = table.select([c for c, w in enumerate(table.weight_formats) if w.startswith("int")])
    assert ints.format_names == ("int2/int4", "int2/int8", "int8/int4", "int8/int8")
    np.testing.assert_array_equal(ints.error_sq, table.error_sq[:, [0, 1, 4, 5]])
    weight_matrix = np.arange(9.0).reshape(3, 3)  # C(f, g) over weight formats
    expanded = expand_weight_matrix(table, ("int2", "fp4_e2m1", "int8"), weight_matrix)
    assert expanded.shape == (6, 6)
    assert expanded[table.format_index("fp4_e2m1/int8"), table.format_index("int8/int4")] == 5.0
    assert expanded[table.format_index("int2/int4"), table.format_index("int2/int8")] == 0.0
    with pytest.raises(InputError, match="no weight format 'fp4_e2m1'"):
        expand_weight_matrix(table, ("int2", "int8"), np.zeros((2, 2)))
    scores = activation_score_matrix(table, {"int4": np.array([1.0, 2.0, 3.0])})
    np.testing.assert_array_equal(scores[:, table.format_index("int8/int4")], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(scores[:, table.format_index("int8/int8")], 0.0)


def test_pair_table_round_trip_and_old_files(tmp_path) -> None:
    model = make_tiny_conv_net()
    layers = discover_layers(model, conv_inputs(2))
    table = measure_candidates(model, layers, ("int4", "fp8_e4m3"), QuantScheme(), None, ACTS)
    loaded = load_candidates(save_candidates(tmp_path / "candidates.npz", table))
    assert loaded.format_names == table.format_names
    assert loaded.activation_formats == table.activation_formats
    assert loaded.weight_formats == table.weight_formats
    np.testing.assert_array_equal(loaded.size_bits, table.size_bits)
    # A candidates.npz written before activation formats existed still loads, as weights-only.
    plain = measure_candidates(model, layers, ("int4", "fp8_e4m3"), QuantScheme())
    arrays = dict(np.load(save_candidates(tmp_path / "old.npz", plain)))
    del arrays["weight_formats"], arrays["activation_formats"]
    np.savez(tmp_path / "old.npz", **arrays)
    old = load_candidates(tmp_path / "old.npz")
    assert old.weight_formats == ("int4", "fp8_e4m3")
    assert old.activation_formats == ("int8", "int8") and not old.paired


def test_activation_term_of_pairs_from_activations_npz(tmp_path) -> None:
    """The ILP score of (w, a) = weight score + ½·T_l·σ²_l(a) from activations.npz (trace scorer),
    ½·weighted[l, a] with the diagonal scorer; 0 for an unmeasured format and unpaired tables."""
    from lcpaq.sensitivity.activation import ActivationSensitivity
    from lcpaq.sensitivity.activation_file import save_activation_sensitivity
    from lcpaq.stages.allocate import activation_term

    model = make_tiny_conv_net()
    layers = discover_layers(model, conv_inputs(2))
    table = measure_candidates(model, layers, ("int4", "int8"), QuantScheme(), None, ACTS)
    noise = np.array([[0.1, 0.01, 0.001], [0.2, 0.02, 0.002], [0.3, 0.03, 0.003]])
    sensitivity = ActivationSensitivity(
        layer_names=table.layer_names,
        format_names=("int4", "int8", "fp32"),
        trace=np.array([1.0, 2.0, 4.0]),
        trace_stderr=np.zeros(3),
        num_elements=np.array([36, 64, 54]),
        noise=noise,
        weighted=10 * noise,
        weighted_stderr=np.zeros((3, 3)),
        low=np.zeros(3),
        high=np.ones(3),
        num_samples=2,
        method="gauss_newton",
    )
    save_activation_sensitivity(tmp_path / "activations.npz", sensitivity)
    term = activation_term(tmp_path, table, "hawq_v2")
    column = table.format_index("int8/int4")
    np.testing.assert_allclose(term[:, column], 0.5 * np.array([1.0, 2.0, 4.0]) * noise[:, 0])
    np.testing.assert_allclose(term[:, table.format_index("int4/int8")], [0.005, 0.02, 0.06])
    np.testing.assert_array_equal(term[:, table.format_index("int4/fp8_e4m3")], 0.0)
    diagonal = activation_term(tmp_path, table, "diagonal")
    np.testing.assert_allclose(diagonal[:, column], 5 * noise[:, 0])
    plain = measure_candidates(model, layers, ("int4", "int8"), QuantScheme())
    np.testing.assert_array_equal(activation_term(tmp_path, plain, "hawq_v2"), 0.0)
    renamed = dataclasses.replace(sensitivity, layer_names=("a", "b", "c"))
    save_activation_sensitivity(tmp_path / "activations.npz", renamed)
    with pytest.raises(InputError, match="other layers"):
        activation_term(tmp_path, table, "hawq_v2")


def test_output_error_oracles_and_its_table_column(tmp_path) -> None:
    """White inputs (S = σ²I, any σ) give exactly ‖ΔW‖²; correlated inputs weigh the error by
    where the inputs are large; GPTQ runs fill the column, round-to-nearest ones leave NaN, and the
    column survives pairing, selection and the artifact."""
    generator = torch.Generator().manual_seed(3)
    delta = torch.randn(6, 2, 3, 3, generator=generator, dtype=torch.float64)  # groups=2
    white = 2.5 * torch.eye(9, dtype=torch.float64).expand(2, 9, 9)
    assert output_error(delta, white) == pytest.approx(float(delta.pow(2).sum()), rel=1e-12)
    inputs = torch.randn(500, 4, generator=generator, dtype=torch.float64) * torch.tensor(
        [10.0, 1.0, 1.0, 1.0], dtype=torch.float64
    )
    moments = inputs.T @ inputs / len(inputs)
    on_large = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    on_small = torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    assert output_error(on_large, moments) > 10 * output_error(on_small, moments)
    model = make_tiny_conv_net()
    inputs = conv_inputs(8)
    layers = discover_layers(model, inputs)
    names = [layer.name for layer in layers]
    hessians = collect_input_hessians(model, names, inputs)
    gptq = QuantScheme(rounding="gptq")
    table = measure_candidates(model, layers, FORMATS, gptq, None, ACTS, input_hessians=hessians)
    nearest = measure_candidates(model, layers, FORMATS, QuantScheme())
    assert np.isnan(nearest.output_error).all()
    assert np.isfinite(table.output_error).all() and (table.output_error > 0).all()
    for row, layer in enumerate(layers):
        weight = get_module(model, layer.name).weight.detach()
        column = table.format_index("int4/int8")
        quantized = fake_quantize(weight, get_format("int4"), gptq, hessians[layer.name])
        expected = output_error(quantized.double() - weight.double(), hessians[layer.name])
        assert table.output_error[row, column] == pytest.approx(expected, rel=1e-9)
    picked = table.select([1, 0])
    np.testing.assert_array_equal(picked.output_error, table.output_error[:, [1, 0]])
    loaded = load_candidates(save_candidates(tmp_path / "candidates.npz", table))
    np.testing.assert_array_equal(loaded.output_error, table.output_error)
