"""Instances, reference MIP solvers and independent exact oracles for scripts/bench_allocate.py.

Instances: ResNet-50 layer shapes (repeated past 54 layers), 8 formats, HAWQ-style scores and
pairwise terms in a window of layers (`make_instance`). References: PuLP+CBC and scipy's milp on
the arrays of lcpaq's HiGHS model (`solve_cbc`, `solve_milp`). Oracles, written independently of
lcpaq.allocation: an integer knapsack DP on size bits (no pairs, one budget) and per-state Pareto
lists (pairs between adjacent layers only). Comparisons: whether a reference agrees with lcpaq's
assignment, and where it does not, whether lcpaq's is feasible in the reference's own model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from lcpaq.allocation.budgets import Budget
from lcpaq.allocation.costs import BITS_PER_MB, CostModel, build_cost_model
from lcpaq.allocation.highs import quiet_stdout
from lcpaq.allocation.problem import AllocationProblem
from lcpaq.allocation.table import CandidateTable

FORMATS = ("int2", "int3", "int4", "int5", "int6", "int8", "fp4_e2m1", "fp8_e4m3")
BITS = np.array([2, 3, 4, 5, 6, 8, 4, 8])
IS_FP = np.array([0, 0, 0, 0, 0, 0, 1, 1], dtype=bool)
#: Weight MSE per element relative to the weight variance, per-channel scales with MSE clipping of
#: Gaussian weights (the INT values follow ≈ 4^-b; FP4 sits just above INT4, FP8-E4M3 near INT6.5).
RELATIVE_ERROR = np.array([0.12, 0.037, 0.0115, 0.0034, 0.0010, 7e-5, 0.013, 3e-4])
GAP = 1e-6
AGREE = 1e-6  # relative objective agreement between exact methods


# -- instances -------------------------------------------------------------------------------


def resnet50_layers() -> list[tuple[str, int, int, int]]:
    """(name, output channels, fan-in, output pixels) of torchvision's ResNet-50, in order."""
    layers = [("conv1", 64, 3 * 49, 112 * 112)]
    channels, spatial = 64, 56
    for stage, (blocks, width, stride) in enumerate(
        ((3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2))
    ):
        for block in range(blocks):
            step = stride if block == 0 else 1
            out = spatial // step
            prefix = f"layer{stage + 1}.{block}"
            layers.append((f"{prefix}.conv1", width, channels, spatial * spatial))
            layers.append((f"{prefix}.conv2", width, width * 9, out * out))
            layers.append((f"{prefix}.conv3", width * 4, width, out * out))
            if block == 0:
                layers.append((f"{prefix}.downsample.0", width * 4, channels, out * out))
            channels, spatial = width * 4, out
    layers.append(("fc", 1000, 2048, 1))
    return layers


