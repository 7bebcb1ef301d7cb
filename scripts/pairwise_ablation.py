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
import json
import logging
import platform
import time
from pathlib import Path

import numpy as np
import torch
from _provenance import git_sha
from scipy.stats import spearmanr

from lcpaq import runfolder
from lcpaq.allocation.budgets import Budget
from lcpaq.allocation.frontier import score_candidates
from lcpaq.config import AnalysisConfig, RecoveryConfig, RunConfig
from lcpaq.model.data import load_dataset
from lcpaq.model.evaluate import Accuracy, evaluate_accuracy, paired_difference
from lcpaq.model.zoo import load_model
from lcpaq.sensitivity.interaction_terms import load_interactions
from lcpaq.stages import pipeline

SOURCES = ("hessian", "gauss-newton", "forward")


def _variants(weights: list[float]) -> list[dict[str, object]]:
    """Allocation options per source: λ sweep with the default filter, then λ = 1 variants."""
    rows: list[dict[str, object]] = [{"pairwise_weight": weight} for weight in weights]
    rows += [
        {"pairwise_weight": 1.0, "pair_z": 0.0},
        {"pairwise_weight": 1.0, "pair_clip": "negative"},
        {"pairwise_weight": 1.0, "pair_clip": "psd"},
        {"pairwise_weight": 1.0, "pairwise_mode": "augmented"},
    ]
    return rows


def _describe(options: dict[str, object]) -> str:
    parts = [f"λ={options['pairwise_weight']:g}"]
    parts.append(f"z={options.get('pair_z', 2.0):g}")
    if options.get("pair_clip", "none") != "none":
        parts.append(f"clip {options['pair_clip']}")
    if options.get("pairwise_mode", "ilp") != "ilp":
        parts.append(str(options["pairwise_mode"]))
    return ", ".join(parts)


def _term_statistics(run_dir: Path) -> dict[str, object]:
    """How large and how certain the stored terms are, and how their diagonal compares with the
    HAWQ-V2 score the ILP uses (same layers and formats)."""
    terms = load_interactions(run_dir / "interactions.npz")
    blocks = np.array([terms.cross[pair] for pair in terms.pairs])
    errors = np.array([terms.stderr[pair] for pair in terms.pairs])
    significant = np.abs(blocks) >= 2 * errors
    table = runfolder.load_candidates(run_dir / "candidates.npz")
    curvature = runfolder.load_curvature(run_dir / "curvature.npz")
    hawq = score_candidates(table, curvature.clamped_trace(), "hawq_v2")
    columns = [table.format_names.index(name) for name in terms.format_names]
    # Curvature sources store Δwᵀ M_ll Δw; the loss model uses half of it (as HAWQ-V2 does).
    diagonal = terms.diagonal * (1.0 if terms.method == "measured" else 0.5)
    reference = hawq[:, columns]
    return {
        "method": terms.method,
        "num_samples": terms.num_samples,
        "formats": list(terms.format_names),
        "num_pairs": len(terms.pairs),
        "num_terms": int(blocks.size),
        "num_significant_2se": int(significant.sum()),
        "num_negative_significant_2se": int((significant & (blocks < 0)).sum()),
        "sum_abs_cross": float(np.abs(blocks).sum()),
        "sum_diagonal_model": float(diagonal.sum()),
        "diagonal_vs_hawq_spearman": float(
            spearmanr(diagonal.reshape(-1), reference.reshape(-1)).statistic
        ),
        "diagonal_over_hawq_median": float(np.median(diagonal / reference)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--calib", required=True)
    parser.add_argument("--eval", required=True)
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
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    budgets = [float(text) for text in args.budgets.split(",")]
    weights = [float(text) for text in args.weights.split(",")]
    sources = [text for text in args.sources.split(",") if text]
    base = RunConfig(
        analysis=AnalysisConfig(
            model="cifar-resnet",
            checkpoint=args.checkpoint,
            calib=args.calib,
            pair_samples=args.pair_samples,
        )
    )
    started = time.perf_counter()
    run_dirs, analysis = {}, {}
    for source in sources:
        run_dir = args.work / f"run-{source}"
        config = base.with_analysis(pairwise=source)
        reusable = (
            args.reuse
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

    model = load_model("cifar-resnet", args.checkpoint)
    layers, _ = pipeline.read_layers(run_dirs[sources[0]])
    calib = load_dataset(args.calib, num_classes=10).subset(0, RecoveryConfig().num_samples)
    test = load_dataset(args.eval, num_classes=10)
    cache: dict[tuple[str, ...], Accuracy] = {}
    input_hessians = pipeline.read_input_hessians(run_dirs[sources[0]], base)  # GPTQ rounding

    def accuracy_of(formats: tuple[str, ...]) -> Accuracy:
        if formats not in cache:
            assignment = pipeline.weight_assignment([layer.name for layer in layers], formats)
            quantized, _ = pipeline.quantize_and_recover(
                model, layers, assignment, base, calib.inputs, input_hessians=input_hessians
            )
            cache[formats] = evaluate_accuracy(quantized, test)
        return cache[formats]

    fp32 = evaluate_accuracy(model, test)
    rows = []
    for bits in budgets:
        budget = [Budget("avg-bits", bits)]
        diagonal = pipeline.allocate(run_dirs[sources[0]], budget, pairwise_weight=0.0)
        anchor = accuracy_of(diagonal.formats)
        rows.append(
            {
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
        )
        for source in sources:
            for options in _variants(weights):
                allocation = pipeline.allocate(run_dirs[source], budget, **options)  # type: ignore[arg-type]
                accuracy = accuracy_of(allocation.formats)
                difference, difference_se = paired_difference(accuracy, anchor)
                used = runfolder.read_json(run_dirs[source] / "allocation.json", "allocation")[
                    "pairwise"
                ]
                rows.append(
                    {
                        "budget_avg_bits": bits,
                        "source": source,
                        "options": _describe(options),
                        "avg_bits": allocation.average_bits,
                        "top1_pct": 100 * accuracy.top1,
                        "paired_vs_diagonal_pct": 100 * difference,
                        "paired_vs_diagonal_se_pct": 100 * difference_se,
                        "layers_changed": int(
                            sum(a != b for a, b in zip(allocation.formats, diagonal.formats))
                        ),
                        "predicted_loss_increase": allocation.predicted_loss_increase,
                        "solve_s": allocation.solve_time_s,
                        "status": allocation.status,
                        "mip_gap": allocation.mip_gap,
                        "pairs_used": used["pairs_used"],  # type: ignore[index]
                        "terms_used": used["terms_used"],  # type: ignore[index]
                        "formats": list(allocation.formats),
                    }
                )
                logging.info(
                    "%g bits %s %s: %.2f %% (%+.2f ± %.2f vs diagonal)",
                    bits,
                    source,
                    _describe(options),
                    100 * accuracy.top1,
                    100 * difference,
                    100 * difference_se,
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    for row in rows:
        print(
            f"{row['budget_avg_bits']:g} bits  {row['source']:<13} {row['options']:<28} "
            f"{row['top1_pct']:6.2f} %  {row['paired_vs_diagonal_pct']:+6.2f} ± "
            f"{row['paired_vs_diagonal_se_pct']:.2f}  ({row['layers_changed']} layers changed)"
        )


if __name__ == "__main__":
    main()
