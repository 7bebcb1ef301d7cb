"""Models beyond Linear/Conv modules through analyze → allocate → export → checkpoint → load
(issue 19): a tiny network with every layer kind of the torchvision zoo (a conv that pads in its
own forward, depthwise conv, channels-last Linear, Swin-style F.linear, nn.MultiheadAttention),
GPT-2's transformers Conv1D, and weights kept in FP32 with their reasons."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from layer_kinds import ZooNet, gpt2_block
from torch import nn

import lcpaq
from lcpaq.model.graph import survey_weights
from lcpaq.quant.checkpoint import load_quantized, write_quantized_checkpoint
from lcpaq.quant.formats import QuantScheme

pytestmark = pytest.mark.usefixtures("single_thread")


def _data(count: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return torch.randn(count, 3, 8, 8, generator=generator), torch.arange(count) % 10


def _quantize(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], rounding: str):
    analysis = lcpaq.analyze(
        model,
        data,
        num_samples=len(data[0]),
        batch_size=len(data[0]),
        formats=("int4", "int8"),
        scheme=QuantScheme(rounding=rounding),
    )
    allocation = lcpaq.allocate(analysis, "avg-bits=4")
    return analysis, allocation, lcpaq.export(model, analysis, allocation, data)


@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
def test_every_layer_kind_is_quantized_and_round_trips(rounding: str, tmp_path: Path) -> None:
    """At 4 bits every one of the 11 weights is quantized to int4 (attention and F.linear
    included), the exported model runs, and the checkpoint loads back into a fresh model with
    the quantized model's weights."""
    torch.manual_seed(0)
    model = ZooNet().eval()
    data = _data()
    analysis, allocation, quantized = _quantize(model, data, rounding)
    assert len(analysis.layers) == 11 and set(allocation.formats) == {"int4"}
    quantized_state = quantized.model.state_dict()
    for layer in analysis.layers:
        assert not torch.equal(
            quantized_state[layer.weight_key], model.state_dict()[layer.weight_key]
        )
    assert torch.isfinite(quantized.model(data[0])).all()
    scheme = analysis.config.analysis.scheme
    out = write_quantized_checkpoint(
        tmp_path / "q", quantized_state, analysis.layers, quantized.codes, {}, scheme
    )
    loaded = load_quantized(out, copy.deepcopy(model))
    assert isinstance(loaded, nn.Module)
    for key, value in quantized_state.items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_transformers_conv1d_quantizes_along_its_output_channels(tmp_path: Path) -> None:
    """GPT-2's Conv1D stores [in, out]: per-output-channel scales are per column of the stored
    weight, and the checkpoint puts the decoded weight back in that layout."""
    torch.manual_seed(0)
    model = gpt2_block().eval()
    inputs = torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(3))
    analysis = lcpaq.analyze(
        model,
        (inputs, torch.zeros(4, dtype=torch.long)),
        num_samples=4,
        batch_size=4,
        formats=("int4",),
        loss="mse",
        scheme=QuantScheme(rounding="gptq"),
    )
    assert [layer.weight_shape for layer in analysis.layers] == [(12, 6), (6, 12)]
    allocation = lcpaq.allocate(analysis, "avg-bits=4")
    quantized = lcpaq.export(
        model, analysis, allocation, (inputs, torch.zeros(4, dtype=torch.long))
    )
    first = quantized.codes["c_fc"]
    assert first.codes.shape == (12, 6) and first.scale.shape[0] == 12
    stored = quantized.model.state_dict()
    out = write_quantized_checkpoint(
        tmp_path / "q",
        stored,
        analysis.layers,
        quantized.codes,
        {},
        analysis.config.analysis.scheme,
    )
    loaded = load_quantized(out, gpt2_block())
    assert isinstance(loaded, nn.Module)
    torch.testing.assert_close(loaded.state_dict()["c_fc.weight"], stored["c_fc.weight"])
    assert loaded.state_dict()["c_fc.weight"].shape == (6, 12)


def test_weights_kept_in_fp32_are_listed_with_reasons() -> None:
    """The embedding, Conv3d, class token and position embedding stay FP32, with their reason."""
    model = ZooNet(with_unsupported=True).eval()
    survey = survey_weights(model, _data()[0], exclude=["head"])
    reasons = {kept.key: kept.reason for kept in survey.kept}
    assert reasons["embed.weight"].startswith("embedding table")
    assert reasons["volume.weight"] == "Conv3d is not supported"
    assert reasons["head.weight"] == "excluded by --include/--exclude"
    assert 0.5 < survey.quantized_share() < 1.0
