"""Curvature estimators in `lcpaq.sensitivity.hessian` against exact linear algebra on tiny float64 nets.

Oracles: the explicit Gauss-Newton matrix J^T H_out J built from full Jacobians, exact Hessian blocks
from torch.autograd.functional.hessian, per-sample gradients taken one sample at a time, and
PyHessian's whole-model Hutchinson trace.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    exact_hessian_block_traces,
    explicit_gauss_newton,
    make_tiny_conv_net,
    make_tiny_mlp,
    weight_jacobians,
)
from torch import nn

from lcpaq.errors import InputError
from lcpaq.model.graph import LayerInfo, discover_layers
from lcpaq.sensitivity import hessian
from lcpaq.sensitivity.hessian import (
    CurvatureEstimate,
    flag_estimates,
    gauss_newton_traces,
    hutchinson_traces,
    per_sample_weight_grads,
    probes_for_tolerance,
    single_layer_hutchinson_traces,
)

pytestmark = pytest.mark.usefixtures("single_thread")

# ---------------------------------------------------------------------------------------------
# Models covering every layer kind the per-sample gradient code handles.


class GroupedConvNet(nn.Module):
    """Strided, padded, grouped and dilated Conv2d layers (one with reflect padding), BN, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, (3, 2), padding=(2, 1), dilation=(2, 1), groups=2, bias=False)
        self.conv3 = nn.Conv2d(6, 2, 3, padding=1, padding_mode="reflect")
        self.fc = nn.Linear(2 * 3 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, 2, 6, 6]
        out = torch.tanh(self.bn(self.conv1(x)))  # [N, 4, 3, 3]
        out = torch.tanh(self.conv2(out))  # [N, 6, 3, 4]
        out = torch.tanh(self.conv3(out))  # [N, 2, 3, 4]
        return self.fc(out.flatten(1))


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(3, 4, 3, stride=2, padding=2)
        self.conv2 = nn.Conv1d(4, 4, 3, padding=1, groups=2, padding_mode="circular", bias=False)
        self.fc = nn.Linear(4 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, 3, 9]
        out = torch.tanh(self.conv1(x))  # [N, 4, 6]
        out = torch.tanh(self.conv2(out))
        return self.fc(out.flatten(1))


class SequenceNet(nn.Module):
    """Linear layers applied to a [N, T, in] sequence, then a classifier on the flattened output."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 5)
        self.mix = nn.Linear(5, 2, bias=False)
        self.head = nn.Linear(4 * 2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, 4, 3]
        out = self.mix(torch.tanh(self.embed(x)))  # [N, 4, 2]
        return self.head(torch.tanh(out).flatten(1))


class SharedWeightNet(nn.Module):
    """One Linear applied twice: its curvature is that of the summed contributions."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def _build(kind: str) -> tuple[nn.Module, torch.Tensor]:
    """A float64 model in eval mode and 10 inputs for it, both from fixed seeds."""
    generator = torch.Generator().manual_seed(123)
    if kind == "tiny_conv":
        model = make_tiny_conv_net(torch.float64)
        return model, torch.randn(10, 1, 6, 6, generator=generator, dtype=torch.float64)
    if kind == "mlp":
        return make_tiny_mlp(torch.float64), torch.randn(
            10, 5, generator=generator, dtype=torch.float64
        )
    torch.manual_seed(7)
    model, shape = {
        "grouped_conv": (GroupedConvNet, (10, 2, 6, 6)),
        "conv1d": (Conv1dNet, (10, 3, 9)),
        "sequence": (SequenceNet, (10, 4, 3)),
        "shared": (SharedWeightNet, (10, 4)),
    }[kind]
    net = model().double().eval()
    with torch.no_grad():  # make the logits large enough that softmax is far from uniform
        for parameter in net.parameters():
            parameter.mul_(2.0)
    return net, torch.randn(*shape, generator=generator, dtype=torch.float64)


MODEL_KINDS = ["tiny_conv", "mlp", "grouped_conv", "conv1d", "sequence", "shared"]


def _layers(model: nn.Module, inputs: torch.Tensor) -> tuple[LayerInfo, ...]:
    return discover_layers(model, inputs)


# ---------------------------------------------------------------------------------------------
# Gauss-Newton traces.


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_gauss_newton_matches_explicit_matrix(kind: str, loss: str) -> None:
    model, inputs = _build(kind)
    layers = _layers(model, inputs)
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
        model, inputs = _build(kind)
        layers = _layers(model, inputs)
        estimate = gauss_newton_traces(model, layers, [inputs])
        exact, _ = explicit_gauss_newton(model, [layer.name for layer in layers], inputs)
        np.testing.assert_allclose(estimate.trace, exact, rtol=1e-8, atol=0)