def make_instance(
    num_layers: int, window: int, seed: int = 0, rho: float = 0.5
) -> tuple[CandidateTable, np.ndarray, CostModel, dict[tuple[int, int], np.ndarray]]:
    """ResNet-50 layer shapes (repeated past 54), 8 formats; HAWQ-style scores ½·tr/n·‖ΔW‖² with
    traces log-uniform over three decades and ±25 % noise per (layer, format); pairwise terms
    C_ij = 2ρ_ij·√(s_i s_j)·(1 + 0.3·N(0,1)) for 1 ≤ j − i ≤ window, ρ_ij ~ U(−ρ, ρ)/(j − i) (the
    Cauchy–Schwarz scale of a Hessian cross term Δw_iᵀH_ijΔw_j, both signs)."""
    rng = np.random.default_rng(seed)
    base = resnet50_layers()
    rows = [base[k % len(base)] for k in range(num_layers)]
    names = tuple(
        name if k < len(base) else f"{name}#{k // len(base)}" for k, (name, *_) in enumerate(rows)
    )
    channels = np.array([r[1] for r in rows])
    params = channels * np.array([r[2] for r in rows])
    macs = (params * np.array([r[3] for r in rows])).astype(float)
    overhead = (
        np.where(IS_FP, 32, 48)[None, :] * channels[:, None]
    )  # scale (+ zero point) per channel
    weight_bits = params[:, None] * BITS[None, :].astype(float)
    noise = np.exp(rng.normal(0.0, 0.25, (num_layers, len(FORMATS))))
    error = params[:, None] * RELATIVE_ERROR[None, :] * noise
    table = CandidateTable(
        layer_names=names,
        format_names=FORMATS,
        num_params=params.astype(np.int64),
        bits=BITS.astype(np.int64),
        weight_bits=weight_bits,
        size_bits=weight_bits + overhead,
        error_sq=error,
        weighted_error=np.full(error.shape, np.nan),
    )
    level = 10 ** rng.uniform(-4, -1, num_layers)
    scores = 1e3 * level[:, None] * RELATIVE_ERROR[None, :] * noise
    unquantized = float(channels.sum() * 64 * 4)  # BatchNorm: 4 float32 per channel
    costs = build_cost_model(
        table,
        constant_size_bits=unquantized,
        fp32_size_bits=float(params.sum() * 32 + unquantized),
        macs_per_sample=macs,
        activation_bits=8,
        weight_sign_bits=IS_FP.astype(float),
    )
    pairs = {}
    for i in range(num_layers):
        for j in range(i + 1, min(num_layers, i + window + 1)):
            rho_ij = rng.uniform(-rho, rho) / (j - i)
            shape = (len(FORMATS), len(FORMATS))
            pairs[(i, j)] = (
                2
                * rho_ij
                * np.sqrt(np.outer(scores[i], scores[j]))
                * (1 + 0.3 * rng.normal(size=shape))
            )
    return table, scores, costs, pairs


def relative_budget(costs: CostModel, metric: str, fraction: float) -> Budget:
    """HAWQ-V3 style: all-lowest + fraction × (all-highest − all-lowest)."""
    coefficients = costs.coefficients[metric]
    low = coefficients.min(axis=1).sum() + costs.offsets[metric]
    high = coefficients.max(axis=1).sum() + costs.offsets[metric]
    return Budget(metric, float(low + fraction * (high - low)))


# -- reference MIP solvers ----------------------------------------------------------------------


def solve_cbc(arrays: dict[str, np.ndarray], time_limit: float) -> dict[str, object]:
    """PuLP + CBC on the arrays (as HAWQ, LIMPQ and ModelOpt call it): one thread, gap 1e-6."""
    import pulp

    matrix = arrays["matrix"].tocsr()
    count = matrix.shape[1]
    start = time.perf_counter()
    model = pulp.LpProblem("allocation", pulp.LpMinimize)
    variables = [
        pulp.LpVariable(f"x{j}", 0, 1, cat="Binary" if arrays["integrality"][j] else "Continuous")
        for j in range(count)
    ]
    model += pulp.lpSum(float(c) * v for c, v in zip(arrays["cost"], variables) if c != 0)
    lower, upper = arrays["row_lower"], arrays["row_upper"]
    for row in range(matrix.shape[0]):
        begin, end = matrix.indptr[row], matrix.indptr[row + 1]
        expression = pulp.lpSum(
            float(value) * variables[j]
            for j, value in zip(matrix.indices[begin:end], matrix.data[begin:end])
        )
        if lower[row] == upper[row]:
            model += expression == float(lower[row])
            continue
        if np.isfinite(lower[row]):
            model += expression >= float(lower[row])
        if np.isfinite(upper[row]):
            model += expression <= float(upper[row])
    built = time.perf_counter()
    status = model.solve(
        pulp.PULP_CBC_CMD(msg=False, gapRel=GAP, gapAbs=0.0, threads=1, timeLimit=time_limit)
    )
    solved = time.perf_counter()
    values = np.array([v.value() or 0.0 for v in variables])
    return {
        "status": f"{pulp.LpStatus[status]} ({pulp.LpSolution[model.sol_status]})",
        "solve_s": solved - built,
        "build_s": built - start,
        "values": values,
        "timed_out": solved - built >= time_limit * 0.98,
    }


