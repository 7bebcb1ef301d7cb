"""The exact solve of a `ChainSolver`: enumerate partial assignments under a threshold (METHOD §4).

Input: a `lcpaq.allocation.exact.ChainSolver`, budget rows [P, M] and, per row, multipliers and
rest tables (`lcpaq.allocation.multipliers`). Output: the optimum per row, proven: partial
assignments are extended unit by unit and dropped when their Lagrangian value plus the exact rest
minimum exceeds a threshold, when their cost plus the cheapest rest breaks a budget, or when
another of the same state is no worse in objective and every budgeted cost (`dominance`). See
`solve_points` for why the best survivor is optimal. Numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from lcpaq.allocation.exact import LabelLimit, Solution
from lcpaq.allocation.local_search import improve
from lcpaq.allocation.multipliers import Found, hull_multipliers, multipliers

if TYPE_CHECKING:
    from lcpaq.allocation.exact import ChainSolver


def _undominated(values: np.ndarray, new_group: np.ndarray) -> np.ndarray:
    """Positions whose value is below every earlier value of the same group (groups are runs
    flagged by ``new_group``). Exact: a segmented prefix minimum by doubling steps (min and
    comparisons only, no arithmetic on the values), log2(largest group) vector passes."""
    count = len(values)
    positions = np.arange(count)
    start = np.maximum.accumulate(np.where(new_group, positions, 0))  # first index of the group
    longest = int((positions - start).max()) + 1 if count else 0
    running = values.copy()
    step = 1
    while step < longest:
        inside = positions[step:] - step >= start[step:]
        shifted = np.minimum(running[step:], running[:-step])
        running[step:] = np.where(inside, shifted, running[step:])
        step *= 2
    before = np.concatenate([[np.inf], running[:-1]])
    return new_group | (values < before)


def dominance(groups: np.ndarray, costs: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Which labels to keep: drop a label when another of the same group is no worse in every
    cost and the value (of identical labels the first stays). Exact for one cost; for several,
    each label is checked against its group's best-valued earlier label in two cost orders and
    against its nearest neighbours, which finds most dominated labels and never a wrong one."""
    count = len(values)
    num_costs = costs.shape[1]
    base = np.arange(count)
    if num_costs == 0:
        order = np.lexsort((base, values, groups))
        first = np.concatenate([[True], groups[order][1:] != groups[order][:-1]])
        kept = np.zeros(count, dtype=bool)
        kept[order[first]] = True
        return kept
    if num_costs == 1:
        # Equal costs in either order are fine: the later one may survive, never wrongly go.
        order = np.lexsort((costs[:, 0], groups))
        sorted_groups = groups[order]
        new_group = np.concatenate([[True], sorted_groups[1:] != sorted_groups[:-1]])
        kept = np.zeros(count, dtype=bool)
        kept[order[_undominated(values[order], new_group)]] = True
        return kept
    dominated = np.zeros(count, dtype=bool)
    for lead in range(2):
        keys = [base, values] + [costs[:, (lead + k) % num_costs] for k in range(num_costs)][::-1]
        order = np.lexsort((*keys, groups))
        sorted_groups, sorted_values = groups[order], values[order]
        sorted_costs = costs[order]
        new_group = np.concatenate([[True], sorted_groups[1:] != sorted_groups[:-1]])
        # The best-valued earlier label of the group (ties: the earliest), via exact ranks.
        rank = np.empty(count, dtype=np.int64)
        rank[np.argsort(sorted_values, kind="stable")] = np.arange(count)
        group = np.cumsum(new_group) - 1
        key = rank - group * (count + 1)
        running = np.minimum.accumulate(key)
        before = np.concatenate([[np.iinfo(np.int64).max], running[:-1]])
        has = ~new_group
        by_rank = np.empty(count, dtype=np.int64)
        by_rank[rank] = np.arange(count)
        candidate = np.where(has, by_rank[np.clip(before + group * (count + 1), 0, count - 1)], 0)
        check = has & (sorted_values[candidate] <= sorted_values)
        check &= np.all(sorted_costs[candidate] <= sorted_costs, axis=1)
        dominated[order[check]] = True
        if lead == 0:
            for lag in range(1, 5):
                if lag >= count:
                    break
                same = sorted_groups[lag:] == sorted_groups[:-lag]
                worse = np.all(sorted_costs[lag:] >= sorted_costs[:-lag], axis=1)
                worse &= sorted_values[lag:] >= sorted_values[:-lag]
                dominated[order[lag:][same & worse]] = True
    return ~dominated


