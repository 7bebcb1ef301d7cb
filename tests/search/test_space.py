"""The search space (`lcpaq.search.space`, `lcpaq.search.dimensions`): each dimension sets the
pipeline's own options; ``--fix``, ``--also``; budgets that count activation bits; and the
percentile clipping choices against numpy's percentile."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from lcpaq.config import AllocationConfig, AnalysisConfig, RunConfig
from lcpaq.errors import InputError
from lcpaq.quant.formats import QuantScheme, get_format
from lcpaq.quant.weights import fake_quantize
from lcpaq.search.dimensions import ACTIVATION_SETS
from lcpaq.search.options import SearchOptions
from lcpaq.search.slices import space_head
from lcpaq.search.space import SearchSpace, search_space


def test_space_maps_to_pipeline_options():
    base = RunConfig(
        AnalysisConfig(model="m", checkpoint=None, calib="c"),
        allocation=AllocationConfig(budgets=("avg-bits=3", "size-mb=0.2")),
    )
    space = SearchSpace.default()
    default = space.config(base, space.default_params())
    assert default == base  # the enqueued default is lcpaq's default configuration
    params = {
        "num_samples": 512,
        "clipping": "p99.9",
        "symmetric": True,
        "granularity": "group64",
        "formats": "int+fp4",
        "first_last": "keep-8bit",
        "scorer": "diagonal",
        "correction": "off",
        "cost_weight": 0.01,
        "estimator": "gauss-newton",
        "rounding": "gptq-damp0.1",
    }
    config = space.config(base, params)
    assert config.analysis.num_samples == 512
    assert config.analysis.scheme == QuantScheme(
        symmetric=True,
        granularity="group",
        group_size=64,
        clipping="percentile",
        percentile=99.9,
        rounding="gptq",
        gptq_damp=0.1,
    )
    nearest = space.config(base, {**params, "rounding": "nearest"}).analysis.scheme
    assert nearest.rounding == "nearest"
    assert "fp4_e2m1" in config.analysis.formats
    assert config.allocation.first_last == "keep-8bit" and config.allocation.scorer == "diagonal"
    assert not config.recovery.enabled
    assert config.allocation.cost_weights == (("avg-bits", 0.01),)  # λ on the first budget
    assert config.allocation.budgets == base.allocation.budgets
    assert space_head(space, base) == 1024
    fixed = space.fix({"correction": "64", "num_samples": "48"}, base)
    assert space_head(fixed, base) == 64
    assert fixed.size == space.size // (4 * 4)
    # Optional dimensions (the Hutchinson estimator) are pinned unless asked for.
    assert space.dimension("estimator").choices == ("gauss-newton",)
    wider = SearchSpace.default(also=["estimator"])
    assert wider.size == 3 * space.size
    hutchinson = wider.config(base, {**params, "estimator": "hutchinson-64"})
    assert hutchinson.analysis.estimator == "hutchinson"
    assert hutchinson.analysis.hutchinson_probes == 64
    with pytest.raises(InputError, match="--also nosuch"):
        SearchSpace.default(also=["nosuch"])
    # Pairwise terms: opt-in; with a cost weight they enter the ILP exactly (no augmented score).
    assert space.dimension("pairwise").choices == ("none",)
    paired = SearchSpace.default(also=["pairwise"])
    windowed = paired.config(base, {**params, "cost_weight": 0.0, "pairwise": "gn-w2"})
    assert windowed.analysis.pairwise == "gauss-newton" and windowed.analysis.pair_window == 2
    assert windowed.allocation.pairwise_mode == "augmented"
    weighted = paired.config(base, {**params, "pairwise": "gn-w1"})
    assert weighted.allocation.pairwise_mode == "ilp"
    assert weighted.allocation.pair_clip == "negative"
    assert paired.config(base, {**params, "pairwise": "none"}).analysis.pairwise == "none"


def test_budgets_that_count_activation_bits_quantize_the_inputs_of_every_configuration(tmp_path):
    """Under BitOps (or EBOPs, latency) a weights-only checkpoint would keep FP32 activations
    that the cost counts as 8-bit: the default and every trial get real INT8 inputs instead,
    unless --fix or --also act_formats says otherwise; avg-bits/size budgets are untouched."""
    base = RunConfig(
        AnalysisConfig(model="m", checkpoint=None, calib="c"),
        allocation=AllocationConfig(budgets=("bitops-g=0.6",)),
    )

    def space(**options):
        return search_space(SearchOptions(base=base, out=tmp_path, **options))

    pinned = space().dimension("act_formats")
    assert pinned.choices == ("int8",) and pinned.default == "int8"
    searched = space(also=("act_formats",)).dimension("act_formats")
    assert searched.choices == tuple(ACTIVATION_SETS) and searched.default == "int8"
    assert space(fixed={"act_formats": "int4-8"}).dimension("act_formats").choices == ("int4-8",)
    assert space(fixed={"act_formats": "none"}).dimension("act_formats").default == "none"
    weights_only = replace(base, allocation=AllocationConfig(budgets=("avg-bits=3",)))
    options = SearchOptions(base=weights_only, out=tmp_path)
    assert search_space(options).dimension("act_formats").default == "none"
    with pytest.raises(InputError, match="no such search dimension"):
        SearchSpace.default().with_default("nosuch", 1)


def test_percentile_clipping_oracles():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 50, generator=generator)
    weight[0, 3] = 40.0  # an outlier the percentile cuts off
    int4 = get_format("int4")
    for symmetric in (False, True):
        for granularity in ("tensor", "channel", "group"):
            args = {"symmetric": symmetric, "granularity": granularity, "group_size": 32}
            full = fake_quantize(
                weight, int4, QuantScheme(clipping="percentile", percentile=100.0, **args)
            )
            minmax = fake_quantize(weight, int4, QuantScheme(clipping="minmax", **args))
            assert torch.equal(full, minmax)  # p = 100 is min-max
    # Symmetric per channel: the scale is P_p(|w|) / 7, numpy's linear percentile of each row.
    scheme = QuantScheme(symmetric=True, clipping="percentile", percentile=95.0)
    from lcpaq.quant.weights import quantize_weight

    scale = quantize_weight(weight, int4, scheme).scale
    expected = np.percentile(weight.abs().numpy().astype(np.float64), 95.0, axis=1) / 7
    np.testing.assert_allclose(scale.numpy(), expected, rtol=1e-6)
    assert float(scale[0]) < 5.0 / 7  # the outlier no longer sets row 0's scale
    # Groups of 32 over 50 inputs: the padded second group uses its 18 real elements only.
    grouped = QuantScheme(
        symmetric=True, granularity="group", group_size=32, clipping="percentile", percentile=90.0
    )
    scale = quantize_weight(weight, int4, grouped).scale
    tail = np.percentile(weight[:, 32:].abs().numpy().astype(np.float64), 90.0, axis=1) / 7
    np.testing.assert_allclose(scale[:, 1].numpy(), tail, rtol=1e-6)
    with pytest.raises(InputError, match="percentile"):
        QuantScheme(clipping="percentile", percentile=40.0)
