"""A trial's preparation (`lcpaq.search.context`): activation formats are measured once per key,
reach the trial folder, and the trial's model quantizes its inputs exactly as ``export`` of
that folder does; the keys that tell quantized models apart (`lcpaq.search.keys`)."""

from __future__ import annotations

import json

import pytest
import torch
from search_helpers import (
    digits_config,
    make_files,
)

from lcpaq import load_quantized
from lcpaq.errors import InputError
from lcpaq.model.demo import DigitsNet
from lcpaq.search.context import Infeasible, SearchContext
from lcpaq.search.dimensions import ACTIVATION_SETS
from lcpaq.search.keys import curvature_key, model_key
from lcpaq.search.space import SearchSpace
from lcpaq.stages import pipeline


def test_activation_formats_are_cached_and_quantize_the_trial_model(
    tmp_path, monkeypatch, single_thread
):
    """``--also act_formats``: the activation sensitivity and ranges are measured once per
    (images, formats, clipping), reach the trial folder, and the trial's model quantizes its
    layer inputs exactly as ``export`` of that folder does."""
    files = make_files(tmp_path)
    calls = []
    original = pipeline.measure_activations

    def counting(config, *args, **kwargs):
        calls.append((config.analysis.act_formats, config.analysis.act_clipping))
        return original(config, *args, **kwargs)

    monkeypatch.setattr(pipeline, "measure_activations", counting)
    base = digits_config(files, num_samples=16, batch_size=8)
    space = SearchSpace.default(also=["act_formats", "act_clipping"])
    space = space.fix({"num_samples": "16", "correction": "16"}, base)
    assert space.dimension("act_formats").choices == tuple(ACTIVATION_SETS)
    context = SearchContext.open(base, tmp_path / "s", space, "kl", (16, 48))
    a4 = space.config(base, {**space.default_params(), "act_formats": "int4"})
    assert a4.analysis.act_formats == ("int4",) and a4.analysis.act_clipping == "mse"
    first = context.prepare(a4)
    again = context.prepare(a4, build=False)
    assert calls == [(("int4",), "mse")]
    assert again.timings["hessian_s"] == 0
    assert all(name.endswith("/int4") for name in first.allocation.formats)
    assert not (tmp_path / "t1").exists()  # trials write no run folder
    # The run folder best/ gets: the ordinary stages on it allocate and export the same model.
    folder, estimate, _ = context.cache.curvature(a4)
    context.write_analysis(tmp_path / "t1", a4, folder, context.cache.table(a4, estimate))
    assert (tmp_path / "t1" / "activations.npz").is_file()
    budgets = [pipeline.parse_budget(text) for text in a4.allocation.budgets]
    on_folder = pipeline.allocate(tmp_path / "t1", budgets, **a4.allocation.options())
    assert on_folder.formats == first.allocation.formats
    assert on_folder.predicted_loss_increase == first.allocation.predicted_loss_increase
    pipeline.export(tmp_path / "t1")
    manifest = json.loads((tmp_path / "t1" / "quantized" / "manifest.json").read_text())
    assert all(entry["activation_quantizer"]["format"] == "int4" for entry in manifest["layers"])
    loaded = load_quantized(tmp_path / "t1" / "quantized", DigitsNet())
    inputs = context.cache.calib.inputs[:32]
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), first.quantized(inputs))
    weights_only = context.prepare(base, build=False)
    assert not any("/" in name for name in weights_only.allocation.formats)
    # Infeasible budgets: the trial fails with the message the allocate stage gives on a folder.
    impossible = base.with_allocation(budgets=("avg-bits=0.5",))
    with pytest.raises(Infeasible) as caught:
        context.prepare(impossible, build=False)
    folder, estimate, _ = context.cache.curvature(base)
    context.write_analysis(tmp_path / "t3", base, folder, context.cache.table(base, estimate))
    with pytest.raises(InputError) as on_folder:
        pipeline.allocate(tmp_path / "t3", [pipeline.parse_budget("avg-bits=0.5")])
    assert str(caught.value) == str(on_folder.value)
    assert model_key(a4, first.allocation) != model_key(base, weights_only.allocation)
    minmax = a4.with_analysis(act_clipping="minmax")
    assert curvature_key(minmax, {}) == curvature_key(a4, {})
    context.prepare(minmax, build=False)
    assert calls == [(("int4",), "mse"), (("int4",), "minmax")]
    assert model_key(minmax, first.allocation) != model_key(a4, first.allocation)
    with pytest.raises(InputError, match="unknown activation format 'int9'"):
        space.fix({"act_formats": "int9"}, base)
