"""The evaluate stage's file content in each metric: a classifier's evaluation.json keeps
``top1``; an encoder's says recall@1 with recall@10 and cosine to FP32; a causal LM's says
perplexity with its paired NLL difference."""

from __future__ import annotations

import pytest
import torch
from conftest import TableEncoder
from torch import nn

from lcpaq.model.data import Dataset
from lcpaq.model.text_data import RetrievalPairs
from lcpaq.stages.evaluate import evaluate_models

pytestmark = pytest.mark.usefixtures("single_thread")


class _Linear(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.layer.weight.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def test_classifier_file_keeps_top1() -> None:
    inputs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.2], [0.1, 1.0]])
    labels = torch.tensor([0, 1, 0, 0])
    dataset = Dataset(inputs, labels, "four")
    fp = _Linear(torch.eye(2))
    flipped = _Linear(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    result = evaluate_models(fp, flipped, dataset, {})
    assert result["fp32"] == {"top1": 0.75, "stderr": pytest.approx(0.2165, abs=1e-4)} | {
        "num_samples": 4
    }
    assert result["quantized"]["top1"] == 0.25  # type: ignore[index]
    assert (result["metric"], result["higher_is_better"], result["paired_quantity"]) == (
        "top1",
        True,
        "top1",
    )
    assert result["paired_difference"] == -0.5


def _token_rows(ids: list[int]) -> torch.Tensor:
    column = torch.tensor(ids).unsqueeze(1)
    return torch.stack(
        [torch.cat([column, column], 1), torch.ones(len(ids), 2, dtype=torch.long)], 1
    )


def test_encoder_file_says_recall_and_cosine() -> None:
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]])
    moved = table.clone()
    moved[0] = torch.tensor([0.0, 1.0])  # query 0 now finds document 1 first
    labels = torch.full((2,), -1)
    pairs = RetrievalPairs(
        Dataset(_token_rows([0, 1]), labels, "q"), Dataset(_token_rows([2, 3]), labels, "d"), "p"
    )
    result = evaluate_models(TableEncoder(table), TableEncoder(moved), pairs, {})
    assert result["metric"] == "recall@1" and result["eval_data"] == "p"
    assert result["fp32"]["recall@1"] == 1.0  # type: ignore[index]
    quantized = result["quantized"]
    assert quantized["recall@1"] == 0.5  # type: ignore[index]
    # Cosines to FP32: 0 for query 0, 1 for the other three texts.
    assert quantized["cosine_to_fp32"] == pytest.approx(0.75)  # type: ignore[index]
    assert "cosine_to_fp32" not in result["fp32"]  # type: ignore[operator]
    assert result["paired_difference"] == -0.5


class _Bigram(nn.Module):
    task = "causal-lm"

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embedding = nn.Embedding(6, 6)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.embedding(inputs[:, 0])


def test_causal_lm_file_says_perplexity() -> None:
    ids = torch.tensor([[1, 2, 3, 4], [5, 4, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    dataset = Dataset(torch.stack([ids, mask], 1), torch.full((2,), -1), "text")
    result = evaluate_models(_Bigram(0), _Bigram(1), dataset, {})
    assert (result["metric"], result["higher_is_better"], result["paired_quantity"]) == (
        "perplexity",
        False,
        "nll",
    )
    fp32, quantized = result["fp32"], result["quantized"]
    assert fp32["tokens"] == 5  # type: ignore[index]
    assert result["paired_difference"] == pytest.approx(quantized["nll"] - fp32["nll"])  # type: ignore[index]
