"""Where a search starts: lcpaq's default configuration, or the nearest one that fits the budgets.

Input: the searched space, the base configuration (hard budgets) and the `SearchContext` that
solves one configuration's allocation. Output: a `Start`: the parameters trial 0 measures (the
study's reference and the size cap's source), and a note when they are not lcpaq's default.

A search must never end on an infeasible default: under ``--budget bitops-g=0.365`` with
``--also act_formats`` the default keeps INT8 inputs, whose smallest BitOps is above the budget.
Only dimensions that change what the budgets count (`Dimension.changes_costs`: candidate formats,
activation formats, first/last policy, scale granularity, zero points) can make a configuration
fit, so the start is the first of the default's one-change neighbours along those dimensions that
fits (cheapest to check first, `neighbours`). When none fits, the search starts without a reference
trial and without a size cap, prunes every configuration that does not fit, and says so.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lcpaq.allocation.result import Allocation
from lcpaq.config import RunConfig
from lcpaq.search.context import Infeasible, SearchContext
from lcpaq.search.space import SearchSpace


@dataclass(frozen=True)
class Start:
    """Trial 0's parameters (None: no configuration near the default fits the budgets), its
    allocation, the seconds spent finding it, and what the report says about it."""

    params: dict[str, Any] | None
    allocation: Allocation | None
    seconds: float
    note: str = ""

    def to_attrs(self) -> dict[str, Any]:
        """What the study stores (user attribute ``start``), so every worker and a resumed
        search agree on it."""
        return {"params": self.params, "note": self.note}


def _fmt(params: Mapping[str, Any], names: Iterable[str]) -> str:
    return ", ".join(f"{name}={params[name]}" for name in names)


def neighbours(space: SearchSpace, base: RunConfig) -> list[dict[str, Any]]:
    """lcpaq's default with one budget-relevant dimension changed: first those that keep the
    default's quantized weights (scheme and candidate formats; no new rounding pass to check
    them), then the others, each in the space's order."""
    default = space.default_params()
    reference = space.config(base, default).analysis

    def new_weights(params: dict[str, Any]) -> bool:
        analysis = space.config(base, params).analysis
        return (analysis.scheme, analysis.formats) != (reference.scheme, reference.formats)

    found = [
        {**default, dimension.name: choice}
        for dimension in space.dimensions
        if dimension.changes_costs
        for choice in dimension.choices
        if choice != dimension.default
    ]
    return sorted(found, key=new_weights)  # stable: the space's order within each group


def _try(context: SearchContext, config: RunConfig) -> tuple[Allocation | None, str, float]:
    """The allocation of ``config`` (None with the reason when it does not fit), and seconds."""
    try:
        prepared = context.prepare(config, build=False)
    except Infeasible as error:
        return None, str(error), sum(error.timings.values())
    return prepared.allocation, "", sum(prepared.timings.values())


def find_start(space: SearchSpace, base: RunConfig, context: SearchContext) -> Start:
    """The default if it fits the budgets of ``base``, else its first fitting neighbour."""
    default = space.default_params()
    allocation, reason, seconds = _try(context, space.config(base, default))
    if allocation is not None:
        return Start(default, allocation, seconds)
    for params in neighbours(space, base):
        candidate, _, spent = _try(context, space.config(base, params))
        seconds += spent
        if candidate is not None:
            changed = [name for name in params if params[name] != default[name]]
            note = (
                f"lcpaq's default ({_fmt(default, changed)}) does not fit the budgets "
                f"({reason}); the search starts from {_fmt(params, changed)}, the nearest "
                "configuration that fits"
            )
            return Start(params, candidate, seconds, note)
    note = (
        f"lcpaq's default does not fit the budgets ({reason}), nor does any configuration one "
        "change away from it: the search starts without a reference trial and without a size "
        "cap, and prunes every configuration that does not fit"
    )
    return Start(None, None, seconds, note)
