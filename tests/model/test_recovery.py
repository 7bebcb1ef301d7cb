"""Statistics correction in `lcpaq.model.recovery`: after correction the quantized model's BatchNorm
outputs and biased-layer outputs have the FP32 model's per-channel moments on the calibration data."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TinyConvNet, conv_inputs, make_tiny_conv_net
from torch import nn

from lcpaq.errors import InputError
from lcpaq.model.graph import discover_layers
from lcpaq.model.recovery import (
    collect_input_hessians,
    collect_reference_stats,
    correct_statistics,
    correction_points,
)
from lcpaq.quant.checkpoint import quantize_model
from lcpaq.quant.formats import QuantScheme
from lcpaq.sensitivity.candidates import output_error

pytestmark = pytest.mark.usefixtures("single_thread")

ASSIGNMENT = {"conv1": "int2", "conv2": "int3", "fc": "int3"}


def _channel_moments(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = tensor.detach().transpose(0, 1).reshape(tensor.shape[1], -1).double()
    return flat.mean(1), flat.var(1, unbiased=False)


def _record(model: nn.Module, names: list[str], inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outputs of the named modules on one forward pass."""
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda _m, _a, out, name=name: outputs.__setitem__(name, out.detach())
        )
        for name in names
    ]
    with torch.no_grad():
        model(inputs)
    for handle in handles:
        handle.remove()
    return outputs


def calibrated_conv_net(inputs: torch.Tensor) -> TinyConvNet:
    """The tiny conv net with BatchNorm running statistics equal to the moments of its own inputs
    on ``inputs`` (as if BN had been trained on exactly this data), set layer by layer."""
    model = make_tiny_conv_net()
    with torch.no_grad():
        for name in ("bn1", "bn2"):
            norm = model.get_submodule(name)
            captured: list[torch.Tensor] = []
            handle = norm.register_forward_pre_hook(
                lambda _m, args, store=captured: store.append(args[0])
            )
            model(inputs)
            handle.remove()
            mean, var = _channel_moments(captured[0])
            norm.running_mean.copy_(mean.float())
            norm.running_var.copy_(var.float())
    return model


def _quantized(model: TinyConvNet, inputs: torch.Tensor) -> nn.Module:
    layers = discover_layers(model, inputs)
    scheme = QuantScheme(symmetric=True, granularity="channel", clipping="minmax")
    quantized, _ = quantize_model(model, layers, ASSIGNMENT, scheme)
    return quantized


def _assert_moments_match(
    fp_model: nn.Module, quantized: nn.Module, inputs: torch.Tensor, watched: list[str]
) -> None:
    reference, after = _record(fp_model, watched, inputs), _record(quantized, watched, inputs)
    for name in watched:
        mean_fp, var_fp = _channel_moments(reference[name])
        mean_q, var_q = _channel_moments(after[name])
        torch.testing.assert_close(mean_q, mean_fp, rtol=0, atol=1e-5)
        if not isinstance(quantized.get_submodule(name), nn.Linear):
            # BN matches the variance as well; bias correction only shifts the mean.
            torch.testing.assert_close(var_q, var_fp, rtol=1e-4, atol=1e-6)


def test_correction_matches_fp32_moments_after_each_norm_and_bias() -> None:
    inputs = conv_inputs(64, seed=5)
    fp_model = calibrated_conv_net(inputs)
    quantized = _quantized(fp_model, inputs)
    watched = ["bn1", "bn2", "fc"]
    reference = _record(fp_model, watched, inputs)
    before = _record(quantized, watched, inputs)
    # Quantization to 2-3 bits really shifts the statistics (otherwise this test proves nothing).
    mean_fp, var_fp = _channel_moments(reference["bn2"])
    mean_q, var_q = _channel_moments(before["bn2"])
    assert (mean_q - mean_fp).abs().max() > 0.05 or (var_q / var_fp - 1).abs().max() > 0.1

    report = correct_statistics(fp_model, quantized, inputs, list(ASSIGNMENT))
    assert report.num_samples == 64
    assert report.corrected_norms == 2
    assert report.corrected_biases == 2  # conv2 and fc carry a bias; conv1 does not
    assert report.single_pass
    _assert_moments_match(fp_model, quantized, inputs, watched)
    # The FP32 model is left untouched.
    assert torch.equal(fp_model.bn1.running_mean, calibrated_conv_net(inputs).bn1.running_mean)


