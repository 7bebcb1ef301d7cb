"""Cached analysis (`lcpaq.search.cache`): one curvature per key, reloaded by a new process;
quantized weights per (scheme, format); GPTQ caches that follow the calibration images; pair
terms per scheme; the candidate table from cached weights equals `measure_candidates`."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import conv_inputs, make_tiny_conv_net
from search_helpers import (
    NUM_IMAGES,
    digits_config,
    make_files,
)

from lcpaq.config import RecoveryConfig
from lcpaq.model.graph import discover_layers, get_module
from lcpaq.quant.formats import QuantScheme, get_format
from lcpaq.quant.input_stats import collect_input_hessians
from lcpaq.quant.weights import fake_quantize
from lcpaq.search import cache as search_cache
from lcpaq.search.cache import candidate_table
from lcpaq.search.context import SearchContext
from lcpaq.search.space import SearchSpace
from lcpaq.sensitivity.candidates import measure_candidates
from lcpaq.sensitivity.interaction_terms import load_interactions
from lcpaq.stages import pipeline


def test_curvature_is_cached_per_key(tmp_path, monkeypatch, single_thread):
    """One analysis per distinct (samples, loss, seed, ...) key; a new process reloads it."""
    files = make_files(tmp_path)
    calls = []
    original = pipeline.analyze

    def counting(config, run_dir, **kwargs):
        calls.append(config.analysis.num_samples)
        return original(config, run_dir, **kwargs)

    monkeypatch.setattr(pipeline, "analyze", counting)
    base = digits_config(files)
    space = SearchSpace.default().fix({"num_samples": "16", "correction": "16"}, base)
    context = SearchContext.open(base, tmp_path / "s", space, "kl", (16, 48))
    a = base.with_analysis(num_samples=16)
    b = base.with_analysis(num_samples=24)
    # Scheme and formats do not change the curvature: same key.
    c = a.with_analysis(scheme=QuantScheme(symmetric=True), formats=("int2", "int8"))
    folders = [context.cache.curvature(config)[0] for config in (a, b, c, a, b)]
    assert calls == [16, 24]
    assert folders[0] == folders[2] == folders[3] and folders[1] == folders[4] != folders[0]
    again = SearchContext.open(base, tmp_path / "s", space, "kl", (16, 48))
    estimate = again.cache.curvature(b)[1]
    assert calls == [16, 24]
    assert estimate.num_samples == 24
    # Another seed is another key.
    again.cache.curvature(a.with_analysis(seed=1))
    assert calls == [16, 24, 16]
    # Quantized weights: computed once per (scheme, format), reloaded from disk by a new process.
    quantized = []
    original_quantize = search_cache.fake_quantize_formats

    def counting_quantize(weight, fmts, *args, **kwargs):
        quantized.extend(fmt.name for fmt in fmts)
        return original_quantize(weight, fmts, *args, **kwargs)

    monkeypatch.setattr(search_cache, "fake_quantize_formats", counting_quantize)
    first = context.cache.quantized_weights(QuantScheme(), "int3")
    assert len(quantized) == len(first) == 5  # one per layer of DigitsNet
    second = again.cache.quantized_weights(QuantScheme(), "int3")
    assert len(quantized) == 5
    assert all(torch.equal(first[name], second[name]) for name in first)
    again.cache.quantized_weights(QuantScheme(symmetric=True), "int3")
    assert len(quantized) == 10
    # Several formats at once: only the missing ones are computed, each layer's in one call.
    sets = again.cache.quantized_weight_sets(QuantScheme(), ("int2", "int3", "int4"))
    assert quantized[10:] == ["int2", "int4"] * 5
    assert all(torch.equal(sets["int3"][name], first[name]) for name in first)
    assert all(
        torch.equal(sets["int4"][name], again.cache.quantized_weights(QuantScheme(), "int4")[name])
        for name in first
    )
    assert len(quantized) == 20


@pytest.mark.parametrize("change", ["calib", "normalize"])
def test_gptq_caches_follow_the_calibration_images(tmp_path, single_thread, change):
    """GPTQ weights depend on the input second moments, hence on the calibration images and
    their normalisation: a second search in the same folder on other images must recompute."""
    files = make_files(tmp_path)
    other = tmp_path / "calib2.npz"
    rng = np.random.default_rng(5)
    np.savez(
        other,
        x=rng.integers(0, 255, (NUM_IMAGES, 1, 8, 8), dtype=np.uint8),
        y=rng.integers(0, 10, NUM_IMAGES),
    )
    variants = (
        [digits_config(files), digits_config({**files, "calib": other})]
        if change == "calib"
        else [digits_config(files), digits_config(files).with_analysis(normalize="0.5/0.25")]
    )
    scheme = QuantScheme(rounding="gptq")
    for base in variants:
        space = SearchSpace.default().fix({"num_samples": "16", "correction": "16"}, base)
        context = SearchContext.open(base, tmp_path / "s", space, "kl", (16, 48))
        context.cache.curvature(base.with_analysis(num_samples=16))
        weights = context.cache.quantized_weights(scheme, "int3", 16)
        hessians = context.cache.input_hessians(base.with_analysis(scheme=scheme, num_samples=16))
        names = list(weights)
        expected = collect_input_hessians(
            context.cache.model,
            names,
            context.cache.calib.inputs[:16],
            batch_size=base.analysis.batch_size,
        )
        for name in names:
            torch.testing.assert_close(hessians[name], expected[name])
            fresh = fake_quantize(
                context.cache.fp_weights[name], get_format("int3"), scheme, expected[name]
            )
            assert torch.equal(weights[name], fresh)


def test_pairwise_terms_are_cached_per_scheme_and_reach_the_trial_folder(
    tmp_path, monkeypatch, single_thread
):
    files = make_files(tmp_path)
    calls = []
    original = pipeline.analyze_interactions

    def counting(config, *args, **kwargs):
        if config.analysis.pairwise != "none":  # ``analyze`` of the curvature cache calls it too
            calls.append(config.analysis.pair_window)
        return original(config, *args, **kwargs)

    monkeypatch.setattr(pipeline, "analyze_interactions", counting)
    base = digits_config(files, num_samples=16, pair_samples=16, batch_size=8)
    base = replace(base, recovery=RecoveryConfig(enabled=False))
    space = SearchSpace.default(also=["pairwise"]).fix({"num_samples": "16"}, base)
    space = space.fix({"correction": "off"}, base)
    context = SearchContext.open(base, tmp_path / "s", space, "kl", (16, 48))
    w1 = space.config(base, {**space.default_params(), "pairwise": "gn-w1"})
    first = context.prepare(w1, build=False)
    again = context.prepare(w1, build=False)
    assert calls == [1]  # the second trial reuses the cached terms
    assert first.timings["hessian_s"] > 0 and again.timings["hessian_s"] == 0
    assert again.allocation.formats == first.allocation.formats
    path, seconds = context.cache.interactions(w1)
    assert seconds == 0
    assert load_interactions(path).pairs == tuple((i, i + 1) for i in range(4))
    # The terms enter the trial's problem: without them (λ = 0) the data holds none.
    _, estimate, _ = context.cache.curvature(w1)
    table = context.cache.table(w1, estimate)
    assert context.problem_data(w1, table, path).interactions is not None
    unweighted = w1.with_allocation(pairwise_weight=0.0)
    assert context.problem_data(unweighted, table, path).interactions is None
    context.prepare(w1.with_analysis(pair_window=2), build=False)
    other_scheme = w1.with_analysis(scheme=QuantScheme(symmetric=True))
    context.prepare(other_scheme, build=False)
    assert calls == [1, 2, 1]
    none = context.prepare(base, build=False)
    assert none.allocation.formats


@pytest.mark.parametrize(
    "scheme",
    [
        QuantScheme(),
        QuantScheme(symmetric=True, clipping="minmax"),
        QuantScheme(granularity="group", group_size=32, clipping="percentile", percentile=99.0),
        QuantScheme(granularity="tensor", clipping="percentile", percentile=99.99),
    ],
)
def test_candidate_table_from_cached_weights_equals_measure_candidates(scheme):
    model = make_tiny_conv_net()
    layers = discover_layers(model, conv_inputs(4))
    formats = ("int2", "int4", "int8", "fp4_e2m1")
    rng = np.random.default_rng(0)
    diagonal = {layer.name: rng.random(layer.weight_shape) for layer in layers}
    hessians = collect_input_hessians(model, [layer.name for layer in layers], conv_inputs(4))
    expected = measure_candidates(model, layers, formats, scheme, diagonal, (), hessians)
    weights = {layer.name: get_module(model, layer.name).weight.detach() for layer in layers}
    quantized = {
        name: {
            key: fake_quantize(value, get_format(name), scheme) for key, value in weights.items()
        }
        for name in formats
    }
    table = candidate_table(layers, weights, quantized, formats, scheme, diagonal, (), hessians)
    assert np.isfinite(table.output_error).all()
    fields = ("error_sq", "weighted_error", "output_error", "weight_bits", "size_bits", "bits")
    for field in (*fields, "num_params"):
        np.testing.assert_array_equal(getattr(table, field), getattr(expected, field))
    assert table.format_names == expected.format_names
