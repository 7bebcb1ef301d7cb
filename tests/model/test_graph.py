"""Layer discovery in `lcpaq.model.graph`: execution order, parameter and MAC counts, unused layers."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyConvNet, conv_inputs
from torch import nn

from lcpaq.errors import InputError
from lcpaq.model.graph import (
    LayerInfo,
    channel_axis,
    discover_layers,
    failing_layer,
    first_and_last,
    get_module,
    layer_parameter,
    layer_weight,
    masked_positions,
    model_device,
    norm_modules,
    quantizable_modules,
    survey_weights,
    token_mask,
    weight_of,
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


# ---------------------------------------------------------------------------------------------
# Weights as the operations meet them (`survey_weights`): attention, F.linear, Conv1D, FP32 list.


def test_survey_finds_every_weight_an_operation_meets() -> None:
    from layer_kinds import ZooNet

    model = ZooNet(with_unsupported=True).eval()
    survey = survey_weights(model, torch.randn(2, 3, 8, 8))
    layers = {layer.name: layer for layer in survey.layers}
    assert list(layers) == [
        "stem",
        "block.dwconv",
        "block.pwconv1",
        "block.pwconv2",
        "swin.qkv",
        "swin.proj",
        "patch",
        "vit.attn",
        "vit.attn.out_proj",
        "vit.mlp",
        "head",
    ]
    attention = layers["vit.attn"]
    assert attention.weight_key == "vit.attn.in_proj_weight"
    assert attention.kind == "MultiheadAttention" and attention.weight_shape == (24, 8)
    assert attention.has_bias and attention.macs_per_sample == 5 * 24 * 8
    assert layers["swin.qkv"].macs_per_sample == 16 * 24 * 8  # 16 positions, F.linear
    kept = {weight.key: weight.reason for weight in survey.kept}
    assert kept == {
        "vit.class_token": "not the weight of a linear or convolution operation",
        "vit.position": "not the weight of a linear or convolution operation",
        "volume.weight": "Conv3d is not supported",
        "embed.weight": "embedding table (a lookup, not a matmul)",
    }
    total = sum(layer.num_params for layer in survey.layers) + 8 + 40 + 1 + 32
    assert survey.quantized_share() == pytest.approx(1 - (8 + 40 + 1 + 32) / total)


def test_include_and_exclude_patterns() -> None:
    from layer_kinds import ZooNet

    model = ZooNet().eval()
    inputs = torch.randn(1, 3, 8, 8)
    survey = survey_weights(model, inputs, exclude=["vit.*", "swin.qkv"])
    names = [layer.name for layer in survey.layers]
    assert "swin.qkv" not in names and not any(name.startswith("vit.") for name in names)
    excluded = [kept.key for kept in survey.kept if kept.reason.startswith("excluded")]
    assert excluded == [
        "swin.qkv.weight",
        "vit.attn.in_proj_weight",
        "vit.attn.out_proj.weight",
        "vit.mlp.weight",
    ]
    only = discover_layers(model, inputs, include=["block.*"], exclude=["*dwconv"])
    assert [layer.name for layer in only] == ["block.pwconv1", "block.pwconv2"]
    with pytest.raises(InputError, match="after --include/--exclude"):
        discover_layers(model, inputs, include=["nothing*"])


def test_conv1d_weight_is_seen_as_out_by_in_and_written_through() -> None:
    from layer_kinds import gpt2_block

    model = gpt2_block()
    first = discover_layers(model, torch.randn(2, 3, 6))[0]
    assert first.kind == "Conv1D" and first.weight_shape == (12, 6)
    assert first.macs_per_sample == 3 * 12 * 6
    view = weight_of(model, first)
    assert view.shape == (12, 6) and layer_parameter(model, first).shape == (6, 12)
    with torch.no_grad():
        view[3, 2] = 7.0
    assert float(model.c_fc.weight[2, 3].detach()) == 7.0
    assert layer_weight(model.c_fc).shape == (12, 6)


def test_channel_axis_token_mask_and_masked_positions() -> None:
    from layer_kinds import gpt2_block

    assert channel_axis(nn.Linear(2, 2)) == -1 and channel_axis(gpt2_block().c_fc) == -1
    assert channel_axis(nn.Conv2d(1, 1, 1)) == 1 and channel_axis(nn.Conv1d(1, 1, 1)) == 1
    assert channel_axis(nn.BatchNorm2d(1)) == 1 and channel_axis(nn.MultiheadAttention(2, 1)) == -1

    class Masked(nn.Module):
        def token_mask(self, inputs: torch.Tensor) -> torch.Tensor:
            return inputs[:, 1] > 0

    inputs = torch.tensor([[[5, 6, 7], [1, 1, 0]], [[8, 9, 1], [1, 0, 0]]])
    mask = token_mask(Masked(), inputs)
    assert mask is not None and mask.tolist() == [[True, True, False], [True, False, False]]
    assert token_mask(nn.Linear(1, 1), inputs) is None
    states = torch.arange(2 * 3 * 4).reshape(2, 3, 4)
    kept = masked_positions(states, mask)
    assert kept.tolist() == [states[0, 0].tolist(), states[0, 1].tolist(), states[1, 0].tolist()]
    other = states.transpose(0, 1)  # first two dims are not the mask's: unchanged
    assert masked_positions(other, mask) is other
    assert masked_positions(states, None) is states


def test_a_failure_inside_a_layer_names_it() -> None:
    with (
        pytest.raises(
            InputError,
            match=r"^quantizing failed on layer 'blk' \(Linear\): "
            r"RuntimeError: boom; keep it in FP32 with --exclude 'blk'$",
        ),
        failing_layer("blk", "Linear", "quantizing"),
    ):
        raise RuntimeError("boom\nsecond line")


def test_weights_of_modules_that_do_not_run_at_inference_are_named_so() -> None:
    from lcpaq.model.graph import NOT_RUN_REASON, survey_weights

    class WithAuxHead(nn.Module):  # GoogLeNet-style: the auxiliary head runs only in training
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.aux = nn.Linear(4, 12)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.body(x)
            return out + self.aux(x)[:, :4] if self.training else out

    survey = survey_weights(WithAuxHead().eval(), torch.randn(2, 4))
    assert [layer.name for layer in survey.layers] == ["body"]
    assert {kept.key: kept.reason for kept in survey.kept} == {"aux.weight": NOT_RUN_REASON}
    assert survey.quantized_share() == pytest.approx(16 / (16 + 48))
    assert survey.quantized_share_at_inference() == 1.0


def test_weights_applied_to_sample_independent_tables_are_kept() -> None:
    from lcpaq.model.graph import SHARED_INPUT_REASON, survey_weights

    class PositionBias(nn.Module):  # Swin V2: an MLP over a constant coordinate table
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("coords", torch.randn(5, 2))
            self.cpb = nn.Linear(2, 4)
            self.body = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x) + self.cpb(self.coords).mean(0)

    survey = survey_weights(PositionBias().eval(), torch.randn(3, 4))
    assert [layer.name for layer in survey.layers] == ["body"]
    assert {kept.key: kept.reason for kept in survey.kept} == {"cpb.weight": SHARED_INPUT_REASON}