def solve_milp(arrays: dict[str, np.ndarray], time_limit: float) -> dict[str, object]:
    """scipy.optimize.milp (HiGHS inside scipy) on the same arrays, gap 1e-6."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    start = time.perf_counter()
    with quiet_stdout():
        result = milp(
            arrays["cost"],
            constraints=LinearConstraint(
                arrays["matrix"], arrays["row_lower"], arrays["row_upper"]
            ),
            integrality=arrays["integrality"],
            bounds=Bounds(0, 1),
            options={"mip_rel_gap": GAP, "time_limit": time_limit, "disp": False},
        )
    elapsed = time.perf_counter() - start
    return {
        "status": result.message,
        "solve_s": elapsed,
        "values": result.x if result.x is not None else None,
        "gap": float(getattr(result, "mip_gap", np.nan)),
        "timed_out": elapsed >= time_limit * 0.98,
    }


# -- independent exact oracles --------------------------------------------------------------------


def integer_knapsack_values(
    scores: np.ndarray, cost_bits: np.ndarray, capacities_bits: np.ndarray
) -> np.ndarray:
    """Exact min Σ scores s.t. Σ integer costs ≤ capacity, by a dynamic program over the cost
    (integer bits, divided by their greatest common divisor above each layer's cheapest format)."""
    cheapest = cost_bits.min(axis=1)
    extra = cost_bits - cheapest[:, None]
    unit = int(np.gcd.reduce(extra.ravel())) or 1
    steps = extra // unit
    top = int(steps.max(axis=1).sum())
    reach = 0  # the largest extra cost reachable so far
    table = np.full(top + 1, np.inf)  # table[c]: min score with extra cost exactly c
    table[0] = 0.0
    for layer in range(len(scores)):
        new = np.full(top + 1, np.inf)
        for f in range(cost_bits.shape[1]):
            shift = int(steps[layer, f])
            span = reach + 1
            np.minimum(
                new[shift : shift + span],
                table[:span] + scores[layer, f],
                out=new[shift : shift + span],
            )
        reach += int(steps[layer].max())
        table = new
    best = np.minimum.accumulate(table)  # extra cost at most c
    room = np.floor((capacities_bits - cheapest.sum()) / unit).astype(np.int64)
    return np.where(room >= 0, best[np.clip(room, 0, top)], np.inf)


def chain_frontier_values(
    scores: np.ndarray,
    costs: np.ndarray,
    pairs: dict[tuple[int, int], np.ndarray],
    budgets: np.ndarray,
) -> np.ndarray:
    """Exact optima for pairs between adjacent layers only: one (cost, value) Pareto list per
    format of the last layer, extended layer by layer (independent of lcpaq.allocation.exact)."""
    num_layers, num_formats = scores.shape
    lists = [(np.array([costs[0, f]]), np.array([scores[0, f]])) for f in range(num_formats)]
    for layer in range(1, num_layers):
        pair = pairs.get((layer - 1, layer), np.zeros((num_formats, num_formats)))
        new_lists = []
        for f in range(num_formats):
            cost = np.concatenate([c + costs[layer, f] for c, _ in lists])
            value = np.concatenate(
                [v + scores[layer, f] + pair[g, f] for g, (_, v) in enumerate(lists)]
            )
            order = np.lexsort((value, cost))
            cost, value = cost[order], value[order]
            kept = value < np.minimum.accumulate(np.concatenate([[np.inf], value[:-1]]))
            new_lists.append((cost[kept], value[kept]))
        lists = new_lists
    cost = np.concatenate([c for c, _ in lists])
    value = np.concatenate([v for _, v in lists])
    order = np.argsort(cost, kind="stable")
    cost, running = cost[order], np.minimum.accumulate(value[order])
    index = np.searchsorted(cost, budgets, side="right") - 1
    return np.where(index >= 0, running[np.maximum(index, 0)], np.inf)


def oracle_check(
    instance: tuple, window: int, fixed: Sequence[Budget], swept: list[float], by_budget: dict
) -> dict[str, object]:
    """Every swept point against an exact oracle where one applies (no other budget; no pairs,
    or pairs between adjacent layers only)."""
    table, scores, costs, pair_terms = instance
    pairs = {} if window == 0 else pair_terms
    entry: dict[str, object] = {}
    values = np.array(swept)
    if fixed:
        expected, oracle_s = None, 0.0
    elif window == 0:
        cost_bits = table.size_bits.astype(np.int64)
        # Integer costs: a budget allows floor(bits); 0.01 bit absorbs the MB round trip (lcpaq
        # accepts 1e-10 relative, about 0.01 bit at these sizes).
        capacities = (values - costs.offsets["size-mb"]) * BITS_PER_MB + 1e-2
        expected, oracle_s = timed(integer_knapsack_values, scores, cost_bits, capacities)
        entry["oracle"] = "integer knapsack DP on size bits"
    elif window == 1:
        coefficients = costs.coefficients["size-mb"]
        limits = values - costs.offsets["size-mb"] + 1e-10 * values
        expected, oracle_s = timed(
            lambda: chain_frontier_values(scores, coefficients, pairs, limits)
        )
        entry["oracle"] = "per-state Pareto lists (adjacent pairs)"
    else:
        expected, oracle_s = None, 0.0
    if expected is not None:
        got = np.array([by_budget[v].predicted_loss_increase for v in swept])
        errors = np.abs(got - expected) / np.abs(expected)
        entry["oracle_s"] = oracle_s
        entry["oracle_max_relative_error"] = float(errors.max())
        entry["all_points_match_oracle"] = bool(errors.max() <= 1e-9)
    return entry


# -- lcpaq against the references ---------------------------------------------------------------------------------


def timed(function: Callable[..., object], *args: object, **kwargs: object) -> tuple[object, float]:
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def problem_for(
    instance: tuple, pairs: bool, solver: str, linearization: str = "rlt", prune: bool = True
) -> AllocationProblem:
    table, scores, costs, pair_terms = instance
    return AllocationProblem(
        table,
        scores,
        np.ones_like(scores, dtype=bool),
        costs=costs,
        pairwise=pair_terms if pairs else None,
        solver=solver,
        linearization=linearization,
        prune=prune,
    )


def check_against(
    entry: dict[str, object],
    problem: AllocationProblem,
    budgets: Sequence[Budget],
    mine: tuple[str, ...],
    arrays: dict[str, np.ndarray],
) -> None:
    """Mark agreement of a reference solver with lcpaq's assignment ``mine``; where the reference
    reports a worse "optimum", check that lcpaq's assignment is feasible in the reference's own
    model (rows within 1e-9) and record by how much the reference's claim is off."""
    choice = np.array([problem.table.format_names.index(name) for name in mine])
    value = problem.objective(choice)
    other = entry.get("objective")
    entry["agrees"] = other is not None and relative(other, value) <= AGREE
    if other is not None and not entry["agrees"] and other > value:
        unit_choice = np.zeros(problem.units.allowed.shape[0], dtype=int)
        unit_choice[problem.unit] = choice
        x = problem.solvers.highs.column_values(unit_choice)
        product = arrays["matrix"] @ x
        violation = np.maximum(arrays["row_lower"] - product, 0) + np.maximum(
            product - arrays["row_upper"], 0
        )
        meets = all(problem.metric_value(b.metric, choice) <= b.value for b in budgets)
        entry["lcpaq_better_and_feasible"] = bool(meets and violation.max() <= 1e-9)
        entry["reference_excess_relative"] = relative(other, value)


def mip_reference(
    problem: AllocationProblem,
    budgets: Sequence[Budget],
    which: Sequence[str],
    time_limit: float,
    mine: tuple[str, ...],
) -> dict[str, dict[str, object]]:
    """CBC and/or milp on the problem's HiGHS model under ``budgets``: time, status, objective,
    agreement with lcpaq's assignment ``mine`` (`check_against`)."""
    arrays = problem.milp_arrays(budgets)
    out = {}
    for name in which:
        run = solve_cbc(arrays, time_limit) if name == "cbc" else solve_milp(arrays, time_limit)
        entry = {k: v for k, v in run.items() if k != "values"}
        values = run["values"]
        if values is not None:
            try:
                choice = problem.decode(values)
                entry["objective"] = problem.objective(choice)
                entry["meets_budgets"] = all(
                    problem.metric_value(b.metric, choice) <= b.value * (1 + 1e-9) for b in budgets
                )
            except ValueError:
                entry["objective"] = None
        check_against(entry, problem, budgets, mine, arrays)
        out[name] = entry
    return out


def kept(problem: AllocationProblem, metrics: tuple[str, ...]) -> int:
    """Candidates the safe pruning keeps for these cost metrics."""
    return int(sum(len(c) for c in problem.solvers.prepare(metrics).columns))
