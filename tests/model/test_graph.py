"""Layer discovery in `lcpaq.model.graph`: execution order, parameter and MAC counts, unused layers."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyConvNet, conv_inputs
from torch import nn

from lcpaq.errors import InputError
from lcpaq.model.graph import (
    LayerInfo,
    discover_layers,
    first_and_last,
    get_module,
    layer_weight,
    model_device,
    norm_modules,
    quantizable_modules,
)

pytestmark = pytest.mark.usefixtures("single_thread")


class ShuffledNet(nn.Module):
    """Registration order (head, unused, body.conv, stem) differs from execution order
    (stem, body.conv, seq, head); ``unused`` never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4 * 2 * 2, 5)
        self.unused = nn.Conv2d(3, 3, 1)
        self.body = nn.ModuleDict({"conv": nn.Conv2d(8, 4, 3, stride=2, padding=1, groups=2)})
        self.stem = nn.Conv2d(3, 8, 3, padding=0, bias=False)
        self.seq = nn.Conv1d(4, 4, 2)  # runs on [N, 4, 4] after reshaping, output length 3
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(self.stem(x))  # [N, 8, 5, 5]
        out = self.body["conv"](out)  # [N, 4, 3, 3]
        out = out[:, :, :2, :2]  # [N, 4, 2, 2]
        seq = self.seq(out.flatten(2))  # [N, 4, 3]
        return self.head(out.flatten(1)) + seq.sum()


def test_layers_come_out_in_execution_order() -> None:
    model = ShuffledNet().eval()
    layers = discover_layers(model, torch.randn(2, 3, 7, 7))
    assert [layer.name for layer in layers] == ["stem", "body.conv", "seq", "head"]
    assert [layer.execution_index for layer in layers] == [0, 1, 2, 3]
    assert list(quantizable_modules(model)) == ["head", "unused", "body.conv", "stem", "seq"]
    assert first_and_last(layers) == ("stem", "head")


def test_layer_fields_and_macs() -> None:
    model = ShuffledNet().eval()
    layers = {layer.name: layer for layer in discover_layers(model, torch.randn(3, 3, 7, 7))}
    assert "unused" not in layers  # registered but never run: omitted
    stem, conv, seq, head = layers["stem"], layers["body.conv"], layers["seq"], layers["head"]
    # Conv2d: out_h * out_w * C_out * (C_in / groups) * k * k per sample.
    assert stem.weight_shape == (8, 3, 3, 3)
    assert stem.num_params == 8 * 3 * 3 * 3
    assert stem.macs_per_sample == 5 * 5 * 8 * 3 * 3 * 3
    assert conv.weight_shape == (4, 4, 3, 3)
    assert conv.num_params == 4 * 4 * 3 * 3
    assert conv.macs_per_sample == 3 * 3 * 4 * (8 // 2) * 3 * 3
    # Conv1d: out_len * C_out * C_in * k.
    assert seq.macs_per_sample == 3 * 4 * 4 * 2
    # Linear: in * out.
    assert head.num_params == 16 * 5
    assert head.macs_per_sample == 16 * 5
    assert (stem.kind, conv.kind, seq.kind, head.kind) == ("Conv2d", "Conv2d", "Conv1d", "Linear")
    assert (stem.has_bias, conv.has_bias, head.has_bias) == (False, True, True)
    assert stem.weight_key == "stem.weight"
    assert conv.weight_key == "body.conv.weight"
    assert set(model.state_dict()) >= {layer.weight_key for layer in layers.values()}


def test_linear_on_a_sequence_counts_every_position() -> None:
    model = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 2)).eval()
    layers = discover_layers(model, torch.randn(4, 5, 6))  # [N, T=5, features]
    assert [layer.name for layer in layers] == ["0", "2"]
    assert [layer.macs_per_sample for layer in layers] == [5 * 6 * 7, 5 * 7 * 2]


def test_tiny_conv_net_layers() -> None:
    model = TinyConvNet().eval()
    layers = discover_layers(model, conv_inputs(2))
    assert [layer.name for layer in layers] == ["conv1", "conv2", "fc"]
    assert [layer.macs_per_sample for layer in layers] == [
        6 * 6 * 4 * 1 * 9,
        3 * 3 * 6 * 2 * 9,
        54 * 3,
    ]
    assert [layer.num_params for layer in layers] == [36, 108, 162]
    assert list(norm_modules(model)) == ["bn1", "bn2"]


def test_discovery_leaves_the_model_unchanged() -> None:
    model = TinyConvNet().eval()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    discover_layers(model, conv_inputs(4))
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
    for module in model.modules():  # hooks removed
        assert not module._forward_hooks


def test_layer_info_round_trip() -> None:
    layer = discover_layers(TinyConvNet().eval(), conv_inputs(1))[1]
    data = layer.to_dict()
    assert data["weight_shape"] == [6, 2, 3, 3]
    assert LayerInfo.from_dict(data) == layer


def test_model_without_quantizable_layers_raises() -> None:
    with pytest.raises(ValueError, match="no Conv1d, Conv2d or Linear"):
        discover_layers(nn.Sequential(nn.ReLU()), torch.randn(1, 3))


def test_get_module_names_a_missing_path() -> None:
    model = TinyConvNet()
    assert get_module(model, "conv2") is model.conv2
    with pytest.raises(ValueError, match="'conv9'"):
        get_module(model, "conv9")


def test_layer_weight_and_model_device() -> None:
    model = TinyConvNet()
    assert layer_weight(model.conv1) is model.conv1.weight
    with pytest.raises(InputError, match="ReLU has no weight tensor"):
        layer_weight(nn.ReLU())
    assert model_device(model) == torch.device("cpu")
