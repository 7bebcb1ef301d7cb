"""HAWQ-V2 (exact Gauss–Newton traces) vs LIMPQ's learned-step indicator (``--scorer limpq``) on
the shared checkpoints → JSON.

Per checkpoint, ``analyze`` runs once with ``--limpq-steps`` (256 calibration images: Gauss–Newton
traces, GPTQ input second moments, the candidate table and the learned step sizes). For each
average-bit budget HiGHS allocates under ``hawq_v2`` and under ``limpq`` on the same table; each
allocation is quantized and corrected as export does (GPTQ, 1024 correction images) and evaluated
on the same test images, paired limpq − hawq_v2. Also recorded: the rank agreement (Spearman,
Kendall) of the LIMPQ indicator with the HAWQ-V2 score, the cost of each (wall seconds;
forward+backward passes of the learning), and whether the learned step sizes quantize better by
themselves: each allocation with its weights rounded to nearest at the learned per-channel steps
(signed codes, no zero point), corrected the same way, paired against the pipeline's quantizer.

    OMP_NUM_THREADS=1 python scripts/limpq_study.py --shared ../shared --models resnet20 \
        --steps 100 --out results/limpq_study_resnet20.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import _study
import numpy as np
import torch
from scipy import stats
from torch import nn

from lcpaq import runfolder
from lcpaq.allocation.budgets import parse_budget
from lcpaq.allocation.frontier import score_candidates
from lcpaq.allocation.table import CandidateTable
from lcpaq.config import RunConfig
from lcpaq.model.data import Dataset
from lcpaq.model.evaluate import Accuracy, evaluate_accuracy
from lcpaq.model.graph import LayerInfo
from lcpaq.model.zoo import load_model
from lcpaq.sensitivity.limpq import LearnedStepSizes, code_bounds, load_step_sizes, lsq_quantize
from lcpaq.stages import pipeline
from lcpaq.stages.export import recover_quantized

BUDGETS = (2.0, 2.5, 3.0)
SCORERS = ("hawq_v2", "limpq")


def rank_agreement(
    indicator: np.ndarray, score: np.ndarray, table: CandidateTable
) -> dict[str, object]:
    """Spearman and Kendall correlation of the LIMPQ indicator with the HAWQ-V2 score: per format
    across layers, and pooled over (layer, format) of both measured against the widest format
    (what a move from it costs, the quantity the ILP trades)."""
    per_format = {}
    for column, name in enumerate(table.format_names):
        per_format[name] = {
            "spearman": float(stats.spearmanr(indicator[:, column], score[:, column])[0]),
            "kendall": float(stats.kendalltau(indicator[:, column], score[:, column])[0]),
        }
    widest = int(np.argmax(table.bits))
    others = [c for c in range(len(table.format_names)) if c != widest]
    rise_indicator = (indicator[:, others] - indicator[:, [widest]]).ravel()
    rise_score = (score[:, others] - score[:, [widest]]).ravel()
    return {
        "per_format_across_layers": per_format,
        "pooled_rise_from_widest": {
            "spearman": float(stats.spearmanr(rise_indicator, rise_score)[0]),
            "kendall": float(stats.kendalltau(rise_indicator, rise_score)[0]),
            "points": len(rise_score),
        },
    }


def learned_accuracy(
    model: nn.Module,
    layers: list[LayerInfo],
    formats: tuple[str, ...],
    learned: LearnedStepSizes,
    config: RunConfig,
    correction_inputs: torch.Tensor,
    test: Dataset,
) -> Accuracy:
    """Top-1 with every layer's weights rounded to nearest at its learned steps for its format,
    then the statistics correction export applies."""
    quantized = copy.deepcopy(model)
    parameters = dict(quantized.named_parameters())
    with torch.no_grad():
        for index, (layer, name) in enumerate(zip(layers, formats)):
            weight = parameters[layer.weight_key]
            steps = torch.from_numpy(learned.step_sizes[index][learned.format_names.index(name)])
            weight.copy_(lsq_quantize(weight, steps.to(weight), *code_bounds(name)))
    recover_quantized(model, quantized, [layer.name for layer in layers], config, correction_inputs)
    return evaluate_accuracy(quantized, test)


def study(
    args: argparse.Namespace, model_name: str, budgets: list[float], calib: Dataset, test: Dataset
) -> dict[str, object]:
    steps = args.steps
    config = _study.base_config(args.shared, model_name).with_analysis(
        limpq_steps=steps, batch_size=32, num_samples=args.num_samples
    )
    run_dir = args.work / model_name
    start = time.perf_counter()
    pipeline.analyze(config, run_dir, progress=False)
    analyze_seconds = time.perf_counter() - start
    table = runfolder.load_candidates(run_dir / "candidates.npz")
    curvature = runfolder.load_curvature(run_dir / "curvature.npz")
    learned = load_step_sizes(run_dir / "step_sizes.npz")
    layers_file = json.loads((run_dir / "layers.json").read_text())
    hawq = score_candidates(table, curvature.clamped_trace(), "hawq_v2")
    assert table.learned_step is not None
    model = load_model(config.analysis.model, config.analysis.checkpoint)
    layers = list(pipeline.read_layers(run_dir)[0])
    correction = calib.inputs[: config.recovery.num_samples]
    measured = _study.cached_accuracy(model, run_dir, config, correction, test)
    learned_cache = _study.AccuracyCache(
        lambda formats: learned_accuracy(model, layers, formats, learned, config, correction, test)
    )
    entries = []
    for bits in budgets:
        rows: dict[str, dict[str, object]] = {}
        accuracy: dict[str, Accuracy] = {}
        for scorer in SCORERS:
            allocation = pipeline.allocate(
                run_dir, [parse_budget(f"avg-bits={bits:g}")], scorer=scorer
            )
            accuracy[scorer] = measured(allocation.formats)
            with_learned = learned_cache(allocation.formats)
            rows[scorer] = {
                "top1_pct": 100 * accuracy[scorer].top1,
                "average_bits": allocation.average_bits,
                "formats": list(allocation.formats),
                "learned_steps_top1_pct": 100 * with_learned.top1,
                "learned_steps_minus_pipeline": _study.paired(with_learned, accuracy[scorer]),
            }
        paired = _study.paired(accuracy["limpq"], accuracy["hawq_v2"])
        entries.append(
            {"budget": f"avg-bits={bits:g}", "rows": rows, "limpq_minus_hawq_v2": paired}
        )
        print(
            f"{model_name} {bits:g} bits: hawq_v2 {rows['hawq_v2']['top1_pct']:.2f}, limpq "
            f"{rows['limpq']['top1_pct']:.2f}, diff {paired['difference_pct']:+.2f} ± "
            f"{paired['stderr_pct']:.2f}; learned steps "
            f"{rows['hawq_v2']['learned_steps_top1_pct']:.2f} / "
            f"{rows['limpq']['learned_steps_top1_pct']:.2f}",
            flush=True,
        )
    return {
        "model": model_name,
        "test_images": len(test),
        "fp32_top1_pct": 100 * evaluate_accuracy(model, test).top1,
        "limpq_steps": steps,
        "rank_agreement": rank_agreement(table.learned_step, hawq, table),
        "objective_kl_before": dict(zip(learned.format_names, learned.objective_before)),
        "objective_kl_after": dict(zip(learned.format_names, learned.objective_after)),
        "cost": {
            "limpq_forward_backward_passes": learned.passes,
            "limpq_forward_passes": learned.forward_passes,
            "limpq_images_per_pass": learned.batch_size,
            "limpq_seconds": learned.seconds,
            "gauss_newton_seconds": layers_file["curvature_seconds"],
            "gauss_newton_images": config.analysis.num_samples,
            "analyze_seconds": analyze_seconds,
        },
        "indicator": {
            "formats": list(learned.format_names),
            "layers": list(learned.layer_names),
            "values": learned.indicator().tolist(),
        },
        "budgets": entries,
    }


def main() -> None:
    parser = _study.parser(__doc__, "limpq_study", BUDGETS)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--num-samples", type=int, default=256)
    _study.run_per_model(parser.parse_args(), study)


if __name__ == "__main__":
    main()