@pytest.mark.parametrize("kind", ["tiny_conv", "sequence"])
def test_gauss_newton_streaming_gives_the_same_result(kind: str) -> None:
    model, inputs = _build(kind)
    layers = _layers(model, inputs)
    whole = gauss_newton_traces(model, layers, [inputs])
    parts = gauss_newton_traces(model, layers, iter([inputs[:3], inputs[3:8], inputs[8:]]))
    assert parts.num_samples == whole.num_samples == len(inputs)
    np.testing.assert_allclose(parts.trace, whole.trace, rtol=1e-12, atol=0)
    np.testing.assert_allclose(parts.trace_stderr, whole.trace_stderr, rtol=1e-9, atol=0)
    np.testing.assert_allclose(parts.sample_traces, whole.sample_traces, rtol=1e-6)
    for name in whole.layer_names:
        np.testing.assert_allclose(parts.diagonal[name], whole.diagonal[name], rtol=1e-6)


def test_gauss_newton_aligned_micro_batches_give_the_same_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, inputs = _build("tiny_conv")
    layers = _layers(model, inputs)
    whole = gauss_newton_traces(model, layers, [inputs])
    largest = max(layer.num_params for layer in layers)
    # Micro-batches of 6 (sample, factor) pairs = 2 samples x 3 classes.
    monkeypatch.setattr(hessian, "PER_SAMPLE_ELEMENTS_LIMIT", 6 * largest)
    split = gauss_newton_traces(model, layers, [inputs])
    np.testing.assert_allclose(split.trace, whole.trace, rtol=1e-12)
    np.testing.assert_allclose(split.sample_traces, whole.sample_traces, rtol=1e-6)


def test_gauss_newton_unaligned_micro_batches_give_the_same_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, inputs = _build("tiny_conv")
    layers = _layers(model, inputs)
    whole = gauss_newton_traces(model, layers, [inputs])
    largest = max(layer.num_params for layer in layers)
    # Micro-batches of 7 (sample, factor) pairs with 3 classes: 7 is not a multiple of 3.
    monkeypatch.setattr(hessian, "PER_SAMPLE_ELEMENTS_LIMIT", 7 * largest)
    split = gauss_newton_traces(model, layers, [inputs])
    np.testing.assert_allclose(split.trace, whole.trace, rtol=1e-6)


@pytest.mark.parametrize("limit_factors", [1, 2])
def test_gauss_newton_factor_chunks_give_the_same_result(
    monkeypatch: pytest.MonkeyPatch, limit_factors: int
) -> None:
    """Backward passes in chunks of 1 or 2 of the 3 factors (bounded memory) change nothing."""
    model, inputs = _build("grouped_conv")
    layers = _layers(model, inputs)
    whole = gauss_newton_traces(model, layers, [inputs])
    with torch.no_grad():
        per_factor = sum(output.numel() for output in _layer_outputs(model, layers, inputs))
    monkeypatch.setattr(hessian, "FACTOR_GRADS_ELEMENTS_LIMIT", limit_factors * per_factor)
    assert hessian.factor_chunk(3, per_factor) == limit_factors
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
    layers = _layers(model, inputs)
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
    model, inputs = _build("mlp")
    layers = _layers(model, inputs)
    with pytest.raises(ValueError, match="no calibration samples"):
        gauss_newton_traces(model, layers, [])
    ghost = LayerInfo("ghost", "ghost.weight", "Linear", (2, 2), 4, 4, 9, False)
    model.ghost = nn.Linear(2, 2).double()
    with pytest.raises(ValueError, match="'ghost' did not run"):
        gauss_newton_traces(model, (*layers, ghost), [inputs])
    per_position = nn.Sequential(nn.Linear(3, 5)).double().eval()
    sequence = torch.randn(2, 4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"logits of shape \[batch, classes\]"):
        gauss_newton_traces(per_position, _layers(per_position, sequence), [sequence])


# ---------------------------------------------------------------------------------------------
# Per-sample gradients.

