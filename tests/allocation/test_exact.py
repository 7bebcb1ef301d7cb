"""The dynamic programs of `lcpaq.allocation.exact` against brute-force enumeration on small instances."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from lcpaq.allocation.exact import ChainSolver, LabelLimit, StateSpaceTooLarge


def random_chain(
    rng: np.random.Generator, *, window: int, metrics: int, sign: str = "mixed"
) -> tuple[list[np.ndarray], list[np.ndarray], dict[tuple[int, int], np.ndarray]]:
    """Units with 1-3 options, costs in ``metrics`` dimensions, pairs within ``window`` units
    (``sign``: C ≥ 0, C ≤ 0 or both)."""
    num_units = int(rng.integers(1, 7))
    sizes = rng.integers(1, 4, num_units)
    scores = [rng.uniform(0.0, 1.0, n) for n in sizes]
    costs = [rng.uniform(0.0, 1.0, (n, metrics)) for n in sizes]
    pairs = {}
    for u in range(num_units):
        for v in range(u + 1, min(num_units, u + window + 1)):
            if rng.random() < 0.7:
                block = rng.normal(0.0, 0.5, (sizes[u], sizes[v]))
                if sign != "mixed":
                    block = np.abs(block) * (1 if sign == "positive" else -1)
                pairs[(u, v)] = block
    return scores, costs, pairs


def enumerate_all(
    solver: ChainSolver, sizes: list[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    choices = np.array(list(itertools.product(*(range(n) for n in sizes))))
    values = np.array([solver.value(choice) for choice in choices])
    costs = np.array([solver.cost(choice) for choice in choices])
    return choices, values, costs


def brute_best(values: np.ndarray, costs: np.ndarray, budgets: np.ndarray) -> float | None:
    feasible = np.all(costs <= budgets, axis=1)
    return float(values[feasible].min()) if feasible.any() else None


def budget_between(rng: np.random.Generator, achievable: np.ndarray) -> float:
    """A limit inside the achievable range, away from every achievable value."""
    for _ in range(100):
        value = float(rng.uniform(achievable.min(), achievable.max()))
        if np.min(np.abs(achievable - value)) > 1e-6:
            return value
    return float(achievable.max()) + 1.0


@pytest.mark.parametrize("seed", range(60))
def test_solve_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sign = ("mixed", "positive", "negative")[seed % 3]
    metrics = 1 + seed % 2
    scores, costs, pairs = random_chain(rng, window=seed % 4, metrics=metrics, sign=sign)
    solver = ChainSolver(scores, costs, pairs)
    choices, values, totals = enumerate_all(solver, [len(s) for s in scores])
    # Lagrangian minimum: exact for any multipliers.
    lam = rng.uniform(0.0, 2.0, metrics)
    total, minimiser, _ = solver.minimise(lam)
    assert total == pytest.approx(float((values + totals @ lam).min()), abs=1e-12)
    assert solver.value(minimiser) + solver.cost(minimiser) @ lam == pytest.approx(total, abs=1e-12)
    for _ in range(3):
        budgets = np.full(metrics, np.inf)
        for k in rng.choice(metrics, int(rng.integers(0, metrics + 1)), replace=False):
            budgets[k] = budget_between(rng, totals[:, k])
        expected = brute_best(values, totals, budgets)
        solution = solver.solve(budgets)
        if expected is None:
            assert solution is None
            continue
        assert solution is not None
        assert solution.value == pytest.approx(expected, abs=1e-12)
        assert np.all(solution.costs <= budgets + 1e-12)
        assert solution.bound <= expected + 1e-12  # a valid Lagrangian lower bound
        assert solver.value(solution.choice) == pytest.approx(solution.value, abs=1e-15)


@pytest.mark.parametrize("seed", range(30))
def test_sweep_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    metrics = 1 + seed % 2
    scores, costs, pairs = random_chain(rng, window=seed % 3, metrics=metrics)
    solver = ChainSolver(scores, costs, pairs)
    _, values, totals = enumerate_all(solver, [len(s) for s in scores])
    fixed = np.full(metrics, np.inf)
    if metrics == 2:
        fixed[1] = budget_between(rng, totals[:, 1])
    sweep = np.linspace(totals[:, 0].min() - 0.1, totals[:, 0].max(), 9)
    for value, solution in zip(sweep, solver.sweep(0, sweep, fixed)):
        budgets = fixed.copy()
        budgets[0] = value
        expected = brute_best(values, totals, budgets + 1e-9)
        if expected is None:
            assert solution is None
        else:
            assert solution is not None
            assert solution.value == pytest.approx(expected, abs=1e-12)


def test_limits_raise() -> None:
    rng = np.random.default_rng(5)
    scores = [np.zeros(3) for _ in range(6)]  # all ties: nothing is pruned by value
    costs = [rng.uniform(size=(3, 1)) for _ in range(6)]
    pairs = {(0, 5): np.zeros((3, 3)), (1, 5): np.zeros((3, 3))}
    # Units 0 and 1 stay linked until unit 5: 3 * 3 states times unit 5's 3 options.
    with pytest.raises(StateSpaceTooLarge, match="27 states"):
        ChainSolver(scores, costs, pairs, max_states=26)
    solver = ChainSolver(scores, costs, pairs, max_states=27, max_labels=2)
    with pytest.raises(LabelLimit):
        solver.solve(np.array([100.0]))  # every state keeps a label: 9 > 2
    assert ChainSolver(scores, costs, pairs).solve(np.array([100.0])).value == 0.0
    with pytest.raises(ValueError, match="u < v"):
        ChainSolver(scores, costs, {(3, 2): np.zeros((3, 3))})
