"""The ``plot`` stage: the run's figures as PNGs in ``plots/``, drawn by `lcpaq.stages.figures`,
`lcpaq.stages.model_curve` and `lcpaq.stages.heatmaps`.

Reads ``layers.json``, ``candidates.npz``, ``curvature.npz``, ``frontiers.npz``,
``allocation.json`` and, when present, ``sweep.json``, ``evaluation.json`` and
``interactions.npz``; writes ``plots/frontiers.png``, ``plots/candidate_heatmap.png``,
``plots/bit_allocation.png``, ``plots/model_curve*.png`` (after ``sweep``) and
``plots/interactions.png`` (with inter-layer terms). The next stage is ``report``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypedDict, cast

import numpy as np

from lcpaq import runfolder
from lcpaq.allocation.budgets import Budget
from lcpaq.allocation.frontier import pareto_mask
from lcpaq.allocation.pairwise import pair_views
from lcpaq.allocation.result import Allocation
from lcpaq.allocation.table import CandidateTable, weight_format_of
from lcpaq.config import AllocationConfig
from lcpaq.quant.formats import get_format
from lcpaq.sensitivity.interaction_terms import load_interactions
from lcpaq.stages import figures, heatmaps, model_curve
from lcpaq.stages.allocate import candidate_costs
from lcpaq.stages.folder import (
    allocation_config_of,
    read_allocation,
    read_layers_file,
    timed,
)


class SweepFile(TypedDict, total=False):
    """``sweep.json`` as the figures and the report read it (``points``: files before
    ``curves``, the first metric's curve)."""

    metrics: list[str]
    fixed_budgets: list[str]
    curves: dict[str, list[dict[str, Any]]]
    points: list[dict[str, Any]]
    uniform: list[dict[str, Any]]
    eval_data: str | None
    first_last: str
    metric: str  # the measured metric's name (absent: top1, or nothing measured)
    higher_is_better: bool


class _EvaluationMetric(TypedDict, total=False):
    """What ``evaluation.json`` says of its metric (absent from files from before other metrics:
    top-1)."""

    metric: str
    higher_is_better: bool
    paired_quantity: str


class EvaluationFile(_EvaluationMetric):
    """``evaluation.json``: the metric of both models (`lcpaq.stages.evaluate`)."""

    eval_data: str
    fp32: dict[str, Any]
    quantized: dict[str, Any]
    paired_difference: float
    paired_difference_stderr: float


def read_sweep(run_dir: Path) -> SweepFile | None:
    path = run_dir / "sweep.json"
    return cast(SweepFile, runfolder.read_json(path, "sweep")) if path.is_file() else None


def read_evaluation(run_dir: Path) -> EvaluationFile | None:
    path = run_dir / "evaluation.json"
    return cast(EvaluationFile, runfolder.read_json(path, "evaluation")) if path.is_file() else None


def _frontier_mask(
    run_dir: Path, table: CandidateTable, scores: np.ndarray, latency_table: str | None
) -> np.ndarray:
    """[L, C]: a candidate is on its layer's frontier when no other is cheaper or equal in every
    cost metric and no worse in score (pairs differ in BitOps only, so weight bits are not
    enough)."""
    costs = candidate_costs(run_dir, table, latency_table)
    stacked = np.stack([costs.coefficients[m] for m in costs.metrics], axis=-1)
    return np.array([pareto_mask(stacked[row], scores[row]) for row in range(len(scores))])


def _layer_figures(
    run_dir: Path, allocation: Allocation, options: AllocationConfig, title: str
) -> list[Path]:
    """Per-layer frontiers, the layer × candidate heatmap and the chosen bits per layer."""
    table = runfolder.load_candidates(run_dir / "candidates.npz")
    curvature = runfolder.load_curvature(run_dir / "curvature.npz")
    frontiers = runfolder.read_npz(run_dir / "frontiers.npz", "frontiers (lcpaq allocate)")
    scores = frontiers["scores"]
    return [
        figures.plot_layer_frontiers(
            run_dir / "plots" / "frontiers.png",
            layer_names=table.layer_names,
            format_names=table.format_names,
            bits=table.bits,
            scores=scores,
            kept=_frontier_mask(run_dir, table, scores, options.latency_table),
            chosen=allocation.formats,
            title=f"Per-layer Pareto frontiers ({options.scorer} score): {title}",
            kinds=[get_format(name).kind for name in table.weight_formats],
            activation_formats=table.activation_formats if table.paired else None,
        ),
        heatmaps.plot_candidate_heatmap(
            run_dir / "plots" / "candidate_heatmap.png",
            layer_names=table.layer_names,
            format_names=table.format_names,
            values=scores,
            chosen=allocation.formats,
            allowed=frontiers["allowed"],
            title=f"Predicted loss increase per layer and candidate: {title}",
        ),
        figures.plot_bit_allocation(
            run_dir / "plots" / "bit_allocation.png",
            layer_names=allocation.layer_names,
            bits=allocation.bits,
            num_params=table.num_params,
            trace=curvature.trace,
            trace_stderr=curvature.trace_stderr,
            title=f"Chosen weight bits per layer: {title}",
        ),
    ]


def _model_curves(
    run_dir: Path, sweep_data: SweepFile, allocation: Allocation, model_name: str
) -> list[Path]:
    """One model-level curve per swept budget metric (the first keeps the old file name)."""
    evaluation = read_evaluation(run_dir)
    score = str(
        (evaluation.get("metric") if evaluation else None) or sweep_data.get("metric") or "top1"
    )
    chosen = {
        "avg_bits": allocation.average_bits,
        "costs": allocation.costs,
        "predicted_loss_increase": allocation.predicted_loss_increase,
        score: evaluation["quantized"][score] if evaluation else None,
        f"{score}_stderr": evaluation["quantized"].get("stderr") if evaluation else None,
    }
    curves = sweep_data.get("curves") or {"avg-bits": sweep_data["points"]}
    fixed = ", ".join(sweep_data.get("fixed_budgets", []))
    paths = []
    for number, (metric, points) in enumerate(curves.items()):
        others = ", ".join(b for b in fixed.split(", ") if b and not b.startswith(metric))
        name = "model_curve.png" if number == 0 else f"model_curve_{metric}.png"
        paths.append(
            model_curve.plot_model_curve(
                run_dir / "plots" / name,
                sweep=points,
                uniform=sweep_data["uniform"],
                chosen=chosen,
                fp32_value=evaluation["fp32"][score] if evaluation else None,
                fp32_stderr=evaluation["fp32"].get("stderr") if evaluation else None,
                title=f"Model-level Pareto curve over {metric}"
                + (f" (held: {others})" if others else "")
                + f": {model_name}",
                metric=metric,
                score=score,
            )
        )
    return paths


def plot(run_dir: Path) -> list[Path]:
    """Per-layer frontiers (INT and FP markers), the layer × candidate heatmap, the bit
    allocation and, if swept, one model-level curve per swept budget metric, as PNGs."""
    with timed(run_dir, "plot"):
        allocation, allocation_data = read_allocation(run_dir)
        model_name = str(read_layers_file(run_dir, "layer list")["model"])
        budget_text = ", ".join(str(Budget(use.metric, use.limit)) for use in allocation.budgets)
        title = f"{model_name} — budget {budget_text}"
        options = allocation_config_of(allocation_data)
        paths = _layer_figures(run_dir, allocation, options, title)
        sweep_data = read_sweep(run_dir)
        if sweep_data is not None:
            paths += _model_curves(run_dir, sweep_data, allocation, model_name)
        if (run_dir / "interactions.npz").is_file():
            paths.append(_plot_interactions(run_dir, allocation, options.pair_z, model_name))
    return paths


def _plot_interactions(
    run_dir: Path, allocation: Allocation, pair_z: float, model_name: str
) -> Path:
    """``plots/interactions.png``: the largest term of every pair and the term at the choice
    (dots where ``|C| ≥ pair_z·SE``)."""
    terms = load_interactions(run_dir / "interactions.npz")
    z = float(pair_z)
    chosen = [weight_format_of(name) for name in allocation.formats]
    views = pair_views(terms, chosen, z)
    return heatmaps.plot_interaction_heatmap(
        run_dir / "plots" / "interactions.png",
        layer_names=terms.layer_names,
        pairs=terms.pairs,
        panels=[
            (
                "largest |C_ij(f, g)| over the measured formats (signed)",
                views["largest"],
                views["largest_significant"],
            ),
            ("C_ij at the chosen formats", views["chosen"], views["chosen_significant"]),
        ],
        title=f"Inter-layer terms ({terms.method}, {terms.num_samples} samples, "
        f"dots: |C| ≥ {z:g}·SE): {model_name}",
    )
