"""Activation sensitivity (`lcpaq.sensitivity.activation`) against explicit oracles on tiny float64 nets.

Oracles: per-sample Jacobians of the logits with respect to a perturbation added to one layer's
input (torch.autograd.functional.jacobian) give the exact J_nᵀ H_out J_n; the exact Hessian of the
mean KL(p_FP ‖ p) with respect to that perturbation (torch.autograd.functional.hessian) equals it at
the FP32 point; the noise comes from a quantizer written out here and from torch's float8 cast.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_conv_net
from torch import nn

from lcpaq.errors import InputError
from lcpaq.model.graph import discover_layers
from lcpaq.quant.activations import (
    ActivationQuantizer,
    activation_quantizers,
    attach_activation_quantizers,
    quantize_activation,
    range_statistics,
)
from lcpaq.sensitivity.activation import ActivationState, activation_scores, activation_sensitivity
from lcpaq.sensitivity.activation_file import (
    load_activation_sensitivity,
    save_activation_sensitivity,
)

pytestmark = pytest.mark.usefixtures("single_thread")


class TwoBranchNet(nn.Module):
    """One tensor feeds two layers (as a residual block's input feeds conv1 and the shortcut), and
    one Linear runs twice: each layer's activation curvature must be its own path only."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Linear(4, 5)
        self.right = nn.Linear(4, 5, bias=False)
        self.shared = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.left(x)) + torch.relu(self.right(x))
        hidden = torch.tanh(self.shared(torch.tanh(self.shared(hidden))))
        return self.head(hidden)


def _problem(kind: str) -> tuple[nn.Module, torch.Tensor]:
    generator = torch.Generator().manual_seed(31)
    if kind == "tiny_conv":
        return make_tiny_conv_net(torch.float64), torch.randn(
            9, 1, 6, 6, generator=generator, dtype=torch.float64
        )
    torch.manual_seed(32)
    model = TwoBranchNet().double().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1.5)
    return model, torch.randn(9, 4, generator=generator, dtype=torch.float64)


def _calls(model: nn.Module, name: str, inputs: torch.Tensor) -> list[torch.Tensor]:
    """The inputs of every call of layer ``name`` in one forward pass."""
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().clone())
    )
    with torch.no_grad():
        model(inputs)
    handle.remove()
    return seen


def _perturbed_logits(model: nn.Module, name: str, inputs: torch.Tensor, num_calls: int):
    """deltas ↦ logits with deltas[c] added to the input of call c of layer ``name``."""

    def logits(*deltas: torch.Tensor) -> torch.Tensor:
        calls = iter(deltas)
        handle = model.get_submodule(name).register_forward_pre_hook(
            lambda _m, args: (args[0] + next(calls), *args[1:])
        )
        try:
            return model(inputs)
        finally:
            handle.remove()

    return logits


def explicit_activation_curvature(
    model: nn.Module, name: str, inputs: torch.Tensor
) -> tuple[np.ndarray, list[torch.Tensor]]:
    """Per-sample tr(J_nᵀ(diag p − ppᵀ)J_n) [N] (summed over calls) and, per call, the per-element
    diagonal [N, ...], from the explicit Jacobian of the logits w.r.t. each call's input."""
    calls = _calls(model, name, inputs)
    zeros = tuple(torch.zeros_like(call) for call in calls)
    function = _perturbed_logits(model, name, inputs, len(calls))
    with torch.no_grad():
        probs = torch.softmax(model(inputs), dim=-1)
    h_out = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    jacobians = torch.autograd.functional.jacobian(function, zeros)
    count = len(inputs)
    traces = np.zeros(count)
    diagonals = []
    for call, jacobian in zip(calls, jacobians):
        jacobian = jacobian.reshape(count, probs.shape[1], count, -1)
        per_sample = torch.stack([jacobian[n, :, n] for n in range(count)])  # [N, C, n_a]
        diagonal = torch.einsum("nck,ncd,ndk->nk", per_sample, h_out, per_sample)
        traces += diagonal.sum(1).numpy()
        diagonals.append(diagonal.reshape(call.shape))
    return traces, diagonals


