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
    collect_reference_stats,
    correct_statistics,
    correction_points,
)
from lcpaq.quant.checkpoint import quantize_model
from lcpaq.quant.formats import QuantScheme

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


def test_text_models_get_no_statistics_correction() -> None:
    """Bias correction lowered all-MiniLM-L6-v2's cosine to FP32 (results/minilm_cosine_check.json):
    text models (they define token_mask) are left as quantized."""
    hf_models = pytest.importorskip("hf_models")
    from lcpaq.model.recovery import corrects_statistics
    from lcpaq.model.text import TextModel

    fp_model = TextModel(hf_models.tiny_model("bert"), "encoder")
    ids = hf_models.token_ids()
    inputs = torch.stack([ids, torch.ones_like(ids)], 1)
    layers = discover_layers(fp_model, inputs)
    assignment = dict.fromkeys((layer.name for layer in layers), "int2")
    quantized, _ = quantize_model(fp_model, layers, assignment, QuantScheme())
    before = {key: value.clone() for key, value in quantized.state_dict().items()}
    report = correct_statistics(fp_model, quantized, inputs, [layer.name for layer in layers])
    assert not corrects_statistics(fp_model) and corrects_statistics(_TokenNet())
    assert (report.corrected_norms, report.corrected_biases) == (0, 0)
    for key, value in quantized.state_dict().items():
        assert torch.equal(value, before[key]), key
