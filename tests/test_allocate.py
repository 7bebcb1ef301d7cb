"""The HiGHS allocation in `lcpaq.allocate` against brute-force enumeration on small instances."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from lcpaq.allocate import (
    BITS_PER_MB,
    Allocation,
    AllocationProblem,
    Budget,
    allowed_candidates,
    parse_budget,
    uniform_choice,
)
from lcpaq.candidates import CandidateTable
from lcpaq.errors import InputError
from lcpaq.frontier import build_frontiers

pytestmark = pytest.mark.usefixtures("single_thread")


def random_instance(
    rng: np.random.Generator,
    num_layers: int,
    num_formats: int,
    *,
    monotone: bool = False,
    format_overhead: bool = False,
) -> tuple[CandidateTable, np.ndarray, float]:
    """A random candidate table. ``monotone``: scores fall with bits (as quantization error does),
    so budgets bind. ``format_overhead``: the stored overhead differs per format, so size is not an
    affine function of average bits and the two budgets can conflict."""
    bits = np.sort(rng.choice(np.arange(2, 9), size=num_formats, replace=False))
    num_params = rng.integers(20, 3000, size=num_layers)
    overhead = rng.integers(1, 64, size=num_layers)[:, None] * 32.0
    if format_overhead:
        overhead = overhead * rng.integers(0, 200, size=(num_layers, num_formats))
    weight_bits = num_params[:, None] * bits[None, :].astype(float)
    table = CandidateTable(
        layer_names=tuple(f"block{index}.conv" for index in range(num_layers)),
        format_names=tuple(f"int{b}" for b in bits),
        num_params=num_params.astype(np.int64),
        bits=bits.astype(np.int64),
        weight_bits=weight_bits,
        size_bits=weight_bits + overhead,
        error_sq=rng.random((num_layers, num_formats)),
        weighted_error=np.full((num_layers, num_formats), np.nan),
    )
    # Score scale is tested separately (test_allocation_is_invariant_to_the_scale_of_the_scores).
    scale = 10.0 ** rng.uniform(-1, 1, (num_layers, 1))
    if monotone:
        decay = 2.0 ** -(bits[None, :] - 2.0)
        scores = scale * decay * rng.uniform(0.5, 2.0, (num_layers, num_formats))
    else:
        scores = scale * rng.uniform(0.01, 1.0, (num_layers, num_formats))
    constant_size_bits = float(rng.integers(0, 100_000))
    return table, scores, constant_size_bits


class BruteForce:
    """Every assignment over the allowed candidates, with its metrics and score."""

    def __init__(
        self, table: CandidateTable, scores: np.ndarray, allowed: np.ndarray, constant: float
    ) -> None:
        options = [np.flatnonzero(row) for row in allowed]
        self.choices = np.array(list(itertools.product(*options)))
        rows = np.arange(len(table.layer_names))
        self.avg_bits = table.weight_bits[rows, self.choices].sum(1) / table.num_params.sum()
        self.size_mb = (table.size_bits[rows, self.choices].sum(1) + constant) / BITS_PER_MB
        self.score = scores[rows, self.choices].sum(1)

    def metric(self, name: str) -> np.ndarray:
        return self.avg_bits if name == "avg-bits" else self.size_mb

    def best(self, budgets: list[Budget]) -> tuple[float, np.ndarray] | None:
        feasible = np.ones(len(self.score), dtype=bool)
        for budget in budgets:
            feasible &= self.metric(budget.metric) <= budget.value
        if not feasible.any():
            return None
        scores = np.where(feasible, self.score, np.inf)
        index = int(np.argmin(scores))
        return float(scores[index]), self.choices[index]

    def is_unique_optimum(self, budgets: list[Budget]) -> bool:
        feasible = np.ones(len(self.score), dtype=bool)
        for budget in budgets:
            feasible &= self.metric(budget.metric) <= budget.value
        ordered = np.sort(self.score[feasible])
        return len(ordered) == 1 or ordered[1] > ordered[0] * (1 + 1e-4) + 1e-12

    def random_budget(self, rng: np.random.Generator, metric: str) -> Budget:
        """A limit between the smallest and largest value, away from every achievable value
        (so float rounding at the boundary cannot decide feasibility)."""
        values = np.unique(self.metric(metric))
        for _ in range(100):
            value = float(rng.uniform(values[0], values[-1]))
            if np.min(np.abs(values - value)) > 1e-6 * value:
                return Budget(metric, value)
        return Budget(metric, float(values[-1] * 1.1))


def check_allocation(
    allocation: Allocation,
    problem: AllocationProblem,
    brute: BruteForce,
    budgets: list[Budget],
    allowed: np.ndarray,
) -> None:
    table = problem.table
    expected = brute.best(budgets)
    assert expected is not None
    best_score, _ = expected
    assert allocation.predicted_loss_increase == pytest.approx(best_score, rel=1e-6, abs=1e-12)
    choice = np.array([table.format_names.index(name) for name in allocation.formats])
    rows = np.arange(len(table.layer_names))
    assert allowed[rows, choice].all()
    assert allocation.bits == tuple(int(table.bits[index]) for index in choice)
    assert allocation.layer_names == table.layer_names
    assert allocation.predicted_loss_increase == pytest.approx(
        float(problem.scores[rows, choice].sum()), rel=1e-12
    )
    average_bits = table.weight_bits[rows, choice].sum() / table.num_params.sum()
    size_bytes = (table.size_bits[rows, choice].sum() + problem.constant_size_bits) / 8
    assert allocation.average_bits == pytest.approx(average_bits, rel=1e-12)
    assert allocation.size_bytes == pytest.approx(size_bytes, rel=1e-12)
    assert len(allocation.budgets) == len(budgets)
    for use, budget in zip(allocation.budgets, budgets):
        assert (use.metric, use.limit) == (budget.metric, budget.value)
        recomputed = average_bits if budget.metric == "avg-bits" else size_bytes * 8 / BITS_PER_MB
        assert use.used == pytest.approx(recomputed, rel=1e-12)
        assert use.used <= budget.value * (1 + 1e-12)
        assert use.binding == (use.used >= budget.value * (1 - 1e-3))
    if brute.is_unique_optimum(budgets):
        _, best_choice = expected
        assert tuple(choice) == tuple(best_choice)


@pytest.mark.parametrize("seed", range(36))
def test_solve_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_layers, num_formats = int(rng.integers(1, 7)), int(rng.integers(1, 4))
    table, scores, constant = random_instance(
        rng, num_layers, num_formats, monotone=seed % 4 < 2, format_overhead=seed % 4 == 3
    )
    kept = build_frontiers(table, scores) if seed % 2 else np.ones_like(scores, dtype=bool)
    fixed = {}
    if seed % 3 == 0:  # fix one layer, possibly to a pruned format
        layer = int(rng.integers(num_layers))
        fixed[table.layer_names[layer]] = table.format_names[int(rng.integers(num_formats))]
    allowed = allowed_candidates(table, kept, fixed)
    for name, fmt in fixed.items():
        row = table.layer_names.index(name)
        assert allowed[row].sum() == 1 and allowed[row, table.format_index(fmt)]
    problem = AllocationProblem(table, scores, allowed, constant_size_bits=constant)
    brute = BruteForce(table, scores, allowed, constant)
    budget_sets = [
        [brute.random_budget(rng, "avg-bits")],
        [brute.random_budget(rng, "size-mb")],
        [brute.random_budget(rng, "avg-bits"), brute.random_budget(rng, "size-mb")],
        [brute.random_budget(rng, "size-mb"), brute.random_budget(rng, "avg-bits")],
        [],
    ]
    for budgets in budget_sets:
        if brute.best(budgets) is None:  # each alone is feasible, together they are not
            with pytest.raises(InputError, match="cannot all be met at once"):
                problem.solve(budgets)
            continue
        allocation = problem.solve(budgets)
        check_allocation(allocation, problem, brute, budgets, allowed)
        for name, fmt in fixed.items():
            assert allocation.formats[table.layer_names.index(name)] == fmt


def test_resolving_equals_a_fresh_problem() -> None:
    rng = np.random.default_rng(1234)
    table, scores, constant = random_instance(rng, 6, 3, monotone=True, format_overhead=True)
    allowed = np.ones_like(scores, dtype=bool)
    brute = BruteForce(table, scores, allowed, constant)
    reused = AllocationProblem(table, scores, allowed, constant_size_bits=constant)
    sequence = [
        [brute.random_budget(rng, "size-mb")],
        [brute.random_budget(rng, "avg-bits")],  # the size row must be released again
        [],
        [brute.random_budget(rng, "avg-bits"), brute.random_budget(rng, "size-mb")],
        [brute.random_budget(rng, "avg-bits")],
        [brute.random_budget(rng, "size-mb")],
    ]
    solved = 0
    for budgets in sequence:
        if brute.best(budgets) is None:
            continue
        fresh = AllocationProblem(table, scores, allowed, constant_size_bits=constant)
        first, second = reused.solve(budgets), fresh.solve(budgets)
        solved += 1
        assert first.formats == second.formats
        assert first.predicted_loss_increase == pytest.approx(second.predicted_loss_increase)
        check_allocation(first, reused, brute, budgets, allowed)
    assert solved >= 5


def test_allocation_is_invariant_to_the_scale_of_the_scores() -> None:
    """Multiplying every score by 1e-6 must not change the optimal allocation."""
    for seed in range(12):
        rng = np.random.default_rng(500 + seed)
        table, scores, constant = random_instance(rng, 6, 3, monotone=True)
        allowed = np.ones_like(scores, dtype=bool)
        brute = BruteForce(table, scores, allowed, constant)
        budgets = [brute.random_budget(rng, "avg-bits")]
        best = brute.best(budgets)
        assert best is not None
        small = scores * 1e-6
        allocation = AllocationProblem(table, small, allowed, constant_size_bits=constant).solve(
            budgets
        )
        assert allocation.predicted_loss_increase == pytest.approx(best[0] * 1e-6, rel=1e-6)


def test_infeasible_budget_names_the_smallest_achievable_value() -> None:
    rng = np.random.default_rng(7)
    table, scores, constant = random_instance(rng, 4, 3)
    allowed = np.ones_like(scores, dtype=bool)
    problem = AllocationProblem(table, scores, allowed, constant_size_bits=constant)
    brute = BruteForce(table, scores, allowed, constant)
    for metric in ("avg-bits", "size-mb"):
        smallest = float(brute.metric(metric).min())
        assert problem.smallest_achievable(metric) == pytest.approx(smallest, rel=1e-12)
        with pytest.raises(InputError, match="infeasible") as info:
            problem.solve([Budget(metric, smallest * 0.9)])
        assert f"{smallest:.4g}" in str(info.value)
        # Exactly the smallest value is feasible and picks the cheapest format everywhere.
        allocation = problem.solve([Budget(metric, smallest)])
        assert allocation.formats == (table.format_names[0],) * 4
    # A fixed layer raises the smallest achievable value.
    fixed = allowed_candidates(table, allowed, {"block0.conv": table.format_names[-1]})
    constrained = AllocationProblem(table, scores, fixed, constant_size_bits=constant)
    expected = (table.weight_bits[1:, 0].sum() + table.weight_bits[0, -1]) / table.num_params.sum()
    assert constrained.smallest_achievable("avg-bits") == pytest.approx(expected, rel=1e-12)


def test_problem_input_errors() -> None:
    rng = np.random.default_rng(8)
    table, scores, constant = random_instance(rng, 3, 2)
    allowed = np.ones_like(scores, dtype=bool)
    allowed[1] = False
    with pytest.raises(InputError, match="'block1.conv' has no allowed candidate"):
        AllocationProblem(table, scores, allowed, constant_size_bits=constant)
    with pytest.raises(ValueError, match="same shape"):
        AllocationProblem(table, scores[:, :1], allowed[:, :1], constant_size_bits=constant)
    problem = AllocationProblem(
        table, scores, np.ones_like(scores, dtype=bool), constant_size_bits=constant
    )
    with pytest.raises(InputError, match="each budget metric may be given once"):
        problem.solve([Budget("avg-bits", 8.0), Budget("avg-bits", 7.0)])
    with pytest.raises(InputError, match="cannot fix layer 'nope'"):
        allowed_candidates(table, np.ones_like(scores, dtype=bool), {"nope": "int2"})
    with pytest.raises(ValueError, match="'int9' is not among the analysed candidates"):
        allowed_candidates(table, np.ones_like(scores, dtype=bool), {"block0.conv": "int9"})


def test_allocation_round_trip_and_uniform_choice() -> None:
    rng = np.random.default_rng(9)
    table, scores, constant = random_instance(rng, 3, 3)
    problem = AllocationProblem(
        table, scores, np.ones_like(scores, dtype=bool), constant_size_bits=constant
    )
    allocation = problem.solve([Budget("avg-bits", 5.0)])
    data = allocation.to_dict()
    assert data["assignment"] == dict(zip(allocation.layer_names, allocation.formats))
    assert Allocation.from_dict(data) == allocation
    choice = uniform_choice(table, table.format_names[1])
    np.testing.assert_array_equal(choice, [1, 1, 1])
    assert problem.metric_value("avg-bits", choice) == pytest.approx(float(table.bits[1]))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("avg-bits=3", Budget("avg-bits", 3.0)),
        ("size-mb=0.12", Budget("size-mb", 0.12)),
        (" avg-bits = 2.5", Budget("avg-bits", 2.5)),
        ("size-mb=1e-2", Budget("size-mb", 0.01)),
    ],
)
def test_parse_budget(text: str, expected: Budget) -> None:
    assert parse_budget(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("avg-bits=-1", "positive"),
        ("avg-bits=0", "positive"),
        ("avg-bits=nan", "positive"),
        ("size-mb=inf", "positive"),
        ("latency=3", "unknown metric 'latency'; known: avg-bits, size-mb"),
        ("avg-bits=three", "'three' is not a number"),
        ("avg-bits=", "is not a number"),
        ("avg-bits", "expected METRIC=VALUE"),
    ],
)
def test_parse_budget_errors(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        parse_budget(text)