def reference_quantize(values: torch.Tensor, name: str, low: float, high: float) -> torch.Tensor:
    """Per-tensor static quantizers written out: asymmetric INT (METHOD §0) and torch's E4M3 cast."""
    if name == "fp8_e4m3":
        scale = max(abs(low), abs(high)) / 448.0
        return (values / scale).to(torch.float8_e4m3fn).to(values.dtype) * scale
    bits = int(name.removeprefix("int"))
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / (2**bits - 1)
    zero = np.clip(round(-low / scale), 0, 2**bits - 1)
    codes = torch.clamp(torch.round(values / scale) + zero, 0, 2**bits - 1)
    return (codes - zero) * scale


FORMATS = ("int8", "int6", "int4", "fp8_e4m3")


@pytest.mark.parametrize("kind", ["tiny_conv", "two_branch"])
def test_activation_sensitivity_matches_explicit_oracle(kind: str) -> None:
    model, inputs = _problem(kind)
    layers = discover_layers(model, inputs)
    names = [layer.name for layer in layers]
    batches = [inputs[:4], inputs[4:]]
    result = activation_sensitivity(model, layers, batches, FORMATS, loss="cross_entropy")
    assert result.layer_names == tuple(names)
    assert result.format_names == FORMATS
    assert result.num_samples == len(inputs)
    assert result.method == "gauss_newton"
    for index, name in enumerate(names):
        calls = _calls(model, name, inputs)
        traces, diagonals = explicit_activation_curvature(model, name, inputs)
        assert traces.mean() > 1e-6  # the oracle is not trivially zero
        np.testing.assert_allclose(result.trace[index], traces.mean(), rtol=1e-9)
        np.testing.assert_allclose(
            result.trace_stderr[index], traces.std(ddof=1) / np.sqrt(len(traces)), rtol=1e-7
        )
        np.testing.assert_allclose(result.sample_traces[:, index], traces, rtol=1e-6)
        low = min(float(call.min()) for call in calls)
        high = max(float(call.max()) for call in calls)
        np.testing.assert_allclose([result.low[index], result.high[index]], [low, high])
        assert result.num_elements[index] == sum(call[0].numel() for call in calls)
        for column, format_name in enumerate(FORMATS):
            errors = [
                (reference_quantize(call, format_name, low, high) - call).pow(2) for call in calls
            ]
            noise = sum(float(error.sum()) for error in errors) / (
                len(inputs) * result.num_elements[index]
            )
            assert noise > 0
            np.testing.assert_allclose(result.noise[index, column], noise, rtol=1e-9)
            weighted = sum(
                (diagonal * error).flatten(1).sum(1) for diagonal, error in zip(diagonals, errors)
            )
            np.testing.assert_allclose(
                result.weighted[index, column], float(weighted.mean()), rtol=1e-9
            )
    scores = activation_scores(result)
    np.testing.assert_allclose(scores, 0.5 * result.trace[:, None] * result.noise)
    np.testing.assert_allclose(activation_scores(result, "diagonal"), 0.5 * result.weighted)
    # Fewer bits, more noise (same range): INT4 > INT6 > INT8 on every layer.
    assert np.all(scores[:, 2] > scores[:, 1]) and np.all(scores[:, 1] > scores[:, 0])


def test_kl_activation_curvature_is_the_exact_hessian() -> None:
    """At the FP32 point the Hessian of the mean KL(p_FP ‖ p) w.r.t. a layer's input is exactly the
    Gauss–Newton block: its trace is the activation trace, its diagonal gives ``weighted``."""
    model, inputs = _problem("two_branch")
    layers = discover_layers(model, inputs)
    result = activation_sensitivity(model, layers, [inputs], ("int4",), loss="kl")
    with torch.no_grad():
        reference = torch.log_softmax(model(inputs), dim=-1)
    for index, layer in enumerate(layers):
        if layer.name == "shared":
            continue  # two calls: covered by the Jacobian oracle above
        (call,) = _calls(model, layer.name, inputs)
        function = _perturbed_logits(model, layer.name, inputs, 1)

        def mean_kl(delta: torch.Tensor, function=function) -> torch.Tensor:
            log_p = torch.log_softmax(function(delta), dim=-1)
            return (reference.exp() * (reference - log_p)).sum(-1).mean()

        hessian = torch.autograd.functional.hessian(mean_kl, torch.zeros_like(call))
        hessian = hessian.reshape(call.numel(), call.numel())
        # The mean loss carries 1/N: tr(H) = (1/N) Σ_n tr(H_n) = the mean per-sample trace.
        np.testing.assert_allclose(result.trace[index], float(torch.trace(hessian)), rtol=1e-9)
        error = quantize_activation(call, "int4", result.low[index], result.high[index]) - call
        expected = float((hessian.diagonal() * error.reshape(-1).pow(2)).sum())
        np.testing.assert_allclose(result.weighted[index, 0], expected, rtol=1e-9)