def enumerate_labels(
    chain: ChainSolver,
    multipliers: np.ndarray,
    rests: Sequence[np.ndarray],
    budgets: np.ndarray,
    thresholds: np.ndarray,
) -> tuple[list[tuple[np.ndarray, float] | None], int]:
    """For P budget points at once (rows of ``multipliers`` [P, M], ``budgets`` [P, M] with the
    same metrics finite in every row, and of the rest tables ``rests[u]`` [P, states after u]):
    every partial assignment that can still complete to a
    solution with Lagrangian value ≤ the point's threshold within its budgets, up to dominance
    within a state (see `solve`). Points share the unit loop, so the per-unit overhead of
    numpy calls is paid once for the whole sweep. Returns the best complete survivor per
    point (choice, value) or None, and the most labels kept at one unit."""
    points = len(thresholds)
    active = np.flatnonzero(np.isfinite(budgets[0]))
    lam = multipliers
    shift = (lam[:, active] * budgets[:, active]).sum(axis=1)  # [P]
    limit = budgets[:, active] + np.array([chain.budget_tolerance(b) for b in budgets])[:, active]
    tolerance = np.array([chain.tolerance(t) for t in thresholds])
    cutoff = thresholds + tolerance + shift  # compare Lagrangian value + rest with this
    unit_reduced = np.einsum("uwm,pm->puw", chain.padded_costs, lam)  # [P, U, W]
    room = limit[:, None, :] - chain.rest_cost[None, 1:, active]  # [P, U, K]
    point = np.arange(points)  # the budget point of each label
    flat = np.zeros(points, dtype=np.int64)  # state index over the active units
    values = np.zeros(points)  # objective of the prefix
    reduced = np.zeros(points)  # its Lagrangian value: objective + λ·costs
    costs = np.zeros((points, chain.num_metrics))
    parents, options = [], []
    most = 1
    for u in range(chain.num_units):
        n = chain.sizes[u]
        unit_costs = chain.padded_costs[u, :n]
        states_after = len(chain.next_base[u + 1]) if u + 1 < chain.num_units else 1
        # One flat table per unit: rest minimum by (point, state after u).
        rest_flat = rests[u].ravel()
        grid = chain.padded_scores[u, :n] + chain.pair_rows[u][flat]  # [labels, n]
        next_flat = chain.next_base[u][flat][:, None] + chain.own_stride[u]
        bound = grid + unit_reduced[:, u, :n][point]
        bound += (reduced - cutoff[point])[:, None]
        bound += rest_flat[(point * states_after)[:, None] + next_flat]
        keep = bound <= 0
        for position, k in enumerate(active):
            keep &= unit_costs[None, :, k] <= (room[point, u, position] - costs[:, k])[:, None]
        parent, option = np.nonzero(keep)
        step = grid[parent, option]
        point = point[parent]
        values = values[parent] + step
        reduced = reduced[parent] + step + unit_reduced[point, u, option]
        flat = next_flat[parent, option]
        costs = costs[parent] + unit_costs[option]
        if len(values) > 16:
            kept = dominance(point * states_after + flat, costs[:, active], values)
            parent, option, values, point = (
                parent[kept],
                option[kept],
                values[kept],
                point[kept],
            )
            reduced, flat, costs = reduced[kept], flat[kept], costs[kept]
        parents.append(parent)
        options.append(option)
        most = max(most, len(values))
        if len(values) > chain.max_labels:
            raise LabelLimit(f"{len(values)} partial assignments at unit {u}")
    best: list[tuple[np.ndarray, float] | None] = [None] * points
    if len(values):
        order = np.lexsort((values, point))
        first = order[np.concatenate([[True], point[order][1:] != point[order][:-1]])]
        for index in first:
            choice = np.zeros(chain.num_units, dtype=np.int64)
            label = int(index)
            for unit in range(chain.num_units - 1, -1, -1):
                choice[unit] = options[unit][label]
                label = int(parents[unit][label])
            best[int(point[index])] = (choice, float(values[index]))
    return best, most


def solve_points(
    chain: ChainSolver,
    budgets: np.ndarray,
    *,
    uppers: Sequence[tuple[np.ndarray, float] | None] | None = None,
    hull: list[tuple[float, float]] | None = None,
    first_gap: float = 1e-4,
    local_search: bool = True,
) -> list[Solution | None]:
    """The optimum under each row of ``budgets`` [P, M] (inf where absent; the same metrics
    finite in every row), or None where no assignment meets the row. ``uppers``: known
    feasible (choice, value) per row. ``hull``: shared hull points for single-budget sweeps.

    Why it is exact: let x* be optimal. For feasible x, L(x) = value(x) + Σ λ_k (c_k(x) − B_k)
    ≤ value(x). A prefix of x* has Lagrangian value plus the exact rest minimum ≤ L(x*) ≤
    value(x*), and its cost plus the cheapest rest meets every budget, so at any threshold
    T ≥ value(x*) neither test drops it; a prefix dropped by dominance is replaced by one with
    the same state and no larger value and costs, whose completion by x*'s rest is as good and
    as cheap. So once some feasible solution has value ≤ T, the best survivor is optimal.
    Thresholds start just above the bound (few survivors when the bound is tight) and double
    towards the best known value; with none known, until the enumeration is complete.
    """
    budgets = np.atleast_2d(np.asarray(budgets, dtype=float))
    # Rows where one budget alone is below its cheapest assignment have no solution.
    tolerance = np.array([chain.budget_tolerance(row) for row in budgets])
    possible = np.all(budgets + tolerance >= chain.rest_cost[0], axis=1)
    if not possible.all():
        results: list[Solution | None] = [None] * len(budgets)
        if possible.any():
            rows = np.flatnonzero(possible).tolist()
            solved = solve_points(
                chain,
                budgets[rows],
                uppers=None if uppers is None else [uppers[row] for row in rows],
                hull=hull,
                first_gap=first_gap,
                local_search=local_search,
            )
            for row, solution in zip(rows, solved):
                results[row] = solution
        return results
    lams, bounds, rests, best = _start_points(chain, budgets, uppers, hull, local_search)
    gaps = np.maximum(first_gap * np.abs(bounds), [chain.tolerance(b) for b in bounds])
    labels, infeasible = _close_gaps(chain, budgets, lams, bounds, rests, best, gaps)
    results = []
    for row, found in enumerate(best):
        if row in infeasible or found is None:
            results.append(None)
            continue
        choice = found[0]
        results.append(
            Solution(choice, chain.value(choice), chain.cost(choice), bounds[row], int(labels[row]))
        )
    return results


