"""Do inter-layer terms improve the ILP's choice? Paired accuracy at equal budget (METHOD §1c').

For one CIFAR ResNet checkpoint, in this one process: `lcpaq.stages.pipeline.analyze` once per pair source
(``hessian``: Δw_iᵀH_ijΔw_j of the cross-entropy; ``gauss-newton``: the same with the Gauss–Newton
matrix; ``forward``: measured KL interaction ΔL(i,j) − ΔL(i) − ΔL(j)), all with the default
quantizer and pair options (window of 3 layers, formats of ≤ 4 bits, 256 calibration images); then
`lcpaq.stages.pipeline.allocate` at every budget for diagonal-only (λ = 0) and for each source with several
λ, without the significance filter, with negative clipping, PSD projection and the augmented score
(METHOD §1d); every distinct assignment is quantized with the statistics correction
(`lcpaq.stages.pipeline.quantize_and_recover`) and evaluated on the same test images, paired against the
diagonal-only choice at the same budget (`lcpaq.model.evaluate.paired_difference`).

    python scripts/pairwise_ablation.py --checkpoint ../shared/checkpoints/resnet20-12fca82f.th \\
        --calib ../shared/data/cifar10_train_subset.npz --eval ../shared/data/cifar10_test.npz \\
        --out results/pairwise_ablation.json
"""

from __future__ import annotations

import argparse
import logging
import platform
import time
from pathlib import Path
from typing import TypedDict

import _study
import numpy as np
import torch
from _provenance import git_sha
from scipy.stats import spearmanr

from lcpaq import runfolder
from lcpaq.allocation.budgets import Budget
from lcpaq.allocation.frontier import score_candidates
from lcpaq.allocation.pairwise import PairClip, PairwiseMode
from lcpaq.allocation.result import Allocation
from lcpaq.config import AllocationConfig, RecoveryConfig, RunConfig
from lcpaq.model.data import load_dataset
from lcpaq.model.evaluate import Accuracy, evaluate_accuracy, paired_difference
from lcpaq.model.zoo import load_model
from lcpaq.sensitivity.interaction_terms import load_interactions
from lcpaq.stages import pipeline

SOURCES = ("hessian", "gauss-newton", "forward")


class Variant(TypedDict, total=False):
    """The allocation options one row sets (`pipeline.allocate`'s keywords; the rest default)."""

    pairwise_weight: float
    pair_z: float
    pair_clip: PairClip
    pairwise_mode: PairwiseMode


def _variants(weights: list[float]) -> list[Variant]:
    """Allocation options per source: λ sweep with the default filter, then λ = 1 variants."""
    rows: list[Variant] = [{"pairwise_weight": weight} for weight in weights]
    rows += [
        {"pairwise_weight": 1.0, "pair_z": 0.0},
        {"pairwise_weight": 1.0, "pair_clip": "negative"},
        {"pairwise_weight": 1.0, "pair_clip": "psd"},
        {"pairwise_weight": 1.0, "pairwise_mode": "augmented"},
    ]
    return rows


def _describe(options: Variant) -> str:
    parts = [f"λ={options['pairwise_weight']:g}"]
    parts.append(f"z={options.get('pair_z', AllocationConfig.pair_z):g}")
    if options.get("pair_clip", "none") != "none":
        parts.append(f"clip {options['pair_clip']}")
    if options.get("pairwise_mode", "ilp") != "ilp":
        parts.append(str(options["pairwise_mode"]))
    return ", ".join(parts)


def _term_statistics(run_dir: Path) -> dict[str, object]:
    """How large and how certain the stored terms are, and how their diagonal compares with the
    HAWQ-V2 score the ILP uses (same layers and formats)."""
    terms = load_interactions(run_dir / "interactions.npz")
    blocks, errors = terms.stacked()
    significant = np.abs(blocks) >= 2 * errors
    table = runfolder.load_candidates(run_dir / "candidates.npz")
    curvature = runfolder.load_curvature(run_dir / "curvature.npz")
    hawq = score_candidates(table, curvature.clamped_trace(), "hawq_v2")
    columns = [table.format_names.index(name) for name in terms.format_names]
    # Curvature sources store Δwᵀ M_ll Δw; the loss model uses half of it (as HAWQ-V2 does).
    diagonal = terms.diagonal * (1.0 if terms.method == "measured" else 0.5)
    reference = hawq[:, columns]
    return {
        **terms.header(),
        "num_significant_2se": int(significant.sum()),
        "num_negative_significant_2se": int((significant & (blocks < 0)).sum()),
        "sum_abs_cross": float(np.abs(blocks).sum()),
        "sum_diagonal_model": float(diagonal.sum()),
        "diagonal_vs_hawq_spearman": float(
            spearmanr(diagonal.reshape(-1), reference.reshape(-1)).statistic
        ),
        "diagonal_over_hawq_median": float(np.median(diagonal / reference)),
    }


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _study.add_input_paths(parser)
    parser.add_argument("--out", type=Path, default=Path("results/pairwise_ablation.json"))
    parser.add_argument("--work", type=Path, default=Path("results/pairwise_ablation"))
    parser.add_argument("--budgets", default="3.0,2.5", help="average weight bits")
    parser.add_argument("--weights", default="0.25,0.5,1", help="λ values with the default filter")
    parser.add_argument("--sources", default=",".join(SOURCES))
    parser.add_argument("--pair-samples", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep a run folder under --work whose analysis has the same configuration",
    )
    return parser.parse_args()


