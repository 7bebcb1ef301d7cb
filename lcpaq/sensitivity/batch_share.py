"""Which calibration batches one process computes, and how its partial results are combined.

`BatchShare` is the one seam between the curvature estimators and torch.distributed: the estimators
(`lcpaq.sensitivity.gauss_newton`, `lcpaq.sensitivity.hutchinson`,
`lcpaq.sensitivity.activation`) take one and never call
torch.distributed themselves; `lcpaq.sensitivity.distributed.batch_share` builds the one of this
process from its process group. The default is a single process with every batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import numpy as np
import torch

#: A calibration batch: inputs and labels (None for the label-free ``kl`` loss).
Batch = tuple[torch.Tensor, torch.Tensor | None]

T = TypeVar("T")

#: (batch index, per-batch result) pairs of one process.
IndexedRows = list[tuple[int, Any]]


@dataclass(frozen=True)
class BatchShare:
    """The calibration batches one process computes, and how per-batch results are combined.

    Batches ``rank, rank + world, …`` are this process's. ``reduce_sum`` adds a float64 array over
    the processes (every process gets the sum; ``reduce_min``/``reduce_max`` the elementwise
    minimum/maximum), ``reduce_tensor_sum`` the same for a tensor (kept
    on its device and dtype), and ``gather`` collects every process's (batch index, result) pairs
    in every process. With the Hutchinson estimators every process draws the same probes from the
    same seed, sums its batches and all-reduces, so every process sees the same estimate and stops
    at the same round; the Gauss–Newton traces gather the per-batch rows and replay them in batch
    order, so the sums are the single-process ones.
    """

    rank: int = 0
    world: int = 1
    reduce_sum: Callable[[np.ndarray], np.ndarray] | None = None
    reduce_min: Callable[[np.ndarray], np.ndarray] | None = None
    reduce_max: Callable[[np.ndarray], np.ndarray] | None = None
    reduce_tensor_sum: Callable[[torch.Tensor], torch.Tensor] | None = None
    gather: Callable[[IndexedRows], list[IndexedRows]] | None = None

    def indices(self, num_batches: int) -> list[int]:
        """Indices of this process's batches among ``num_batches``."""
        return list(range(self.rank, num_batches, self.world))

    def mine(self, batches: Sequence[T]) -> Sequence[T]:
        return batches[self.rank :: self.world]

    def add_up(self, values: np.ndarray) -> np.ndarray:
        return values if self.reduce_sum is None else self.reduce_sum(values)

    def smallest(self, values: np.ndarray) -> np.ndarray:
        """The elementwise minimum over the processes (the activation ranges' low ends)."""
        return values if self.reduce_min is None else self.reduce_min(values)

    def largest(self, values: np.ndarray) -> np.ndarray:
        return values if self.reduce_max is None else self.reduce_max(values)

    def add_up_tensor(self, values: torch.Tensor) -> torch.Tensor:
        return values if self.reduce_tensor_sum is None else self.reduce_tensor_sum(values)

    def in_batch_order(self, rows: Sequence[T], num_batches: int) -> list[T]:
        """Every process's per-batch ``rows`` (this process's in `indices` order), in batch order."""
        if self.gather is None:
            return list(rows)
        gathered = self.gather(list(zip(self.indices(num_batches), rows)))
        by_index = dict(pair for part in gathered for pair in part)
        return [cast(T, by_index[index]) for index in range(num_batches)]


#: One process computing every batch (the default of the estimators).
SINGLE_PROCESS = BatchShare()
