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
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _allocate_oracles import (  # noqa: E402
    FORMATS,
    check_against,
    kept,
    make_instance,
    mip_reference,
    oracle_check,
    problem_for,
    relative,
    relative_budget,
    timed,
)
from _provenance import git_sha  # noqa: E402

from lcpaq.allocation.budgets import Budget  # noqa: E402
from lcpaq.allocation.multipliers import multipliers  # noqa: E402
from lcpaq.allocation.problem import AllocationProblem  # noqa: E402

# -- measurements ---------------------------------------------------------------------------------


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


def sampled_references(
    highs_problem: AllocationProblem,
    window: int,
    args: argparse.Namespace,
    fixed: Sequence[Budget],
    swept: list[float],
    by_budget: dict,
    entry: dict[str, object],
) -> dict[str, list[dict[str, object]]]:
    """HiGHS, milp and CBC on sampled points of the sweep (HiGHS only where ``entry`` has no
    whole HiGHS sweep), each checked against lcpaq's assignment there."""
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
    return references


def curve(
    instance: tuple, window: int, args: argparse.Namespace, fixed: Sequence[Budget] = ()
) -> dict:
    """The 100-point model-level Pareto curve on size (``fixed``: other budgets held), lcpaq vs
    references."""
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
    entry.update(oracle_check(instance, window, fixed, swept, by_budget))
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
    references = sampled_references(highs_problem, window, args, fixed, swept, by_budget, entry)
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
            "kept_all_metrics": int(pruned.units.allowed.sum()),
            "kept_size_only": kept(pruned, ("size-mb",)),
            "kept_size_bitops": kept(pruned, ("size-mb", "bitops-g")),
            "kept_avg_bits_only": kept(pruned, ("avg-bits",)),
        }
        _, entry["highs_pruned_s"] = timed(pruned.solve, budgets)
        _, entry["highs_unpruned_s"] = timed(unpruned.solve, budgets)
        # A HiGHS sweep (size only): warm starts and skipped re-solves on, then warm starts off.
        for label, warm in (("warm", True), ("cold", False)):
            problem = problem_for(inst, window > 0, "highs")
            calls = []

            solvers = problem.solvers

            def counted(
                budgets_, factors_, solvers=solvers, run=solvers.run_highs, warm=warm, calls=calls
            ):
                calls.append(1)
                if not warm:
                    solvers.found.clear()  # nothing to start from
                return run(budgets_, factors_)

            solvers.run_highs = counted  # type: ignore[method-assign]
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
    prepared = problem.solvers.prepare(("size-mb", "bitops-g"))
    limits = problem.solvers.limits(budgets, prepared.metrics)
    found: list = []
    assert prepared.chain is not None
    _, bound, _ = multipliers(prepared.chain, limits, found)
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
