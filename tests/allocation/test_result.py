"""`lcpaq.allocation.result`: an allocation survives its JSON round trip."""

from __future__ import annotations

import json

from lcpaq.allocation.result import Allocation, BudgetUse


def test_allocation_round_trips_through_json() -> None:
    allocation = Allocation(
        layer_names=("a", "b"),
        formats=("int4", "int8"),
        bits=(4, 8),
        predicted_loss_increase=0.25,
        average_bits=6.0,
        size_bytes=1000.0,
        budgets=(BudgetUse("avg-bits", 6.0, 6.0, True),),
        status="Optimal",
        mip_gap=0.0,
        solve_time_s=0.01,
        costs={"avg-bits": 6.0},
        objective=0.25,
        solver="knapsack",
    )
    data = json.loads(json.dumps({**allocation.to_dict(), "scorer": "hawq_v2"}))
    assert data["assignment"] == {"a": "int4", "b": "int8"}
    assert Allocation.from_dict(data) == allocation
