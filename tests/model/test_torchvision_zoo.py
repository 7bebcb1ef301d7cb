"""A representative handful of torchvision's classification models (random weights, two small
random images) through analyze → allocate → export → evaluate (issue 19; the whole zoo is
``scripts/zoo_check.py``): a ResNet, a MobileNet, an EfficientNet, a ConvNeXt (channels-last
Linear layers), a ViT (nn.MultiheadAttention), a Swin (window attention through F.linear), a
RegNet (grouped convolutions) and an Inception-style net (GoogLeNet, training-only auxiliary
heads). Each must quantize ≥ 95 % of the weights its inference forward pass uses and give a
checkpoint that reloads into the same outputs as the in-memory quantized model."""

from __future__ import annotations

import pytest
import torch

import lcpaq
from lcpaq.model.graph import survey_weights
from lcpaq.quant.checkpoint import load_quantized, write_quantized_checkpoint
from lcpaq.quant.formats import QuantScheme

models = pytest.importorskip("torchvision.models")

#: name → (constructor keywords, image size): the smallest input each architecture takes.
HANDFUL = {
    "resnet18": ({}, 32),
    "mobilenet_v3_small": ({}, 32),
    "efficientnet_b0": ({}, 32),
    "convnext_tiny": ({}, 32),
    "vit_b_16": ({"image_size": 32}, 32),
    "swin_t": ({}, 32),
    "regnet_x_400mf": ({}, 32),
    "googlenet": ({"aux_logits": True, "init_weights": True}, 32),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", list(HANDFUL))
def test_zoo_model_runs_end_to_end(name: str, tmp_path) -> None:
    keywords, size = HANDFUL[name]
    torch.manual_seed(0)
    model = models.get_model(name, weights=None, num_classes=10, **keywords).eval()
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    data = (images, torch.tensor([3, 7]))
    survey = survey_weights(model, images)
    assert survey.quantized_share_at_inference() >= 0.95, [k.to_dict() for k in survey.kept]

    analysis = lcpaq.analyze(
        model,
        data,
        num_samples=2,
        batch_size=2,
        formats=("int4", "int8"),
        scheme=QuantScheme(rounding="nearest", clipping="minmax"),
    )
    assert len(analysis.layers) == len(survey.layers)
    allocation = lcpaq.allocate(analysis, "avg-bits=6")
    quantized = lcpaq.export(model, analysis, allocation, data)
    result = lcpaq.evaluate(model, quantized.model, data)
    assert result["quantized"]["num_samples"] == 2

    out = write_quantized_checkpoint(
        tmp_path / "q",
        quantized.model.state_dict(),
        analysis.layers,
        quantized.codes,
        {},
        analysis.config.analysis.scheme,
    )
    skeleton = models.get_model(name, weights=None, num_classes=10, **keywords).eval()
    reloaded = load_quantized(out, skeleton)
    assert isinstance(reloaded, torch.nn.Module)
    with torch.no_grad():
        expected = quantized.model(images)
        torch.testing.assert_close(reloaded(images), expected, rtol=1e-4, atol=1e-4)
        assert torch.isfinite(expected).all()
