"""Per-sample weight gradients from captured operation calls (`lcpaq.sensitivity.per_sample`)
against torch.func's own per-sample gradients (vmap of grad), for every way a weight is met:
convolutions that pad in their own forward, padding='same', dilation, groups, Conv1d, Linear on
inputs of any rank, F.linear on a Linear's weight (Swin), nn.MultiheadAttention's in-projection
and out_proj (batch first or not), transformers' Conv1D; and the token Gram form of the squared
norm against the materialised gradient."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from lcpaq.model.graph import discover_layers, layer_parameter, weight_of
from lcpaq.model.op_capture import OpCapture
from lcpaq.sensitivity.per_sample import (
    gram_squared_norms,
    input_columns,
    output_grads,
    per_sample_grads_from_columns,
    per_sample_weight_grads,
)

pytestmark = pytest.mark.usefixtures("single_thread")


class StaticSamePadConv(nn.Conv2d):
    """efficientnet_pytorch's "static same padding": the module pads in its own forward."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.pad = nn.ZeroPad2d((1, 2, 0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            self.pad(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups
        )


class Seq(nn.Module):
    """One layer followed by a fixed nonlinearity (so gradients differ per position)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(x)
        return torch.tanh(out[0] if isinstance(out, tuple) else out)


class SwinLike(nn.Module):
    """Window attention that applies its projections with F.linear on the modules' weights."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(6, 18)
        self.proj = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        windows = x.reshape(x.shape[0] * 2, -1, 6)  # two windows per sample, sample-major
        q, k, v = F.linear(windows, self.qkv.weight, self.qkv.bias).chunk(3, dim=-1)
        attended = torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v
        return F.linear(attended, self.proj.weight, self.proj.bias).reshape(x.shape)


def _conv1d_transformers() -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return Seq(Conv1D(5, 4))


#: name → (model factory, input shape with N first, weight key)
CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], str]] = {
    "static-same-pad": (
        lambda: Seq(StaticSamePadConv(3, 4, 3, stride=2)),
        (3, 3, 7, 6),
        "layer.weight",
    ),
    "padding-same": (
        lambda: Seq(nn.Conv2d(2, 3, 4, padding="same", dilation=(1, 2))),
        (3, 2, 7, 9),
        "layer.weight",
    ),
    "dilated-grouped": (
        lambda: Seq(nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2)),
        (3, 4, 9, 8),
        "layer.weight",
    ),
    "reflect": (
        lambda: Seq(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")),
        (3, 2, 5, 5),
        "layer.weight",
    ),
    "depthwise": (
        lambda: Seq(nn.Conv2d(3, 3, 3, padding=1, groups=3)),
        (3, 3, 5, 5),
        "layer.weight",
    ),
    "conv1d": (
        lambda: Seq(nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2)),
        (3, 4, 11),
        "layer.weight",
    ),
    "conv1d-same": (lambda: Seq(nn.Conv1d(2, 3, 4, padding="same")), (3, 2, 9), "layer.weight"),
    "linear": (lambda: Seq(nn.Linear(5, 4)), (3, 5), "layer.weight"),
    "linear-tokens": (lambda: Seq(nn.Linear(5, 4)), (3, 6, 5), "layer.weight"),
    "linear-channels-last": (lambda: Seq(nn.Linear(5, 4)), (3, 2, 3, 5), "layer.weight"),
    "swin-qkv": (SwinLike, (3, 8, 6), "qkv.weight"),
    "swin-proj": (SwinLike, (3, 8, 6), "proj.weight"),
    "mha-in-proj": (lambda: _SelfAttention(True), (3, 5, 6), "attn.in_proj_weight"),
    "mha-out-proj": (lambda: _SelfAttention(True), (3, 5, 6), "attn.out_proj.weight"),
    "mha-seq-first-in": (lambda: _SelfAttention(False), (3, 5, 6), "attn.in_proj_weight"),
    "mha-seq-first-out": (lambda: _SelfAttention(False), (3, 5, 6), "attn.out_proj.weight"),
    "transformers-conv1d": (_conv1d_transformers, (3, 2, 4), "layer.weight"),
}


class _SelfAttention(nn.Module):
    """nn.MultiheadAttention on [N, T, E], batch first or in its default sequence-first layout."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(6, 2, batch_first=batch_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x if self.batch_first else x.transpose(0, 1)
        out = self.attn(tokens, tokens, tokens, need_weights=False)[0]
        return torch.tanh(out if self.batch_first else out.transpose(0, 1))


def _inputs(model: nn.Module, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(6)
    inputs = torch.randn(*shape, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        out_shape = model(inputs).shape
    return inputs, torch.randn(out_shape, generator=generator, dtype=torch.float64)


def _oracle(
    model: nn.Module, key: str, inputs: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """torch.func: per-sample ∂/∂W of Σ (weights_n · model(x_n))."""
    param = model.get_parameter(key).detach()

    def value(p: torch.Tensor, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return (functional_call(model, {key: p}, (x[None],)) * u[None]).sum()

    return vmap(grad(value), in_dims=(None, 0, 0))(param, inputs, weights)


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel:UserWarning")
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_per_sample_grads_of_captured_calls_match_torch_func(case: str) -> None:
    factory, shape, key = CASES[case]
    torch.manual_seed(5)
    model = factory().double().eval()
    inputs, weights = _inputs(model, shape)
    layer = next(layer for layer in discover_layers(model, inputs) if layer.weight_key == key)
    expected = _oracle(model, key, inputs, weights)
    if layer.kind == "Conv1D":  # the quantizer's [out, in] view of a weight stored [in, out]
        expected = expected.transpose(1, 2)
    parameter = layer_parameter(model, layer)
    with OpCapture({layer.name: parameter}, keep_graph=True) as capture:
        value = (model(inputs) * weights).sum()
    calls = capture.calls[layer.name]
    grads = torch.autograd.grad(value, [call.output for call in calls])
    shape_out = tuple(weight_of(model, layer).shape)
    fast = sum(
        per_sample_weight_grads(call, grad_output, shape_out, len(inputs))
        for call, grad_output in zip(calls, grads)
    )
    assert isinstance(fast, torch.Tensor) and fast.shape == (len(inputs), *shape_out)
    torch.testing.assert_close(fast, expected, rtol=1e-10, atol=1e-10)


def test_gram_form_equals_the_materialised_squared_norm() -> None:
    """Σ_k ‖Σ_t g_kt x_tᵀ‖² from token Gram matrices equals the norm of the formed gradient."""
    generator = torch.Generator().manual_seed(3)
    columns = torch.randn(4, 7, 5, generator=generator, dtype=torch.float64)  # [n, T, in]
    grads = torch.randn(3, 4, 7, 6, generator=generator, dtype=torch.float64)  # [K, n, T, out]
    model = Seq(nn.Linear(5, 6))
    with OpCapture({"layer": model.layer.weight}) as capture:
        model(torch.zeros(1, 5))
    call = capture.calls["layer"][0]
    formed = per_sample_grads_from_columns(call, columns, grads, (6, 5))
    expected = formed.pow(2).sum(0).flatten(1).sum(1)
    torch.testing.assert_close(gram_squared_norms(columns, grads), expected, rtol=1e-12, atol=1e-12)
    assert input_columns(call, (), 1).shape == (1, 1, 5)
    assert output_grads(call, grads[:, :, 0], 4).shape == (3, 4, 1, 6)
