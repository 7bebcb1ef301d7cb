"""The metric of the evaluate stage, chosen by what the model is and what the data holds, with the
per-sample outcomes kept so two models evaluated on the same samples can be compared pairwise:

- a classifier (images, or a text sequence classifier) on labelled data: top-1 accuracy;
- a sentence encoder on query/document pairs (`lcpaq.model.text_data.RetrievalPairs`): recall@1 of
  each query's own document among all documents by cosine similarity (recall@10 and, given the
  FP32 result, the mean cosine of the embeddings to FP32's as secondary metrics);
- a causal LM on token ids [N, 2, T] (ids, attention mask): perplexity over the real next tokens,
  paired through each sequence's summed negative log-likelihood.

Every metric is a ratio Σᵢ sᵢ / Σᵢ wᵢ of per-sample sums sᵢ over per-sample weights wᵢ (1 per
image or query; the number of predicted tokens per sequence), so one paired difference and one
standard error (the ratio estimator's, over samples) serve all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from lcpaq.errors import InputError
from lcpaq.model.data import Dataset
from lcpaq.model.graph import model_device
from lcpaq.model.text_data import RetrievalPairs


@dataclass(frozen=True)
class MetricInfo:
    """How a metric reads: its label, its direction and whether it is a fraction shown in %."""

    label: str
    higher_is_better: bool
    percent: bool
    spec: str = ".4g"  # how a value that is not a percentage is written


#: Every metric (and secondary metric) evaluation can report, by the name files use.
METRICS: dict[str, MetricInfo] = {
    "top1": MetricInfo("top-1 accuracy", True, True),
    "recall@1": MetricInfo("recall@1", True, True),
    "recall@10": MetricInfo("recall@10", True, True),
    "cosine_to_fp32": MetricInfo("cosine to FP32", True, False, ".4f"),
    "perplexity": MetricInfo("perplexity", False, False),
    "nll": MetricInfo("NLL (nats/token)", False, False),
}

#: Elements of one batch of causal-LM logits [B, T, V] (256 MiB in float32): bounds memory at a
#: 150 k vocabulary.
_LOGITS_PER_BATCH = 1 << 26


def metric_info(name: str) -> MetricInfo:
    """The `MetricInfo` of ``name``; unknown names read as higher-is-better plain numbers."""
    return METRICS.get(name, MetricInfo(name, True, False))


def format_metric(name: str, value: float, stderr: float | None = None) -> str:
    """``value`` (± ``stderr``) as the report shows it: fractions in %, others with 4 digits."""
    if metric_info(name).percent:
        text = f"{100 * value:.2f} %"
        return text if stderr is None else f"{100 * value:.2f} ± {100 * stderr:.2f} %"
    text = format(value, metric_info(name).spec)
    return text if stderr is None else f"{text} ± {stderr:.2g}"


@dataclass(frozen=True, eq=False)
class MetricResult:
    """One model's metric on one data set.

    ``value`` = Σ ``per_sample`` / Σ ``weights`` for ratio metrics (perplexity: the exponential of
    that mean NLL); ``per_sample`` and ``weights`` are in data set order so that
    `paired_difference` can compare two models on the same samples. ``secondary``: further
    metrics by name (with ``<name>_stderr`` where one exists). ``embeddings``: an encoder's
    embeddings (queries then documents), kept so a quantized model's can be compared with them.
    """

    name: str
    value: float
    stderr: float
    num_samples: int
    per_sample: np.ndarray  # float [N]: what each sample adds to the ratio's numerator
    higher_is_better: bool = True
    secondary: dict[str, float] = field(default_factory=dict)
    weights: np.ndarray | None = None  # float [N]; None: every sample weighs 1
    paired_quantity: str | None = None  # what paired differences are in (None: the metric)
    embeddings: torch.Tensor | None = None

    def sample_weights(self) -> np.ndarray:
        return np.ones(len(self.per_sample)) if self.weights is None else self.weights

    def to_dict(self) -> dict[str, float | int]:
        """The value under the metric's name, its standard error, the samples, the secondary
        metrics (a classifier's dict is ``{"top1", "stderr", "num_samples"}``)."""
        return {
            self.name: self.value,
            "stderr": self.stderr,
            "num_samples": self.num_samples,
            **self.secondary,
        }


class Accuracy(MetricResult):
    """Top-1 accuracy of a classifier: ``correct`` says which samples it got right."""

    def __init__(self, top1: float, stderr: float, num_samples: int, correct: np.ndarray) -> None:
        super().__init__("top1", top1, stderr, num_samples, np.asarray(correct, dtype=float))

    @property
    def top1(self) -> float:
        return self.value

    @property
    def correct(self) -> np.ndarray:
        return self.per_sample.astype(bool)


def ratio_stderr(values: np.ndarray, weights: np.ndarray) -> float:
    """Standard error of Σ values / Σ weights over samples (the ratio estimator's; for unit
    weights the sample standard deviation over √N). Zero-weight samples add nothing."""
    keep = weights > 0
    values, weights = values[keep], weights[keep]
    count = len(values)
    if count < 2:
        return 0.0
    mean = values.sum() / weights.sum()
    residual = values - mean * weights
    return float(np.sqrt(count / (count - 1) * np.sum(residual**2)) / weights.sum())


def paired_difference(first: MetricResult, second: MetricResult) -> tuple[float, float]:
    """Mean difference (first − second) of the paired quantity on the same samples (accuracy and
    recall: a fraction; perplexity: the NLL in nats per token) and its standard error."""
    if first.num_samples != second.num_samples or len(first.per_sample) != len(second.per_sample):
        raise ValueError("paired comparison needs the same evaluation samples")
    weights = first.sample_weights()
    if not np.array_equal(weights, second.sample_weights()):
        raise ValueError(
            "paired comparison needs the same evaluation samples (token counts differ)"
        )
    diff = first.per_sample.astype(float) - second.per_sample.astype(float)
    return float(diff.sum() / weights.sum()), ratio_stderr(diff, weights)


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, dataset: Dataset, *, batch_size: int = 256) -> Accuracy:
    """Top-1 accuracy (as a fraction) and its binomial standard error."""
    model.eval()
    device = model_device(model)
    outcomes = []
    for start in range(0, len(dataset), batch_size):
        logits = model(dataset.inputs[start : start + batch_size].to(device))
        labels = dataset.labels[start : start + batch_size].to(device)
        outcomes.append((logits.argmax(dim=1) == labels).cpu().numpy())
    correct = np.concatenate(outcomes)
    top1 = float(correct.mean())
    return Accuracy(
        top1=top1,
        stderr=float(np.sqrt(top1 * (1 - top1) / len(correct))),
        num_samples=len(correct),
        correct=correct,
    )


