"""Layers whose output-channel groups take different formats (``--allocate-per channel-group``).

A `MixedWeight` is a layer's weight as consecutive spans of output channels, each a
`QuantizedWeight` of those rows in its own format. Every format quantizes the whole layer once
(`quantize_weight_formats`, GPTQ included) and each span keeps its rows: rows are quantized
independently under per-channel and per-group scales and GPTQ compensates each row's error within
the row, so a span's values are exactly that format's values for those channels (the errors the
allocation summed, `lcpaq.sensitivity.channel_errors`). Under per-tensor scales a span keeps the
layer's scale for that format.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from lcpaq.errors import InputError
from lcpaq.quant.formats import QuantScheme, get_format
from lcpaq.quant.weights import QuantizedWeight, dequantize_weight, quantize_weight_formats

#: (first channel, end channel, format name) of one span.
Span = tuple[int, int, str]


@dataclass(frozen=True)
class MixedWeight:
    """``parts[i]`` holds the output channels ``spans[i][0]:spans[i][1]`` in ``spans[i][2]``."""

    spans: tuple[Span, ...]
    parts: tuple[QuantizedWeight, ...]


def check_spans(spans: Sequence[Span], channels: int, where: str) -> None:
    """Spans must cover 0 … channels in order, without gaps or overlaps."""
    position = 0
    for start, stop, _ in spans:
        if start != position or stop <= start:
            raise InputError(f"{where}: channel groups {list(spans)} do not tile 0..{channels}")
        position = stop
    if position != channels:
        raise InputError(f"{where}: channel groups {list(spans)} do not tile 0..{channels}")


def rows_of(quantized: QuantizedWeight, start: int, stop: int) -> QuantizedWeight:
    """The output channels start:stop of a quantized weight (scales per channel/group sliced;
    a per-tensor scale, or a pruned weight's empty one, kept)."""
    per_row = quantized.granularity != "tensor" and quantized.scale.numel() > 0
    zero = quantized.zero_point
    return replace(
        quantized,
        codes=quantized.codes[start:stop],
        scale=quantized.scale[start:stop] if per_row else quantized.scale,
        zero_point=zero[start:stop] if zero is not None and per_row else zero,
    )


def quantize_mixed(
    weight: torch.Tensor,
    spans: Sequence[Span],
    scheme: QuantScheme,
    input_hessian: torch.Tensor | None = None,
) -> MixedWeight:
    """Quantize a weight (output channels on axis 0) with a format per span of channels."""
    check_spans(spans, int(weight.shape[0]), "quantize_mixed")
    names = sorted({name for _, _, name in spans})
    whole = quantize_weight_formats(
        weight, [get_format(name) for name in names], scheme, input_hessian
    )
    by_name = dict(zip(names, whole))
    parts = tuple(rows_of(by_name[name], start, stop) for start, stop, name in spans)
    return MixedWeight(tuple(spans), parts)


def dequantize_mixed(mixed: MixedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.cat([dequantize_weight(part, dtype) for part in mixed.parts])
