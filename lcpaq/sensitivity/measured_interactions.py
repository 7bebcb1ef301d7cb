"""Inter-layer terms measured by forward passes (METHOD §1c', CLADO): no quadratic model.

C_ij(f, g) = δ_ij(f, g) − δ_i(f) − δ_j(g) from forward passes with the quantized weights on one
fixed sample, common random numbers for the four terms and per-sample standard errors. Exact for
the pair. Input: the FP32 model, its layers, one calibration sample and candidate formats. Output:
`InteractionTerms` with ``method="measured"`` (the analyze stage's ``interactions.npz`` for
``--pair-source forward``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lcpaq.model.graph import LayerInfo, layer_parameter
from lcpaq.quant.formats import QuantScheme
from lcpaq.sensitivity.cross_terms import weight_perturbations
from lcpaq.sensitivity.interaction_terms import (
    InteractionTerms,
    Pair,
    check_pairs,
    select_pairs,
)

#: (logits, labels) -> per-sample losses [N]; labels are None when none were given.
PerSampleLoss = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


@contextmanager
def _weights_replaced(
    weights: dict[int, torch.Tensor], new: dict[int, torch.Tensor]
) -> Iterator[None]:
    """The layers ``new`` names run with the given weights inside the block; restored after it."""
    saved = {index: weights[index].detach().clone() for index in new}
    try:
        with torch.no_grad():
            for index, weight in new.items():
                weights[index].copy_(weight)
        yield
    finally:
        with torch.no_grad():
            for index, weight in saved.items():
                weights[index].copy_(weight)


class _ForwardLosses:
    """Per-sample losses of the model on one fixed sample, in forward passes of ``batch_size``;
    ``base`` holds them at the weights the model had when this was made (FP32)."""

    def __init__(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        labels: torch.Tensor | None,
        loss: Literal["cross_entropy", "kl"] | PerSampleLoss,
        batch_size: int,
    ) -> None:
        self.model, self.inputs, self.labels = model, inputs, labels
        self.loss, self.batch_size = loss, batch_size
        self.reference = self.forward()
        self.base = self.losses(self.reference)

    def forward(self) -> torch.Tensor:
        inputs, size = self.inputs, self.batch_size
        with torch.no_grad():
            return torch.cat(
                [self.model(inputs[s : s + size]) for s in range(0, len(inputs), size)]
            )

    def losses(self, logits: torch.Tensor) -> np.ndarray:
        loss, labels = self.loss, self.labels
        if callable(loss):
            values = loss(logits, labels)
        elif loss == "cross_entropy":
            if labels is None:
                raise ValueError("loss='cross_entropy' needs labels; use loss='kl' without them")
            values = F.cross_entropy(logits, labels, reduction="none")
        elif loss == "kl":
            reference_log = torch.log_softmax(self.reference, -1)
            values = (reference_log.exp() * (reference_log - torch.log_softmax(logits, -1))).sum(-1)
        else:
            raise ValueError(f"loss must be 'cross_entropy', 'kl' or a callable, got {loss!r}")
        return values.double().cpu().numpy()

    def increase(self) -> np.ndarray:
        """ℓ_n(the model's current weights) − ℓ_n(FP32), per sample."""
        return self.losses(self.forward()) - self.base


def measured_interactions(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    inputs: torch.Tensor,
    labels: torch.Tensor | None,
    format_names: Sequence[str],
    *,
    scheme: QuantScheme | None = None,
    pairs: Sequence[Pair] | None = None,
    loss: Literal["cross_entropy", "kl"] | PerSampleLoss = "cross_entropy",
    batch_size: int = 256,
    input_hessians: Mapping[str, torch.Tensor] | None = None,
) -> InteractionTerms:
    """C_ij(f, g) = δ_ij(f, g) − δ_i(f) − δ_j(g) measured by forward passes on one fixed sample.

    Per sample n, c_n = ℓ_n(i@f, j@g) − ℓ_n(i@f) − ℓ_n(j@g) + ℓ_n(FP32); the term is the mean of c_n
    and its standard error std(c_n)/√N (the same samples for all four losses, so shared noise
    cancels). Cost: L·F + |pairs|·F² forward passes over the sample.

    Args:
        loss: ``cross_entropy`` (needs labels), ``kl`` (KL(p_FP32 ‖ p_Q), label-free) or a callable
            ``(logits, labels) -> per-sample losses [N]``.
    Returns:
        `InteractionTerms` with ``method="measured"`` and ``diagonal[l, f] = δ_l(f)``.
    """
    model.eval()
    scheme = scheme or QuantScheme()
    pairs = check_pairs(pairs if pairs is not None else select_pairs(len(layers)), len(layers))
    # Parameter layout, as `weight_perturbations` returns its deltas.
    modules = {index: layer_parameter(model, layer) for index, layer in enumerate(layers)}
    device = modules[0].device
    inputs = inputs.to(device)
    labels = labels.to(device) if labels is not None else None
    quantized = [
        [delta + modules[k].detach() for delta in per_layer]
        for k, per_layer in enumerate(
            weight_perturbations(model, layers, format_names, scheme, input_hessians)
        )
    ]
    measure = _ForwardLosses(model, inputs, labels, loss, batch_size)
    num_formats = len(format_names)
    single = np.zeros((len(layers), num_formats, len(measure.base)))  # ℓ_n(l@f) − ℓ_n(FP32)
    for k in range(len(layers)):
        for f in range(num_formats):
            with _weights_replaced(modules, {k: quantized[k][f]}):
                single[k, f] = measure.increase()
    cross, stderr = {}, {}
    for i, j in pairs:
        block = np.zeros((num_formats, num_formats))
        error = np.zeros((num_formats, num_formats))
        for f in range(num_formats):
            for g in range(num_formats):
                with _weights_replaced(modules, {i: quantized[i][f], j: quantized[j][g]}):
                    per_sample = measure.increase() - single[i, f] - single[j, g]
                block[f, g] = per_sample.mean()
                error[f, g] = per_sample.std(ddof=1) / np.sqrt(len(per_sample))
        cross[(i, j)], stderr[(i, j)] = block, error
    return InteractionTerms(
        layer_names=tuple(layer.name for layer in layers),
        format_names=tuple(format_names),
        cross=cross,
        stderr=stderr,
        diagonal=single.mean(-1),
        diagonal_stderr=single.std(-1, ddof=1) / np.sqrt(single.shape[-1]),
        method="measured",
        num_samples=len(measure.base),
    )
