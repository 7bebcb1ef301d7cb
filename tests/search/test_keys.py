"""Cache keys (`lcpaq.search.keys`): each key changes exactly with what its cached result
depends on."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import cast

from lcpaq.allocation.result import Allocation
from lcpaq.config import AllocationConfig, AnalysisConfig, RecoveryConfig, RunConfig
from lcpaq.quant.formats import QuantScheme
from lcpaq.search.keys import (
    activations_key,
    curvature_key,
    interactions_key,
    model_key,
    scheme_slug,
)

BASE = RunConfig(
    AnalysisConfig(model="m", checkpoint="net.pt", calib="c.npz"),
    allocation=AllocationConfig(budgets=("avg-bits=3",)),
)
FILES = {"checkpoint": "abc", "calib": "def"}


def _allocation(*formats: str) -> Allocation:
    """What `model_key` reads of an allocation: the chosen formats."""
    return cast(Allocation, SimpleNamespace(formats=formats))


def test_curvature_key_follows_the_curvature_options_only():
    key = curvature_key(BASE, FILES)
    candidates_only = BASE.with_analysis(
        scheme=QuantScheme(symmetric=True), formats=("int2", "int8"), act_formats=("int8",)
    )
    assert curvature_key(candidates_only, FILES) == key
    assert curvature_key(BASE.with_analysis(pair_window=3), FILES) == key
    assert curvature_key(BASE.with_analysis(num_samples=512), FILES) != key
    assert curvature_key(BASE.with_analysis(seed=1), FILES) != key
    assert curvature_key(BASE, {**FILES, "calib": "other"}) != key


def test_interaction_and_activation_keys_add_their_own_options():
    pairs = interactions_key(BASE, FILES)
    assert interactions_key(BASE.with_analysis(pair_window=2), FILES) != pairs
    assert interactions_key(BASE.with_analysis(scheme=QuantScheme(symmetric=True)), FILES) != pairs
    assert interactions_key(BASE.with_analysis(seed=1), FILES) != pairs  # via the curvature key
    acts = BASE.with_analysis(act_formats=("int8",))
    key = activations_key(acts, FILES)
    assert activations_key(acts.with_analysis(act_clipping="minmax"), FILES) != key
    assert activations_key(acts.with_analysis(scheme=QuantScheme(symmetric=True)), FILES) == key


def test_model_key_is_the_quantized_model():
    allocation = _allocation("int4", "int8")
    key = model_key(BASE, allocation)
    # Options that change only the allocation share the key when the formats come out the same.
    other = BASE.with_allocation(scorer="diagonal", first_last="keep-8bit")
    assert model_key(other.with_analysis(formats=("int4", "int8")), allocation) == key
    assert model_key(BASE, _allocation("int8", "int4")) != key
    off = replace(BASE, recovery=RecoveryConfig(enabled=False))
    assert model_key(off, allocation) != key
    # GPTQ rounds against the curvature images' input moments: their count matters then.
    nearest = BASE.with_analysis(scheme=QuantScheme(rounding="nearest"))
    assert model_key(nearest, allocation) == model_key(
        nearest.with_analysis(num_samples=512), allocation
    )
    gptq = BASE.with_analysis(scheme=QuantScheme(rounding="gptq"))
    assert model_key(gptq, allocation) != model_key(gptq.with_analysis(num_samples=512), allocation)


def test_scheme_slug_names_the_scheme():
    assert scheme_slug(QuantScheme(clipping="minmax", rounding="nearest")) == "asym-channel-minmax"
    grouped = QuantScheme(
        symmetric=True,
        granularity="group",
        group_size=64,
        clipping="percentile",
        percentile=99.0,
        rounding="gptq",
        gptq_damp=0.1,
    )
    assert scheme_slug(grouped) == "sym-group64-p99-gptq0.1"
    assert scheme_slug(QuantScheme(rounding="nearest")) == "asym-channel-mse100"