Upper = tuple[np.ndarray, float]  # a feasible (choice, value)


def _start_points(
    chain: ChainSolver,
    budgets: np.ndarray,
    uppers: Sequence[Upper | None] | None,
    hull: list[tuple[float, float]] | None,
    local_search: bool,
) -> tuple[list[np.ndarray], np.ndarray, list[list[np.ndarray]], list[Upper | None]]:
    """Multipliers, lower bounds, rest tables and the best known feasible solution per row:
    one batched hull walk when every row has the same single budget, else one search per row."""
    count = len(budgets)
    lams: list[np.ndarray] = []
    bounds = np.zeros(count)
    rests: list[list[np.ndarray]] = []
    best: list[Upper | None] = [None] * count
    finite = np.isfinite(budgets)
    if count > 1 and (finite == finite[0]).all() and finite[0].sum() == 1:
        k = int(np.flatnonzero(finite[0])[0])
        lam_rows, bounds, rests, hull_best = hull_multipliers(chain, k, budgets)
        lams, best = list(lam_rows), list(hull_best)
        if uppers is not None:
            for row, upper in enumerate(uppers):
                known = best[row]
                if upper is not None and known is not None and upper[1] < known[1]:
                    best[row] = upper
    for row, point in enumerate(budgets if not len(lams) else []):
        found: Found = []
        lam, bounds[row], rest = multipliers(chain, point, found, hull=hull)
        lams.append(lam)
        rests.append(rest)
        if not np.isfinite(point).any():  # no budget: the minimiser is optimal
            best[row] = (found[-1][2], found[-1][0])
            continue
        feasible = [item for item in found if chain.meets(item[1], point)]
        if feasible:
            _, _, choice = min(feasible, key=lambda item: item[0])
            best[row] = (
                improve(chain, choice, point, lam)
                if local_search
                else (choice, chain.value(choice))
            )
        upper = None if uppers is None else uppers[row]
        known = best[row]
        if upper is not None and (known is None or upper[1] < known[1]):
            best[row] = upper
    return lams, bounds, rests, best


def _close_gaps(
    chain: ChainSolver,
    budgets: np.ndarray,
    lams: list[np.ndarray],
    bounds: np.ndarray,
    rests: list[list[np.ndarray]],
    best: list[Upper | None],
    gaps: np.ndarray,
) -> tuple[np.ndarray, set[int]]:
    """Enumerate under thresholds bound + gap, doubling the gap of a row until its best
    solution is within its threshold (then it is optimal) or the enumeration was complete
    without one (infeasible). Updates ``best``; returns the most labels per row and the
    infeasible rows."""
    count = len(budgets)
    labels = np.ones(count, dtype=np.int64)
    pending = [row for row in range(count) if np.isfinite(budgets[row]).any()]
    # Rest tables per unit for all points at once: [points, states after the unit].
    stacked = [
        np.stack([np.asarray(rest[u]).ravel() for rest in rests]) for u in range(chain.num_units)
    ]
    infeasible: set[int] = set()
    while pending:
        thresholds = bounds[pending] + gaps[pending]
        for position, row in enumerate(pending):
            known = best[row]
            if known is not None and known[1] <= thresholds[position] + 1e-12 * abs(
                thresholds[position]
            ):
                thresholds[position] = known[1]
        found_best, most = enumerate_labels(
            chain,
            np.array([lams[row] for row in pending]),
            [table[pending] for table in stacked],
            budgets[pending],
            thresholds,
        )
        still = []
        for position, row in enumerate(pending):
            labels[row] = max(labels[row], most)
            candidate, known = found_best[position], best[row]
            if candidate is not None and (known is None or candidate[1] < known[1]):
                best[row] = known = candidate
            if known is not None and known[1] <= thresholds[position]:
                continue  # every solution with value <= threshold was enumerated
            if known is None and thresholds[position] > abs(bounds[row]) + 2 * (
                chain.objective_scale
            ):
                infeasible.add(row)  # the enumeration was complete and found nothing
                continue
            gaps[row] = (
                2 * gaps[row] if known is None else min(2 * gaps[row], known[1] - bounds[row])
            )
            still.append(row)
        pending = still
    return labels, infeasible
