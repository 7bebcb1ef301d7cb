"""Top-1 accuracy of a model on labelled data (the core of the evaluate stage), with the per-sample
outcomes kept so two models evaluated on the same images can be compared pairwise."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lcpaq.model.data import Dataset
from lcpaq.model.graph import model_device


@dataclass(frozen=True)
class Accuracy:
    top1: float
    stderr: float
    num_samples: int
    correct: np.ndarray  # bool [N], in data set order

    def to_dict(self) -> dict[str, float | int]:
        return {"top1": self.top1, "stderr": self.stderr, "num_samples": self.num_samples}


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


def paired_difference(first: Accuracy, second: Accuracy) -> tuple[float, float]:
    """Mean accuracy difference (first − second) on the same samples and its standard error."""
    if first.num_samples != second.num_samples:
        raise ValueError("paired comparison needs the same evaluation samples")
    diff = first.correct.astype(float) - second.correct.astype(float)
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))
