"""Gauss–Newton traces of text models (`lcpaq.sensitivity.gauss_newton` on `TextModel`s) against
brute-force oracles built from one backward pass per output, on each text alone and unpadded:

* tiny BERT encoder, squared error of the pooled embedding to FP32's (D = 32 ≤ 64: exact factors):
  per-sequence traces equal the oracle to float64 rounding, with the texts padded in a batch, in
  the token Gram form and the materialised one (padding changes nothing);
* tiny GPT-2 causal LM (transformers Conv1D layers, LM head tied to the input embedding), KL to
  FP32: the per-position Monte-Carlo Fisher is unbiased: its mean over seeds matches the exact
  per-sequence Fisher trace, the tied table's with both its uses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_models import tiny_model, token_ids

from lcpaq.model.graph import LayerInfo, discover_layers, layer_parameter
from lcpaq.model.text import TextModel
from lcpaq.sensitivity.gauss_newton import gauss_newton_traces
from lcpaq.sensitivity.losses import next_token_positions

pytestmark = pytest.mark.usefixtures("single_thread")

LENGTHS = [5, 8, 3]


def _padded_batch(width: int = 10) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Three texts of LENGTHS padded to ``width`` (pad id 0), and each text alone [1, 2, L]."""
    ids = token_ids(count=len(LENGTHS), length=max(LENGTHS))
    batch = torch.zeros(len(LENGTHS), 2, width, dtype=torch.long)
    alone = []
    for row, length in enumerate(LENGTHS):
        batch[row, 0, :length] = ids[row, :length]
        batch[row, 1, :length] = 1
        alone.append(batch[row : row + 1, :, :length].clone())
    return batch, alone


def _jacobian_rows(
    model: TextModel, layers: list[LayerInfo], text: torch.Tensor, outputs: list[tuple[int, ...]]
) -> list[torch.Tensor]:
    """For each layer, ∂z[o]/∂W flattened, one row per output index o: [len(outputs), P]."""
    weights = [layer_parameter(model, layer) for layer in layers]
    z = model(text)[0]
    rows: list[list[torch.Tensor]] = [[] for _ in layers]
    for index in outputs:
        grads = torch.autograd.grad(z[index], weights, retain_graph=True)
        for layer_rows, grad in zip(rows, grads):
            layer_rows.append(grad.flatten())
    return [torch.stack(layer_rows) for layer_rows in rows]


def _encoder_oracle(model: TextModel, layers: list[LayerInfo], text: torch.Tensor) -> np.ndarray:
    """tr(Jᵀ (2/D)·I J) per layer for one text: (2/D)·Σ_d ‖∂z_d/∂W‖²."""
    dim = model(text).shape[-1]
    jacobians = _jacobian_rows(model, layers, text, [(d,) for d in range(dim)])
    return np.array([2.0 / dim * float(rows.pow(2).sum()) for rows in jacobians])


def _causal_oracle(model: TextModel, layers: list[LayerInfo], text: torch.Tensor) -> np.ndarray:
    """Σ_t tr(J_tᵀ (diag p_t − p_t p_tᵀ) J_t) over the positions the next-token loss counts."""
    with torch.no_grad():
        probs = torch.softmax(model(text)[0], dim=-1)
    vocab = probs.shape[-1]
    positions = next_token_positions(text[:, 1].bool())[0].nonzero().flatten().tolist()
    total = np.zeros(len(layers))
    for t in positions:
        jacobians = _jacobian_rows(model, layers, text, [(t, c) for c in range(vocab)])
        hessian = torch.diag(probs[t]) - torch.outer(probs[t], probs[t])
        for index, rows in enumerate(jacobians):
            total[index] += float((hessian * (rows @ rows.T)).sum())
    return total


@pytest.mark.parametrize("keep_diagonal", [False, True])  # token Gram form / materialised
def test_encoder_traces_equal_the_oracle_with_padding(keep_diagonal: bool) -> None:
    model = TextModel(tiny_model("bert").double(), "encoder")
    batch, alone = _padded_batch()
    layers = list(discover_layers(model, batch))
    assert len(layers) == 12 and all("pooler" not in layer.name for layer in layers)
    estimate = gauss_newton_traces(model, layers, [batch], loss="mse", keep_diagonal=keep_diagonal)
    assert estimate.method == "gauss_newton"  # D = 32: exact factors
    oracle = np.stack([_encoder_oracle(model, layers, text) for text in alone])
    assert oracle.min() > 0
    np.testing.assert_allclose(estimate.sample_traces, oracle, rtol=1e-5)
    np.testing.assert_allclose(estimate.trace, oracle.mean(0), rtol=1e-9)
    stderr = oracle.std(0, ddof=1) / np.sqrt(len(alone))
    np.testing.assert_allclose(estimate.trace_stderr, stderr, rtol=1e-6)


def test_encoder_traces_do_not_depend_on_the_padding() -> None:
    model = TextModel(tiny_model("bert").double(), "encoder")
    layers = list(discover_layers(model, _padded_batch()[0]))
    narrow = gauss_newton_traces(model, layers, [_padded_batch(8)[0]], loss="mse")
    wide = gauss_newton_traces(model, layers, [_padded_batch(16)[0]], loss="mse")
    np.testing.assert_allclose(narrow.sample_traces, wide.sample_traces, rtol=1e-6)
    for name in narrow.layer_names:
        np.testing.assert_allclose(
            narrow.diagonal[name], wide.diagonal[name], rtol=1e-6, atol=1e-12
        )


def test_causal_lm_sampled_fisher_is_unbiased_with_padding() -> None:
    model = TextModel(tiny_model("gpt2").double(), "causal-lm")
    batch, alone = _padded_batch()
    # GPT-2's Conv1D layers store their weights transposed; its LM head is the embedding table
    # (one layer whose gradient has both uses: the oracle differentiates the parameter).
    layers = list(discover_layers(model, batch))
    kinds = [layer.kind for layer in layers]
    assert kinds.count("Conv1D") == 8 and layers[-1].weight_key == "model.transformer.wte.weight"
    oracle = np.stack([_causal_oracle(model, layers, text) for text in alone])
    draws = np.stack(
        [
            gauss_newton_traces(
                model, layers, [batch], loss="kl", seed=seed, keep_diagonal=False
            ).sample_traces.astype(np.float64)
            for seed in range(150)
        ]
    )  # [seeds, texts, layers]
    mean = draws.mean(0)
    stderr = draws.std(0, ddof=1) / np.sqrt(len(draws))
    assert (stderr < 0.1 * oracle).all()  # the check below has power
    assert (np.abs(mean - oracle) < 4.5 * stderr).all(), np.abs(mean - oracle) / stderr
    estimate = gauss_newton_traces(model, layers, [batch], loss="kl")
    assert estimate.method == "fisher_sampled"
