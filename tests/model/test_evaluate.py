"""Metrics in `lcpaq.model.evaluate` against exact small oracles: top-1 over batches with its
binomial standard error, retrieval recall@1/@10 and cosine to FP32 on hand-built embeddings,
perplexity of a tiny causal LM against a brute-force loop with padding present, and the paired
differences of all three."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import TableEncoder
from torch import nn

from lcpaq.errors import InputError
from lcpaq.model.data import Dataset
from lcpaq.model.evaluate import (
    Accuracy,
    MetricResult,
    evaluate_accuracy,
    evaluate_model,
    evaluate_perplexity,
    first_samples,
    format_metric,
    paired_difference,
    ratio_stderr,
    retrieval_metrics,
)
from lcpaq.model.text_data import RetrievalPairs

pytestmark = pytest.mark.usefixtures("single_thread")


class _FirstFeature(nn.Module):
    """Predicts class 1 where the first feature is positive, else class 0."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positive = (x[:, 0] > 0).float() * self.scale
        return torch.stack([1 - positive, positive], dim=1)


def test_accuracy_over_batches() -> None:
    inputs = torch.tensor([[1.0], [-1.0], [2.0], [-3.0], [0.5]])
    labels = torch.tensor([1, 0, 0, 0, 0])  # three of five right
    dataset = Dataset(inputs, labels, "five")
    accuracy = evaluate_accuracy(_FirstFeature(), dataset, batch_size=2)
    assert (accuracy.top1, accuracy.num_samples) == (0.6, 5)
    assert accuracy.stderr == pytest.approx(np.sqrt(0.6 * 0.4 / 5))
    np.testing.assert_array_equal(accuracy.correct, [True, True, False, True, False])
    assert accuracy.to_dict() == {"top1": 0.6, "stderr": accuracy.stderr, "num_samples": 5}
    assert (accuracy.name, accuracy.higher_is_better) == ("top1", True)
    # An image model on image data dispatches to accuracy; unlabelled data (-1) is refused.
    assert evaluate_model(_FirstFeature(), dataset).value == 0.6
    with pytest.raises(InputError, match="labelled data"):
        evaluate_model(_FirstFeature(), Dataset(inputs, torch.full((5,), -1), "unlabelled"))


def test_paired_difference() -> None:
    first = Accuracy(0.75, 0.0, 4, np.array([True, True, True, False]))
    second = Accuracy(0.25, 0.0, 4, np.array([True, False, False, False]))
    mean, stderr = paired_difference(first, second)
    # Differences 0, 1, 1, 0: mean 0.5, sample std sqrt(1/3), over sqrt(4).
    assert mean == 0.5 and stderr == pytest.approx(np.sqrt(1 / 3) / 2)
    with pytest.raises(ValueError, match="same evaluation samples"):
        paired_difference(first, Accuracy(1.0, 0.0, 1, np.array([True])))


def test_ratio_stderr_weighted() -> None:
    # Sums 2, 1, 3 over weights 1, 2, 3: ratio 1; residuals 1, -1, 0.
    values, weights = np.array([2.0, 1.0, 3.0]), np.array([1.0, 2.0, 3.0])
    assert ratio_stderr(values, weights) == pytest.approx(math.sqrt(3 / 2 * 2) / 6)
    # A zero-weight sample neither counts as a sample nor moves the estimate.
    assert ratio_stderr(np.append(values, 0.0), np.append(weights, 0.0)) == pytest.approx(
        ratio_stderr(values, weights)
    )


def _embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    """Four queries and documents in 2-D; query 0 and 1 find their own documents first,
    query 2's own document ranks second (document 3 is closer), query 3's is last."""
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.2]])
    documents = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.2], [1.0, 1.1]])
    return queries, documents