PER_SAMPLE_CASES = {
    "conv2d_grouped_strided": (
        lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
        (5, 4, 7, 6),
    ),
    "conv2d_dilated_asym": (
        lambda: nn.Conv2d(2, 3, (3, 2), stride=(1, 2), padding=(2, 1), dilation=2),
        (5, 2, 6, 7),
    ),
    "conv2d_reflect": (lambda: nn.Conv2d(3, 2, 3, padding=1, padding_mode="reflect"), (4, 3, 5, 5)),
    "conv2d_same": (lambda: nn.Conv2d(2, 2, 4, padding="same", bias=False), (3, 2, 6, 6)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), (5, 3, 9)),
    "conv1d_circular_grouped": (
        lambda: nn.Conv1d(4, 2, 3, padding=1, groups=2, padding_mode="circular"),
        (4, 4, 8),
    ),
    "linear": (lambda: nn.Linear(6, 4), (5, 6)),
    "linear_sequence": (lambda: nn.Linear(6, 4), (5, 3, 6)),
    "linear_2d_sequence": (lambda: nn.Linear(3, 2), (4, 2, 5, 3)),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("case", list(PER_SAMPLE_CASES))
def test_per_sample_weight_grads_match_one_sample_at_a_time(case: str) -> None:
    factory, shape = PER_SAMPLE_CASES[case]
    torch.manual_seed(5)
    module = factory().double()
    generator = torch.Generator().manual_seed(6)
    inputs = torch.randn(*shape, generator=generator, dtype=torch.float64)
    outputs = module(inputs)
    grad_outputs = torch.randn(outputs.shape, generator=generator, dtype=torch.float64)
    fast = per_sample_weight_grads(module, inputs, grad_outputs)
    assert fast.shape == (shape[0], *module.weight.shape)
    for index in range(shape[0]):
        value = (grad_outputs[index : index + 1] * module(inputs[index : index + 1])).sum()
        (expected,) = torch.autograd.grad(value, module.weight)
        torch.testing.assert_close(fast[index], expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Hutchinson.


def _labelled(kind: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model, inputs = _build(kind)
    with torch.no_grad():
        classes = model(inputs[:1]).shape[-1]
    labels = torch.randint(0, classes, (len(inputs),), generator=torch.Generator().manual_seed(9))
    return model, inputs, labels


@pytest.mark.parametrize(("kind", "probes"), [("mlp", 400), ("tiny_conv", 400)])
def test_hutchinson_within_three_standard_errors_of_exact_blocks(kind: str, probes: int) -> None:
    model, inputs, labels = _labelled(kind)
    layers = _layers(model, inputs)
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
    model, inputs, labels = _labelled("mlp")
    layers = _layers(model, inputs)
    one = hutchinson_traces(model, layers, [(inputs, labels)], max_probes=24, rel_tol=0.0, seed=3)
    split = [(inputs[:3], labels[:3]), (inputs[3:], labels[3:])]
    two = hutchinson_traces(model, layers, split, max_probes=24, rel_tol=0.0, seed=3)
    np.testing.assert_allclose(two.trace, one.trace, rtol=1e-10)
    np.testing.assert_allclose(two.trace_stderr, one.trace_stderr, rtol=1e-8)


def test_hutchinson_stops_at_tolerance_and_validates() -> None:
    model, inputs, labels = _labelled("mlp")
    layers = _layers(model, inputs)
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
    model, inputs, labels = _labelled(kind)
    layers = _layers(model, inputs)
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
    model, inputs, labels = _labelled("tiny_conv")
    layers = _layers(model, inputs)
    single = single_layer_hutchinson_traces(
        model, layers, [(inputs, labels)], rel_tol=0.0, min_probes=64, max_probes_per_layer=64
    )
    joint = hutchinson_traces(model, layers, [(inputs, labels)], max_probes=64, rel_tol=0.0)
    assert np.median(single.trace_stderr / joint.trace_stderr) < 1.0


def test_single_layer_budgets_follow_variance_and_caps() -> None:
    model, inputs, labels = _labelled("tiny_conv")
    layers = _layers(model, inputs)
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


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
def test_exact_block_traces_agree_with_pyhessian() -> None:
    """Whole-model Hutchinson trace from PyHessian vs the sum of exact per-layer block traces
    (all parameters are weights: no bias, no BatchNorm)."""
    pyhessian = pytest.importorskip("pyhessian")
    torch.manual_seed(21)
    model = nn.Sequential(
        nn.Linear(5, 6, bias=False), nn.Tanh(), nn.Linear(6, 3, bias=False)
    ).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(2.0)
    model.eval()
    generator = torch.Generator().manual_seed(22)
    inputs = torch.randn(12, 5, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (12,), generator=generator)
    names = ["0", "2"]
    exact_total = sum(exact_hessian_block_traces(model, names, inputs, labels))

    torch.manual_seed(0)  # PyHessian draws its probes from torch's global RNG
    computer = pyhessian.hessian(model, nn.CrossEntropyLoss(), data=(inputs, labels), cuda=False)
    samples = np.array(computer.trace(maxIter=300, tol=float("-inf")))
    assert len(samples) == 300
    stderr = samples.std(ddof=1) / np.sqrt(len(samples))
    assert abs(samples.mean() - exact_total) <= 4 * stderr
    assert stderr < 0.2 * abs(exact_total)

    # lcpaq's joint-probe Hutchinson reads the same estimator per layer; its sum agrees too.
    fresh = nn.Sequential(nn.Linear(5, 6, bias=False), nn.Tanh(), nn.Linear(6, 3, bias=False))
    fresh = fresh.double().eval()
    fresh.load_state_dict(model.state_dict())
    layers = _layers(fresh, inputs)
    ours = hutchinson_traces(fresh, layers, [(inputs, labels)], max_probes=300, rel_tol=0.0)
    ours_total_se = float(np.sqrt((ours.trace_stderr**2).sum()))  # conservative upper bound
    assert abs(ours.trace.sum() - samples.mean()) <= 4 * np.hypot(stderr, ours_total_se)


# ---------------------------------------------------------------------------------------------
# Flags and clamping.


def test_flag_estimates() -> None:
    trace = np.array([-1.0, 0.0, 0.1, 0.2, 5.0, 1e-9])
    stderr = np.array([0.1, 0.1, 0.1, 0.1, 0.1, 0.0])
    assert flag_estimates(trace, stderr) == (
        "negative",
        "negative",
        "insignificant",
        "",  # exactly 2 standard errors is significant
        "",
        "",
    )


def test_clamped_trace_replaces_non_positive_values() -> None:
    trace = np.array([-1.0, 0.0, 2.0])
    estimate = CurvatureEstimate(
        layer_names=("a", "b", "c"),
        trace=trace,
        trace_stderr=np.zeros(3),
        num_samples=1,
        method="test",
        num_probes=0,
        flags=flag_estimates(trace, np.zeros(3)),
    )
    np.testing.assert_array_equal(estimate.clamped_trace(), [2e-12, 2e-12, 2.0])
    assert estimate.flags == ("negative", "negative", "")


def test_cross_entropy_factors_reproduce_the_output_hessian() -> None:
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    factors, sampled = hessian.output_hessian_factors(logits, "cross_entropy", None)
    assert not sampled
    assert factors.shape == (4, 5, 4)
    probs = torch.softmax(logits, dim=-1)
    expected = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    rebuilt = torch.einsum("kni,knj->nij", factors, factors)
    torch.testing.assert_close(rebuilt, expected, rtol=0, atol=1e-7)
    # The output Hessian is the one of cross-entropy: check against autograd for one sample.
    label = torch.tensor([2])
    autograd_hessian = torch.autograd.functional.hessian(
        lambda z: F.cross_entropy(z[None], label), logits[0]
    )
    torch.testing.assert_close(autograd_hessian, expected[0], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Losses: MSE and KL to the FP32 outputs, against torch.autograd.functional.hessian.


def _mean_loss_of_layer_weight(
    model: nn.Module, name: str, inputs: torch.Tensor, labels: torch.Tensor, loss: str
):
    """w ↦ mean loss with layer ``name``'s weight replaced by w (flat); KL's reference is FP32."""
    params = {key: value.detach() for key, value in model.named_parameters()}
    params.update(dict(model.named_buffers()))
    shape = params[f"{name}.weight"].shape
    with torch.no_grad():
        reference = torch.log_softmax(model(inputs), dim=-1)

    def mean_loss(flat: torch.Tensor) -> torch.Tensor:
        logits = torch.func.functional_call(
            model, {**params, f"{name}.weight": flat.reshape(shape)}, (inputs,)
        )
        if loss == "kl":  # KL(p_FP || p) with p_FP fixed
            log_p = torch.log_softmax(logits, dim=-1)
            return (reference.exp() * (reference - log_p)).sum(-1).mean()
        if loss == "mse":
            return (logits - F.one_hot(labels, logits.shape[-1])).pow(2).mean(-1).mean()
        return F.cross_entropy(logits, labels)

    return mean_loss, params[f"{name}.weight"].reshape(-1)


def exact_hessian_blocks(
    model: nn.Module, names: list[str], inputs: torch.Tensor, labels: torch.Tensor, loss: str
) -> list[torch.Tensor]:
    """The diagonal Hessian blocks H_ll [n_l, n_l] of the mean loss, by torch.autograd.functional."""
    blocks = []
    for name in names:
        function, flat = _mean_loss_of_layer_weight(model, name, inputs, labels, loss)
        blocks.append(torch.autograd.functional.hessian(function, flat))
    return blocks


def explicit_gauss_newton_blocks(
    model: nn.Module, names: list[str], inputs: torch.Tensor
) -> list[torch.Tensor]:
    """(1/N) Σ_n J_nᵀ (diag(p) − ppᵀ) J_n per layer, from explicit Jacobians."""
    logits, jacobians = weight_jacobians(model, names, inputs)
    probs = torch.softmax(logits, dim=-1)
    h_out = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    return [torch.einsum("ncp,ncd,ndq->pq", jac, h_out, jac) / len(inputs) for jac in jacobians]


@pytest.mark.parametrize("kind", ["mlp", "tiny_conv", "grouped_conv"])
def test_kl_hessian_at_the_fp32_point_is_the_gauss_newton_matrix(kind: str) -> None:
    """KL(p_FP ‖ p)'s gradient p − p_FP vanishes at the FP32 weights, so its exact Hessian has no
    residual term: every block equals Jᵀ(diag(p) − ppᵀ)J, and lcpaq's ``kl`` traces and diagonals
    are exact Hessian traces. Cross-entropy with labels keeps a residual term (the contrast)."""
    model, inputs, labels = _labelled(kind)
    layers = _layers(model, inputs)
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
    layers = _layers(model, inputs)
    (block,) = exact_hessian_blocks(model, ["0"], inputs, labels, "mse")
    estimate = gauss_newton_traces(model, layers, [inputs], loss="mse")
    np.testing.assert_allclose(estimate.trace, [float(torch.trace(block))], rtol=1e-12)
    np.testing.assert_allclose(
        estimate.trace, [2.0 / 3.0 * 3 * float(inputs.pow(2).sum(1).mean())], rtol=1e-12
    )


@pytest.mark.parametrize("loss", ["mse", "kl"])  # cross-entropy: the tests above
@pytest.mark.parametrize(
    "estimator", ["joint", "single_layer"], ids=["hutchinson", "single_layer_hutchinson"]
)
def test_hutchinson_estimators_follow_the_loss(loss: str, estimator: str) -> None:
    """Both Hutchinson estimators agree with the exact Hessian traces of the chosen loss (3 SE)."""
    model, inputs, labels = _labelled("tiny_conv")
    layers = _layers(model, inputs)
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


def test_summed_loss_values_and_errors() -> None:
    generator = torch.Generator().manual_seed(8)
    logits = torch.randn(4, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 2, 1, 2])
    mse = hessian.summed_loss(logits, labels, "mse")
    expected = ((logits - F.one_hot(labels, 3)) ** 2).mean(1).sum()
    torch.testing.assert_close(mse, expected)
    targets = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(
        hessian.summed_loss(logits, targets, "mse"), ((logits - targets) ** 2).mean(1).sum()
    )
    torch.testing.assert_close(
        hessian.summed_loss(logits, labels, "cross_entropy"),
        F.cross_entropy(logits, labels, reduction="sum"),
    )
    kl = hessian.summed_loss(logits, None, "kl")  # at its own reference: zero, zero gradient
    assert float(kl.detach()) == 0.0
    (grad,) = torch.autograd.grad(kl, logits)
    assert float(grad.abs().max()) < 1e-15
    with pytest.raises(InputError, match="needs labels"):
        hessian.summed_loss(logits, None, "cross_entropy")
    with pytest.raises(InputError, match="mse targets have shape"):
        hessian.summed_loss(logits, torch.zeros(4, 2, dtype=torch.float64), "mse")
    with pytest.raises(InputError, match="loss must be one of"):
        hessian.summed_loss(logits, labels, "hinge")  # type: ignore[arg-type]
    model, inputs = _build("mlp")
    with pytest.raises(InputError, match="loss must be one of"):
        gauss_newton_traces(model, _layers(model, inputs), [inputs], loss="l1")  # type: ignore[arg-type]


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_single_layer_hutchinson_with_gauss_newton_control_variate(loss: str) -> None:
    """tr(G_ll) exact + Hutchinson on v(H − G)v: unbiased for tr(H_ll), far less probe noise."""
    model, inputs, labels = _labelled("grouped_conv")  # tanh: a real residual term
    layers = _layers(model, inputs)
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
    model, inputs, labels = _labelled("tiny_conv")
    layers = _layers(model, inputs)
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


# ---------------------------------------------------------------------------------------------
# The estimator option of the pipeline (lcpaq analyze --estimator).


def test_analyze_with_the_hutchinson_estimator(tmp_path, capsys) -> None:
    """``--estimator hutchinson`` scores with Hutchinson traces (SEs, GN control variate); the
    options round-trip through run_config.json; a cap below 2 probes per layer is an input error."""
    import json

    from safetensors.torch import save_file

    from lcpaq import runfolder
    from lcpaq.cli import main
    from lcpaq.config import RunConfig
    from lcpaq.model.demo import DigitsNet

    torch.manual_seed(0)
    net = DigitsNet().eval()
    save_file(
        {k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "net.safetensors"
    )
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "data.npz",
        x=rng.integers(0, 255, (24, 1, 8, 8), dtype=np.uint8),
        y=rng.integers(0, 10, 24),
    )
    base = [
        "-q",
        "analyze",
        "--model",
        "demo-digits",
        "--checkpoint",
        str(tmp_path / "net.safetensors"),
    ]
    base += ["--calib", str(tmp_path / "data.npz"), "--normalize", "none", "--num-samples", "24"]
    base += ["--batch-size", "12", "--estimator", "hutchinson", "--loss", "kl"]
    out = tmp_path / "run"
    probes = ["--hutchinson-probes", "30", "--hutchinson-rel-tol", "0.01"]
    assert main([*base, *probes, "--out", str(out)]) == 0
    curvature = runfolder.load_curvature(out / "curvature.npz")
    assert curvature.method == "hutchinson_single_layer_gn_control"
    assert curvature.num_samples == 24 and curvature.num_probes <= 30
    assert np.all(curvature.trace_stderr >= 0) and np.all(curvature.trace > 0)
    assert not (out / "hutchinson.npz").exists()
    config = json.loads((out / "run_config.json").read_text())["analysis"]
    assert (config["estimator"], config["hutchinson_probes"], config["loss"]) == (
        "hutchinson",
        30,
        "kl",
    )
    assert (
        RunConfig.from_dict(
            json.loads((out / "run_config.json").read_text())
        ).analysis.hutchinson_rel_tol
        == 0.01
    )
    assert main([*base, "--hutchinson-probes", "6", "--out", str(tmp_path / "bad")]) == 2
    assert "below 2 probes per layer" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "bad")]) == 2
    assert "needs a probe cap" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
