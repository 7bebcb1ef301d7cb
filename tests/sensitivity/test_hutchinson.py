"""Hutchinson estimators in `lcpaq.sensitivity.hutchinson` against exact Hessian blocks on tiny float64
nets (within three standard errors), their probe budgets, and the Gauss–Newton control variate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import exact_hessian_block_traces
from curvature_cases import exact_hessian_blocks, labelled

from lcpaq.model.graph import discover_layers
from lcpaq.sensitivity.curvature import flag_estimates
from lcpaq.sensitivity.gauss_newton import gauss_newton_traces
from lcpaq.sensitivity.hutchinson import (
    hutchinson_traces,
    probes_for_tolerance,
    single_layer_hutchinson_traces,
)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize(("kind", "probes"), [("mlp", 400), ("tiny_conv", 400)])
def test_hutchinson_within_three_standard_errors_of_exact_blocks(kind: str, probes: int) -> None:
    model, inputs, labels = labelled(kind)
    layers = discover_layers(model, inputs)
    names = [layer.name for layer in layers]
    exact = exact_hessian_block_traces(model, names, inputs, labels)
    batches = [(inputs[:4], labels[:4]), (inputs[4:], labels[4:])]
    estimate = hutchinson_traces(model, layers, batches, max_probes=probes, rel_tol=0.0, seed=0)
    assert estimate.method == "hutchinson"
    assert estimate.num_probes == probes
    assert estimate.num_samples == len(inputs)
    assert estimate.layer_names == tuple(names)
    deviation = np.abs(estimate.trace - np.array(exact))
    assert np.all(deviation <= 3 * estimate.trace_stderr), (estimate.trace, exact)
    # The check has teeth: the standard errors are small next to the total curvature.
    assert np.all(estimate.trace_stderr < 0.2 * np.abs(exact).sum())
    assert estimate.flags == flag_estimates(estimate.trace, estimate.trace_stderr)
    # Parameters' requires_grad flags are restored.
    assert all(parameter.requires_grad for parameter in model.parameters())


def test_hutchinson_is_deterministic_and_batching_invariant() -> None:
    model, inputs, labels = labelled("mlp")
    layers = discover_layers(model, inputs)
    one = hutchinson_traces(model, layers, [(inputs, labels)], max_probes=24, rel_tol=0.0, seed=3)
    split = [(inputs[:3], labels[:3]), (inputs[3:], labels[3:])]
    two = hutchinson_traces(model, layers, split, max_probes=24, rel_tol=0.0, seed=3)
    np.testing.assert_allclose(two.trace, one.trace, rtol=1e-10)
    np.testing.assert_allclose(two.trace_stderr, one.trace_stderr, rtol=1e-8)


def test_hutchinson_stops_at_tolerance_and_validates() -> None:
    model, inputs, labels = labelled("mlp")
    layers = discover_layers(model, inputs)
    loose = hutchinson_traces(
        model, layers, [(inputs, labels)], max_probes=400, min_probes=8, rel_tol=10.0, seed=0
    )
    assert loose.num_probes == 8
    with pytest.raises(ValueError, match="max_probes"):
        hutchinson_traces(model, layers, [(inputs, labels)], max_probes=1)
    with pytest.raises(ValueError, match="no calibration samples"):
        hutchinson_traces(model, layers, [(inputs[:0], labels[:0])])


@pytest.mark.parametrize("kind", ["mlp", "tiny_conv"])
def test_single_layer_hutchinson_within_three_standard_errors(kind: str) -> None:
    model, inputs, labels = labelled(kind)
    layers = discover_layers(model, inputs)
    names = [layer.name for layer in layers]
    exact = np.array(exact_hessian_block_traces(model, names, inputs, labels))
    batches = [(inputs[:4], labels[:4]), (inputs[4:], labels[4:])]
    estimate = single_layer_hutchinson_traces(
        model, layers, batches, rel_tol=0.0, min_probes=200, max_probes_per_layer=200
    )
    assert estimate.method == "hutchinson_single_layer"
    np.testing.assert_array_equal(estimate.probes_per_layer, [200] * len(layers))
    assert estimate.num_probes == 200 * len(layers)
    assert np.all(np.abs(estimate.trace - exact) <= 3 * estimate.trace_stderr), (
        estimate.trace,
        exact,
    )
    assert np.all(estimate.trace_stderr < 0.2 * np.abs(exact).sum())
    assert all(parameter.requires_grad for parameter in model.parameters())


def test_single_layer_probes_have_no_cross_block_variance() -> None:
    """Per-layer probes beat joint probes at equal probe count per layer (METHOD §1a (ii))."""
    model, inputs, labels = labelled("tiny_conv")
    layers = discover_layers(model, inputs)
    single = single_layer_hutchinson_traces(
        model, layers, [(inputs, labels)], rel_tol=0.0, min_probes=64, max_probes_per_layer=64
    )
    joint = hutchinson_traces(model, layers, [(inputs, labels)], max_probes=64, rel_tol=0.0)
    assert np.median(single.trace_stderr / joint.trace_stderr) < 1.0


def test_single_layer_budgets_follow_variance_and_caps() -> None:
    model, inputs, labels = labelled("tiny_conv")
    layers = discover_layers(model, inputs)
    estimate = single_layer_hutchinson_traces(
        model, layers, [(inputs, labels)], rel_tol=0.05, min_probes=4, max_probes_per_layer=30
    )
    probes = estimate.probes_per_layer
    assert np.all(probes >= 4) and np.all(probes <= 30)
    # Every layer either reached the tolerance or its cap (or would need more than the cap).
    variance = estimate.trace_stderr**2 * probes
    needed = probes_for_tolerance(estimate.trace, variance, 0.05)
    reached = estimate.trace_stderr <= 0.05 * np.abs(estimate.trace) + 1e-15
    assert np.all(reached | (probes == 30) | (needed > probes))
    capped = single_layer_hutchinson_traces(
        model, layers, [(inputs, labels)], rel_tol=1e-6, min_probes=3, max_total_probes=20
    )
    assert capped.num_probes == 20
    again = single_layer_hutchinson_traces(
        model, layers, [(inputs, labels)], rel_tol=1e-6, min_probes=3, max_total_probes=20
    )
    np.testing.assert_array_equal(again.trace, capped.trace)
    with pytest.raises(ValueError, match="min_probes"):
        single_layer_hutchinson_traces(model, layers, [(inputs, labels)], min_probes=1)
    with pytest.raises(ValueError, match="max_total_probes"):
        single_layer_hutchinson_traces(model, layers, [(inputs, labels)], max_total_probes=5)


def test_probes_for_tolerance() -> None:
    needed = probes_for_tolerance(np.array([2.0, 0.0, -1.0]), np.array([4.0, 1.0, 1.0]), 0.1)
    np.testing.assert_array_equal(needed, [100.0, np.inf, 100.0])


@pytest.mark.parametrize("loss", ["mse", "kl"])  # cross-entropy: the tests above
@pytest.mark.parametrize(
    "estimator", ["joint", "single_layer"], ids=["hutchinson", "single_layer_hutchinson"]
)
def test_hutchinson_estimators_follow_the_loss(loss: str, estimator: str) -> None:
    """Both Hutchinson estimators agree with the exact Hessian traces of the chosen loss (3 SE)."""
    model, inputs, labels = labelled("tiny_conv")
    layers = discover_layers(model, inputs)
    names = [layer.name for layer in layers]
    exact = np.array(
        [float(torch.trace(b)) for b in exact_hessian_blocks(model, names, inputs, labels, loss)]
    )
    batch_labels = None if loss == "kl" else labels  # KL needs no labels
    batches = [(inputs[:4], None if batch_labels is None else batch_labels[:4])]
    batches.append((inputs[4:], None if batch_labels is None else batch_labels[4:]))
    if estimator == "joint":
        estimate = hutchinson_traces(
            model, layers, batches, max_probes=300, rel_tol=0.0, seed=1, loss=loss
        )
    else:
        estimate = single_layer_hutchinson_traces(
            model, layers, batches, rel_tol=0.0, min_probes=150, max_probes_per_layer=150, loss=loss
        )
    assert np.all(np.abs(estimate.trace - exact) <= 3 * estimate.trace_stderr), (estimate, exact)
    assert np.all(estimate.trace_stderr < 0.25 * np.abs(exact).sum())


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_single_layer_hutchinson_with_gauss_newton_control_variate(loss: str) -> None:
    """tr(G_ll) exact + Hutchinson on v(H − G)v: unbiased for tr(H_ll), far less probe noise."""
    model, inputs, labels = labelled("grouped_conv")  # tanh: a real residual term
    layers = discover_layers(model, inputs)
    names = [layer.name for layer in layers]
    exact = np.array(
        [float(torch.trace(b)) for b in exact_hessian_blocks(model, names, inputs, labels, loss)]
    )
    batches = [(inputs[:4], labels[:4]), (inputs[4:], labels[4:])]
    gn = gauss_newton_traces(model, layers, [inputs[:4], inputs[4:]], loss=loss)
    options = {"rel_tol": 0.0, "min_probes": 60, "max_probes_per_layer": 60, "loss": loss}
    plain = single_layer_hutchinson_traces(model, layers, batches, **options)
    controlled = single_layer_hutchinson_traces(model, layers, batches, gauss_newton=gn, **options)
    assert controlled.method == "hutchinson_single_layer_gn_control"
    assert np.all(np.abs(controlled.trace - exact) <= 3 * controlled.trace_stderr + 1e-12)
    assert np.any(np.abs(gn.trace - exact) > 5 * controlled.trace_stderr)  # H ≠ G here
    # Here the residual dominates the hidden layers (strong tanh curvature), so the gain is small
    # there; the variance left is R's alone, and none is left where R vanishes (the last layer).
    assert np.median(controlled.trace_stderr / plain.trace_stderr) < 1.0
    assert controlled.trace_stderr[-1] < 1e-12 < plain.trace_stderr[-1]
    # The last layer's logits are linear in its weight: no residual, the estimate is exact.
    np.testing.assert_allclose(controlled.trace[-1], exact[-1], rtol=1e-9)


def test_control_variate_is_exact_for_relu_networks() -> None:
    """Logits of a ReLU network with eval-mode BatchNorm are piecewise linear in each layer's
    weight, so H_ll = G_ll even for the labelled cross-entropy: two probes give the exact trace."""
    model, inputs, labels = labelled("tiny_conv")
    layers = discover_layers(model, inputs)
    names = [layer.name for layer in layers]
    exact = exact_hessian_block_traces(model, names, inputs, labels)
    gn = gauss_newton_traces(model, layers, [inputs])
    np.testing.assert_allclose(gn.trace, exact, rtol=1e-9)
    estimate = single_layer_hutchinson_traces(
        model, layers, [(inputs, labels)], min_probes=2, gauss_newton=gn, rel_tol=0.01
    )
    np.testing.assert_array_equal(estimate.probes_per_layer, 2)
    np.testing.assert_allclose(estimate.trace, exact, rtol=1e-9)
    assert np.all(estimate.trace_stderr < 1e-9 * np.abs(estimate.trace))
    other = gauss_newton_traces(model, layers, [inputs[:5]])
    with pytest.raises(ValueError, match="same layers and samples"):
        single_layer_hutchinson_traces(model, layers, [(inputs, labels)], gauss_newton=other)
