"""Mixed INT vs mixed INT+FP candidate sets vs uniform formats: top-1 against model size.

For each checkpoint (one analysis with every INT and FP weight format as candidates, lcpaq's
default quantizer: per-channel asymmetric INT / per-channel-scaled FP with MSE clipping), the HiGHS
allocation on the HAWQ-V2 score is solved under a grid of size budgets (``size-mb``, the whole
checkpoint with scales and zero points) twice, once restricted to the INT candidates and once with
INT and FP candidates; every assignment and every uniform format is quantized, statistics-corrected
(BN statistics and biases, 1024 calibration images) and evaluated on the same test images, so the
INT+FP vs INT difference at each budget is paired. The size grid is given in *INT-equivalent bits*:
budget(b) = the size of uniform INT⌊b⌋ interpolated linearly to uniform INT⌈b⌉.

    python scripts/int_vs_fp.py --shared ../shared --out results/int_vs_fp.json \
        --figure docs/img/int_vs_fp.png

writes the JSON (per model: uniform rows, per budget both allocations with top-1, paired difference
± SE, the FP formats chosen and the share of weights they hold) and the figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypedDict

import _study
import numpy as np
import torch
from _provenance import git_sha
from torch import nn

from lcpaq import runfolder
from lcpaq.allocation.budgets import Budget
from lcpaq.allocation.frontier import score_candidates
from lcpaq.allocation.problem import AllocationProblem
from lcpaq.allocation.table import CandidateTable
from lcpaq.config import RecoveryConfig, RunConfig
from lcpaq.model.data import Dataset, load_dataset
from lcpaq.model.evaluate import Accuracy, evaluate_accuracy, paired_difference
from lcpaq.model.recovery import collect_reference_stats
from lcpaq.model.zoo import load_model
from lcpaq.quant.formats import get_format, parse_format_list
from lcpaq.stages import pipeline

FORMATS = "int2,int3,int4,int5,int6,int8,fp4_e2m1,fp6_e2m3,fp6_e3m2,fp8_e4m3,fp8_e5m2"
EQUIVALENT_BITS = (2.25, 2.5, 2.75, 3.0, 3.25, 3.5, 4.0, 4.5, 5.0)


def problem_for(run_dir: Path, table: CandidateTable, columns: list[int]) -> AllocationProblem:
    """The ILP over a subset of the analysed candidates (same scores, costs and policy)."""
    curvature = runfolder.load_curvature(run_dir / "curvature.npz")
    subset = table.select(columns)
    scores = score_candidates(subset, curvature.clamped_trace(), "hawq_v2")
    _, unquantized_bits = pipeline.read_layers(run_dir)
    return AllocationProblem(
        subset,
        scores,
        np.ones(scores.shape, dtype=bool),
        constant_size_bits=unquantized_bits,
        costs=pipeline.candidate_costs(run_dir, subset),
    )


def size_budgets(problem: AllocationProblem) -> dict[float, float]:
    """INT-equivalent bits → size-mb budget, from the sizes of the uniform INT assignments."""
    table = problem.table
    uniform = {
        get_format(name).bits: problem.metric_value(
            "size-mb", np.full(len(table.layer_names), column)
        )
        for column, name in enumerate(table.format_names)
    }
    budgets = {}
    for bits in EQUIVALENT_BITS:
        low, high = int(np.floor(bits)), int(np.ceil(bits))
        weight = bits - low
        budgets[bits] = (1 - weight) * uniform[low] + weight * uniform[high]
    return budgets


class FpShare(TypedDict):
    """Which layers an assignment puts in FP formats and the share of the weights they hold."""

    fp_layers: list[str]
    fp_param_frac: float
    format_counts: dict[str, int]


def fp_share(table: CandidateTable, formats: tuple[str, ...]) -> FpShare:
    params = dict(zip(table.layer_names, table.num_params.tolist()))
    fp_layers = [
        name for name, fmt in zip(table.layer_names, formats) if get_format(fmt).kind == "fp"
    ]
    return {
        "fp_layers": fp_layers,
        "fp_param_frac": sum(params[name] for name in fp_layers) / sum(params.values()),
        "format_counts": dict(Counter(formats)),
    }


def _config(name: str, args: argparse.Namespace) -> RunConfig:
    """One analysis with every INT and FP weight format as candidates."""
    config = _study.base_config(args.shared, name).with_analysis(
        formats=parse_format_list(FORMATS), num_samples=args.num_samples
    )
    return replace(config, recovery=RecoveryConfig(num_samples=args.correction_samples))


def _measure(
    run_dir: Path, config: RunConfig, model: nn.Module, test: Dataset, correction_samples: int
) -> _study.AccuracyCache:
    """Top-1 per distinct assignment: quantized, corrected on the calibration images (against
    the FP32 model's statistics on them), evaluated on the test images (as export does)."""
    layers, _ = pipeline.read_layers(run_dir)
    calib = load_dataset(config.analysis.calib, num_classes=10).subset(0, correction_samples)
    reference = collect_reference_stats(model, calib.inputs, [layer.name for layer in layers])
    return _study.cached_accuracy(model, run_dir, config, calib.inputs, test, reference)


def _uniform_rows(
    table: CandidateTable, full: AllocationProblem, accuracy_of: _study.AccuracyCache
) -> list[dict[str, object]]:
    """Every candidate format on every layer: size, bits, predicted loss, top-1."""
    num_layers = len(table.layer_names)
    uniform: list[dict[str, object]] = []
    for column, format_name in enumerate(table.format_names):
        accuracy = accuracy_of((format_name,) * num_layers)
        choice = np.full(num_layers, column)
        uniform.append(
            {
                "format": format_name,
                "kind": get_format(format_name).kind,
                "size_mb": full.metric_value("size-mb", choice),
                "avg_bits": full.metric_value("avg-bits", choice),
                "predicted_loss_increase": full.objective(choice),
                "top1_pct": 100 * accuracy.top1,
            }
        )
    return uniform


def _budget_point(
    name: str,
    bits: float,
    size_mb: float,
    problems: dict[str, AllocationProblem],
    accuracy_of: _study.AccuracyCache,
    fp32: Accuracy,
) -> dict[str, object]:
    """Both allocations (INT, INT+FP candidates) at one size budget, paired against each other."""
    entry: dict[str, object] = {"equivalent_bits": bits, "size_mb_budget": size_mb}
    accuracies: dict[str, Accuracy] = {}
    assignments: dict[str, dict[str, str]] = {}
    shares: dict[str, FpShare] = {}
    for label, problem in problems.items():
        allocation = problem.solve([Budget("size-mb", size_mb)])
        accuracy = accuracies[label] = accuracy_of(allocation.formats)
        assignments[label] = dict(zip(allocation.layer_names, allocation.formats))
        shares[label] = fp_share(problem.table, allocation.formats)
        entry[label] = {
            "size_mb": allocation.costs["size-mb"],
            "avg_bits": allocation.average_bits,
            "predicted_loss_increase": allocation.predicted_loss_increase,
            "top1_pct": 100 * accuracy.top1,
            "paired_vs_fp32_pct": 100 * paired_difference(accuracy, fp32)[0],
            "assignment": assignments[label],
            **shares[label],
        }
    gain, gain_se = paired_difference(accuracies["int+fp"], accuracies["int"])
    entry["int_fp_minus_int_pct"] = 100 * gain
    entry["int_fp_minus_int_se_pct"] = 100 * gain_se
    entry["same_assignment"] = assignments["int"] == assignments["int+fp"]
    logging.info(
        "%s %.2f bits (%.4f MB): INT %.2f %%, INT+FP %.2f %% (%+.2f ± %.2f), FP weights %.0f %%",
        name,
        bits,
        size_mb,
        100 * accuracies["int"].top1,
        100 * accuracies["int+fp"].top1,
        100 * gain,
        100 * gain_se,
        100 * shares["int+fp"]["fp_param_frac"],
    )
    return entry


def measure_model(name: str, args: argparse.Namespace) -> dict[str, object]:
    run_dir = args.work / name
    config = _config(name, args)
    started = time.perf_counter()
    pipeline.analyze(config, run_dir, progress=False)
    analyze_s = time.perf_counter() - started
    table = runfolder.load_candidates(run_dir / "candidates.npz")
    int_columns = [c for c, w in enumerate(table.weight_formats) if get_format(w).kind == "int"]
    problems = {
        "int": problem_for(run_dir, table, int_columns),
        "int+fp": problem_for(run_dir, table, list(range(len(table.format_names)))),
    }
    model = load_model("cifar-resnet", config.analysis.checkpoint)
    test = load_dataset(str(_study.test_path(args.shared)), num_classes=10)
    accuracy_of = _measure(run_dir, config, model, test, args.correction_samples)
    fp32 = evaluate_accuracy(model, test)
    uniform = _uniform_rows(table, problems["int+fp"], accuracy_of)
    points = [
        _budget_point(name, bits, size_mb, problems, accuracy_of, fp32)
        for bits, size_mb in size_budgets(problems["int"]).items()
    ]
    return {
        "checkpoint": config.analysis.checkpoint,
        "fp32_top1_pct": 100 * fp32.top1,
        "num_eval_samples": len(test),
        "analyze_s": analyze_s,
        "total_s": time.perf_counter() - started,
        "distinct_assignments_evaluated": len(accuracy_of),
        "uniform": uniform,
        "points": points,
    }


def plot(result: Mapping[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = result["models"]
    fig = Figure(figsize=(6.5 * len(models), 8.0), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(models), squeeze=False, height_ratios=[2.2, 1])
    for k, (name, data) in enumerate(models.items()):
        top, bottom = axes[0, k], axes[1, k]
        points = data["points"]
        for label, style in (("int", "o-"), ("int+fp", "D-")):
            x = [p[label]["size_mb"] for p in points]
            y = [p[label]["top1_pct"] for p in points]
            top.plot(x, y, style, ms=5, label=f"lcpaq mixed, {label.upper()} candidates")
        for kind, marker, color in (("int", "s", "tab:orange"), ("fp", "D", "tab:purple")):
            # Uniform formats within the swept size range (uniform INT2 is far below on both).
            low, high = points[0]["size_mb_budget"], points[-1]["size_mb_budget"]
            rows = [
                u
                for u in data["uniform"]
                if u["kind"] == kind and 0.95 * low <= u["size_mb"] <= 1.05 * high
            ]
            top.plot(
                [u["size_mb"] for u in rows],
                [u["top1_pct"] for u in rows],
                marker,
                color=color,
                mec="black",
                lw=0,
                label=f"uniform {kind.upper()}",
            )
            for u in rows:
                top.annotate(
                    u["format"],
                    (u["size_mb"], u["top1_pct"]),
                    xytext=(4, -10),
                    textcoords="offset points",
                    fontsize=7,
                    color="saddlebrown",
                )
        top.axhline(data["fp32_top1_pct"], ls="--", color="black", lw=1, label="FP32")
        top.set_ylabel("top-1 on 1017 test images (%)")
        top.set_title(f"{name}: top-1 vs size", fontsize=10)
        top.grid(True, alpha=0.3)
        top.legend(fontsize=8, loc="lower right")
        x = [p["size_mb_budget"] for p in points]
        gain = [p["int_fp_minus_int_pct"] for p in points]
        se = [p["int_fp_minus_int_se_pct"] for p in points]
        bottom.errorbar(x, gain, yerr=se, fmt="D", color="tab:red", capsize=3)
        bottom.axhline(0, color="black", lw=0.8)
        for p in points:
            share = p["int+fp"]["fp_param_frac"]
            if share > 0:
                bottom.annotate(
                    f"{100 * share:.0f}% FP",
                    (p["size_mb_budget"], p["int_fp_minus_int_pct"]),
                    xytext=(4, 4),
                    textcoords="offset points",
                    fontsize=7,
                )
        bottom.set_xlabel("size budget (MB, whole checkpoint with scales)")
        bottom.set_ylabel("INT+FP − INT (points, paired ± SE)")
        bottom.grid(True, alpha=0.3)
        top.sharex(bottom)
    fig.suptitle(
        "Mixed INT vs mixed INT+FP candidates vs uniform formats (lcpaq quantizer + correction)"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def render_markdown(result: Mapping[str, Any]) -> str:
    """The tables of docs/results.md from the JSON."""
    lines = []
    for name, data in result["models"].items():
        lines += [
            f"**{name}** (FP32 {data['fp32_top1_pct']:.2f} %, {data['num_eval_samples']} test images;"
            f" {data['distinct_assignments_evaluated']} distinct assignments evaluated,"
            f" {data['total_s']:.0f} s)",
            "",
            "| size budget (INT-equiv. bits) | MB | mixed INT top-1 % | mixed INT+FP top-1 % |"
            " INT+FP − INT (paired) | FP share of weights | FP formats chosen |",
            "|---|---|---|---|---|---|---|",
        ]
        for p in data["points"]:
            fp = p["int+fp"]
            chosen = {
                fmt: count
                for fmt, count in fp["format_counts"].items()
                if get_format(fmt).kind == "fp"
            }
            text = ", ".join(f"{fmt} ×{count}" for fmt, count in sorted(chosen.items())) or "none"
            lines.append(
                f"| {p['equivalent_bits']:g} | {p['size_mb_budget']:.4f} | {p['int']['top1_pct']:.2f}"
                f" | {fp['top1_pct']:.2f} | {p['int_fp_minus_int_pct']:+.2f} ±"
                f" {p['int_fp_minus_int_se_pct']:.2f} | {100 * fp['fp_param_frac']:.0f} % | {text} |"
            )
        lines += ["", "| uniform format | MB | top-1 % |", "|---|---|---|"]
        for u in sorted(data["uniform"], key=lambda u: u["size_mb"]):
            lines.append(f"| {u['format']} | {u['size_mb']:.4f} | {u['top1_pct']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = _study.parser(__doc__, "int_vs_fp")
    parser.add_argument("--figure", type=Path, default=Path("results/int_vs_fp.png"))
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--correction-samples", type=int, default=1024)
    parser.add_argument(
        "--render", type=Path, help="only print the tables and draw the figure of this JSON"
    )
    args = parser.parse_args()
    if args.render:  # re-render tables and figure from a finished run
        result = json.loads(args.render.read_text())
        print(render_markdown(result))
        plot(result, args.figure)
        return
    _study.set_up(args.threads, verbose=True)
    started = time.perf_counter()
    models = {name: measure_model(name, args) for name in args.models.split(",")}
    result = {
        "formats": FORMATS,
        "budget": "size-mb at INT-equivalent bits " + ", ".join(map(str, EQUIVALENT_BITS)),
        "git_sha": git_sha(),
        "machine": f"{platform.machine()} torch {torch.__version__}, {args.threads} threads",
        "total_s": time.perf_counter() - started,
        "models": models,
    }
    _study.write_json(args.out, result)
    plot(result, args.figure)
    print(render_markdown(result))
    print(f"wrote {args.out} and {args.figure}")


if __name__ == "__main__":
    main()
