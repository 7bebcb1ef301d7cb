"""The rounds of the Hutchinson estimators, resumable after any finished batch.

Both Hutchinson estimators (`lcpaq.sensitivity.hutchinson`) run in rounds: draw probes from the
seeded generator, sum each batch's contribution for every probe, add the sums up over processes,
and decide from all values so far whether (and where) to probe again. That decision is a pure
function of the values, and the probes a pure function of the seed and the draws before them, so
the whole run is determined by the per-round values. `ProbeRounds` saves exactly those (and, for
the round in progress, its batches done and partial sums) to a `lcpaq.state_file.StateFile`. A
resumed estimator replays the saved rounds: it draws their probes again (the generator then stands
where it stood) but takes their values from the file instead of computing them, and continues the
round in progress from its next batch; the sums are added in the same order, so the estimate is
bitwise that of an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import TypeVar

import numpy as np

from lcpaq.sensitivity.batch_share import Batch, BatchShare
from lcpaq.state_file import Snapshot, StateFile

P = TypeVar("P")


class ProbeRounds:
    """The per-round values of one Hutchinson run, restored from ``state_file`` when it holds a
    snapshot (constructor: loads only)."""

    def __init__(self, state_file: StateFile) -> None:
        self.state_file = state_file
        self.values: list[np.ndarray] = []
        snapshot = state_file.load()
        self._restored: list[np.ndarray] = []
        self._partial: np.ndarray | None = None
        self._position = 0
        if snapshot is not None:
            count = int(snapshot["rounds"])
            self._restored = [snapshot[f"round/{index}"].numpy() for index in range(count)]
            self._position = int(snapshot["position"])
            if self._position:
                self._partial = snapshot["partial"].numpy()

    def run(
        self,
        probes: P,
        contribution: Callable[[P, Batch], np.ndarray],
        batches: Sequence[Batch],
        share: BatchShare,
        shape: tuple[int, ...],
    ) -> np.ndarray:
        """The values of one round, of ``shape``: Σ over ``batches`` of
        ``contribution(probes, batch)``, added up over the processes. A round the snapshot holds is returned without computing
        (``probes`` must still be drawn, so the generator advances as in the first run)."""
        index = len(self.values)
        if index < len(self._restored):
            values = self._restored[index]
        else:
            values = share.add_up(self._accumulate(probes, contribution, batches, shape))
        self.values.append(values)
        self.state_file.save(self._snapshot, last=True)
        return values

    def _accumulate(
        self,
        probes: P,
        contribution: Callable[[P, Batch], np.ndarray],
        batches: Sequence[Batch],
        shape: tuple[int, ...],
    ) -> np.ndarray:
        total = np.zeros(shape) if self._partial is None else self._partial
        start = self._position
        self._partial, self._position = None, 0
        for position in range(start, len(batches)):
            total = total + contribution(probes, batches[position])
            if position + 1 < len(batches):
                self.state_file.save(partial(self._snapshot, total, position + 1))
        return total

    def _snapshot(self, total: np.ndarray | None = None, position: int = 0) -> Snapshot:
        """The finished rounds, and of the round in progress its batches done and partial sums."""
        arrays: dict[str, np.ndarray] = {
            f"round/{index}": values for index, values in enumerate(self.values)
        }
        arrays["rounds"] = np.array(len(self.values))
        arrays["position"] = np.array(position)
        if total is not None:
            arrays["partial"] = total
        return arrays
