"""Accuracy in `lcpaq.model.evaluate`: top-1 over batches, its binomial standard error and the
paired difference of two models on the same images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lcpaq.model.data import Dataset
from lcpaq.model.evaluate import Accuracy, evaluate_accuracy, paired_difference

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


def test_paired_difference() -> None:
    first = Accuracy(0.75, 0.0, 4, np.array([True, True, True, False]))
    second = Accuracy(0.25, 0.0, 4, np.array([True, False, False, False]))
    mean, stderr = paired_difference(first, second)
    # Differences 0, 1, 1, 0: mean 0.5, sample std sqrt(1/3), over sqrt(4).
    assert mean == 0.5 and stderr == pytest.approx(np.sqrt(1 / 3) / 2)
    with pytest.raises(ValueError, match="same evaluation samples"):
        paired_difference(first, Accuracy(1.0, 0.0, 1, np.array([True])))
