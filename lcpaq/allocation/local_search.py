"""Greedy local search over a `ChainSolver`'s options: a good feasible assignment, fast.

Input: a feasible choice (an option per unit), budgets [M] and optionally multipliers λ. Output: a
choice no worse in objective that still meets the budgets, and its value: the upper bound the
exact enumeration (`lcpaq.allocation.labels`) starts from. Numpy only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from lcpaq.allocation.exact import ChainSolver


def move_deltas(chain: ChainSolver, choice: np.ndarray) -> np.ndarray:
    """[U, W] objective change of moving unit u alone to option f (pairs included)."""
    delta = chain.padded_scores - chain.padded_scores[chain.unit_range, choice][:, None]
    if len(chain.pair_first):
        pairs = np.arange(len(chain.pair_first))
        first, second = choice[chain.pair_first], choice[chain.pair_second]
        now = chain.pair_matrix[pairs, first, second][:, None]
        np.add.at(delta, chain.pair_first, chain.pair_matrix[pairs, :, second] - now)
        np.add.at(delta, chain.pair_second, chain.pair_matrix[pairs, first, :] - now)
    return delta


def improve(
    chain: ChainSolver,
    choice: np.ndarray,
    budgets: np.ndarray,
    multipliers: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """Greedy local search from a feasible choice: the best single-unit change, else the best
    change of two units at once (one may pay for the other), while the objective falls and the
    budgets hold."""
    choice = choice.copy()
    limit = budgets + chain.budget_tolerance(budgets)
    width = chain.padded_scores.shape[1]
    lam = np.zeros(chain.num_metrics) if multipliers is None else multipliers
    value = chain.value(choice)
    for _ in range(4 * chain.num_units + 4):
        delta = move_deltas(chain, choice)
        cost = chain.cost(choice)
        step = chain.padded_costs - chain.padded_costs[chain.unit_range, choice][:, None, :]
        fits = np.all(cost + step <= limit, axis=-1) & np.isfinite(delta)
        single = np.where(fits, delta, np.inf)
        u, f = np.unravel_index(int(np.argmin(single)), single.shape)
        tolerance = chain.tolerance(value)
        if single[u, f] < -tolerance:
            choice[u] = f
            value = chain.value(choice)
            continue
        # Two units: pool the moves best by objective and by Lagrangian-reduced objective.
        flat = np.where(np.isfinite(delta), delta, np.inf).ravel()
        flat_step = step.reshape(-1, chain.num_metrics)
        reduced = flat + np.where(np.isfinite(flat), flat_step @ lam, 0)
        pool = np.unique(np.r_[np.argsort(flat)[:48], np.argsort(reduced)[:48]])
        pool = pool[np.isfinite(flat[pool])]
        total = flat[pool][:, None] + flat[pool][None, :]
        fits2 = np.all(
            cost + flat_step[pool][:, None, :] + flat_step[pool][None, :, :] <= limit, axis=-1
        )
        owner = pool // width
        total = np.where(fits2 & (owner[:, None] != owner[None, :]), total, np.inf)
        moved = False
        for index in np.argsort(total, axis=None)[:8]:
            a, b = np.unravel_index(int(index), total.shape)
            if not total[a, b] < 0:
                break
            trial = choice.copy()
            trial[owner[a]], trial[owner[b]] = pool[a] % width, pool[b] % width
            trial_value = chain.value(trial)
            if trial_value < value - tolerance and chain.meets(chain.cost(trial), budgets):
                choice, value, moved = trial, trial_value, True
                break
        if not moved:
            break
    return choice, value
