"""Allocation speed and exactness: lcpaq vs PuLP+CBC vs scipy.optimize.milp on the same ILPs.

Issue 5's targets, on a synthetic ResNet-50-scale instance (54 layers × 8 formats, size + BitOps
budgets, pairwise terms between layers at most 1, 2 or 3 apart) and a 200-layer one: every returned
point proven optimal; a single solve with pairs ≥ 10× faster than PuLP+CBC; the 100-point Pareto
curve in under 5 s with pairs and under 0.5 s without. Everything runs in one process on the same
instances; compare ratios (the machine is shared, absolute times are noisy).

Verification: without pairs and with one budget, an integer dynamic program on the exact integer
size in bits (independent code, below) gives the optimum of every budget; with pairs between
adjacent layers only, a per-state Pareto-list dynamic program (below) gives every optimum; otherwise
the objectives of lcpaq, HiGHS, scipy's milp and CBC must agree and each MIP must report a gap
≤ 1e-6 (sampled points for the curves: a MIP solve per point takes seconds to minutes).

    python scripts/bench_allocate.py                      # results/bench_allocate.json
    python scripts/bench_allocate.py --quick              # fewer MIP reference solves
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _provenance import git_sha  # noqa: E402

from lcpaq.allocation.budgets import Budget  # noqa: E402
from lcpaq.allocation.costs import BITS_PER_MB, CostModel, build_cost_model  # noqa: E402
from lcpaq.allocation.problem import AllocationProblem, _quiet_stdout  # noqa: E402
from lcpaq.allocation.table import CandidateTable  # noqa: E402

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
    with _quiet_stdout():
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


# -- measurements ---------------------------------------------------------------------------------


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
        unit_choice = np.zeros(problem.unit_allowed.shape[0], dtype=int)
        unit_choice[problem.unit] = choice
        x = problem._column_values(unit_choice)
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


def single_solves(num_layers: int, windows: Sequence[int], args: argparse.Namespace) -> dict:
    """One solve with size + BitOps budgets (40 % and 50 % of the way from all-lowest to
    all-highest): without pairs, and with pairs per window."""
    results: dict[str, object] = {}
    for window in [0, *windows]:
        inst = make_instance(num_layers, max(window, 1), seed=args.seed)
        costs = inst[2]
        budgets = [relative_budget(costs, "size-mb", 0.4), relative_budget(costs, "bitops-g", 0.5)]
        results["budgets"] = [str(b) for b in budgets]
        entry: dict[str, object] = {}
        runs = {}
        for label, solver, form in (
            ("lcpaq", "auto", "rlt"),
            ("lcpaq_dp", "dp", "rlt"),
            ("highs_rlt", "highs", "rlt"),
            ("highs_mccormick", "highs", "mccormick"),
        ):
            if window == 0 and label == "highs_mccormick":
                continue
            if label == "highs_mccormick" and window > args.mccormick_max_window:
                continue
            problem, build = timed(problem_for, inst, window > 0, solver, form)
            allocation, elapsed = timed(problem.solve, budgets)
            runs[label] = allocation
            entry[label] = {
                "solve_s": elapsed,
                "build_s": build,
                "objective": allocation.predicted_loss_increase,
                "status": allocation.status,
                "mip_gap": allocation.mip_gap,
                "method": allocation.solver,
            }
            if label == "highs_rlt":
                reference_problem = problem
        forms = ["rlt"] + (["mccormick"] if window and window <= args.mccormick_max_window else [])
        mine = runs["lcpaq"].formats
        for form in forms:
            problem = (
                problem_for(inst, window > 0, "highs", form) if form != "rlt" else reference_problem
            )
            which = ["milp"] + (["cbc"] if window <= args.cbc_max_window else [])
            for name, run in mip_reference(problem, budgets, which, args.time_limit, mine).items():
                entry[f"{name}_{form}"] = run
        arrays = reference_problem.milp_arrays(budgets)
        for label in ("lcpaq_dp", "highs_rlt", "highs_mccormick"):
            if label in entry:
                check_against(entry[label], reference_problem, budgets, mine, arrays)
        entry["objectives_agree"] = {
            name: run["agrees"]
            for name, run in entry.items()
            if isinstance(run, dict) and "agrees" in run
        }
        cbc = entry.get("cbc_rlt", {})
        entry["speedup_vs_cbc_rlt"] = cbc.get("solve_s", np.nan) / entry["lcpaq"]["solve_s"]
        entry["speedup_vs_milp_rlt"] = entry["milp_rlt"]["solve_s"] / entry["lcpaq"]["solve_s"]
        entry["speedup_vs_highs_rlt"] = entry["highs_rlt"]["solve_s"] / entry["lcpaq"]["solve_s"]
        results["no_pairs" if window == 0 else f"window_{window}"] = entry
        print(
            f"single window={window}: "
            + ", ".join(
                f"{k} {v['solve_s']:.3f}s"
                for k, v in entry.items()
                if isinstance(v, dict) and "solve_s" in v
            ),
            flush=True,
        )
    return results


def curve(
    instance: tuple, window: int, args: argparse.Namespace, fixed: Sequence[Budget] = ()
) -> dict:
    """The 100-point model-level Pareto curve on size (``fixed``: other budgets held), lcpaq vs
    references."""
    table, scores, costs, pair_terms = instance
    pairs = {} if window == 0 else pair_terms
    problem, build = timed(problem_for, instance, window > 0, "auto")
    points, elapsed = timed(problem.pareto_curve, "size-mb", args.points, budgets=fixed)
    swept = sorted(v for p in points for v in p.budgets)
    entry: dict[str, object] = {
        "fixed_budgets": [str(b) for b in fixed],
        "points": args.points,
        "distinct_optima": len(points),
        "lcpaq_s": elapsed,
        "lcpaq_build_s": build,
        "method": sorted({p.solver for p in points}),
        "max_mip_gap": max(p.mip_gap for p in points),
    }
    by_budget = {v: p for p in points for v in p.budgets}
    # Exact oracles where they apply.
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
    # HiGHS (lcpaq's own MIP path) over the whole sweep, and sampled CBC / milp points.
    highs_problem = problem_for(instance, window > 0, "highs")
    if window == 0 or args.highs_curve_pairs:
        highs_points, highs_s = timed(
            lambda: highs_problem.pareto_curve("size-mb", args.points, budgets=fixed)
        )
        entry["highs_s"] = highs_s
        highs_by = {v: p for p in highs_points for v in p.budgets}
        entry["highs_max_relative_difference"] = float(
            max(
                relative(highs_by[v].predicted_loss_increase, by_budget[v].predicted_loss_increase)
                for v in swept
            )
        )
        entry["speedup_vs_highs"] = highs_s / elapsed
    sample = np.unique(np.linspace(0, len(swept) - 1, args.sample).round().astype(int))
    references: dict[str, list[dict[str, object]]] = {"highs": [], "milp": [], "cbc": []}
    for index in sample:
        value = swept[index]
        budget = [*fixed, Budget("size-mb", value)]
        formats = by_budget[value].formats
        if "highs_s" not in entry:
            allocation, seconds = timed(highs_problem.solve, budget)
            run = {
                "budget": value,
                "solve_s": seconds,
                "objective": allocation.predicted_loss_increase,
                "mip_gap": allocation.mip_gap,
            }
            check_against(run, highs_problem, budget, formats, highs_problem.milp_arrays(budget))
            references["highs"].append(run)
        which = ["milp"] + (["cbc"] if window in args.cbc_curve_windows and not fixed else [])
        for name, run in mip_reference(
            highs_problem, budget, which, args.time_limit, formats
        ).items():
            run["budget"] = value
            references[name].append(run)
    for name, runs in references.items():
        if not runs:
            continue
        per_point = float(np.mean([r["solve_s"] for r in runs]))
        entry[f"{name}_sampled"] = runs
        entry[f"{name}_per_point_s"] = per_point
        # Every point of the sweep is a distinct optimum here, so each needs its own solve.
        entry[f"{name}_curve_estimate_s"] = per_point * len(points)
        entry[f"speedup_vs_{name}_estimate"] = per_point * len(points) / elapsed
    print(
        f"curve window={window} fixed={[str(b) for b in fixed]}: lcpaq {elapsed:.2f}s, "
        f"{len(points)} optima",
        flush=True,
    )
    return entry


def levers(args: argparse.Namespace) -> dict:
    """Levers measured one at a time: safe pruning (candidates kept per set of cost metrics;
    HiGHS with and without it), warm starts and skipped re-solves in a HiGHS sweep, and the
    dynamic program's Lagrangian bound against the LP relaxation of the RLT form."""
    out: dict[str, object] = {}
    for window in (0, 1):
        inst = make_instance(args.layers, max(window, 1), seed=args.seed)
        table, scores, costs, _ = inst
        budgets = [relative_budget(costs, "size-mb", 0.4), relative_budget(costs, "bitops-g", 0.5)]
        pruned = problem_for(inst, window > 0, "highs")
        unpruned = problem_for(inst, window > 0, "highs", prune=False)
        entry: dict[str, object] = {
            "candidates": int(scores.size),
            "kept_all_metrics": int(pruned.unit_allowed.sum()),
            "kept_size_only": int(sum(len(c) for c in pruned._prepare(("size-mb",)).columns)),
            "kept_size_bitops": int(
                sum(len(c) for c in pruned._prepare(("size-mb", "bitops-g")).columns)
            ),
            "kept_avg_bits_only": int(sum(len(c) for c in pruned._prepare(("avg-bits",)).columns)),
        }
        _, entry["highs_pruned_s"] = timed(pruned.solve, budgets)
        _, entry["highs_unpruned_s"] = timed(unpruned.solve, budgets)
        # A HiGHS sweep (size only): warm starts and skipped re-solves on, then warm starts off.
        for label, warm in (("warm", True), ("cold", False)):
            problem = problem_for(inst, window > 0, "highs")
            calls = []

            def counted(
                budgets_, factors_, problem=problem, run=problem._run_highs, warm=warm, calls=calls
            ):
                calls.append(1)
                if not warm:
                    problem._found.clear()  # nothing to start from
                return run(budgets_, factors_)

            problem._run_highs = counted  # type: ignore[method-assign]
            points, seconds = timed(problem.pareto_curve, "size-mb", args.lever_points)
            entry[f"highs_sweep_{label}_s"] = seconds
            entry[f"highs_sweep_{label}_solves"] = len(calls) - 1  # one finds the top
            entry["highs_sweep_points"] = args.lever_points
            entry["highs_sweep_distinct"] = len(points)
        out["no_pairs" if window == 0 else "window_1"] = entry
    # The dynamic program's Lagrangian bound vs the LP relaxation of the RLT form (window 3).
    inst = make_instance(args.layers, 3, seed=args.seed)
    table, scores, costs, _ = inst
    budgets = [relative_budget(costs, "size-mb", 0.4), relative_budget(costs, "bitops-g", 0.5)]
    problem = problem_for(inst, True, "auto")
    allocation = problem.solve(budgets)
    arrays = problem_for(inst, True, "highs").milp_arrays(budgets)
    from scipy.optimize import Bounds, LinearConstraint, milp

    relaxed = milp(
        arrays["cost"],
        constraints=LinearConstraint(arrays["matrix"], arrays["row_lower"], arrays["row_upper"]),
        bounds=Bounds(0, 1),
    )
    prepared = problem._prepare(("size-mb", "bitops-g"))
    limits = problem._limits(budgets, prepared.metrics)
    found: list = []
    _, bound, _ = prepared.chain.multipliers(limits, found)
    out["bounds_window_3"] = {
        "optimum": allocation.predicted_loss_increase,
        "lp_relaxation_rlt": float(relaxed.fun / arrays["objective_scale"]),
        "lagrangian_dp": float(bound),
    }
    return out


