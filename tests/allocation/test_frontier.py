"""Scores and Pareto pruning in `lcpaq.allocation.frontier` against brute-force dominance and enumeration."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest

from lcpaq.allocation.frontier import (
    build_frontiers,
    diagonal_score,
    hawq_v2_score,
    output_score,
    pairwise_score_bounds,
    pareto_mask,
    safe_pareto_mask,
    score_candidates,
)
from lcpaq.allocation.table import CandidateTable
from lcpaq.errors import InputError

pytestmark = pytest.mark.usefixtures("single_thread")


def random_table(rng: np.random.Generator, num_layers: int, num_formats: int) -> CandidateTable:
    """Costs strictly increasing in bits (weight bits n*b, size adds per-layer scale overhead)."""
    bits = np.sort(rng.choice(np.arange(2, 9), size=num_formats, replace=False))
    num_params = rng.integers(10, 500, size=num_layers)
    overhead = rng.integers(1, 20, size=num_layers) * 32
    weight_bits = num_params[:, None] * bits[None, :].astype(float)
    error_sq = rng.random((num_layers, num_formats))
    weighted = rng.random((num_layers, num_formats))
    return CandidateTable(
        layer_names=tuple(f"layer{index}" for index in range(num_layers)),
        format_names=tuple(f"int{b}" for b in bits),
        num_params=num_params.astype(np.int64),
        bits=bits.astype(np.int64),
        weight_bits=weight_bits,
        size_bits=weight_bits + overhead[:, None],
        error_sq=error_sq,
        weighted_error=weighted,
    )


def brute_force_nondominated(values: np.ndarray) -> np.ndarray:
    """Points no other point dominates (no worse everywhere, strictly better somewhere)."""
    count = len(values)
    result = np.ones(count, dtype=bool)
    for i, j in itertools.product(range(count), repeat=2):
        if i != j and np.all(values[j] <= values[i]) and np.any(values[j] < values[i]):
            result[i] = False
    return result


@pytest.mark.parametrize("seed", range(40))
def test_pareto_mask_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    count = int(rng.integers(1, 12))
    dims = int(rng.integers(1, 4))
    # Small integer values give many ties and exact duplicates.
    costs = rng.integers(0, 4, size=(count, dims)).astype(float)
    scores = rng.integers(0, 4, size=count).astype(float)
    kept = pareto_mask(costs, scores)
    values = np.column_stack([costs, scores])
    nondominated = brute_force_nondominated(values)
    assert not np.any(kept & ~nondominated), "a dominated point was kept"
    # Every non-dominated point is kept, or an identical earlier copy of it is.
    for index in np.flatnonzero(nondominated):
        copies = np.flatnonzero(np.all(values == values[index], axis=1))
        assert kept[copies].sum() == 1
        assert kept[copies[0]]


def test_pareto_mask_examples() -> None:
    costs = np.array([[1.0], [2.0], [3.0], [2.0], [1.0]])
    scores = np.array([5.0, 3.0, 4.0, 3.0, 6.0])
    # point 2 is dominated by 1; point 3 duplicates 1; point 4 is dominated by 0
    np.testing.assert_array_equal(pareto_mask(costs, scores), [True, True, False, False, False])
    # A non-convex point (cost 2, score 2.9 above the chord from (1, 5) to (3, 0)) is kept.
    costs = np.array([[1.0], [2.0], [3.0]])
    np.testing.assert_array_equal(pareto_mask(costs, np.array([5.0, 2.9, 0.0])), [True] * 3)


def test_hawq_v2_score_formula() -> None:
    table = random_table(np.random.default_rng(0), 4, 3)
    trace = np.array([2.0, 0.5, 7.0, 1e-3])
    scores = hawq_v2_score(table, trace)
    for row, col in itertools.product(range(4), range(3)):
        expected = 0.5 * trace[row] / table.num_params[row] * table.error_sq[row, col]
        assert scores[row, col] == pytest.approx(expected, rel=1e-15)
    np.testing.assert_array_equal(score_candidates(table, trace, "hawq_v2"), scores)


def test_output_score_formula_and_its_requirement() -> None:
    """trace/n × output error; with the output error equal to ‖ΔW‖² (white inputs) it is
    HAWQ-V2; a table without input second moments is refused with the reason."""
    table = random_table(np.random.default_rng(2), 4, 3)
    trace = np.array([2.0, 0.5, 7.0, 1e-3])
    output = np.random.default_rng(3).random((4, 3))
    with_output = CandidateTable(**{**table.__dict__, "output_error": output})
    np.testing.assert_allclose(
        score_candidates(with_output, trace, "output"),
        0.5 * (trace / table.num_params)[:, None] * output,
        rtol=1e-15,
    )
    white = CandidateTable(**{**table.__dict__, "output_error": table.error_sq})
    np.testing.assert_array_equal(output_score(white, trace), hawq_v2_score(table, trace))
    with pytest.raises(ValueError, match="needs each layer's input second moments"):
        score_candidates(table, trace, "output")


def test_diagonal_score_and_scorer_errors() -> None:
    table = random_table(np.random.default_rng(1), 3, 2)
    trace = np.ones(3)
    np.testing.assert_array_equal(diagonal_score(table, trace), 0.5 * table.weighted_error)
    np.testing.assert_array_equal(
        score_candidates(table, trace, "diagonal"), 0.5 * table.weighted_error
    )
    with pytest.raises(ValueError, match="unknown scorer 'nope'; known: hawq_v2, diagonal, output"):
        score_candidates(table, trace, "nope")
    with pytest.raises(ValueError, match="one value per layer"):
        score_candidates(table, np.ones(4), "hawq_v2")
    no_diagonal = CandidateTable(
        **{**table.__dict__, "weighted_error": np.full_like(table.weighted_error, np.nan)}
    )
    with pytest.raises(ValueError, match="per-element curvature diagonal"):
        score_candidates(no_diagonal, trace, "diagonal")


def _assignment_totals(
    table: CandidateTable, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every assignment (one format per layer) with its weight bits, size bits and score."""
    num_layers, num_formats = scores.shape
    choices = np.array(list(itertools.product(range(num_formats), repeat=num_layers)))
    rows = np.arange(num_layers)
    weight = table.weight_bits[rows, choices].sum(1)
    size = table.size_bits[rows, choices].sum(1)
    total = scores[rows, choices].sum(1)
    return choices, weight, size, total