def test_correction_matches_fp32_moments_when_running_stats_differ_from_calibration() -> None:
    """BN running statistics from other data than the calibration set (the usual case: BN was
    trained on the training set, calibration is a different subset or label-free data)."""
    fp_model = make_tiny_conv_net()  # running statistics unrelated to the calibration inputs
    inputs = conv_inputs(64, seed=5)
    quantized = _quantized(fp_model, inputs)
    correct_statistics(fp_model, quantized, inputs, list(ASSIGNMENT))
    _assert_moments_match(fp_model, quantized, inputs, ["bn1", "bn2", "fc"])


def test_linear_bias_gets_mean_output_difference() -> None:
    """A model with one quantized Linear and nothing before it: bias += E[y_fp - y_q] exactly."""
    torch.manual_seed(0)
    fp_model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3, bias=False)).eval()
    inputs = torch.randn(50, 6, generator=torch.Generator().manual_seed(1)) + 0.5
    layers = discover_layers(fp_model, inputs)
    scheme = QuantScheme(symmetric=True, granularity="channel", clipping="mse")
    quantized, _ = quantize_model(fp_model, layers, {"0": "int2", "2": "int2"}, scheme)
    with torch.no_grad():
        expected = (fp_model[0](inputs) - quantized[0](inputs)).double().mean(0)
    old_bias = quantized[0].bias.detach().clone()
    old_weights = [quantized[index].weight.detach().clone() for index in (0, 2)]
    report = correct_statistics(fp_model, quantized, inputs, ["0", "2"])
    assert report.corrected_biases == 1 and report.corrected_norms == 0
    torch.testing.assert_close(
        (quantized[0].bias.detach() - old_bias).double(), expected, rtol=1e-5, atol=1e-6
    )
    assert torch.equal(quantized[0].weight, old_weights[0])  # weights are not touched
    assert torch.equal(quantized[2].weight, old_weights[1])
    assert (quantized[0].bias.detach() - old_bias).abs().max() > 1e-3  # a real correction
    with torch.no_grad():
        torch.testing.assert_close(
            quantized[0](inputs).mean(0), fp_model[0](inputs).mean(0), rtol=0, atol=1e-5
        )


@pytest.mark.parametrize("batch_size", [256, 7])
def test_single_pass_and_micro_batches_in_lockstep_agree(batch_size: int) -> None:
    fp_model = make_tiny_conv_net()
    inputs = conv_inputs(64, seed=6)
    base = _quantized(fp_model, inputs)
    single, prefix = copy.deepcopy(base), copy.deepcopy(base)
    one = correct_statistics(fp_model, single, inputs, list(ASSIGNMENT), batch_size=batch_size)
    two = correct_statistics(
        fp_model, prefix, inputs, list(ASSIGNMENT), batch_size=batch_size, single_pass_max_bytes=0
    )
    assert one.single_pass and not two.single_pass
    assert (one.corrected_norms, one.corrected_biases) == (
        two.corrected_norms,
        two.corrected_biases,
    )
    single_state, prefix_state = single.state_dict(), prefix.state_dict()
    changed = 0
    for key, value in base.state_dict().items():
        if not torch.equal(single_state[key], value):
            changed += 1
        # Equal up to float rounding: micro-batches sum their moments in another order.
        torch.testing.assert_close(prefix_state[key], single_state[key], rtol=1e-6, atol=1e-8)
    # running_mean/var of bn1, bn2 and the biases of conv2 and fc were corrected.
    assert changed == 6


def test_micro_batches_in_lockstep_match_fp32_moments() -> None:
    inputs = conv_inputs(50, seed=7)
    fp_model = calibrated_conv_net(inputs)
    quantized = _quantized(fp_model, inputs)
    report = correct_statistics(
        fp_model, quantized, inputs, list(ASSIGNMENT), batch_size=7, single_pass_max_bytes=0
    )
    assert not report.single_pass
    _assert_moments_match(fp_model, quantized, inputs, ["bn1", "bn2", "fc"])


