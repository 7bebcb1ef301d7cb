"""Losses on the logits and their output-Hessian factors (`lcpaq.sensitivity.losses`) against autograd."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from curvature_cases import build

from lcpaq.errors import InputError
from lcpaq.model.graph import discover_layers
from lcpaq.sensitivity.gauss_newton import gauss_newton_traces
from lcpaq.sensitivity.losses import (
    IGNORE,
    default_loss,
    next_token_positions,
    next_token_targets,
    output_hessian_factors,
    summed_loss,
)


def test_cross_entropy_factors_reproduce_the_output_hessian() -> None:
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    factors, sampled = output_hessian_factors(logits, "cross_entropy", None)
    assert not sampled
    assert factors.shape == (4, 5, 4)
    probs = torch.softmax(logits, dim=-1)
    expected = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    rebuilt = torch.einsum("kni,knj->nij", factors, factors)
    torch.testing.assert_close(rebuilt, expected, rtol=0, atol=1e-7)
    # The output Hessian is the one of cross-entropy: check against autograd for one sample.
    label = torch.tensor([2])
    autograd_hessian = torch.autograd.functional.hessian(
        lambda z: F.cross_entropy(z[None], label), logits[0]
    )
    torch.testing.assert_close(autograd_hessian, expected[0], rtol=1e-12, atol=1e-12)


def test_summed_loss_values_and_errors() -> None:
    generator = torch.Generator().manual_seed(8)
    logits = torch.randn(4, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 2, 1, 2])
    mse = summed_loss(logits, labels, "mse")
    expected = ((logits - F.one_hot(labels, 3)) ** 2).mean(1).sum()
    torch.testing.assert_close(mse, expected)
    targets = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(
        summed_loss(logits, targets, "mse"), ((logits - targets) ** 2).mean(1).sum()
    )
    torch.testing.assert_close(
        summed_loss(logits, labels, "cross_entropy"),
        F.cross_entropy(logits, labels, reduction="sum"),
    )
    kl = summed_loss(logits, None, "kl")  # at its own reference: zero, zero gradient
    assert float(kl.detach()) == 0.0
    (grad,) = torch.autograd.grad(kl, logits)
    assert float(grad.abs().max()) < 1e-15
    with pytest.raises(InputError, match="needs labels"):
        summed_loss(logits, None, "cross_entropy")
    with pytest.raises(InputError, match="mse targets have shape"):
        summed_loss(logits, torch.zeros(4, 2, dtype=torch.float64), "mse")
    with pytest.raises(InputError, match="loss must be one of"):
        summed_loss(logits, labels, "hinge")  # type: ignore[arg-type]
    model, inputs = build("mlp")
    with pytest.raises(InputError, match="loss must be one of"):
        gauss_newton_traces(model, discover_layers(model, inputs), [inputs], loss="l1")  # type: ignore[arg-type]


def test_default_loss_per_task() -> None:
    assert default_loss(None, has_labels=True) == "cross_entropy"  # image classifiers
    assert default_loss("sequence-classification", has_labels=True) == "cross_entropy"
    assert default_loss("sequence-classification", has_labels=False) == "kl"
    assert default_loss("encoder", has_labels=False) == "mse"
    assert default_loss("causal-lm", has_labels=False) == "kl"


def test_next_token_positions_and_targets_skip_padding() -> None:
    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert next_token_positions(mask).int().tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]]
    assert next_token_targets(ids, mask).tolist() == [
        [6, 7, IGNORE, IGNORE, IGNORE],
        [9, 10, 11, 12, IGNORE],
    ]


def _mean_outer(draw: Callable[[torch.Generator], torch.Tensor], draws: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    total: torch.Tensor | None = None
    for _ in range(draws):
        factor = draw(generator).flatten(1)  # [N, outputs]
        outer = factor[:, :, None] * factor[:, None, :]
        total = outer if total is None else total + outer
    assert total is not None
    return total / draws


def test_mse_factors_past_64_outputs_are_unbiased_rademacher() -> None:
    logits = torch.randn(2, 100, dtype=torch.float64)
    factors, sampled = output_hessian_factors(logits, "mse", None)
    assert sampled and factors.shape == (1, 2, 100)
    assert torch.allclose(factors.abs(), torch.full_like(factors, (2 / 100) ** 0.5))
    mean = _mean_outer(lambda g: output_hessian_factors(logits, "mse", g)[0][0], 4000)
    expected = torch.eye(100, dtype=torch.float64).expand(2, -1, -1) * 2 / 100
    # Each entry is ±2/D: its mean over 4000 draws has standard error (2/D)/√4000 ≈ 3e-4.
    torch.testing.assert_close(mean, expected, rtol=0, atol=6 * 0.02 / 4000**0.5)


def test_sequence_factors_are_the_per_position_fisher_at_counted_positions() -> None:
    logits = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    positions = torch.tensor([[True, True, False], [True, False, False]])
    factors, sampled = output_hessian_factors(logits, "kl", None, positions)
    assert sampled and factors.shape == (1, 2, 3, 4)
    assert factors[0][~positions].abs().max() == 0  # padding and last tokens: nothing
    mean = _mean_outer(lambda g: output_hessian_factors(logits, "kl", g, positions)[0][0], 20000)
    probs = torch.softmax(logits, dim=-1) * positions[:, :, None]
    blocks = torch.diag_embed(probs) - probs[:, :, :, None] * probs[:, :, None, :]
    expected = torch.zeros(2, 12, 12, dtype=torch.float64)
    for t in range(3):  # block diagonal: draws at different positions are independent
        expected[:, 4 * t : 4 * t + 4, 4 * t : 4 * t + 4] = blocks[:, t]
    torch.testing.assert_close(mean, expected, rtol=0, atol=0.02)
    with pytest.raises(InputError, match="mse.*sequence logits"):
        output_hessian_factors(logits, "mse", None, positions)
