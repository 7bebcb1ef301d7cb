"""Exact Gauss–Newton traces in `lcpaq.sensitivity.gauss_newton` against explicit matrices on tiny
float64 nets: J^T H_out J from full Jacobians, and exact Hessian blocks from
torch.autograd.functional.hessian where the two coincide (KL at the FP32 point, MSE of a linear model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import explicit_gauss_newton
from curvature_cases import (
    MODEL_KINDS,
    build,
    exact_hessian_blocks,
    explicit_gauss_newton_blocks,
    labelled,
)
from torch import nn

from lcpaq.model.graph import LayerInfo, discover_layers
from lcpaq.sensitivity import losses, per_sample
from lcpaq.sensitivity.gauss_newton import gauss_newton_traces

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_gauss_newton_matches_explicit_matrix(kind: str, loss: str) -> None:
    model, inputs = build(kind)
    layers = discover_layers(model, inputs)
    names = [layer.name for layer in layers]
    estimate = gauss_newton_traces(model, layers, [inputs], loss=loss)
    exact_traces, exact_diagonals = explicit_gauss_newton(model, names, inputs, loss=loss)
    assert estimate.layer_names == tuple(names)
    assert estimate.method == "gauss_newton"
    assert estimate.num_samples == len(inputs)
    assert estimate.num_probes == 0
    # The model is float64 and lcpaq keeps its dtype: agreement is to rounding.
    np.testing.assert_allclose(estimate.trace, exact_traces, rtol=1e-9, atol=0)
    assert min(exact_traces) > 1e-4  # the oracle is not trivially zero
    for layer, exact in zip(layers, exact_diagonals):
        diagonal = estimate.diagonal[layer.name]
        assert diagonal.shape == layer.weight_shape
        np.testing.assert_allclose(
            diagonal.ravel(), exact.numpy(), rtol=1e-5, atol=1e-7 * float(exact.abs().max())
        )
    # The diagonal sums to the trace.
    sums = [float(estimate.diagonal[name].astype(np.float64).sum()) for name in names]
    np.testing.assert_allclose(sums, estimate.trace, rtol=1e-5)
    # Per-sample contributions average to the trace; the standard error is the one over samples.
    assert estimate.sample_traces.shape == (len(inputs), len(names))
    np.testing.assert_allclose(estimate.sample_traces.mean(0), estimate.trace, rtol=1e-5)
    expected_stderr = estimate.sample_traces.astype(np.float64).std(0, ddof=1) / np.sqrt(
        len(inputs)
    )
    np.testing.assert_allclose(estimate.trace_stderr, expected_stderr, rtol=1e-4)


def test_gauss_newton_float64_is_exact_to_1e8() -> None:
    for kind in MODEL_KINDS:
        model, inputs = build(kind)
        layers = discover_layers(model, inputs)
        estimate = gauss_newton_traces(model, layers, [inputs])
        exact, _ = explicit_gauss_newton(model, [layer.name for layer in layers], inputs)
        np.testing.assert_allclose(estimate.trace, exact, rtol=1e-8, atol=0)


@pytest.mark.parametrize("kind", ["tiny_conv", "sequence"])
def test_gauss_newton_streaming_gives_the_same_result(kind: str) -> None:
    model, inputs = build(kind)
    layers = discover_layers(model, inputs)
    whole = gauss_newton_traces(model, layers, [inputs])
    parts = gauss_newton_traces(model, layers, iter([inputs[:3], inputs[3:8], inputs[8:]]))
    assert parts.num_samples == whole.num_samples == len(inputs)
    np.testing.assert_allclose(parts.trace, whole.trace, rtol=1e-12, atol=0)
    np.testing.assert_allclose(parts.trace_stderr, whole.trace_stderr, rtol=1e-9, atol=0)
    np.testing.assert_allclose(parts.sample_traces, whole.sample_traces, rtol=1e-6)
    for name in whole.layer_names:
        np.testing.assert_allclose(parts.diagonal[name], whole.diagonal[name], rtol=1e-6)


# Micro-batches of 6 (sample, factor) pairs = 2 samples x 3 classes, and of 7 pairs with 3
# classes: 7 is not a multiple of 3, so a sample's factors straddle two micro-batches.
@pytest.mark.parametrize(("pairs_per_batch", "trace_rtol"), [(6, 1e-12), (7, 1e-6)])
def test_gauss_newton_micro_batches_give_the_same_result(
    monkeypatch: pytest.MonkeyPatch, pairs_per_batch: int, trace_rtol: float
) -> None:
    model, inputs = build("tiny_conv")
    layers = discover_layers(model, inputs)
    whole = gauss_newton_traces(model, layers, [inputs])
    largest = max(layer.num_params for layer in layers)
    monkeypatch.setattr(per_sample, "PER_SAMPLE_ELEMENTS_LIMIT", pairs_per_batch * largest)
    split = gauss_newton_traces(model, layers, [inputs])
    np.testing.assert_allclose(split.trace, whole.trace, rtol=trace_rtol)
    np.testing.assert_allclose(split.sample_traces, whole.sample_traces, rtol=1e-6)


@pytest.mark.parametrize("limit_factors", [1, 2])
def test_gauss_newton_factor_chunks_give_the_same_result(
    monkeypatch: pytest.MonkeyPatch, limit_factors: int
) -> None:
    """Backward passes in chunks of 1 or 2 of the 3 factors (bounded memory) change nothing."""
    model, inputs = build("grouped_conv")
    layers = discover_layers(model, inputs)
    whole = gauss_newton_traces(model, layers, [inputs])
    with torch.no_grad():
        per_factor = sum(output.numel() for output in _layer_outputs(model, layers, inputs))
    monkeypatch.setattr(losses, "FACTOR_GRADS_ELEMENTS_LIMIT", limit_factors * per_factor)
    assert losses.factor_chunk(3, per_factor) == limit_factors
    split = gauss_newton_traces(model, layers, [inputs])
    np.testing.assert_allclose(split.trace, whole.trace, rtol=1e-12)
    for name in whole.layer_names:
        np.testing.assert_allclose(split.diagonal[name], whole.diagonal[name], rtol=1e-6)
    assert not inputs.requires_grad  # the caller's tensor is left alone


def _layer_outputs(
    model: nn.Module, layers: tuple[LayerInfo, ...], inputs: torch.Tensor
) -> list[torch.Tensor]:
    outputs: list[torch.Tensor] = []
    handles = [
        model.get_submodule(layer.name).register_forward_hook(
            lambda _m, _a, out: outputs.append(out)
        )
        for layer in layers
    ]
    model(inputs)
    for handle in handles:
        handle.remove()
    return outputs


def test_gauss_newton_sampled_fisher_past_64_classes() -> None:
    """With > 64 classes labels are drawn from the model: unbiased, deterministic per seed."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 70)).double().eval()
    base = torch.randn(4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    inputs = base.repeat(150, 1)  # 600 samples, 150 label draws per distinct input
    layers = discover_layers(model, inputs)
    estimate = gauss_newton_traces(model, layers, [inputs], seed=11)
    assert estimate.method == "fisher_sampled"
    exact, _ = explicit_gauss_newton(model, [layer.name for layer in layers], base)
    assert np.all(np.abs(estimate.trace - exact) <= 4 * estimate.trace_stderr)
    assert np.all(estimate.trace_stderr < 0.2 * np.array(exact))
    again = gauss_newton_traces(model, layers, [inputs], seed=11)
    np.testing.assert_array_equal(again.trace, estimate.trace)
    other = gauss_newton_traces(model, layers, [inputs], seed=12)
    assert not np.array_equal(other.trace, estimate.trace)


def test_gauss_newton_input_errors() -> None:
    model, inputs = build("mlp")
    layers = discover_layers(model, inputs)
    with pytest.raises(ValueError, match="no calibration samples"):
        gauss_newton_traces(model, layers, [])
    ghost = LayerInfo("ghost", "ghost.weight", "Linear", (2, 2), 4, 4, 9, False)
    model.ghost = nn.Linear(2, 2).double()
    with pytest.raises(ValueError, match="'ghost' did not run"):
        gauss_newton_traces(model, (*layers, ghost), [inputs])
    per_position = nn.Sequential(nn.Linear(3, 5)).double().eval()
    sequence = torch.randn(2, 4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"logits of shape \[batch, classes\]"):
        gauss_newton_traces(per_position, discover_layers(per_position, sequence), [sequence])


@pytest.mark.parametrize("kind", ["mlp", "tiny_conv", "grouped_conv"])
def test_kl_hessian_at_the_fp32_point_is_the_gauss_newton_matrix(kind: str) -> None:
    """KL(p_FP ‖ p)'s gradient p − p_FP vanishes at the FP32 weights, so its exact Hessian has no
    residual term: every block equals Jᵀ(diag(p) − ppᵀ)J, and lcpaq's ``kl`` traces and diagonals
    are exact Hessian traces. Cross-entropy with labels keeps a residual term (the contrast)."""
    model, inputs, labels = labelled(kind)
    layers = discover_layers(model, inputs)
    names = [layer.name for layer in layers]
    kl_blocks = exact_hessian_blocks(model, names, inputs, labels, "kl")
    gn_blocks = explicit_gauss_newton_blocks(model, names, inputs)
    ce_blocks = exact_hessian_blocks(model, names, inputs, labels, "cross_entropy")
    estimate = gauss_newton_traces(model, layers, [inputs[:4], inputs[4:]], loss="kl")
    assert estimate.method == "gauss_newton"
    residuals = []
    for name, kl_block, gn_block, ce_block in zip(names, kl_blocks, gn_blocks, ce_blocks):
        scale = float(gn_block.abs().max())
        torch.testing.assert_close(kl_block, gn_block, rtol=0, atol=1e-10 * scale)
        residuals.append(float((ce_block - gn_block).abs().max()) / scale)
        np.testing.assert_allclose(
            estimate.trace[names.index(name)], float(torch.trace(kl_block)), rtol=1e-9
        )
        np.testing.assert_allclose(
            estimate.diagonal[name].ravel(),
            kl_block.diagonal().numpy(),
            rtol=1e-5,
            atol=1e-7 * scale,
        )
    # With tanh the logits are curved in the hidden weights, so the labelled cross-entropy keeps a
    # residual term there (ReLU nets are piecewise linear: no residual, as for every last layer).
    if kind != "tiny_conv":
        assert max(residuals[:-1]) > 1e-3
    cross_entropy = gauss_newton_traces(model, layers, [inputs], loss="cross_entropy")
    np.testing.assert_allclose(estimate.trace, cross_entropy.trace, rtol=1e-12)


def test_mse_gauss_newton_is_the_exact_hessian_of_a_linear_model() -> None:
    """For a linear model the MSE Hessian is exactly Gauss–Newton: (2/C)·mean_n ‖x_n‖² per output."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 3)).double().eval()
    inputs = torch.randn(7, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    labels = torch.randint(0, 3, (7,), generator=torch.Generator().manual_seed(4))
    layers = discover_layers(model, inputs)
    (block,) = exact_hessian_blocks(model, ["0"], inputs, labels, "mse")
    estimate = gauss_newton_traces(model, layers, [inputs], loss="mse")
    np.testing.assert_allclose(estimate.trace, [float(torch.trace(block))], rtol=1e-12)
    np.testing.assert_allclose(
        estimate.trace, [2.0 / 3.0 * 3 * float(inputs.pow(2).sum(1).mean())], rtol=1e-12
    )