def test_retrieval_recall_by_hand() -> None:
    queries, documents = _embeddings()
    result = retrieval_metrics(queries, documents)
    # Query 0: cos to docs (1, 0, .98, .67) → own first. Query 1: (0, 1, .20, .74) → first.
    # Query 2: (.71, .71, .83, .9986) → doc 3 first, own doc 2 second.
    # Query 3: (-.98, .20, -.94, -.56) → doc 1 first, own doc 3 second.
    np.testing.assert_array_equal(result.per_sample, [1.0, 1.0, 0.0, 0.0])
    assert (result.name, result.value, result.num_samples) == ("recall@1", 0.5, 4)
    assert result.stderr == pytest.approx(np.std([1, 1, 0, 0], ddof=1) / 2)
    assert result.secondary["recall@10"] == 1.0 and result.secondary["recall@10_stderr"] == 0.0
    assert "cosine_to_fp32" not in result.secondary


def test_retrieval_ties_count_against_the_query() -> None:
    collapsed = torch.ones(3, 4)
    assert retrieval_metrics(collapsed, collapsed).value == 0.0


def test_retrieval_cosine_to_reference_and_paired() -> None:
    queries, documents = _embeddings()
    reference = retrieval_metrics(queries, documents)
    # Rotate query 2 onto its own document and scale another: cosine to FP32 by hand.
    moved = queries.clone()
    moved[2] = torch.tensor([1.0, 0.2])
    moved[0] = 5 * queries[0]
    result = retrieval_metrics(moved, documents, reference.embeddings)
    expected = torch.ones(8, dtype=torch.float64)
    expected[2] = (1.0 + 0.2) / (math.sqrt(2) * math.sqrt(1.04))
    assert result.secondary["cosine_to_fp32"] == pytest.approx(float(expected.mean()))
    assert result.secondary["cosine_to_fp32_stderr"] == pytest.approx(
        float(expected.std()) / math.sqrt(8)
    )
    np.testing.assert_array_equal(result.per_sample, [1.0, 1.0, 1.0, 0.0])
    assert paired_difference(result, reference) == pytest.approx((0.25, 0.25))


def _tokens(ids: list[list[int]], lengths: list[int]) -> torch.Tensor:
    """[N, 2, T] int64: ids and a right-padded attention mask of the given lengths."""
    id_tensor = torch.tensor(ids, dtype=torch.int64)
    mask = (torch.arange(id_tensor.shape[1]) < torch.tensor(lengths).unsqueeze(1)).long()
    return torch.stack([id_tensor * mask, mask], dim=1)


def test_encoder_dispatch_on_pairs() -> None:
    queries, documents = _embeddings()
    encoder = TableEncoder(torch.cat([queries, documents]))
    query_ids = _tokens([[0, 9], [1, 9], [2, 9], [3, 9]], [2, 2, 2, 2])
    doc_ids = _tokens([[4, 9], [5, 9], [6, 9], [7, 9]], [2, 1, 2, 1])
    labels = torch.full((4,), -1)
    pairs = RetrievalPairs(Dataset(query_ids, labels, "q"), Dataset(doc_ids, labels, "d"), "pairs")
    result = evaluate_model(encoder, pairs)
    np.testing.assert_array_equal(result.per_sample, [1.0, 1.0, 0.0, 0.0])
    again = evaluate_model(encoder, pairs, reference=result)
    assert again.secondary["cosine_to_fp32"] == pytest.approx(1.0)
    subset = first_samples(pairs, 2)
    assert isinstance(subset, RetrievalPairs) and len(subset) == 2
    assert evaluate_model(encoder, subset).value == 1.0
    with pytest.raises(InputError, match="query/document pairs"):
        evaluate_model(encoder, pairs.queries)


class _TinyLM(nn.Module):
    """A bigram causal LM: logits of position t depend on token t only (an embedding + linear)."""

    task = "causal-lm"

    def __init__(self, vocab: int = 7, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embedding = nn.Embedding(vocab, 5)
        self.head = nn.Linear(5, vocab)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(inputs[:, 0]))


@torch.no_grad()
def _brute_force_nll(model: _TinyLM, inputs: torch.Tensor) -> list[tuple[float, int]]:
    """Per sequence: summed NLL of each real next token and their number, one position at a time."""
    rows = []
    for sequence in inputs:
        ids, mask = sequence[0].tolist(), sequence[1].tolist()
        total, count = 0.0, 0
        for t in range(len(ids) - 1):
            if mask[t] and mask[t + 1]:
                logits = model(sequence[:, t : t + 1].unsqueeze(0))[0, 0].double()
                log_z = math.log(sum(math.exp(v) for v in logits.tolist()))
                total += log_z - float(logits[ids[t + 1]])
                count += 1
        rows.append((total, count))
    return rows