def test_float_activation_formats() -> None:
    model, inputs = _problem("tiny_conv")
    model, inputs = model.float(), inputs.float()
    layers = discover_layers(model, inputs)
    result = activation_sensitivity(model, layers, [inputs], ("fp32", "fp16", "bf16"))
    np.testing.assert_array_equal(result.noise[:, 0], 0.0)  # fp32 on a float32 model: no noise
    assert np.all(result.noise[:, 2] > result.noise[:, 1])  # bf16 is coarser than fp16
    assert np.all(result.noise[:, 1] > 0)


def test_streaming_over_batches_gives_the_same_result() -> None:
    model, inputs = _problem("tiny_conv")
    layers = discover_layers(model, inputs)
    formats = ("int8", "int4", "fp8_e4m3")
    whole = activation_sensitivity(model, layers, [inputs], formats)
    parts = activation_sensitivity(
        model, layers, iter([inputs[:2], inputs[2:7], inputs[7:]]), formats
    )
    np.testing.assert_allclose(parts.trace, whole.trace, rtol=1e-12)
    np.testing.assert_allclose(parts.trace_stderr, whole.trace_stderr, rtol=1e-9)
    np.testing.assert_allclose(parts.noise, whole.noise, rtol=1e-12)
    np.testing.assert_allclose(parts.weighted, whole.weighted, rtol=1e-12)


def test_round_trip_through_the_artifact(tmp_path: Path) -> None:
    model, inputs = _problem("two_branch")
    layers = discover_layers(model, inputs)
    result = activation_sensitivity(model, layers, [inputs[:5], inputs[5:]], ("int8", "int4"))
    path = save_activation_sensitivity(tmp_path / "activations.npz", result)
    loaded = load_activation_sensitivity(path)
    assert loaded.layer_names == result.layer_names
    assert loaded.format_names == result.format_names
    assert (loaded.num_samples, loaded.method, loaded.symmetric) == (9, "gauss_newton", False)
    for field in ("trace", "trace_stderr", "noise", "weighted", "low", "high", "num_elements"):
        np.testing.assert_array_equal(getattr(loaded, field), getattr(result, field))
    with np.load(path) as archive:
        np.testing.assert_array_equal(archive["scores"], activation_scores(result))


def test_bad_input() -> None:
    model, inputs = _problem("tiny_conv")
    layers = discover_layers(model, inputs)
    with pytest.raises(InputError, match="unknown activation format 'int9'"):
        activation_sensitivity(model, layers, [inputs], ("int9",))
    with pytest.raises(ValueError, match="no calibration samples"):
        activation_sensitivity(model, layers, [], ("int8",))
    low, high, _ = range_statistics(model, layers, [(0, inputs)])
    with pytest.raises(ValueError, match="no calibration samples"):
        ActivationState.start(model, layers, ("int8",), low, high).finish()
    result = activation_sensitivity(model, layers, [inputs], ("int8",))
    with pytest.raises(InputError, match="unknown activation scorer"):
        activation_scores(result, "hessian")


# ---------------------------------------------------------------------------------------------
# Static activation quantization at inference applies the noise the analysis measured.


def _received(model: nn.Module, name: str, inputs: torch.Tensor) -> list[torch.Tensor]:
    """What layer ``name`` receives on each call, after any quantizer hook registered earlier."""
    return _calls(model, name, inputs)


