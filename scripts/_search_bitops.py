"""bench_search.py's ResNet20 W3A3-BitOps phases (issue 17): activation formats searched under the
BitOps of uniform W3A3 (``bitops-g=0.365``), where lcpaq's INT8-input default does not fit.

* ``bitops``: a multi-fidelity search (``--also act_formats --fidelity multi``, no ``--eval``:
  the choice is the lowest full-slice KL to FP32 on held-out calibration images, never test or
  training-image accuracy); then the pick and the start (trial 0: lcpaq's default moved to the
  nearest configuration that fits, INT4/6/8 inputs) on the test images, paired, with FP32.
* ``bitops-rank``: proxy (full slice) vs test top-1 over random configurations of the same space.
* ``bitops-cost``: the ordinary stages from scratch (``lcpaq run`` without sweep and plots) on a
  few of those configurations, against the search's own seconds per scored configuration.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
from _search_common import (
    base_config,
    clean,
    measure,
    naive_run,
    paired,
    random_configurations,
    spearman_of,
    trial_base_of,
)

from lcpaq.model.data import Dataset
from lcpaq.model.evaluate import evaluate_accuracy
from lcpaq.search import SearchContext, SearchOptions, run_search, search_space

BUDGET = "bitops-g=0.365"


def _options(args: argparse.Namespace) -> SearchOptions:
    base = base_config(args.shared, "resnet20", 3.0).with_allocation(budgets=(BUDGET,))
    return SearchOptions(
        base=base,
        out=args.out / "resnet20-bitops",
        trials=args.bitops_trials,
        also=("act_formats",),
        fidelity="multi",
        seed=args.seed,
    )


def _context(options: SearchOptions) -> tuple[SearchContext, Any]:
    space = search_space(options)
    context = SearchContext.open(options.base, options.out, space, options.proxy, options.rungs)
    return context, space


def phase_bitops(args: argparse.Namespace, test: Dataset) -> dict[str, object]:
    options = _options(args)
    start, cpu = time.perf_counter(), time.process_time()
    summary: dict[str, Any] = run_search(options, progress=False)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    context, space = _context(options)
    trial_base = trial_base_of(options.base, options.out)
    start_params = summary["start"]["params"]
    best = measure(context, space.config(trial_base, summary["best"]["params"]), test)
    default = measure(context, space.config(trial_base, start_params), test)
    fp32 = evaluate_accuracy(context.cache.model, test)
    return {
        "budget": BUDGET,
        "search_wall_s": wall,
        "search_cpu_s": cpu,
        "trials": summary["trials"],
        "start": summary["start"],
        "fidelity": summary["fidelity"],
        "selection": "lowest full-slice KL to FP32 on calibration images 3933-5085 (no --eval)",
        "best_params": summary["best"]["params"],
        "fp32_top1": fp32.top1,
        "best_top1": best["top1"],
        "default_top1": default["top1"],
        "best_minus_default": paired(best["_accuracy"], default["_accuracy"]),
        "default_minus_fp32": paired(default["_accuracy"], fp32),
        "rows": clean([best, default]),
    }


def _fitting(space: Any, options: SearchOptions) -> Any:
    """The space with the one activation set that fits the budget (INT8, FP8 and FP32 inputs
    cannot: random configurations would mostly be infeasible)."""
    return space.fix({"act_formats": "int4-8"}, options.base)


def phase_bitops_rank(args: argparse.Namespace, test: Dataset) -> dict[str, object]:
    options = _options(args)
    context, space = _context(options)
    space = _fitting(space, options)
    trial_base = trial_base_of(options.base, options.out)
    rows = []
    for params in random_configurations(space, args.rank_configs, args.seed + 1):
        row = measure(context, space.config(trial_base, params), test)
        rows.append({"params": params, **row})
    return {"budget": BUDGET, **spearman_of(rows), "rows": clean(rows)}


def phase_bitops_cost(args: argparse.Namespace, test_path: Path) -> dict[str, object]:
    """Seconds per configuration: the search's (all its trial work / scored configurations)
    against the ordinary stages from scratch on ``--naive-configs`` random configurations."""
    import json

    options = _options(args)
    report = json.loads((options.out / "search_report.json").read_text())
    trials = json.loads((options.out / "trials.json").read_text())["trials"]
    timing_keys = ("hessian_s", "candidates_s", "ilp_s", "correction_s", "proxy_s")
    search_s = sum(float(t.get(k) or 0) for t in trials for k in timing_keys)
    cheap_s = float(report["fidelity"]["cheap_rung_s"])
    scored = report["trials"]["complete"] + report["trials"]["pruned"]
    _, space = _context(options)
    space = _fitting(space, options)
    trial_base = trial_base_of(options.base, options.out)
    naive = []
    for index, params in enumerate(random_configurations(space, args.naive_configs, args.seed + 2)):
        work = args.out / "naive-bitops" / str(index)
        naive.append(
            {"params": params, **naive_run(space.config(trial_base, params), work, str(test_path))}
        )
    naive_s = float(np.mean([sum(v for k, v in r.items() if k.endswith("_s")) for r in naive]))
    per_config = (search_s + cheap_s) / max(scored, 1)
    return {
        "search_seconds_per_configuration": per_config,
        "search_configurations": scored,
        "ordinary_stages_seconds_per_configuration": naive_s,
        "ordinary_stages_configurations": len(naive),
        "ratio": naive_s / per_config,
        "naive_rows": naive,
        "note": "search seconds: every trial's cheap-rung and full-fidelity stage seconds (setup, "
        "the start search and the final step excluded); ordinary stages: analyze, allocate, "
        "export, evaluate from scratch per configuration",
    }