def test_reference_stats_can_be_reused() -> None:
    fp_model = make_tiny_conv_net()
    inputs = conv_inputs(32, seed=8)
    base = _quantized(fp_model, inputs)
    direct, reused = copy.deepcopy(base), copy.deepcopy(base)
    correct_statistics(fp_model, direct, inputs, list(ASSIGNMENT))
    reference = collect_reference_stats(fp_model, inputs, list(ASSIGNMENT))
    correct_statistics(fp_model, reused, inputs, list(ASSIGNMENT), reference=reference)
    for key, value in direct.state_dict().items():
        assert torch.equal(reused.state_dict()[key], value), key


def test_reference_moments_follow_execution_order() -> None:
    fp_model = make_tiny_conv_net()
    reference = collect_reference_stats(fp_model, conv_inputs(8), list(ASSIGNMENT))
    assert list(reference.moments) == ["bn1", "conv2", "bn2", "fc"]
    assert reference.points == {"bn1": "norm", "bn2": "norm", "conv2": "bias", "fc": "bias"}
    assert correction_points(fp_model, ["conv1"]) == [("bn1", "norm"), ("bn2", "norm")]


def test_unquantized_model_is_left_as_it_is() -> None:
    """Correcting a model against itself changes nothing (beyond float rounding)."""
    fp_model = make_tiny_conv_net()
    inputs = conv_inputs(32, seed=9)
    copy_model = copy.deepcopy(fp_model)
    correct_statistics(fp_model, copy_model, inputs, list(ASSIGNMENT))
    for key, value in fp_model.state_dict().items():
        torch.testing.assert_close(copy_model.state_dict()[key], value, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Input second moments for GPTQ (`collect_input_hessians`).


class _Wrapped(nn.Module):
    """One layer after a fixed nonlinearity (inputs with a non-zero mean), plus a layer that never
    runs."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.unused = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(torch.nn.functional.softplus(x) - 0.3 * x)


#: (layer, input shape of one sample): every supported kind of layer and convolution option.
HESSIAN_LAYERS = {
    "linear": (lambda: nn.Linear(7, 5), (7,)),
    "linear-tokens": (lambda: nn.Linear(6, 4, bias=False), (3, 6)),  # [N, T, F]: N·T positions
    "conv2d": (lambda: nn.Conv2d(3, 5, 3, padding=1), (3, 6, 6)),
    "conv2d-strided-grouped": (
        lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2),
        (4, 9, 8),
    ),
    "conv2d-reflect": (
        lambda: nn.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(2, 1), padding_mode="reflect"),
        (2, 7, 6),
    ),
    "conv2d-same-even-kernel": (
        lambda: nn.Conv2d(2, 3, 4, padding="same", dilation=(1, 2), padding_mode="circular"),
        (2, 7, 9),
    ),
    "conv2d-depthwise": (
        lambda: nn.Conv2d(3, 6, 3, groups=3, padding_mode="replicate", padding=1),
        (3, 5, 5),
    ),
    "conv1d": (
        lambda: nn.Conv1d(
            4, 6, 3, stride=2, padding=2, dilation=2, groups=2, padding_mode="reflect"
        ),
        (4, 11),
    ),
    "conv1d-plain": (lambda: nn.Conv1d(3, 2, 1), (3, 5)),
}


def _hessian_case(kind: str, count: int = 10) -> tuple[nn.Module, torch.Tensor]:
    factory, shape = HESSIAN_LAYERS[kind]
    torch.manual_seed(7)
    model = _Wrapped(factory()).eval()
    inputs = torch.randn(count, *shape, generator=torch.Generator().manual_seed(8))
    return model, inputs


@pytest.mark.parametrize("kind", HESSIAN_LAYERS)
def test_input_hessians_give_the_mean_squared_output_of_any_weight_change(kind: str) -> None:
    """E over samples and output positions of ‖conv(x, Δ)‖² (no bias) = Σ_g tr(Δ_g H_g Δ_gᵀ)
    for any Δ of the weight's shape, Δ_g the flattened rows of group g: H is E[x xᵀ] of the
    patches each output sees, with the layer's own padding, stride, dilation and groups."""
    model, inputs = _hessian_case(kind)
    layer = model.layer
    hessians = collect_input_hessians(model, ["layer"], inputs)
    hessian = hessians["layer"]
    assert list(hessians) == ["layer"] and hessian.dtype == torch.float32
    groups = getattr(layer, "groups", 1)
    fan_in = layer.weight[0].numel()
    assert hessian.shape == ((fan_in, fan_in) if groups == 1 else (groups, fan_in, fan_in))
    per_group = hessian.double().reshape(groups, fan_in, fan_in)
    # The layer's input, and a float64 copy of the layer that computes conv(x, Δ).
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    with torch.no_grad():
        model(inputs)
    handle.remove()
    probe = copy.deepcopy(layer).double()
    probe.bias = None
    generator = torch.Generator().manual_seed(9)
    for _ in range(3):
        delta = torch.randn(layer.weight.shape, generator=generator, dtype=torch.float64)
        with torch.no_grad():
            probe.weight.copy_(delta)
            output = probe(captured[0].double())
        # Output channels on the last axis: one row per (sample, position).
        per_position = output.movedim(1, -1) if isinstance(layer, nn.Conv1d | nn.Conv2d) else output
        squares = per_position.reshape(-1, layer.weight.shape[0]).pow(2).sum(1)
        expected = float(squares.mean())
        rows = delta.reshape(groups, -1, fan_in)
        predicted = float(torch.einsum("gof,gfh,goh->", rows, per_group, rows))
        assert predicted == pytest.approx(expected, rel=1e-5)
        # The candidate table's output error is that, per unit of mean input energy.
        energy = float(per_group.diagonal(dim1=1, dim2=2).sum()) / (groups * fan_in)
        assert output_error(delta, hessian) * energy == pytest.approx(expected, rel=1e-5)


def test_input_hessians_of_a_grouped_layer_in_a_network() -> None:
    """The tiny conv net's layers: conv2 (groups=2) gets one H per group, fc gets XᵀX/N of its
    flattened inputs; every H is symmetric positive semi-definite."""
    model = make_tiny_conv_net()
    inputs = conv_inputs(6)
    hessians = collect_input_hessians(model, ["conv1", "conv2", "fc"], inputs)
    assert hessians["conv1"].shape == (9, 9)
    assert hessians["conv2"].shape == (2, 18, 18)
    assert hessians["fc"].shape == (54, 54)
    captured = _record(model, ["bn2"], inputs)  # fc sees relu(bn2(.)) flattened
    fc_inputs = torch.relu(captured["bn2"]).flatten(1).double()
    torch.testing.assert_close(
        hessians["fc"].double(), fc_inputs.T @ fc_inputs / len(fc_inputs), rtol=1e-5, atol=1e-6
    )
    for hessian in hessians.values():
        torch.testing.assert_close(hessian, hessian.transpose(-1, -2))
        assert bool((torch.linalg.eigvalsh(hessian.double()) > -1e-5).all())


def test_input_hessians_do_not_depend_on_the_batch_size() -> None:
    model, inputs = _hessian_case("conv2d-strided-grouped", count=11)
    whole = collect_input_hessians(model, ["layer"], inputs)["layer"]
    for batch_size in (1, 4):
        batched = collect_input_hessians(model, ["layer"], inputs, batch_size=batch_size)
        torch.testing.assert_close(batched["layer"], whole, rtol=1e-6, atol=1e-7)


def test_input_hessians_of_a_layer_that_never_runs() -> None:
    model, inputs = _hessian_case("linear")
    with pytest.raises(InputError, match="never ran on the calibration inputs: unused$"):
        collect_input_hessians(model, ["layer", "unused"], inputs)
    # The hooks are gone afterwards: a later forward pass is unaffected.
    assert all(not module._forward_pre_hooks for module in model.modules())


def test_input_hessians_refuse_unsupported_layers() -> None:
    model = nn.Sequential(nn.Conv3d(1, 2, 1))
    with pytest.raises(InputError, match="GPTQ rounding supports Conv1d, Conv2d and Linear"):
        collect_input_hessians(model, ["0"], torch.randn(2, 1, 2, 2, 2))
    assert not model[0]._forward_pre_hooks


def test_micro_batches_in_lockstep_equal_the_single_pass_in_float64() -> None:
    """The lockstep path computes what the single pass computes: in float64 the corrected
    statistics agree to rounding of the sums (1e-12)."""
    fp_model = make_tiny_conv_net(torch.float64)
    inputs = conv_inputs(40, torch.float64, seed=11)
    base = _quantized(fp_model, inputs)
    single, stepped = copy.deepcopy(base), copy.deepcopy(base)
    correct_statistics(fp_model, single, inputs, list(ASSIGNMENT))
    correct_statistics(
        fp_model, stepped, inputs, list(ASSIGNMENT), batch_size=6, single_pass_max_bytes=0
    )
    for key, value in single.state_dict().items():
        torch.testing.assert_close(stepped.state_dict()[key], value, rtol=1e-12, atol=1e-12)


def _deep_net(blocks: int) -> nn.Sequential:
    torch.manual_seed(3)
    layers: list[nn.Module] = [nn.Conv2d(1, 4, 3, padding=1)]
    for _ in range(blocks):
        layers += [nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(4 * 36, 3)).eval()


def test_each_micro_batch_runs_every_module_once() -> None:
    """Linear in depth: with micro-batches every module runs once per micro-batch (the former
    prefix passes ran the first module once per corrected module)."""
    fp_model = _deep_net(6)
    inputs = conv_inputs(30, seed=12)
    names = [name for name, m in fp_model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    layers = discover_layers(fp_model, inputs)
    scheme = QuantScheme(symmetric=True, granularity="channel", clipping="mse")
    quantized, _ = quantize_model(fp_model, layers, dict.fromkeys(names, "int3"), scheme)
    calls: dict[str, int] = {}
    for name, module in quantized.named_children():
        module.register_forward_hook(
            lambda *_args, name=name: calls.__setitem__(name, calls.get(name, 0) + 1)
        )
    reference = collect_reference_stats(fp_model, inputs, names)
    calls.clear()  # only what the correction runs counts (one probe sample, then the passes)
    report = correct_statistics(
        fp_model,
        quantized,
        inputs,
        names,
        batch_size=8,
        single_pass_max_bytes=0,
        reference=reference,
    )
    assert not report.single_pass and report.corrected_norms == 6
    assert set(calls.values()) == {1 + 4}  # the size probe, then 4 micro-batches of <= 8
    _assert_moments_match(fp_model, quantized, inputs, ["1", "4", str(len(quantized) - 1)])


def test_a_failure_inside_a_micro_batch_is_raised() -> None:
    fp_model = make_tiny_conv_net()
    inputs = conv_inputs(20, seed=13)
    quantized = _quantized(fp_model, inputs)
    reference = collect_reference_stats(fp_model, inputs, list(ASSIGNMENT))

    def fail(_module, args):
        if args[0].shape[0] < 7:  # the last micro-batch only
            raise InputError("stop here")

    quantized.bn2.register_forward_pre_hook(fail)
    with pytest.raises(InputError, match="stop here"):
        correct_statistics(
            fp_model,
            quantized,
            inputs,
            list(ASSIGNMENT),
            batch_size=7,
            single_pass_max_bytes=0,
            reference=reference,
        )


class _TokenNet(nn.Module):
    """A Linear on token inputs [N, T, C] (channels last), then a head on the mean token."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.proj = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.proj(x)).mean(1))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("batch_size", [256, 3])
def test_linear_bias_on_tokens_is_corrected_along_the_last_axis(masked, batch_size) -> None:
    """Linear on [N, T, C]: the correction is per output channel (last axis), over real tokens
    when a token mask is given (padded positions do not count)."""
    fp_model = _TokenNet().eval()
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(10, 7, 6, generator=generator) + 0.3
    mask = torch.rand(10, 7, generator=generator) > 0.4 if masked else None
    if mask is not None:
        inputs[~mask] = 50.0  # padding that would dominate any mean it entered
    layers = discover_layers(fp_model, inputs)
    scheme = QuantScheme(symmetric=True, granularity="channel", clipping="mse")
    quantized, _ = quantize_model(fp_model, layers, {"proj": "int2"}, scheme)
    with torch.no_grad():
        difference = fp_model.proj(inputs) - quantized.proj(inputs)
    real = difference[mask] if mask is not None else difference.reshape(-1, 5)
    expected = real.double().mean(0)
    old_bias = quantized.proj.bias.detach().clone()
    correct_statistics(
        fp_model,
        quantized,
        inputs,
        ["proj"],
        batch_size=batch_size,
        single_pass_max_bytes=0 if batch_size < 10 else 1 << 40,
        token_mask=mask,
    )
    torch.testing.assert_close(
        (quantized.proj.bias.detach() - old_bias).double(), expected, rtol=1e-5, atol=1e-6
    )
