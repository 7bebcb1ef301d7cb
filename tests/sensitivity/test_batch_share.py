"""`BatchShare` (`lcpaq.sensitivity.batch_share`): which batches a process takes and how per-batch rows
of several processes come back in batch order, with the collectives faked in one process."""

from __future__ import annotations

import numpy as np

from lcpaq.sensitivity.batch_share import SINGLE_PROCESS, BatchShare, IndexedRows


def test_single_process_takes_every_batch_and_reduces_nothing() -> None:
    values = np.array([1.0, 2.0])
    assert SINGLE_PROCESS.indices(3) == [0, 1, 2]
    assert list(SINGLE_PROCESS.mine(["a", "b", "c"])) == ["a", "b", "c"]
    assert SINGLE_PROCESS.add_up(values) is values
    assert SINGLE_PROCESS.in_batch_order(["a", "b", "c"], 3) == ["a", "b", "c"]


def test_rows_of_two_processes_come_back_in_batch_order() -> None:
    """5 batches over 2 processes: rank 0 holds 0, 2, 4 and rank 1 holds 1, 3."""
    other_rank: IndexedRows = [(1, "row1"), (3, "row3")]
    share = BatchShare(
        rank=0,
        world=2,
        reduce_sum=lambda values: 2 * values,
        gather=lambda mine: [mine, other_rank],
    )
    assert share.indices(5) == [0, 2, 4]
    assert list(share.mine(["b0", "b1", "b2", "b3", "b4"])) == ["b0", "b2", "b4"]
    rows = share.in_batch_order(["row0", "row2", "row4"], 5)
    assert rows == ["row0", "row1", "row2", "row3", "row4"]
    np.testing.assert_array_equal(share.add_up(np.array([1.5])), [3.0])