def test_perplexity_against_brute_force_with_padding() -> None:
    model = _TinyLM()
    # Right padding, a sequence of one token (no target), left padding (mask 0 first).
    inputs = _tokens(
        [[1, 2, 3, 4, 5], [6, 5, 4, 0, 0], [3, 0, 0, 0, 0], [0, 2, 2, 1, 0]], [5, 3, 1, 5]
    )
    inputs[3, 1] = torch.tensor([0, 1, 1, 1, 0])
    dataset = Dataset(inputs, torch.full((4,), -1), "four")
    rows = _brute_force_nll(model, inputs)
    assert [count for _, count in rows] == [4, 2, 0, 2]
    total = sum(nll for nll, _ in rows)
    result = evaluate_model(model, dataset)
    assert result.name == "perplexity" and not result.higher_is_better
    assert result.value == pytest.approx(math.exp(total / 8), rel=1e-6)
    assert result.secondary["nll"] == pytest.approx(total / 8, rel=1e-6)
    assert result.secondary["tokens"] == 8 and result.num_samples == 3
    np.testing.assert_allclose(result.per_sample, [nll for nll, _ in rows], rtol=1e-6)
    # Padding ids do not matter: changing them leaves every number the same.
    changed = inputs.clone()
    changed[1, 0, 3:] = 6
    again = evaluate_perplexity(model, Dataset(changed, dataset.labels, "four"), batch_size=3)
    np.testing.assert_allclose(again.per_sample, result.per_sample, rtol=1e-6)
    # Its standard error: the delta method over the three sequences with targets.
    counts = np.array([4.0, 2.0, 2.0])
    sums = np.array([rows[0][0], rows[1][0], rows[3][0]])
    residual = sums - total / 8 * counts
    nll_se = math.sqrt(3 / 2 * float(np.sum(residual**2))) / 8
    assert result.secondary["nll_stderr"] == pytest.approx(nll_se, rel=1e-6)
    assert result.stderr == pytest.approx(result.value * nll_se, rel=1e-6)


def test_perplexity_paired_difference_in_nats_per_token() -> None:
    inputs = _tokens([[1, 2, 3, 4], [4, 3, 2, 0], [5, 5, 6, 6]], [4, 3, 4])
    dataset = Dataset(inputs, torch.full((3,), -1), "three")
    first, second = _TinyLM(seed=0), _TinyLM(seed=1)
    a, b = evaluate_model(first, dataset), evaluate_model(second, dataset)
    difference, stderr = paired_difference(a, b)
    assert a.paired_quantity == "nll"
    assert difference == pytest.approx(a.secondary["nll"] - b.secondary["nll"], rel=1e-9)
    diffs = a.per_sample - b.per_sample
    counts = np.array([3.0, 2.0, 3.0])
    residual = diffs - difference * counts
    assert stderr == pytest.approx(math.sqrt(3 / 2 * float(np.sum(residual**2))) / 8, rel=1e-9)
    assert paired_difference(a, a) == (0.0, 0.0)


def test_causal_lm_needs_next_tokens() -> None:
    inputs = _tokens([[1, 0], [2, 0]], [1, 1])
    with pytest.raises(InputError, match="two real tokens"):
        evaluate_model(_TinyLM(), Dataset(inputs, torch.full((2,), -1), "short"))


def test_format_metric() -> None:
    assert format_metric("top1", 0.9164, 0.0087) == "91.64 ± 0.87 %"
    assert format_metric("recall@1", 0.837) == "83.70 %"
    assert format_metric("perplexity", 12.3456, 0.25) == "12.35 ± 0.25"
    assert format_metric("cosine_to_fp32", 0.99996) == "1.0000"
    assert isinstance(Accuracy(1.0, 0.0, 1, np.array([True])), MetricResult)
