"""Layers with a format per output-channel group in `lcpaq.quant.mixed`: each span is exactly its
format's rows of the whole layer, spans must tile the channels."""

from __future__ import annotations

import pytest
import torch

from lcpaq.errors import InputError
from lcpaq.quant.formats import QuantScheme, get_format
from lcpaq.quant.mixed import dequantize_mixed, quantize_mixed
from lcpaq.quant.weights import fake_quantize

pytestmark = pytest.mark.usefixtures("single_thread")

SPANS = [(0, 2, "int4"), (2, 3, "ternary"), (3, 5, "pruned"), (5, 8, "binary")]


@pytest.mark.parametrize(
    "scheme",
    [QuantScheme(), QuantScheme(rounding="gptq"), QuantScheme(granularity="group", group_size=32)],
    ids=["nearest", "gptq", "group32"],
)
def test_each_span_is_its_formats_rows_of_the_whole_layer(scheme: QuantScheme) -> None:
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(8, 4, 3, 3, generator=generator)
    inputs = torch.randn(300, 36, generator=generator) @ torch.randn(36, 36, generator=generator)
    hessian = inputs.T @ inputs / 300
    mixed = quantize_mixed(weight, SPANS, scheme, hessian)
    decoded = dequantize_mixed(mixed)
    assert decoded.shape == weight.shape
    for (start, stop, name), part in zip(SPANS, mixed.parts):
        whole = fake_quantize(weight, get_format(name), scheme, hessian)
        assert torch.equal(decoded[start:stop], whole[start:stop]), name
        assert part.codes.shape[0] == stop - start and part.format_name == name


@pytest.mark.parametrize(
    "spans", [[(0, 3, "int4")], [(0, 4, "int4"), (3, 8, "int2")], [(1, 8, "int4")]]
)
def test_spans_must_tile_the_channels(spans: list[tuple[int, int, str]]) -> None:
    with pytest.raises(InputError, match="do not tile 0..8"):
        quantize_mixed(torch.randn(8, 5), spans, QuantScheme())
