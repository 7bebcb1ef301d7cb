"""Curvature cross terms in `lcpaq.sensitivity.cross_terms` against explicit Hessian / Gauss–Newton blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import weight_jacobians
from interaction_cases import FORMATS, model_and_data
from torch import nn

from lcpaq.model.graph import discover_layers
from lcpaq.quant.formats import QuantScheme, get_format
from lcpaq.quant.weights import fake_quantize
from lcpaq.sensitivity.cross_terms import hessian_cross_terms
from lcpaq.sensitivity.interaction_terms import (
    select_pairs,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def _deltas(model: nn.Module, names: list[str]) -> list[list[torch.Tensor]]:
    result = []
    for name in names:
        weight = model.get_submodule(name).weight.detach()
        result.append(
            [fake_quantize(weight, get_format(f), QuantScheme()) - weight for f in FORMATS]
        )
    return result


def _explicit_hessian(
    model: nn.Module, names: list[str], inputs: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, list[int]]:
    """Full Hessian of the mean cross-entropy over the concatenated layer weights."""
    params = {key: value.detach() for key, value in model.named_parameters()}
    params.update(dict(model.named_buffers()))
    shapes = [params[f"{name}.weight"].shape for name in names]
    sizes = [int(np.prod(shape)) for shape in shapes]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        values = dict(params)
        for name, part, shape in zip(names, flat.split(sizes), shapes):
            values[f"{name}.weight"] = part.reshape(shape)
        return F.cross_entropy(torch.func.functional_call(model, values, (inputs,)), labels)

    flat = torch.cat([params[f"{name}.weight"].reshape(-1) for name in names])
    return torch.autograd.functional.hessian(loss, flat), sizes


def _block_product(matrix, sizes, deltas, i, j, f, g) -> float:
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    block = matrix[offsets[i] : offsets[i + 1], offsets[j] : offsets[j + 1]]
    return float(deltas[i][f].reshape(-1) @ block @ deltas[j][g].reshape(-1))


@pytest.mark.parametrize("kind", ["mlp", "tiny_conv"])
def test_hessian_cross_terms_match_explicit_blocks(kind: str) -> None:
    model, inputs, labels = model_and_data(kind)
    layers = discover_layers(model, inputs)
    names = [layer.name for layer in layers]
    batches = [(inputs[:4], labels[:4]), (inputs[4:], labels[4:])]  # unequal sizes on purpose
    terms = hessian_cross_terms(
        model, layers, batches, FORMATS, pairs=select_pairs(len(layers), "all")
    )
    matrix, sizes = _explicit_hessian(model, names, inputs, labels)
    deltas = _deltas(model, names)
    assert terms.method == "hessian" and terms.num_samples == 10
    assert terms.pairs == select_pairs(len(layers), "all")
    for i, j in terms.pairs:
        expected = np.array(
            [
                [_block_product(matrix, sizes, deltas, i, j, f, g) for g in range(3)]
                for f in range(3)
            ]
        )
        assert np.abs(expected).max() > 1e-6  # the oracle is not trivially zero
        np.testing.assert_allclose(terms.cross[(i, j)], expected, rtol=1e-8, atol=1e-12)
        assert np.all(np.isfinite(terms.stderr[(i, j)]))
    for k in range(len(layers)):
        expected = [_block_product(matrix, sizes, deltas, k, k, f, f) for f in range(3)]
        np.testing.assert_allclose(terms.diagonal[k], expected, rtol=1e-8, atol=1e-12)
    # The model's weights are unchanged and keep their requires_grad flags.
    assert all(parameter.requires_grad for parameter in model.parameters())


@pytest.mark.parametrize("kind", ["mlp", "tiny_conv"])
def test_gauss_newton_cross_terms_match_explicit_blocks(kind: str) -> None:
    model, inputs, labels = model_and_data(kind)
    layers = discover_layers(model, inputs)
    names = [layer.name for layer in layers]
    terms = hessian_cross_terms(
        model,
        layers,
        [(inputs[:3], labels[:3]), (inputs[3:], labels[3:])],
        FORMATS,
        pairs=select_pairs(len(layers), "all"),
        curvature="gauss_newton",
    )
    logits, jacobians = weight_jacobians(model, names, inputs)
    probs = torch.softmax(logits, -1)
    h_out = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    deltas = _deltas(model, names)
    count = len(inputs)
    for i, j in [*terms.pairs, *[(k, k) for k in range(len(layers))]]:
        gn_block = torch.einsum("ncp,ncd,ndq->pq", jacobians[i], h_out, jacobians[j]) / count
        expected = np.array(
            [
                [
                    float(deltas[i][f].reshape(-1) @ gn_block @ deltas[j][g].reshape(-1))
                    for g in range(3)
                ]
                for f in range(3)
            ]
        )
        if i != j:
            np.testing.assert_allclose(terms.cross[(i, j)], expected, rtol=1e-8, atol=1e-12)
        else:
            np.testing.assert_allclose(terms.diagonal[i], np.diagonal(expected), rtol=1e-8)
    # Standard errors are over samples: std of the per-sample terms / sqrt(N).
    assert all(np.all(np.isfinite(error)) for error in terms.stderr.values())


def test_gauss_newton_mse_matches_explicit_blocks() -> None:
    model, inputs, labels = model_and_data("mlp")
    layers = discover_layers(model, inputs)
    names = [layer.name for layer in layers]
    terms = hessian_cross_terms(
        model, layers, [(inputs, labels)], FORMATS, curvature="gauss_newton", loss="mse"
    )
    _, jacobians = weight_jacobians(model, names, inputs)
    deltas = _deltas(model, names)
    classes = 3
    block = (2.0 / classes) * torch.einsum("ncp,ncq->pq", jacobians[0], jacobians[1]) / len(inputs)
    expected = float(deltas[0][0].reshape(-1) @ block @ deltas[1][2].reshape(-1))
    np.testing.assert_allclose(terms.cross[(0, 1)][0, 2], expected, rtol=1e-8)