@torch.no_grad()
def embed(model: nn.Module, inputs: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
    """An encoder's embeddings [N, D] of token inputs [N, 2, T], float32 on the CPU."""
    model.eval()
    device = model_device(model)
    batches = [
        model(inputs[start : start + batch_size].to(device)).float().cpu()
        for start in range(0, len(inputs), batch_size)
    ]
    return torch.cat(batches)


def retrieval_ranks(queries: torch.Tensor, documents: torch.Tensor) -> np.ndarray:
    """Rank (0 = first) of each query's own document (row i of ``documents``) among all
    documents by cosine similarity; ties count against the query (a document as similar as its
    own one comes first), so a model mapping everything to one vector retrieves nothing."""
    q = nn.functional.normalize(queries.double(), dim=1)
    d = nn.functional.normalize(documents.double(), dim=1)
    similarity = q @ d.T
    own = similarity.diagonal().unsqueeze(1)
    others = similarity >= own
    others.fill_diagonal_(False)
    return others.sum(dim=1).numpy()


def embedding_cosines(embeddings: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """Per text: the cosine of its embedding to the FP32 one (rows of [M, D] tensors), so two
    quantized models' cosines to FP32 can be compared pairwise."""
    if reference.shape != embeddings.shape:
        raise ValueError(
            f"FP32 embeddings {tuple(reference.shape)} do not match {tuple(embeddings.shape)}"
        )
    cosine = nn.functional.cosine_similarity(embeddings.double(), reference.double(), dim=1)
    return cosine.numpy()


def retrieval_metrics(
    queries: torch.Tensor, documents: torch.Tensor, reference: torch.Tensor | None = None
) -> MetricResult:
    """Recall@1 (per-query hits paired), recall@10 and, given the FP32 embeddings
    ``reference`` (queries then documents), the mean cosine of these embeddings to them."""
    if queries.shape != documents.shape or queries.dim() != 2:
        raise ValueError(
            f"need query and document embeddings of one shape [N, D], got "
            f"{tuple(queries.shape)} and {tuple(documents.shape)}"
        )
    ranks = retrieval_ranks(queries, documents)
    hits = (ranks < 1).astype(float)
    top10 = (ranks < 10).astype(float)
    ones = np.ones(len(ranks))
    secondary = {"recall@10": float(top10.mean()), "recall@10_stderr": ratio_stderr(top10, ones)}
    embeddings = torch.cat([queries, documents]).float()
    if reference is not None:
        values = embedding_cosines(embeddings, reference)
        secondary["cosine_to_fp32"] = float(values.mean())
        secondary["cosine_to_fp32_stderr"] = ratio_stderr(values, np.ones(len(values)))
    return MetricResult(
        name="recall@1",
        value=float(hits.mean()),
        stderr=ratio_stderr(hits, ones),
        num_samples=len(hits),
        per_sample=hits,
        secondary=secondary,
        embeddings=embeddings,
    )


def evaluate_retrieval(
    model: nn.Module, pairs: RetrievalPairs, *, reference: MetricResult | None = None
) -> MetricResult:
    """`retrieval_metrics` of an encoder's embeddings of ``pairs`` (cosine to the embeddings of
    ``reference``, the FP32 model's result on the same pairs, when given)."""
    queries = embed(model, pairs.queries.inputs)
    documents = embed(model, pairs.documents.inputs)
    return retrieval_metrics(
        queries, documents, reference.embeddings if reference is not None else None
    )


def next_token_nll(logits: torch.Tensor, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the summed NLL (nats) of the real next tokens and how many there are.

    ``logits`` [N, T, V] predict position t + 1 from position t; a target counts when both
    positions are real tokens (mask 1), so padding on either side adds nothing."""
    ids, mask = inputs[:, 0], inputs[:, 1].bool()
    targets = ids[:, 1:]
    real = mask[:, 1:] & mask[:, :-1]
    predicted = logits[:, :-1].float()
    # Per token in float32 (a float64 copy of [B, T, V] logits would double the memory); the
    # sums over tokens in float64.
    nll = nn.functional.cross_entropy(
        predicted.reshape(-1, predicted.shape[-1]), targets.reshape(-1), reduction="none"
    ).reshape(targets.shape)
    nll = torch.where(real, nll, torch.zeros_like(nll)).double()
    return nll.sum(dim=1), real.sum(dim=1)


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module, dataset: Dataset, *, batch_size: int | None = None
) -> MetricResult:
    """Perplexity exp(Σ NLL / Σ tokens) over the real next tokens of every sequence, its
    standard error by the delta method over sequences, and the mean NLL (nats/token)."""
    model.eval()
    device = model_device(model)
    nll_sums, counts = [], []
    start = 0
    while start < len(dataset):
        batch = dataset.inputs[start : start + (batch_size or 1)].to(device)
        logits = model(batch)
        if batch_size is None:  # first batch told the vocabulary size: fill 256 MiB
            per_row = logits[0].numel()
            batch_size = max(1, _LOGITS_PER_BATCH // per_row)
        nll, count = next_token_nll(logits, batch)
        nll_sums.append(nll.cpu().numpy())
        counts.append(count.cpu().numpy().astype(float))
        start += len(batch)
    per_sample, weights = np.concatenate(nll_sums), np.concatenate(counts)
    if weights.sum() == 0:
        raise InputError(
            f"{dataset.source}: no sequence has two real tokens; perplexity needs next tokens"
        )
    nll_mean = float(per_sample.sum() / weights.sum())
    nll_stderr = ratio_stderr(per_sample, weights)
    perplexity = float(np.exp(nll_mean))
    return MetricResult(
        name="perplexity",
        value=perplexity,
        stderr=perplexity * nll_stderr,
        num_samples=int(np.count_nonzero(weights)),
        per_sample=per_sample,
        higher_is_better=False,
        secondary={"nll": nll_mean, "nll_stderr": nll_stderr, "tokens": float(weights.sum())},
        weights=weights,
        paired_quantity="nll",
    )


def model_task(model: nn.Module) -> str | None:
    """A text model's ``task`` ("encoder", "causal-lm", "sequence-classification"); None for
    image models."""
    task = getattr(model, "task", None)
    return str(task) if task is not None else None


def is_token_data(dataset: Dataset) -> bool:
    """Token ids with attention masks, [N, 2, T] integers (`lcpaq.model.text_data`)."""
    inputs = dataset.inputs
    return not inputs.is_floating_point() and inputs.dim() == 3 and inputs.shape[1] == 2


def evaluate_model(
    model: nn.Module, data: Dataset | RetrievalPairs, *, reference: MetricResult | None = None
) -> MetricResult:
    """The metric that fits ``model`` and ``data``: retrieval for query/document pairs,
    perplexity for a causal LM on token data, else top-1 accuracy. ``reference``: the FP32
    model's result on the same data (an encoder's cosine to FP32 needs it)."""
    task = model_task(model)
    if isinstance(data, RetrievalPairs):
        return evaluate_retrieval(model, data, reference=reference)
    if task == "causal-lm" and is_token_data(data):
        return evaluate_perplexity(model, data)
    if task in ("encoder", "causal-lm"):
        raise InputError(
            f"{data.source}: a {task} model is evaluated on "
            + (
                "query/document pairs (JSONL with query and document)"
                if task == "encoder"
                else "token data"
            )
        )
    if len(data) and bool((data.labels < 0).all()):
        raise InputError(f"{data.source}: a classifier is evaluated on labelled data; it has none")
    return evaluate_accuracy(model, data)


def first_samples(data: Dataset | RetrievalPairs, count: int) -> Dataset | RetrievalPairs:
    """The first ``count`` samples (pairs: the first ``count`` queries among as many documents)."""
    if isinstance(data, RetrievalPairs):
        stop = min(count, len(data))
        return RetrievalPairs(
            data.queries.subset(0, stop), data.documents.subset(0, stop), f"{data.source}[0:{stop}]"
        )
    return data.subset(0, min(count, len(data)))
