"""Forward-measured inter-layer terms (`lcpaq.sensitivity.measured_interactions`): zero for independent
branches, the Hessian term for small perturbations, label-free KL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from interaction_cases import model_and_data
from torch import nn

from lcpaq.model.graph import discover_layers
from lcpaq.sensitivity.cross_terms import hessian_cross_terms
from lcpaq.sensitivity.interaction_terms import (
    select_pairs,
)
from lcpaq.sensitivity.measured_interactions import measured_interactions

pytestmark = pytest.mark.usefixtures("single_thread")


class TwoBranchNet(nn.Module):
    """Two independent non-linear branches summed: with a loss linear in the output, a layer of one
    branch cannot change the effect of quantizing a layer of the other."""

    def __init__(self) -> None:
        super().__init__()
        self.a1, self.a2 = nn.Linear(5, 6), nn.Linear(6, 3)
        self.b1, self.b2 = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a2(torch.tanh(self.a1(x))) + self.b2(torch.tanh(self.b1(x)))


def _linear_loss(logits: torch.Tensor, _labels: torch.Tensor | None) -> torch.Tensor:
    return logits @ torch.tensor([1.0, -2.0, 0.5], dtype=logits.dtype)


def test_measured_interactions_vanish_for_independent_branches() -> None:
    torch.manual_seed(4)
    model = TwoBranchNet().double().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3.0)
    inputs = torch.randn(200, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    layers = discover_layers(model, inputs)
    names = [layer.name for layer in layers]
    before = {key: value.clone() for key, value in model.state_dict().items()}
    terms = measured_interactions(
        model,
        layers,
        inputs,
        None,
        ("int2", "int4"),
        pairs=select_pairs(len(layers), "all"),
        loss=_linear_loss,
    )
    assert terms.method == "measured" and terms.num_samples == 200
    for key, value in model.state_dict().items():  # weights are restored
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    branch = {name: name[0] for name in names}
    within = []
    for (i, j), value in terms.cross.items():
        error = terms.stderr[(i, j)]
        if branch[names[i]] != branch[names[j]]:
            assert np.all(np.abs(value) <= 3 * error + 1e-12), (names[i], names[j], value)
            assert np.abs(value).max() < 1e-10  # zero up to rounding, not just within noise
        else:
            within.append(np.abs(value).max())
    # Within a branch the interaction is real: the check has teeth.
    assert max(within) > 1e-3
    assert np.all(np.abs(terms.diagonal) > 0)


def test_measured_interaction_matches_hessian_for_small_perturbations() -> None:
    """For a mild format the measured cross term approaches the Hessian's Δw_iᵀH_ijΔw_j."""
    model, inputs, labels = model_and_data("mlp")
    layers = discover_layers(model, inputs)
    measured = measured_interactions(model, layers, inputs, labels, ("int8",))
    curvature = hessian_cross_terms(model, layers, [(inputs, labels)], ("int8",))
    value, expected = measured.cross[(0, 1)][0, 0], curvature.cross[(0, 1)][0, 0]
    assert abs(expected) > 1e-9
    np.testing.assert_allclose(value, expected, rtol=0.05)


def test_kl_loss_is_label_free_and_nonnegative() -> None:
    model, inputs, _ = model_and_data("tiny_conv")
    layers = discover_layers(model, inputs)
    terms = measured_interactions(model, layers, inputs, None, ("int2", "int4"), loss="kl")
    assert np.all(terms.diagonal >= 0)
    with pytest.raises(ValueError, match="needs labels"):
        measured_interactions(model, layers, inputs, None, ("int4",))
