"""GPTQ input second moments (`lcpaq.quant.input_stats.collect_input_hessians`): H = E[x xᵀ] of the
patches each output element sees, so that tr(Δ H Δᵀ) is the mean squared output change."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import conv_inputs, make_tiny_conv_net
from torch import nn

from lcpaq.errors import InputError
from lcpaq.quant.input_stats import collect_input_hessians
from lcpaq.sensitivity.candidates import output_error

pytestmark = pytest.mark.usefixtures("single_thread")


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
    with pytest.raises(
        InputError,
        match="never ran a linear or convolution operation on the calibration inputs: unused$",
    ):
        collect_input_hessians(model, ["layer", "unused"], inputs)
    # The hooks are gone afterwards: a later forward pass is unaffected.
    assert all(not module._forward_pre_hooks for module in model.modules())


def test_input_hessians_refuse_unsupported_layers() -> None:
    model = nn.Sequential(nn.Conv3d(1, 2, 1))
    with pytest.raises(InputError, match="never ran a linear or convolution operation"):
        collect_input_hessians(model, ["0"], torch.randn(2, 1, 2, 2, 2))
    assert not model[0]._forward_pre_hooks