@pytest.mark.parametrize("clipping", ["minmax", "mse"])
@pytest.mark.parametrize("format_name", ["int8", "int4", "fp8_e4m3", "fp4_e2m1", "bf16"])
def test_inference_quantizer_applies_the_noise_the_analysis_measured(
    format_name: str, clipping: str
) -> None:
    """One layer at a time: the input a hooked layer receives is Q(a) of its FP input, and its
    mean squared error per element is `ActivationSensitivity.noise` of that layer and format."""
    model, inputs = _problem("tiny_conv")
    layers = discover_layers(model, inputs)
    result = activation_sensitivity(model, layers, [inputs], (format_name,), clipping=clipping)
    for row, layer in enumerate(layers):
        (fp_input,) = _calls(model, layer.name, inputs)
        quantizers = activation_quantizers(result, {layer.name: format_name})
        handles = attach_activation_quantizers(model, quantizers)
        (received,) = _received(model, layer.name, inputs)
        for handle in handles:
            handle.remove()
        expected = quantize_activation(fp_input, format_name, *result.range_of(row, format_name))
        torch.testing.assert_close(received, expected, rtol=0, atol=0)
        noise = float((received - fp_input).pow(2).mean())
        assert noise == pytest.approx(float(result.noise[row, 0]), rel=1e-9)
        # The handles undo it: the layer sees its FP32 input again.
        (after,) = _calls(model, layer.name, inputs)
        torch.testing.assert_close(after, fp_input, rtol=0, atol=0)


def test_inference_quantizer_covers_every_call_and_every_consumer() -> None:
    """A layer that runs twice is quantized on both calls; a tensor feeding two layers is
    quantized separately for each (with each layer's own range), and only where asked."""
    model, inputs = _problem("two_branch")
    layers = discover_layers(model, inputs)
    result = activation_sensitivity(model, layers, [inputs], ("int4",))
    quantizers = activation_quantizers(result, {"shared": "int4", "left": "int4", "right": "fp32"})
    assert set(quantizers) == {"shared", "left"}  # fp32 needs no quantizer
    attach_activation_quantizers(model, quantizers)
    for call in _received(model, "shared", inputs):
        assert torch.equal(call, quantizers["shared"](call))  # already on the grid: idempotent
    (left,) = _received(model, "left", inputs)
    (right,) = _received(model, "right", inputs)
    torch.testing.assert_close(left, quantizers["left"](inputs), rtol=0, atol=0)
    torch.testing.assert_close(right, inputs, rtol=0, atol=0)


def test_activation_quantizers_take_the_analysed_ranges() -> None:
    """`activation_quantizers` reads each layer's calibrated range from the analysis; a layer the
    analysis did not cover is refused by name."""
    model, inputs = _problem("tiny_conv")
    result = activation_sensitivity(model, discover_layers(model, inputs), [inputs], ("int8",))
    row = result.layer_names.index("conv1")
    quantizers = activation_quantizers(result, {"conv1": "int8"})
    assert quantizers == {"conv1": ActivationQuantizer("int8", *result.range_of(row, "int8"))}
    with pytest.raises(InputError, match="layer 'conv9' has no activation range"):
        activation_quantizers(result, {"conv9": "int8"})


def test_mse_clipping_per_format_and_its_artifact(tmp_path: Path) -> None:
    """Each format gets its own range (narrower for fewer bits); floating-point casts keep the
    observed range; the artifact keeps the ranges; a format not analysed falls back to min-max."""
    model, inputs = _problem("tiny_conv")
    model, inputs = model.float(), inputs.float()
    layers = discover_layers(model, inputs)
    formats = ("int4", "int8", "bf16")
    result = activation_sensitivity(
        model, layers, [inputs[:5], inputs[5:]], formats, clipping="mse"
    )
    minmax = activation_sensitivity(model, layers, [inputs[:5], inputs[5:]], formats)
    assert result.clipping == "mse" and minmax.clipping == "minmax"
    np.testing.assert_array_equal(result.low, minmax.low)
    for row in range(len(layers)):
        int4, int8, bf16 = (result.range_of(row, name) for name in formats)
        assert int4[1] <= int8[1] <= result.high[row]
        assert bf16 == (result.low[row], result.high[row])
        assert result.range_of(row, "fp8_e4m3") == (result.low[row], result.high[row])
        # The MSE ranges lower the measured noise of the coarse format on the same data.
        assert result.noise[row, 0] <= minmax.noise[row, 0] * 1.0001
    loaded = load_activation_sensitivity(
        save_activation_sensitivity(tmp_path / "activations.npz", result)
    )
    assert loaded.clipping == "mse"
    np.testing.assert_array_equal(loaded.clip_low, result.clip_low)
    np.testing.assert_array_equal(loaded.clip_high, result.clip_high)
    with pytest.raises(InputError, match="unknown activation clipping 'kl'"):
        activation_sensitivity(model, layers, [inputs], formats, clipping="kl")
