"""Lagrange multipliers for the budget rows of a `ChainSolver` (METHOD §4).

Input: a `lcpaq.allocation.exact.ChainSolver` and budgets [M] (inf where absent). Output: multipliers
λ ≥ 0, the Lagrangian lower bound they give and the rest tables of their dynamic program, which
the exact enumeration (`lcpaq.allocation.labels`) prunes with. One budget: the exact best λ by
walking the lower convex hull of (cost, objective), one dynamic program per step (`walk`; for many
single-budget points at once, `hull_multipliers`). Several: one walk per budget, then Kelley's
cutting planes (`cutting_planes`). Numpy, and highspy for the few-variable LPs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import highspy
import numpy as np

from lcpaq.allocation.highs import new_highs, quiet_stdout

if TYPE_CHECKING:
    from lcpaq.allocation.exact import ChainSolver

Found = list[tuple[float, np.ndarray, np.ndarray]]  # (value, cost, choice) of every minimiser


def walk(
    chain: ChainSolver,
    multipliers: np.ndarray,
    k: int,
    budgets: np.ndarray,
    found: Found,
    hull: list[tuple[float, float]] | None = None,
) -> tuple[np.ndarray, float, list[np.ndarray]]:
    """Maximise the Lagrangian over λ_k (the others fixed) by walking the lower convex hull of
    (c_k, value + Σ_{j≠k} λ_j c_j): exact, one dynamic program per step.

    ``found`` collects every minimiser (value, cost, choice); ``hull`` (for single-budget
    sweeps, where the others are absent) holds known hull points (c_k, value) to start from."""
    lam = multipliers.copy()
    others = np.isfinite(budgets)
    others[k] = False

    def probe(t: float) -> tuple[float, float, float, list[np.ndarray]]:
        lam[k] = t
        value, cost, bound, rest = chain.probe(lam, budgets, found)
        if hull is not None:
            hull.append((float(cost[k]), value))
        return float(cost[k]), value + float(lam[others] @ cost[others]), bound, rest

    limit = budgets[k] + chain.budget_tolerance(budgets)[k]
    low = high = None
    if hull:
        over = [p for p in hull if p[0] > limit]
        under = [p for p in hull if p[0] <= limit]
        if over and under:
            low, high = min(over), max(under)
    if low is None or high is None:
        cost0, base0, bound, rest = probe(0.0)
        if cost0 <= limit:
            return lam, bound, rest
        low = (cost0, base0)
        t = max(abs(base0), chain.objective_scale) / max(cost0 - budgets[k], 1e-300)
        for _ in range(200):
            cost_t, base_t, bound, rest = probe(t)
            if cost_t <= limit:
                high = (cost_t, base_t)
                break
            low = (cost_t, base_t)
            t *= 16.0
        else:
            raise RuntimeError("no multiplier meets the budget; check feasibility first")
    bound, rest = -np.inf, []
    for _ in range(1000):
        t = (high[1] - low[1]) / (low[0] - high[0])
        cost_t, base_t, bound, rest = probe(t)
        line = low[1] + t * low[0]
        if base_t + t * cost_t >= line - chain.tolerance(line) or cost_t in (low[0], high[0]):
            break  # no hull point below the segment: t is the best λ_k
        if cost_t <= limit:
            high = (cost_t, base_t)
        else:
            low = (cost_t, base_t)
    return lam, bound, rest


def cutting_planes(
    chain: ChainSolver,
    lam: np.ndarray,
    bound: float,
    rest: list[np.ndarray],
    budgets: np.ndarray,
    found: Found,
    iterations: int = 40,
    stop: float = 1e-4,
) -> tuple[np.ndarray, float, list[np.ndarray]]:
    """Several budgets: maximise the Lagrangian over all λ by Kelley's cutting planes (the
    dual of Dantzig–Wolfe): a small LP over the minimisers found so far proposes λ, one
    dynamic program adds its minimiser, until the LP's value is within ``stop`` (relative) of
    the best bound. The bound need not be the best possible: the enumeration is exact for
    any λ ≥ 0, a better λ only keeps fewer partial assignments."""
    active = np.flatnonzero(np.isfinite(budgets))
    scale_c = chain.cost_scale[active]
    scale_v = chain.objective_scale
    best = (lam.copy(), bound, rest)
    box = 1e6  # μ = λ·scale_c/scale_v: λ in units of objective scale per cost scale
    for _ in range(iterations):
        values = np.array([item[0] for item in found]) / scale_v
        slopes = (np.array([item[1][active] for item in found]) - budgets[active]) / scale_c
        solved = max_min_lp(values, slopes, box)
        if solved is None:
            break
        model, mu = solved[0] * scale_v, solved[1]
        trial = np.zeros(chain.num_metrics)
        trial[active] = mu * scale_v / scale_c
        _, _, trial_bound, trial_rest = chain.probe(trial, budgets, found)
        if trial_bound > best[1]:
            best = (trial, trial_bound, trial_rest)
        if model - best[1] <= max(stop * abs(best[1]), chain.tolerance(best[1]) * 10):
            break
    return best


def hull_multipliers(
    chain: ChainSolver, k: int, budgets: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[list[np.ndarray]], list[tuple[np.ndarray, float]]]:
    """Exact best multipliers for many single-budget points at once (only metric k finite):
    walk the lower convex hull of (c_k, value) for all points together. Each round brackets
    every pending point by the nearest hull points found so far and runs one batched dynamic
    program at the slopes of those brackets; a bracket with nothing below it is a hull edge,
    its slope the best λ_k of every point inside. Returns λ [P, M], bounds [P], rest tables
    per point and the best hull point within each budget (choice, value)."""
    count = len(budgets)
    limits = budgets[:, k] + np.array([chain.budget_tolerance(b)[k] for b in budgets])
    hull_cost: list[float] = []
    hull_value: list[float] = []
    hull_choice: list[np.ndarray] = []

    def probe(ts: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        lams = np.zeros((len(ts), chain.num_metrics))
        lams[:, k] = ts
        totals, choices, rest = chain.minimise_many(lams)
        for choice in choices:
            hull_cost.append(float(chain.cost(choice)[k]))
            hull_value.append(chain.value(choice))
            hull_choice.append(choice)
        return totals, rest

    lams = np.zeros((count, chain.num_metrics))
    bounds = np.full(count, -np.inf)
    rests: list[list[np.ndarray]] = [[] for _ in range(count)]
    totals, rest = probe(np.zeros(1))
    done = limits >= hull_cost[0]
    for row in np.flatnonzero(done).tolist():
        bounds[row], rests[row] = totals[0], [table[0] for table in rest]
    if not done.all():
        t = chain.objective_scale / max(hull_cost[0] - float(limits[~done].min()), 1e-300)
        for _ in range(200):  # a multiplier large enough for the smallest pending budget
            probe(np.array([t]))
            if hull_cost[-1] <= limits[~done].min():
                break
            t *= 16.0
        else:
            raise RuntimeError("no multiplier meets the budget; check feasibility first")
    for _ in range(10_000):
        pending = np.flatnonzero(~done)
        if not len(pending):
            break
        costs, values = np.array(hull_cost), np.array(hull_value)
        brackets: dict[tuple[int, int], list[int]] = {}
        for row in pending.tolist():
            over = np.flatnonzero(costs > limits[row])
            under = np.flatnonzero(costs <= limits[row])
            low = over[np.lexsort((values[over], costs[over]))[0]]
            high = under[np.lexsort((values[under], -costs[under]))[0]]
            brackets.setdefault((int(low), int(high)), []).append(row)
        keys = list(brackets)
        slopes = np.array(
            [(values[high] - values[low]) / (costs[low] - costs[high]) for low, high in keys]
        )
        first = len(hull_cost)
        totals, rest = probe(slopes)
        for position, (low, high) in enumerate(keys):
            t = slopes[position]
            cost_t, value_t = hull_cost[first + position], hull_value[first + position]
            line = values[low] + t * costs[low]
            edge = value_t + t * cost_t >= line - chain.tolerance(line)
            if edge or cost_t in (costs[low], costs[high]):
                for row in brackets[(low, high)]:
                    lams[row, k] = t
                    bounds[row] = totals[position] - t * budgets[row, k]
                    rests[row] = [table[position] for table in rest]
                    done[row] = True
    costs, values = np.array(hull_cost), np.array(hull_value)
    uppers = []
    for row in range(count):
        fits = np.flatnonzero(costs <= limits[row])
        best = fits[np.argmin(values[fits])]
        uppers.append((hull_choice[best], float(values[best])))
    return lams, bounds, rests, uppers


def multipliers(
    chain: ChainSolver,
    budgets: np.ndarray,
    found: Found,
    *,
    hull: list[tuple[float, float]] | None = None,
) -> tuple[np.ndarray, float, list[np.ndarray]]:
    """Lagrange multipliers for the budget rows: exact hull walk for one budget; for several,
    one walk per budget then cutting planes. Returns (λ [M], lower bound, rest tables)."""
    lam = np.zeros(chain.num_metrics)
    active = np.flatnonzero(np.isfinite(budgets))
    if not len(active):
        _, _, bound, rest = chain.probe(lam, budgets, found)
        return lam, bound, rest
    bound, rest = -np.inf, []
    for k in active:
        lam, bound, rest = walk(chain, lam, int(k), budgets, found, hull)
    if len(active) > 1:
        lam, bound, rest = cutting_planes(chain, lam, bound, rest, budgets, found)
    return lam, bound, rest


def max_min_lp(
    values: np.ndarray, slopes: np.ndarray, box: float
) -> tuple[float, np.ndarray] | None:
    """max_{0 ≤ μ ≤ box} min_i values_i + slopes_i·μ, as the LP max z s.t. z − slopes_i·μ ≤ values_i
    (HiGHS; a few columns, one row per cut). Returns (max, μ) or None if HiGHS fails."""
    cuts, dims = slopes.shape
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = dims + 1, cuts
    lp.col_cost_ = np.r_[np.zeros(dims), -1.0]
    lp.col_lower_ = np.r_[np.zeros(dims), -highspy.kHighsInf]
    lp.col_upper_ = np.r_[np.full(dims, box), highspy.kHighsInf]
    lp.row_lower_ = np.full(cuts, -highspy.kHighsInf)
    lp.row_upper_ = values
    matrix = np.column_stack([-slopes, np.ones(cuts)])
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.start_ = np.arange(0, cuts * (dims + 1) + 1, dims + 1)
    lp.a_matrix_.index_ = np.tile(np.arange(dims + 1), cuts)
    lp.a_matrix_.value_ = matrix.ravel()
    with quiet_stdout():
        highs = new_highs()
        highs.passModel(lp)
        highs.run()
    if highs.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        return None
    solution = np.asarray(highs.getSolution().col_value)
    return float(solution[-1]), solution[:-1]
