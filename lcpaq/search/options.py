"""What ``lcpaq search`` was asked: `SearchOptions`, checked when made.

Input: the base `RunConfig` (model, data, budgets: fixed for every trial) and the search's own
options from `lcpaq.cli`. Output: a frozen `SearchOptions` every other search module reads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lcpaq.config import RunConfig
from lcpaq.errors import InputError
from lcpaq.search.fidelity import FIDELITIES
from lcpaq.search.proxy import PROXIES

DEFAULT_RUNGS = (128, 384, 1152)
DEFAULT_STUDY_NAME = "lcpaq-search"


@dataclass(frozen=True)
class SearchOptions:
    """What ``lcpaq search`` was asked (see `lcpaq.cli`)."""

    base: RunConfig
    out: Path
    trials: int = 60
    eval_path: str | None = None
    storage: str | None = None
    study_name: str = DEFAULT_STUDY_NAME
    resume: bool = False
    #: Create or join the study, run trials until ``trials`` are scored, and skip the final
    #: step (a later ``--resume`` does it over every worker's trials).
    worker: bool = False
    top_k: int = 3
    proxy: str = "kl"
    rungs: tuple[int, ...] = DEFAULT_RUNGS
    #: "multi": the first rung on a cheap configuration (`lcpaq.search.fidelity`).
    fidelity: str = "full"
    cheap_samples: int = 128
    fixed: Mapping[str, str] = field(default_factory=dict)
    also: tuple[str, ...] = ()
    size_cap: bool = True
    seed: int = 0
    #: The best of the full evaluation replaces lcpaq's default only when its paired gain over
    #: the default on the evaluation data exceeds this many standard errors.
    min_gain_se: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_gain_se < math.inf:
            raise InputError(f"--min-gain-se must be a finite number >= 0, got {self.min_gain_se}")
        if self.trials < 1:
            raise InputError(f"--trials must be at least 1, got {self.trials}")
        if self.top_k < 1:
            raise InputError(f"--top-k must be at least 1, got {self.top_k}")
        if self.fidelity not in FIDELITIES:
            raise InputError(
                f"--fidelity must be one of {', '.join(FIDELITIES)}, got {self.fidelity!r}"
            )
        if self.cheap_samples < 1:
            raise InputError(f"--cheap-samples must be at least 1, got {self.cheap_samples}")
        if self.proxy not in PROXIES:
            raise InputError(f"--proxy must be one of {', '.join(PROXIES)}, got {self.proxy!r}")
        if not self.base.allocation.budgets:
            raise InputError("give at least one --budget, e.g. --budget avg-bits=3")

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.out / 'search.db').resolve()}"
