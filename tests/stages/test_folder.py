"""Typed readers of the run folder: the allocation options read back from ``allocation.json``
(with defaults for files written before an option existed), and the early writability check."""

from __future__ import annotations

import pytest

from lcpaq.config import AllocationConfig
from lcpaq.errors import InputError
from lcpaq.stages.folder import allocation_config_of, ensure_writable, pair_options_of


def test_allocation_options_read_back_typed() -> None:
    stored = {
        "first_last": "keep-8bit",
        "scorer": "diagonal",
        "ties": [["a", "b"]],
        "tie_rule": "downsample",
        "latency_table": None,
        "pairwise": {"pairwise_weight": 0.5, "pair_z": 3.0, "pairs_used": 4, "terms_used": 9},
        "formats": ["int4", "int8"],  # the solution's fields are not options
    }
    options = allocation_config_of(stored)
    assert options == AllocationConfig(
        first_last="keep-8bit",
        scorer="diagonal",
        ties=(("a", "b"),),
        tie_rule="downsample",
        pairwise_weight=0.5,
        pair_z=3.0,
    )
    assert pair_options_of(stored) == {
        "pairwise_weight": 0.5,
        "pair_z": 3.0,
        "pair_clip": "none",
        "pairwise_mode": "augmented",
    }


def test_older_allocation_files_get_the_defaults() -> None:
    assert allocation_config_of({"first_last": "search", "scorer": "hawq_v2"}) == (
        AllocationConfig()
    )


def test_unwritable_folder_is_named(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(InputError, match=f"output folder {blocker / 'run'} is not writable"):
        ensure_writable(blocker / "run")