def _analyze_sources(
    base: RunConfig, sources: list[str], work: Path, reuse: bool
) -> tuple[dict[str, Path], dict[str, dict[str, object]]]:
    """One analysis per pair source (kept when ``reuse`` and its configuration is the same):
    the run folders and what each measured."""
    run_dirs, analysis = {}, {}
    for source in sources:
        run_dir = work / f"run-{source}"
        config = base.with_analysis(pairwise=source)
        reusable = (
            reuse
            and (run_dir / "interactions.npz").is_file()
            and pipeline.read_config(run_dir) == config
        )
        if not reusable:
            pipeline.analyze(config, run_dir, progress=False)
        layer_data = runfolder.read_json(run_dir / "layers.json", "layer list")
        analysis[source] = {
            "interactions_s": layer_data["interactions_seconds"],
            "curvature_s": layer_data["curvature_seconds"],
            **_term_statistics(run_dir),
        }
        run_dirs[source] = run_dir
        logging.info("%s: %s", source, analysis[source])
    return run_dirs, analysis


def _diagonal_row(bits: float, diagonal: Allocation, anchor: Accuracy) -> dict[str, object]:
    """The diagonal-only (λ = 0) choice every other row at this budget is paired against."""
    return {
        "budget_avg_bits": bits,
        "source": "none",
        "options": "diagonal only (λ=0)",
        "avg_bits": diagonal.average_bits,
        "top1_pct": 100 * anchor.top1,
        "paired_vs_diagonal_pct": 0.0,
        "paired_vs_diagonal_se_pct": 0.0,
        "layers_changed": 0,
        "predicted_loss_increase": diagonal.predicted_loss_increase,
        "solve_s": diagonal.solve_time_s,
        "status": diagonal.status,
        "formats": list(diagonal.formats),
    }


def _pairwise_used(run_dir: Path) -> dict[str, object]:
    """What the last allocation in ``run_dir`` used of the stored terms."""
    used = runfolder.read_json(run_dir / "allocation.json", "allocation")["pairwise"]
    assert isinstance(used, dict)
    return used


def _variant_row(
    bits: float,
    source: str,
    options: Variant,
    run_dir: Path,
    diagonal: Allocation,
    anchor: Accuracy,
    accuracy_of: _study.AccuracyCache,
) -> dict[str, object]:
    """One source with one set of options at one budget, paired against the diagonal choice."""
    allocation = pipeline.allocate(run_dir, [Budget("avg-bits", bits)], **options)
    accuracy = accuracy_of(allocation.formats)
    difference, difference_se = paired_difference(accuracy, anchor)
    used = _pairwise_used(run_dir)
    logging.info(
        "%g bits %s %s: %.2f %% (%+.2f ± %.2f vs diagonal)",
        bits,
        source,
        _describe(options),
        100 * accuracy.top1,
        100 * difference,
        100 * difference_se,
    )
    return {
        "budget_avg_bits": bits,
        "source": source,
        "options": _describe(options),
        "avg_bits": allocation.average_bits,
        "top1_pct": 100 * accuracy.top1,
        "paired_vs_diagonal_pct": 100 * difference,
        "paired_vs_diagonal_se_pct": 100 * difference_se,
        "layers_changed": int(sum(a != b for a, b in zip(allocation.formats, diagonal.formats))),
        "predicted_loss_increase": allocation.predicted_loss_increase,
        "solve_s": allocation.solve_time_s,
        "status": allocation.status,
        "mip_gap": allocation.mip_gap,
        "pairs_used": used["pairs_used"],
        "terms_used": used["terms_used"],
        "formats": list(allocation.formats),
    }


def _print_rows(rows: list[dict[str, object]]) -> None:
    for row in rows:
        print(
            f"{row['budget_avg_bits']:g} bits  {row['source']:<13} {row['options']:<28} "
            f"{row['top1_pct']:6.2f} %  {row['paired_vs_diagonal_pct']:+6.2f} ± "
            f"{row['paired_vs_diagonal_se_pct']:.2f}  ({row['layers_changed']} layers changed)"
        )


def main() -> None:
    args = _parse_args()
    _study.set_up(args.threads, verbose=True)
    budgets = [float(text) for text in args.budgets.split(",")]
    weights = [float(text) for text in args.weights.split(",")]
    sources = [text for text in args.sources.split(",") if text]
    base = _study.default_config(args.checkpoint, args.calib).with_analysis(
        pair_samples=args.pair_samples
    )
    started = time.perf_counter()
    run_dirs, analysis = _analyze_sources(base, sources, args.work, args.reuse)
    first_dir = run_dirs[sources[0]]
    model = load_model("cifar-resnet", args.checkpoint)
    calib = load_dataset(args.calib, num_classes=10).subset(0, RecoveryConfig().num_samples)
    test = load_dataset(args.eval, num_classes=10)
    # GPTQ rounding with the first source's input second moments
    accuracy_of = _study.cached_accuracy(model, first_dir, base, calib.inputs, test)
    fp32 = evaluate_accuracy(model, test)
    rows = []
    for bits in budgets:
        diagonal = pipeline.allocate(first_dir, [Budget("avg-bits", bits)], pairwise_weight=0.0)
        anchor = accuracy_of(diagonal.formats)
        rows.append(_diagonal_row(bits, diagonal, anchor))
        for source in sources:
            for options in _variants(weights):
                rows.append(
                    _variant_row(
                        bits, source, options, run_dirs[source], diagonal, anchor, accuracy_of
                    )
                )
    result = {
        "checkpoint": args.checkpoint,
        "eval": args.eval,
        "num_eval_samples": len(test),
        "fp32_top1_pct": 100 * fp32.top1,
        "git_sha": git_sha(),
        "machine": f"{platform.machine()} torch {torch.__version__}, {args.threads} threads, cpu",
        "pair_samples": args.pair_samples,
        "analysis": analysis,
        "total_s": time.perf_counter() - started,
        "rows": rows,
    }
    _study.write_json(args.out, result)
    _print_rows(rows)


if __name__ == "__main__":
    main()
