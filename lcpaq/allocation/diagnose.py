"""Why budgets cannot all be met: the infeasibility diagnosis, computed once (allocate).

Input: a problem that knows the smallest achievable value of each metric and whether budgets can be
met together (`Feasibility`), and the budgets. Output: a `Diagnosis`: per budget its smallest
achievable value and shortfall, and every pair of budgets (each feasible alone) that cannot be met
together. `AllocationProblem.solve` raises it inside `InfeasibleBudgets`; the allocate stage writes
it to ``infeasible.json`` (`report`), so every pair is solved once. Numpy only.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from lcpaq.allocation.budgets import Budget
from lcpaq.errors import InputError


class Feasibility(Protocol):
    def smallest_achievable(self, metric: str) -> float: ...

    def feasible(self, budgets: Sequence[Budget]) -> bool: ...


def feasible_alone(budget: Budget, smallest: float) -> bool:
    """Whether ``budget`` admits the smallest achievable value of its metric (1e-9 relative)."""
    return budget.value >= smallest - 1e-9 * abs(smallest)


@dataclass(frozen=True)
class Diagnosis:
    """Budgets, the smallest achievable value of each one's metric, and the conflicting pairs."""

    budgets: tuple[Budget, ...]
    smallest: tuple[float, ...]
    conflicting_pairs: tuple[tuple[Budget, Budget], ...]

    def to_dict(self, message: str) -> dict[str, Any]:
        """The content of ``infeasible.json``, with the error ``message`` the run stopped on."""
        rows = [
            {
                "metric": budget.metric,
                "limit": budget.value,
                "smallest_achievable": smallest,
                "feasible_alone": feasible_alone(budget, smallest),
                "shortfall": max(0.0, smallest - budget.value),
            }
            for budget, smallest in zip(self.budgets, self.smallest)
        ]
        return {
            "budgets": [str(budget) for budget in self.budgets],
            "message": message,
            "per_budget": rows,
            "conflicting_pairs": [[str(a), str(b)] for a, b in self.conflicting_pairs],
        }

    def conflict_message(self) -> str:
        """The error text when each budget is feasible alone but not all together."""
        alone = ", ".join(f"{b.metric} {s:.4g}" for b, s in zip(self.budgets, self.smallest))
        pairs = [f"{a} with {b}" for a, b in self.conflicting_pairs]
        conflict = (
            "conflicting pairs: " + "; ".join(pairs)
            if pairs
            else "no two of them conflict, only all together"
        )
        return (
            "budgets "
            + ", ".join(map(str, self.budgets))
            + " cannot all be met at once: each is feasible alone (smallest achievable "
            + alone
            + ") but together they conflict ("
            + conflict
            + ")"
        )


class InfeasibleBudgets(InputError):
    """Budgets each feasible alone that cannot all be met; carries the `Diagnosis`."""

    def __init__(self, diagnosis: Diagnosis) -> None:
        super().__init__(diagnosis.conflict_message())
        self.diagnosis = diagnosis


def diagnose(problem: Feasibility, budgets: Sequence[Budget]) -> Diagnosis:
    """Per budget the smallest achievable value (alone, with the candidates, ties and layer
    policy), and every pair of budgets feasible alone that cannot be met together."""
    smallest = tuple(problem.smallest_achievable(budget.metric) for budget in budgets)
    alone = [b for b, s in zip(budgets, smallest) if feasible_alone(b, s)]
    conflicts = tuple(
        (first, second)
        for first, second in itertools.combinations(alone, 2)
        if not problem.feasible([first, second])
    )
    return Diagnosis(tuple(budgets), smallest, conflicts)


def infeasibility_report(
    problem: Feasibility, budgets: Sequence[Budget], error: InputError
) -> dict[str, Any]:
    """``infeasible.json`` for a solve that raised ``error``: the diagnosis it carries, or a new
    one (when a budget alone was already infeasible, no pair had been solved)."""
    diagnosis = error.diagnosis if isinstance(error, InfeasibleBudgets) else None
    return (diagnosis or diagnose(problem, budgets)).to_dict(str(error))
