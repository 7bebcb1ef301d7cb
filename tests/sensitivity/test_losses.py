"""Losses on the logits and their output-Hessian factors (`lcpaq.sensitivity.losses`) against autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from curvature_cases import build

from lcpaq.errors import InputError
from lcpaq.model.graph import discover_layers
from lcpaq.sensitivity.gauss_newton import gauss_newton_traces
from lcpaq.sensitivity.losses import output_hessian_factors, summed_loss


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