def budget_grid(args: argparse.Namespace) -> dict:
    """lcpaq alone (auto) on the 200-layer window-3 instance over several (size, BitOps) budget
    pairs: how much the dynamic program's time varies with the budgets."""
    inst = make_instance(args.big_layers, 3, seed=args.seed)
    costs = inst[2]
    rows = []
    pairs = ((0.1, 0.2), (0.2, 0.3), (0.25, 0.35), (0.3, 0.3), (0.4, 0.5), (0.6, 0.5), (0.8, 0.7))
    for size, bitops in pairs:
        budgets = [
            relative_budget(costs, "size-mb", size),
            relative_budget(costs, "bitops-g", bitops),
        ]
        allocation, seconds = timed(problem_for(inst, True, "auto").solve, budgets)
        rows.append(
            {
                "size_fraction": size,
                "bitops_fraction": bitops,
                "solve_s": seconds,
                "method": allocation.solver,
                "objective": allocation.predicted_loss_increase,
            }
        )
        print(f"grid {size},{bitops}: {seconds:.2f}s {allocation.solver}", flush=True)
    return {"instance": f"{args.big_layers} layers, window 3", "points": rows}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "results" / "bench_allocate.json"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--layers", type=int, default=54, help="the ResNet-50-scale instance")
    parser.add_argument("--big-layers", type=int, default=200)
    parser.add_argument("--lever-points", type=int, default=10, help="HiGHS sweeps in levers")
    parser.add_argument("--sample", type=int, default=5, help="MIP reference solves per curve")
    parser.add_argument("--time-limit", type=float, default=600.0, help="per reference MIP solve")
    parser.add_argument("--cbc-max-window", type=int, default=3, help="single solves")
    parser.add_argument("--cbc-curve-windows", default="0,1,3", help="curves with CBC samples")
    parser.add_argument("--mccormick-max-window", type=int, default=1)
    parser.add_argument(
        "--highs-curve-pairs", action="store_true", help="full HiGHS sweeps with pairs"
    )
    parser.add_argument(
        "--quick", action="store_true", help="2 reference points per curve, CBC only to window 1"
    )
    parser.add_argument(
        "--grid-only", action="store_true", help="only the 200-layer budget grid (its own JSON)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.sample, args.cbc_max_window, args.time_limit = 2, 1, 120.0
        args.cbc_curve_windows = "0,1"
    args.cbc_curve_windows = [int(w) for w in args.cbc_curve_windows.split(",") if w]
    started = time.perf_counter()
    report: dict[str, object] = {
        "command": "python scripts/bench_allocate.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "git": git_sha(short=True),
        "machine": f"{platform.machine()} {platform.processor()}, {os.cpu_count()} cores (shared)",
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "instance": "ResNet-50 layer shapes, formats " + ",".join(FORMATS) + f", seed {args.seed}",
        "targets": {
            "single_solve_with_pairs_vs_cbc": ">= 10x",
            "curve_100_points_with_pairs_s": "< 5",
            "curve_100_points_without_pairs_s": "< 0.5",
        },
    }
    if args.grid_only:
        report["budget_grid_200"] = budget_grid(args)
        report["load_average_at_end"] = os.getloadavg()
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=float))
        print(f"wrote {out}")
        return
    report["curves_54"] = {
        f"window_{w}": curve(make_instance(args.layers, max(w, 1), seed=args.seed), w, args)
        for w in (0, 1, 2, 3)
    }
    report["curves_54_bitops_fixed"] = {}
    for w in (0, 3):
        inst = make_instance(args.layers, max(w, 1), seed=args.seed)
        fixed = [relative_budget(inst[2], "bitops-g", 0.5)]
        report["curves_54_bitops_fixed"][f"window_{w}"] = curve(inst, w, args, fixed)
    report["single_54"] = single_solves(args.layers, (1, 2, 3), args)
    report["single_200"] = single_solves(args.big_layers, (3,), args)
    report["levers"] = levers(args)
    report["load_average_at_end"] = os.getloadavg()
    report["total_s"] = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(report, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    )
    print(f"wrote {out} ({report['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
