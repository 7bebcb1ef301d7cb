"""Per-sample weight gradients in `lcpaq.sensitivity.per_sample` against autograd one sample at a time,
for every layer kind (grouped, strided, dilated, padded convolutions; Linear on sequences)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lcpaq.sensitivity.per_sample import per_sample_weight_grads

PER_SAMPLE_CASES = {
    "conv2d_grouped_strided": (
        lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
        (5, 4, 7, 6),
    ),
    "conv2d_dilated_asym": (
        lambda: nn.Conv2d(2, 3, (3, 2), stride=(1, 2), padding=(2, 1), dilation=2),
        (5, 2, 6, 7),
    ),
    "conv2d_reflect": (lambda: nn.Conv2d(3, 2, 3, padding=1, padding_mode="reflect"), (4, 3, 5, 5)),
    "conv2d_same": (lambda: nn.Conv2d(2, 2, 4, padding="same", bias=False), (3, 2, 6, 6)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), (5, 3, 9)),
    "conv1d_circular_grouped": (
        lambda: nn.Conv1d(4, 2, 3, padding=1, groups=2, padding_mode="circular"),
        (4, 4, 8),
    ),
    "linear": (lambda: nn.Linear(6, 4), (5, 6)),
    "linear_sequence": (lambda: nn.Linear(6, 4), (5, 3, 6)),
    "linear_2d_sequence": (lambda: nn.Linear(3, 2), (4, 2, 5, 3)),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("case", list(PER_SAMPLE_CASES))
def test_per_sample_weight_grads_match_one_sample_at_a_time(case: str) -> None:
    factory, shape = PER_SAMPLE_CASES[case]
    torch.manual_seed(5)
    module = factory().double()
    generator = torch.Generator().manual_seed(6)
    inputs = torch.randn(*shape, generator=generator, dtype=torch.float64)
    outputs = module(inputs)
    grad_outputs = torch.randn(outputs.shape, generator=generator, dtype=torch.float64)
    fast = per_sample_weight_grads(module, inputs, grad_outputs)
    assert fast.shape == (shape[0], *module.weight.shape)
    for index in range(shape[0]):
        value = (grad_outputs[index : index + 1] * module(inputs[index : index + 1])).sum()
        (expected,) = torch.autograd.grad(value, module.weight)
        torch.testing.assert_close(fast[index], expected, rtol=1e-12, atol=1e-12)
