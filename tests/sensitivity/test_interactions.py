"""The analyze stage's entry point `lcpaq.sensitivity.interactions.compute_interactions` (each source
gives its estimator's result) and `pair_formats`."""

from __future__ import annotations

import numpy as np
import pytest
from interaction_cases import FORMATS, model_and_data

from lcpaq.model.graph import discover_layers
from lcpaq.sensitivity.cross_terms import hessian_cross_terms
from lcpaq.sensitivity.interaction_terms import (
    select_pairs,
)
from lcpaq.sensitivity.interactions import compute_interactions, pair_formats
from lcpaq.sensitivity.measured_interactions import measured_interactions

pytestmark = pytest.mark.usefixtures("single_thread")


def test_pair_formats_keep_the_narrow_formats() -> None:
    names = ("int2", "int3", "int4", "int5", "int8", "fp4_e2m1", "fp8_e4m3")
    assert pair_formats(names, 4) == ("int2", "int3", "int4", "fp4_e2m1")
    assert pair_formats(names, 8) == names
    assert pair_formats(names, 1) == ()


@pytest.mark.parametrize("source", ["hessian", "gauss-newton", "forward"])
def test_compute_interactions_dispatches_to_the_estimators(source: str) -> None:
    model, inputs, labels = model_and_data("tiny_conv")
    layers = discover_layers(model, inputs)
    pairs = select_pairs(len(layers), "all")
    terms = compute_interactions(
        model, layers, inputs, labels, FORMATS[:2], source=source, pairs=pairs, batch_size=4
    )
    if source == "forward":
        expected = measured_interactions(
            model, layers, inputs, labels, FORMATS[:2], pairs=pairs, loss="kl"
        )
    else:
        batches = [(inputs[:4], labels[:4]), (inputs[4:8], labels[4:8]), (inputs[8:], labels[8:])]
        curvature = "hessian" if source == "hessian" else "gauss_newton"
        expected = hessian_cross_terms(
            model, layers, batches, FORMATS[:2], pairs=pairs, curvature=curvature
        )
    assert terms.method == expected.method and terms.pairs == pairs
    for pair in pairs:
        np.testing.assert_allclose(terms.cross[pair], expected.cross[pair], rtol=1e-12, atol=0)
        np.testing.assert_allclose(terms.stderr[pair], expected.stderr[pair], rtol=1e-12, atol=0)
    if source == "hessian":  # three batches: standard errors over batches exist
        assert all(np.all(np.isfinite(error)) for error in terms.stderr.values())
        with pytest.raises(ValueError, match="labels"):
            compute_interactions(
                model, layers, inputs, None, FORMATS[:1], source=source, pairs=pairs
            )
    with pytest.raises(ValueError, match="source"):
        compute_interactions(
            model,
            layers,
            inputs,
            labels,
            FORMATS[:1],
            source="magic",
            pairs=pairs,  # type: ignore[arg-type]
        )