def test_pyhessian_backend_trace_and_top_eigenvalue_against_the_explicit_hessian() -> None:
    """`pyhessian_check` over two batches: the trace and top eigenvalue of the Hessian of the mean
    cross-entropy over the layers' weights (biases frozen), against the explicit matrix."""
    pytest.importorskip("pyhessian")
    torch.manual_seed(31)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    generator = torch.Generator().manual_seed(32)
    inputs = torch.randn(16, 4, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (16,), generator=generator)
    layers = _layers(model, inputs)
    shapes = [model[0].weight.shape, model[2].weight.shape]
    sizes = [int(np.prod(shape)) for shape in shapes]

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        first, second = flat.split(sizes)
        params = {
            "0.weight": first.view(shapes[0]),
            "0.bias": model[0].bias.detach(),
            "2.weight": second.view(shapes[1]),
            "2.bias": model[2].bias.detach(),
        }
        logits = torch.func.functional_call(model, params, (inputs,))
        return F.cross_entropy(logits, labels)

    flat = torch.cat([model[0].weight.detach().ravel(), model[2].weight.detach().ravel()])
    matrix = torch.autograd.functional.hessian(loss_of, flat)
    exact_trace = float(torch.trace(matrix))
    exact_top = float(torch.linalg.eigvalsh(matrix).max())

    state = torch.random.get_rng_state()
    batches = [(inputs[:8], labels[:8]), (inputs[8:], labels[8:])]
    check = hessian.pyhessian_check(model, layers, batches, max_iter=400, tol=-1.0, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert check.num_samples == 16 and check.num_probes == 400
    assert abs(check.trace - exact_trace) <= 4 * check.trace_stderr
    assert check.trace_stderr < 0.2 * abs(exact_trace)
    assert check.top_eigenvalues[0] == pytest.approx(exact_top, rel=1e-3)
    with pytest.raises(InputError, match="pyhessian-iters"):
        hessian.pyhessian_check(model, layers, batches, max_iter=1)
