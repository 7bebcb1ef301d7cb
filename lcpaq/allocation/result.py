"""What one allocation solve returns (allocate): the chosen formats and what they cost.

`Allocation` is the content of ``allocation.json`` (without the stage's own keys); `ParetoPoint` is
one optimum of a budget sweep; `Outcome` is a solver's raw answer in units (tied layers), which
`lcpaq.allocation.problem.AllocationProblem` turns into the other two. Numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class BudgetUse:
    """One budget of a solve: its limit, the value used and whether it is binding
    (used up to `lcpaq.allocation.budgets.BINDING_TOLERANCE`)."""

    metric: str
    limit: float
    used: float
    binding: bool


@dataclass(frozen=True)
class Allocation:
    """The chosen format per layer (in ``layer_names`` order) and what it costs."""

    layer_names: tuple[str, ...]
    formats: tuple[str, ...]
    #: Bits per weight the budgets count (log2(3) for ternary).
    bits: tuple[float, ...]
    predicted_loss_increase: float
    average_bits: float
    size_bytes: float
    budgets: tuple[BudgetUse, ...]
    status: str
    mip_gap: float
    solve_time_s: float
    costs: dict[str, float] = field(default_factory=dict)
    #: The minimised objective: the predicted loss increase plus Σ_k λ_k·cost_k/B_k (METHOD §4).
    objective: float | None = None
    cost_weights: dict[str, float] = field(default_factory=dict)
    #: Which exact method proved the optimum: ``highs`` (MIP), ``dp`` (dynamic program with
    #: Lagrangian bounds, `lcpaq.allocation.exact`) or ``knapsack`` (multiple-choice knapsack DP).
    solver: str = "highs"

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["assignment"] = dict(zip(self.layer_names, self.formats))
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Allocation:
        """The allocation of an ``allocation.json`` (keys it does not know are ignored)."""
        values: dict[str, Any] = {key: data[key] for key in cls.__dataclass_fields__ if key in data}
        for key in ("layer_names", "formats", "bits"):
            values[key] = tuple(values[key])
        values["budgets"] = tuple(BudgetUse(**use) for use in values["budgets"])
        return cls(**values)


@dataclass(frozen=True)
class ParetoPoint:
    """One optimum of a budget sweep: its costs, predicted loss increase and assignment."""

    budgets: tuple[float, ...]  # the swept values this assignment is optimal for
    costs: dict[str, float]
    predicted_loss_increase: float
    formats: tuple[str, ...]
    mip_gap: float  # 0 when a dynamic program proved the optimum exactly
    objective: float | None = None  # with cost weights: the weighted objective
    solver: str = "highs"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Outcome:
    """One solve: the format column per unit (None if infeasible), status, gap, time, method."""

    choice: np.ndarray | None
    status: str
    gap: float
    seconds: float
    solver: str
