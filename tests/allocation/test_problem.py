"""`lcpaq.allocation.problem.AllocationProblem` (every solver) against brute-force enumeration on small
instances: budgets, ties, pairwise terms, cost weights, Pareto curves."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from lcpaq.allocation.budgets import Budget
from lcpaq.allocation.costs import BITS_PER_MB, CostModel, build_cost_model
from lcpaq.allocation.frontier import build_frontiers
from lcpaq.allocation.knapsack import knapsack_frontier
from lcpaq.allocation.problem import AllocationProblem, allowed_candidates, uniform_choice
from lcpaq.allocation.result import Allocation
from lcpaq.allocation.table import CandidateTable
from lcpaq.errors import InputError

pytestmark = pytest.mark.usefixtures("single_thread")
REPO = Path(__file__).resolve().parents[2]


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


# -- several budgets, ties and pairwise terms ---------------------------------------------------


def rich_instance(
    rng: np.random.Generator, num_layers: int, num_formats: int
) -> tuple[AllocationProblem, CandidateTable, np.ndarray, CostModel, dict, list]:
    """Random costs in every metric (latency non-monotone), pairs with negative C, random ties."""
    table, scores, constant = random_instance(rng, num_layers, num_formats, format_overhead=True)
    latency = {
        name: {fmt: float(rng.uniform(0.1, 2.0)) for fmt in table.format_names}
        for name in table.layer_names
    }
    costs = build_cost_model(
        table,
        constant_size_bits=constant,
        fp32_size_bits=float(table.num_params.sum() * 32 + constant),
        macs_per_sample=rng.integers(100, 10_000, num_layers).astype(float),
        activation_bits=rng.integers(2, 9, num_formats).astype(float),
        weight_sign_bits=rng.integers(0, 2, num_formats).astype(float),
        latency_table=latency,
    )
    pairs = {}
    for i, j in itertools.combinations(range(num_layers), 2):
        if rng.random() < 0.5:
            pairs[(i, j) if rng.random() < 0.5 else (j, i)] = rng.normal(
                0.0, float(scores.mean()), (num_formats, num_formats)
            )
    ties = []
    if num_layers >= 3 and rng.random() < 0.5:
        ties.append(tuple(table.layer_names[k] for k in rng.choice(num_layers, 2, replace=False)))
    allowed = np.ones_like(scores, dtype=bool)
    if rng.random() < 0.3:  # fix one layer
        allowed[int(rng.integers(num_layers))] = np.eye(num_formats, dtype=bool)[0]
    return table, scores, allowed, costs, pairs, ties


class RichBruteForce:
    """Every assignment that respects the ties, with every metric and the full objective."""

    def __init__(self, table, scores, allowed, costs: CostModel, pairs, ties) -> None:
        options = [np.flatnonzero(row) for row in allowed]
        choices = np.array(list(itertools.product(*options)))
        for group in ties:
            rows = [table.layer_names.index(name) for name in group]
            choices = choices[np.all(choices[:, rows] == choices[:, rows[:1]], axis=1)]
        self.choices = choices
        rows = np.arange(len(table.layer_names))
        self.values = {
            metric: costs.coefficients[metric][rows, choices].sum(1) + costs.offsets[metric]
            for metric in costs.metrics
        }
        self.score = scores[rows, choices].sum(1)
        for (i, j), matrix in pairs.items():
            self.score = self.score + matrix[choices[:, i], choices[:, j]]

    def best(self, budgets: list[Budget]) -> float | None:
        feasible = np.ones(len(self.score), dtype=bool)
        for budget in budgets:
            feasible &= self.values[budget.metric] <= budget.value
        return float(self.score[feasible].min()) if feasible.any() else None

    def random_budget(self, rng: np.random.Generator, metric: str) -> Budget:
        values = np.unique(self.values[metric])
        for _ in range(100):
            value = float(rng.uniform(values[0], values[-1] * 1.05))
            if np.min(np.abs(values - value)) > 1e-6 * value:
                return Budget(metric, value)
        return Budget(metric, float(values[-1] * 1.1))


@pytest.mark.parametrize("seed", range(40))
def test_pairs_ties_and_several_budgets_equal_brute_force(seed: int) -> None:
    rng = np.random.default_rng(1000 + seed)
    num_layers, num_formats = int(rng.integers(2, 7)), int(rng.integers(2, 4))
    table, scores, allowed, costs, pairs, ties = rich_instance(rng, num_layers, num_formats)
    brute = RichBruteForce(table, scores, allowed, costs, pairs, ties)
    # Both linearisations in HiGHS, and the dynamic program (auto and forced).
    problems = {
        (solver, form): AllocationProblem(
            table,
            scores,
            allowed,
            costs=costs,
            pairwise=pairs,
            ties=ties,
            linearization=form,
            solver=solver,
        )
        for solver, form in (
            ("highs", "rlt"),
            ("highs", "mccormick"),
            ("auto", "rlt"),
            ("dp", "rlt"),
        )
    }
    metrics = list(costs.metrics)
    for _ in range(4):
        chosen = rng.choice(metrics, size=int(rng.integers(1, 4)), replace=False)
        budgets = [brute.random_budget(rng, str(metric)) for metric in chosen]
        expected = brute.best(budgets)
        for problem in problems.values():
            if any(b.value < problem.smallest_achievable(b.metric) for b in budgets):
                with pytest.raises(InputError, match="infeasible"):
                    problem.solve(budgets)
                continue
            if expected is None:
                with pytest.raises(InputError, match="cannot all be met at once") as info:
                    problem.solve(budgets)
                assert all(str(b) in str(info.value) for b in budgets)
                continue
            allocation = problem.solve(budgets)
            assert allocation.status == "Optimal"
            assert allocation.mip_gap <= 1e-6
            methods = {"highs": ("highs",), "dp": ("dp", "knapsack")}.get(problem.solvers.solver)
            assert methods is None or allocation.solver in methods
            assert allocation.predicted_loss_increase == pytest.approx(expected, rel=1e-6, abs=1e-9)
            assert allocation.objective == pytest.approx(allocation.predicted_loss_increase)
            choice = np.array([table.format_names.index(name) for name in allocation.formats])
            assert allowed[np.arange(num_layers), choice].all()
            for group in ties:
                assert len({allocation.formats[table.layer_names.index(n)] for n in group}) == 1
            for use in allocation.budgets:
                assert use.used == pytest.approx(costs.value(use.metric, choice), rel=1e-12)
                assert use.used <= use.limit * (1 + 1e-9)
            assert allocation.costs == pytest.approx(costs.values(choice))


@pytest.mark.parametrize("solver", ["auto", "dp", "highs"])
@pytest.mark.parametrize("seed", range(12))
def test_pareto_curve_points_are_optimal_and_distinct(seed: int, solver: str) -> None:
    rng = np.random.default_rng(2000 + seed)
    table, scores, allowed, costs, pairs, ties = rich_instance(rng, 5, 3)
    if seed % 3 == 0:
        pairs = {}
    elif seed % 3 == 1:  # all C > 0 (McCormick's lower bounds bind) or all C < 0 (upper ones)
        sign = 1.0 if seed % 2 else -1.0
        pairs = {key: sign * np.abs(block) for key, block in pairs.items()}
    brute = RichBruteForce(table, scores, allowed, costs, pairs, ties)
    problem = AllocationProblem(
        table, scores, allowed, costs=costs, pairwise=pairs, ties=ties, solver=solver
    )
    metric = ("size-mb", "bitops-g", "latency-ms", "avg-bits")[seed % 4]
    fixed = [brute.random_budget(rng, "ebops-g")] if seed % 5 == 0 else []
    if fixed and brute.best(fixed) is None:
        fixed = []
    points = problem.pareto_curve(metric, num_points=30, budgets=fixed)
    assert points and len({point.formats for point in points}) == len(points)
    swept = sorted(value for point in points for value in point.budgets)
    assert len(swept) <= 30
    if not fixed:
        assert len(swept) == 30
        assert swept[0] == pytest.approx(problem.smallest_achievable(metric))
    for point in points:
        assert point.mip_gap <= 1e-6
        assert point.solver in (("highs",) if solver == "highs" else ("highs", "dp", "knapsack"))
        choice = np.array([table.format_names.index(name) for name in point.formats])
        assert point.costs == pytest.approx(costs.values(choice))
        for value in point.budgets:
            assert point.costs[metric] <= value * (1 + 1e-9)
            expected = brute.best([*fixed, Budget(metric, value * (1 + 1e-12))])
            assert point.predicted_loss_increase == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert [p.costs[metric] for p in points] == sorted(p.costs[metric] for p in points)


def test_tied_layers_share_one_format() -> None:
    rng = np.random.default_rng(3)
    table, scores, constant = random_instance(rng, 4, 3, monotone=True)
    allowed = np.ones_like(scores, dtype=bool)
    with pytest.raises(InputError, match="cannot tie layer 'nope'"):
        AllocationProblem(table, scores, allowed, ties=[("block0.conv", "nope")])
    fixed = allowed_candidates(table, allowed, {"block0.conv": table.format_names[0]})
    fixed = allowed_candidates(table, fixed, {"block1.conv": table.format_names[1]})
    with pytest.raises(InputError, match="no allowed format in common"):
        AllocationProblem(table, scores, fixed, ties=[("block0.conv", "block1.conv")])
    problem = AllocationProblem(
        table, scores, fixed, ties=[("block1.conv", "block2.conv", "block3.conv")]
    )
    allocation = problem.solve([Budget("avg-bits", 8.0)])
    assert allocation.formats[1:] == (table.format_names[1],) * 3


def test_pairwise_input_errors_and_tied_pairs_fold_into_scores() -> None:
    rng = np.random.default_rng(4)
    table, scores, constant = random_instance(rng, 3, 2)
    allowed = np.ones_like(scores, dtype=bool)
    with pytest.raises(ValueError, match="two different layers"):
        AllocationProblem(table, scores, allowed, pairwise={(1, 1): np.zeros((2, 2))})
    with pytest.raises(ValueError, match=r"finite \[F, F\]"):
        AllocationProblem(table, scores, allowed, pairwise={(0, 1): np.zeros((3, 2))})
    with pytest.raises(InputError, match="unknown linearization"):
        AllocationProblem(table, scores, allowed, linearization="nope")
    pair = np.array([[-5.0, 3.0], [3.0, 0.0]])
    problem = AllocationProblem(
        table, scores, allowed, pairwise={(0, 1): pair}, ties=[("block0.conv", "block1.conv")]
    )
    allocation = problem.solve([])
    brute = RichBruteForce(
        table, scores, allowed, problem.costs, {(0, 1): pair}, [("block0.conv", "block1.conv")]
    )
    assert allocation.predicted_loss_increase == pytest.approx(brute.best([]))
    assert allocation.formats[0] == allocation.formats[1] == table.format_names[0]


# -- objective weights (METHOD §4) ---------------------------------------------------------------


def weighted_brute_force(
    brute: RichBruteForce, budgets: list[Budget], weights: dict[str, float], scale: dict[str, float]
) -> np.ndarray:
    """The weighted objective of every assignment, inf where a budget is broken."""
    objective = brute.score.copy()
    for metric, weight in weights.items():
        objective = objective + weight * brute.values[metric] / scale[metric]
    for budget in budgets:
        objective = np.where(brute.values[budget.metric] <= budget.value, objective, np.inf)
    return objective


@pytest.mark.parametrize("solver", ["auto", "dp", "highs"])
@pytest.mark.parametrize("seed", range(12))
def test_cost_weights_equal_brute_force(seed: int, solver: str) -> None:
    rng = np.random.default_rng(3000 + seed)
    table, scores, allowed, costs, pairs, ties = rich_instance(rng, 5, 3)
    if seed % 2:
        pairs = {}
    brute = RichBruteForce(table, scores, allowed, costs, pairs, ties)
    problem = AllocationProblem(
        table, scores, allowed, costs=costs, pairwise=pairs, ties=ties, solver=solver
    )
    budgeted, unbudgeted = rng.choice(list(costs.metrics), size=2, replace=False)
    budgets = [brute.random_budget(rng, str(budgeted))]
    if brute.best(budgets) is None or budgets[0].value < problem.smallest_achievable(budgeted):
        budgets = []
    # λ in units of the score: large enough to move the optimum away from the loss-only one.
    level = float(np.abs(scores).sum())
    weights = {str(budgeted): rng.uniform(0, 2) * level, str(unbudgeted): rng.uniform(0, 2) * level}
    # B_k: the budget where one is given, else the largest achievable value of the metric.
    scale = {metric: float(brute.values[metric].max()) for metric in weights}
    scale.update({budget.metric: budget.value for budget in budgets})
    objective = weighted_brute_force(brute, budgets, weights, scale)
    allocation = problem.solve(budgets, cost_weights=weights)
    assert allocation.objective == pytest.approx(float(objective.min()), rel=1e-6, abs=1e-9)
    choice = np.array([table.format_names.index(name) for name in allocation.formats])
    index = np.flatnonzero(np.all(brute.choices == choice, axis=1))[0]
    assert objective[index] == pytest.approx(allocation.objective, rel=1e-9)
    assert allocation.predicted_loss_increase == pytest.approx(brute.score[index], rel=1e-9)
    assert allocation.cost_weights == pytest.approx(weights)
    # Without weights the loss alone is minimised: never a larger loss than with them.
    plain = problem.solve(budgets)
    assert plain.predicted_loss_increase <= allocation.predicted_loss_increase * (1 + 1e-9) + 1e-12
    assert plain.objective == pytest.approx(plain.predicted_loss_increase)
    # A Pareto curve with a weight on another metric: every point minimises the weighted objective.
    metric = next(m for m in costs.metrics if m not in weights)
    for point in problem.pareto_curve(metric, 8, cost_weights=weights):
        for value in point.budgets:
            cut = [Budget(metric, value * (1 + 1e-12))]
            expected = weighted_brute_force(
                brute, cut, weights, {m: float(brute.values[m].max()) for m in weights}
            )
            assert point.objective == pytest.approx(float(expected.min()), rel=1e-6, abs=1e-9)


def test_cost_weight_errors_and_zero_weights() -> None:
    rng = np.random.default_rng(11)
    table, scores, allowed, costs, pairs, ties = rich_instance(rng, 4, 3)
    problem = AllocationProblem(table, scores, allowed, costs=costs, pairwise=pairs, ties=ties)
    budget = Budget("size-mb", problem.largest_achievable("size-mb"))
    with pytest.raises(InputError, match="bitops-g=-1 must be a finite number >= 0"):
        problem.solve([budget], cost_weights={"bitops-g": -1.0})
    with pytest.raises(InputError, match="unknown metric 'flops'"):
        problem.solve([budget], cost_weights={"flops": 1.0})
    with pytest.raises(InputError, match="swept metric size-mb"):
        problem.pareto_curve("size-mb", 5, cost_weights={"size-mb": 1.0})
    plain = problem.solve([budget])
    zero = problem.solve([budget], cost_weights={"bitops-g": 0.0})
    assert zero.formats == plain.formats and zero.objective == plain.objective
    with pytest.raises(InputError, match="unknown solver 'cbc'"):
        AllocationProblem(table, scores, allowed, costs=costs, solver="cbc")


def test_wide_pair_graphs_fall_back_to_highs() -> None:
    """Pairs linking every layer to the last keep all layers in the DP state: too wide."""
    rng = np.random.default_rng(12)
    table, scores, constant = random_instance(rng, 6, 3, monotone=True)
    allowed = np.ones_like(scores, dtype=bool)
    pairs = {(i, 5): rng.normal(0.0, 0.01, (3, 3)) for i in range(5)}
    budget = [Budget("avg-bits", 4.0)]
    kwargs = {"constant_size_bits": constant, "pairwise": pairs, "max_states": 30}
    auto = AllocationProblem(table, scores, allowed, solver="auto", **kwargs).solve(budget)
    highs = AllocationProblem(table, scores, allowed, solver="highs", **kwargs).solve(budget)
    assert auto.solver == "highs" and auto.formats == highs.formats
    with pytest.raises(InputError, match="solver 'dp'"):
        AllocationProblem(table, scores, allowed, solver="dp", **kwargs).solve(budget)
    wide = AllocationProblem(
        table, scores, allowed, solver="dp", **{**kwargs, "max_states": 1 << 12}
    )
    allocation = wide.solve(budget)
    assert allocation.solver == "dp"
    assert allocation.predicted_loss_increase == pytest.approx(highs.predicted_loss_increase)


@pytest.mark.parametrize("seed", range(8))
def test_highs_is_exact_when_the_optimum_is_far_below_the_largest_coefficient(seed: int) -> None:
    """One unused candidate scores 1 (the objective is scaled to it) and the optimum is ~1e-6:
    without the rescaled re-run HiGHS reported "Optimal" for worse assignments here (5 of these 8
    seeds), because its tolerances are absolute."""
    rng = np.random.default_rng(seed)
    table, scores, constant = random_instance(rng, 6, 3, monotone=True)
    scores = scores * 1e-6 / scores.max()
    scores[0, 0] = 1.0
    pairs = {(i, i + 1): 1e-7 * rng.normal(size=(3, 3)) for i in range(5)}
    allowed = np.ones_like(scores, dtype=bool)
    brute = RichBruteForce(table, scores, allowed, build_cost_model(table), pairs, [])
    budget = [brute.random_budget(rng, "avg-bits")]
    expected = brute.best(budget)
    assert expected is not None
    allocation = AllocationProblem(
        table, scores, allowed, pairwise=pairs, solver="highs", constant_size_bits=constant
    ).solve(budget)
    assert allocation.predicted_loss_increase == pytest.approx(expected, rel=1e-6, abs=1e-15)


def test_knapsack_frontier_is_an_oracle_for_highs_sweeps_too_large_to_enumerate() -> None:
    """18 layers x 4 formats (4^18 assignments): HiGHS' Pareto curve against the exact
    multiple-choice-knapsack frontier (`lcpaq.allocation.knapsack.knapsack_frontier`) at every swept value."""
    rng = np.random.default_rng(21)
    table, scores, constant = random_instance(rng, 18, 4, monotone=True, format_overhead=True)
    allowed = np.ones_like(scores, dtype=bool)
    problem = AllocationProblem(
        table, scores, allowed, constant_size_bits=constant, solver="highs", prune=False
    )
    coefficients = problem.costs.coefficients["size-mb"]
    frontier_costs, frontier_values, _ = knapsack_frontier(list(scores), list(coefficients))
    offset = problem.costs.offsets["size-mb"]
    points = problem.pareto_curve("size-mb", num_points=15)
    assert sum(len(point.budgets) for point in points) == 15
    for point in points:
        for value in point.budgets:
            fits = frontier_costs <= value - offset + 1e-12 * value
            assert point.predicted_loss_increase == pytest.approx(
                frontier_values[fits].min(), rel=1e-6
            )