@pytest.mark.parametrize("seed", range(25))
def test_pruned_candidates_never_in_a_brute_force_optimum(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    num_layers, num_formats = int(rng.integers(1, 6)), int(rng.integers(2, 5))
    table = random_table(rng, num_layers, num_formats)
    # Random scores: often not monotone in bits, so some candidates get pruned.
    scores = rng.random((num_layers, num_formats))
    kept = build_frontiers(table, scores)
    assert kept.any(axis=1).all()
    for row in range(num_layers):
        costs = np.column_stack([table.weight_bits[row], table.size_bits[row]])
        np.testing.assert_array_equal(kept[row], pareto_mask(costs, scores[row]))
    choices, weight, size, total = _assignment_totals(table, scores)
    uses_pruned = ~kept[np.arange(num_layers), choices].all(axis=1)
    # Budgets: every achievable (weight, size) pair, each also alone, and no budget at all.
    budgets = np.unique(np.column_stack([weight, size]), axis=0)
    budgets = np.vstack(
        [
            budgets,
            np.column_stack([budgets[:, 0], np.full(len(budgets), np.inf)]),
            np.column_stack([np.full(len(budgets), np.inf), budgets[:, 1]]),
            [[np.inf, np.inf]],
        ]
    )
    feasible = (weight[None, :] <= budgets[:, :1]) & (size[None, :] <= budgets[:, 1:])
    masked = np.where(feasible, total[None, :], np.inf)
    best_all = masked.min(axis=1)
    best_kept = np.where(uses_pruned[None, :], np.inf, masked).min(axis=1)
    # The optimum over kept candidates only is the optimum over all candidates ...
    np.testing.assert_array_equal(best_kept, best_all)
    # ... and (continuous random scores: the optimum is unique) no optimum uses a pruned one.
    optimal = feasible & (masked == best_all[:, None])
    assert not np.any(optimal & uses_pruned[None, :])


@pytest.mark.parametrize("seed", range(40))
def test_safe_pruning_never_removes_an_optimum_with_pairs_and_several_costs(seed: int) -> None:
    rng = np.random.default_rng(300 + seed)
    num_units, num_formats, num_dims = int(rng.integers(2, 5)), int(rng.integers(2, 4)), 3
    # Small integer costs (ties in cost) with one cost dimension not monotone in the others.
    costs = rng.integers(0, 4, size=(num_units, num_formats, num_dims)).astype(float)
    scores = rng.random((num_units, num_formats))
    pairs = {}
    if seed % 4:  # a quarter of the instances without pairs
        for i, j in itertools.combinations(range(num_units), 2):
            if rng.random() < 0.6:
                pairs[(i, j)] = rng.normal(0.0, 0.1 * (seed % 3), (num_formats, num_formats))
    allowed = rng.random((num_units, num_formats)) < 0.9
    allowed[np.arange(num_units), rng.integers(0, num_formats, num_units)] = True
    kept = safe_pareto_mask(costs, scores, allowed, pairs)
    assert not np.any(kept & ~allowed)
    assert kept.any(axis=1).all()
    if not pairs:
        for unit in range(num_units):
            rows = np.flatnonzero(allowed[unit])
            np.testing.assert_array_equal(
                kept[unit, rows], pareto_mask(costs[unit, rows], scores[unit, rows])
            )
    options = [np.flatnonzero(row) for row in allowed]
    choices = np.array(list(itertools.product(*options)))
    units = np.arange(num_units)
    totals = costs[units, choices].sum(axis=1)  # [N, K]
    objective = scores[units, choices].sum(1)
    for (i, j), matrix in pairs.items():
        objective = objective + matrix[choices[:, i], choices[:, j]]
    uses_pruned = ~kept[units, choices].all(axis=1)
    # Every budget vector that is some assignment's cost vector (with each dimension optionally off).
    for budget in np.unique(totals, axis=0):
        for active in itertools.product([True, False], repeat=num_dims):
            limit = np.where(active, budget, np.inf)
            feasible = np.all(totals <= limit, axis=1)
            best = objective[feasible].min()
            best_kept = objective[feasible & ~uses_pruned].min()
            assert best_kept == pytest.approx(best, abs=1e-12)
            optimal = feasible & (objective <= best + 1e-12)
            if optimal.sum() == 1:  # a unique optimum never uses a pruned candidate
                assert not uses_pruned[optimal].any()


def test_pairwise_score_bounds_example() -> None:
    scores = np.array([[1.0, 2.0], [0.0, 0.0]])
    allowed = np.array([[True, True], [True, False]])
    pair = np.array([[5.0, -9.0], [1.0, 7.0]])  # unit 1 can only take format 0
    low, high = pairwise_score_bounds(scores, allowed, {(0, 1): pair})
    np.testing.assert_array_equal(low[0], [6.0, 3.0])
    np.testing.assert_array_equal(high[0], [6.0, 3.0])
    np.testing.assert_array_equal(low[1], [1.0, 0.0])
    np.testing.assert_array_equal(high[1], [5.0, 0.0])
    costs = np.zeros((2, 2, 1))
    # Format 1 of unit 0 costs the same and scores 3 < 6 whatever unit 1 holds: format 0 goes.
    kept = safe_pareto_mask(costs, scores, allowed, {(0, 1): pair})
    np.testing.assert_array_equal(kept, [[False, True], [True, False]])


def test_safe_pruning_compares_pair_terms_format_by_format() -> None:
    """Switching unit 0 from format 0 to 1 changes its pair term by C(1, h) − C(0, h) = 0 for every
    h, so format 0 (higher score, same cost) can go, although METHOD §3's coarser test, which
    compares s(1) + max_h C(1, h) = 10.5 with s(0) + min_h C(0, h) = 1, would keep it. Pruning
    unit 1 then narrows unit 0's range too (the rule is applied until nothing changes)."""
    scores = np.array([[1.0, 0.5], [0.0, 0.2]])
    pair = np.array([[0.0, 10.0], [0.0, 10.0]])
    costs = np.zeros((2, 2, 1))
    allowed = np.ones((2, 2), dtype=bool)
    kept = safe_pareto_mask(costs, scores, allowed, {(0, 1): pair})
    np.testing.assert_array_equal(kept, [[False, True], [True, False]])
    low, high = pairwise_score_bounds(scores, allowed, {(0, 1): pair})
    assert not high[0, 1] <= low[0, 0]  # the coarser rule alone would keep format 0


def test_limpq_scorer_returns_the_learned_steps_and_needs_them() -> None:
    table = random_table(np.random.default_rng(3), num_layers=3, num_formats=2)
    with pytest.raises(InputError, match="--limpq-steps"):
        score_candidates(table, np.ones(3), "limpq")
    steps = np.array([[0.4, 0.1], [0.2, 0.1], [0.3, 0.05]])
    learned = replace(table, learned_step=steps)
    np.testing.assert_array_equal(score_candidates(learned, np.ones(3), "limpq"), steps)
    # Selecting columns keeps each column's step.
    np.testing.assert_array_equal(learned.select([1]).learned_step, steps[:, [1]])
