"""Per-channel moments of activations along a module's channel axis, over micro-batches.

The channel axis is the last one for Linear (and transformers' Conv1D) on inputs of any rank
([N, C], [N, T, C] tokens, channels-last [N, H, W, C]) and 1 for convolutions and BatchNorm
(contract §3). With a token mask ([N, T] bool) a [N, T, ...] tensor contributes its real tokens
only (contract §2). Used by statistics correction (`lcpaq.model.recovery`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lcpaq.model.graph import channel_axis

__all__ = ["channel_axis"]  # the one definition lives in `lcpaq.model.graph`


def _channel_stats(
    tensor: torch.Tensor, axis: int, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel (``axis``) sum and sum of squares in float64, and the count per channel.

    Mean and variance per (sample, channel) over the other axes in one fused reduction in the
    tensor's precision (short, centred sums: accurate), then combined over samples in float64.
    The former transposed float64 copy took as long as the forward pass itself on ResNet20.
    ``mask`` [N, T]: a [N, T, ...] tensor keeps its real tokens only (each a sample)."""
    tensor = tensor.detach()
    if (
        mask is not None
        and axis != 1
        and tensor.dim() >= 3
        and tuple(tensor.shape[:2]) == tuple(mask.shape)
    ):
        tensor = tensor[mask.to(tensor.device)]
    if tensor.dim() > 2:
        tensor = tensor.movedim(axis, 1)
    samples, channels = tensor.shape[:2]
    grouped = tensor.reshape(samples, channels, -1)
    variance, mean = torch.var_mean(grouped, dim=2, correction=0)
    per_sample = grouped.shape[2]
    mean = mean.double()
    total = mean.sum(0) * per_sample
    total_sq = (variance.double() + mean.pow(2)).sum(0) * per_sample
    return total, total_sq, samples * per_sample


class Moments:
    """Per-channel sums of a module's activations over micro-batches (float64)."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.total_sq: torch.Tensor | None = None
        self.count = 0

    def add(self, tensor: torch.Tensor, axis: int = 1, mask: torch.Tensor | None = None) -> None:
        total, total_sq, count = _channel_stats(tensor, axis, mask)
        self.total = total if self.total is None else self.total + total
        self.total_sq = total_sq if self.total_sq is None else self.total_sq + total_sq
        self.count += count

    @classmethod
    def combined(cls, parts: Sequence[Moments]) -> Moments:
        """The moments of several micro-batches, summed in their order."""
        result = cls()
        for part in parts:
            assert part.total is not None and part.total_sq is not None
            result.total = part.total if result.total is None else result.total + part.total
            result.total_sq = (
                part.total_sq if result.total_sq is None else result.total_sq + part.total_sq
            )
            result.count += part.count
        return result

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.total is not None and self.total_sq is not None
        mean = self.total / self.count
        return mean, (self.total_sq / self.count - mean.pow(2)).clamp_min(0.0)
