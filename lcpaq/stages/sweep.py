"""The ``sweep`` stage: model-level Pareto curves of the ILP optima over a range of budgets, and
uniform baselines, each point with every cost metric, its predicted loss increase and (given
evaluation data) its measured top-1.

Reads the analysis files, ``allocation.json`` (the options and budgets it was solved with) and
``input_hessians.safetensors``; writes ``sweep.json``. The next stages are ``plot`` and
``report``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from lcpaq import runfolder
from lcpaq.allocation.budgets import Budget
from lcpaq.allocation.curves import (
    BASELINE_FORMATS,
    extra_uniform_points,
    sweep_metric,
    uniform_points,
)
from lcpaq.allocation.frontier import score_candidates
from lcpaq.allocation.table import assign_activations
from lcpaq.config import RunConfig
from lcpaq.errors import InputError
from lcpaq.model.evaluate import evaluate_accuracy
from lcpaq.model.recovery import collect_reference_stats
from lcpaq.sensitivity.candidates import measure_candidates
from lcpaq.stages.allocate import (
    ProblemData,
    activation_term_of,
    cost_model,
    problem_of,
    read_problem_data,
)
from lcpaq.stages.export import (
    activation_quantizers_of,
    quantize_and_recover,
    read_learned_steps,
    weight_assignment,
)
from lcpaq.stages.folder import (
    allocation_config_of,
    load_eval,
    load_model_and_data,
    read_allocation,
    read_config,
    read_input_hessians,
    timed,
)

#: A point of a curve or a uniform baseline (`lcpaq.allocation.curves`), as ``sweep.json`` holds it.
Point = dict[str, Any]


def sweep(
    run_dir: Path,
    eval_path: str | None,
    *,
    num_points: int = 8,
    max_bits: float | None = None,
    min_bits: float | None = None,
    metrics: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, object]:
    """Model-level Pareto curves and uniform baselines (``sweep.json``).

    For each metric of ``metrics`` (default: the metrics of the run's budgets) the distinct ILP
    optima over ``num_points`` budgets from the smallest achievable value to the unconstrained
    optimum (`lcpaq.allocation.curves.sweep_metric`; ``min_bits``/``max_bits`` bound an ``avg-bits``
    sweep), the run's budgets on other metrics held fixed. Uniform baselines: every weight format
    of the candidates plus `lcpaq.allocation.curves.BASELINE_FORMATS` (INT8, INT4, FP8 E4M3), measured on the
    model when they are not candidates. Every point has every cost metric, the predicted loss
    increase and, given eval data, top-1 after the same quantization and statistics correction as
    the export (each distinct weight assignment measured once)."""
    if num_points < 2:
        raise InputError(f"--sweep-points must be at least 2, got {num_points}")
    config = read_config(run_dir)
    allocation, allocation_data = read_allocation(run_dir)
    options = allocation_config_of(allocation_data)
    fixed = [Budget(use.metric, use.limit) for use in allocation.budgets]
    metrics = list(dict.fromkeys(metrics or [budget.metric for budget in fixed] or ["avg-bits"]))
    with timed(run_dir, "sweep"):
        data = read_problem_data(run_dir, pairwise_weight=options.pairwise_weight)
        problem, _, _ = problem_of(data, **options.problem_options())
        curves = {
            metric: sweep_metric(
                problem,
                metric,
                num_points,
                fixed=fixed,
                low=min_bits if metric == "avg-bits" else None,
                high=max_bits if metric == "avg-bits" else None,
                cost_weights=allocation.cost_weights,
            )
            for metric in metrics
        }
        uniform = uniform_points(problem, data.table)
        missing = [name for name in BASELINE_FORMATS if name not in data.table.weight_formats]
        if missing:
            model = load_model_and_data(config, 1)[0]
            uniform += baseline_points(
                data, model, missing, options.scorer, options.latency_table, config, run_dir
            )
        if eval_path is not None:
            everything = [point for curve in curves.values() for point in curve] + uniform
            measure_top1(run_dir, config, data, everything, eval_path, progress)
        result: dict[str, object] = {
            "first_last": options.first_last,
            "eval_data": eval_path,
            "metrics": metrics,
            "fixed_budgets": [str(budget) for budget in fixed],
            "curves": curves,
            "points": curves[metrics[0]],
            "uniform": uniform,
        }
        runfolder.write_json(run_dir / "sweep.json", result)
    return result


def measure_top1(
    run_dir: Path,
    config: RunConfig,
    data: ProblemData,
    points: Sequence[Point],
    eval_path: str,
    progress: bool = True,
) -> None:
    """Add ``top1`` to every point: its candidates quantized and corrected as ``export`` does,
    evaluated on ``eval_path`` (each distinct assignment once)."""
    model, calib = load_model_and_data(config, config.recovery.num_samples)
    dataset = load_eval(config, model, eval_path)
    names = [layer.name for layer in data.layers]
    reference = (
        collect_reference_stats(model, calib.inputs, names) if config.recovery.enabled else None
    )
    input_hessians = read_input_hessians(run_dir, config)
    learned_steps = read_learned_steps(run_dir, config)
    layer_names = data.table.layer_names

    def measure(candidates: Sequence[str]) -> float:
        quantized_model, _ = quantize_and_recover(
            model,
            data.layers,
            weight_assignment(layer_names, candidates),
            config,
            calib.inputs,
            reference,
            input_hessians,
            # The ranges were read once for every point (``data.activations``).
            activation_quantizers_of(run_dir, layer_names, candidates, data.activations),
            learned_steps,
        )
        return evaluate_accuracy(quantized_model, dataset).top1

    seen: dict[tuple[str, ...], float] = {}
    for point in tqdm(points, desc="measuring", disable=not progress, unit="point"):
        candidates = _point_candidates(point, len(data.layers))
        key = tuple(candidates)
        if key not in seen:
            seen[key] = measure(candidates)
        point["top1"] = seen[key]


def _point_candidates(point: Point, num_layers: int) -> list[str]:
    """A curve point's candidates, or a uniform point's one format for every layer."""
    formats = point.get("formats")
    if formats:
        return [str(name) for name in formats]
    return [str(point["format"])] * num_layers


def baseline_points(
    data: ProblemData,
    model: nn.Module,
    formats: Sequence[str],
    scorer: str,
    latency_table: str | None,
    config: RunConfig,
    run_dir: Path,
) -> list[Point]:
    """Uniform baselines of weight formats outside the candidate set, measured on the model with
    the run's scheme and scored by the run's scorer (no pairwise terms). In a paired table the
    activation format is the weight format itself (W8A8, W4A4, FP8/FP8)."""
    extra = measure_candidates(
        model,
        data.layers,
        formats,
        config.analysis.scheme,
        data.curvature.diagonal,
        input_hessians=read_input_hessians(run_dir, config),
    )
    if data.table.paired:
        extra = assign_activations(extra, formats)
    extra_scores = score_candidates(extra, data.curvature.clamped_trace(), scorer)
    extra_scores = extra_scores + activation_term_of(data.activations, extra, scorer, data.source)
    try:
        costs = cost_model(data, extra, latency_table)
    except InputError:  # the measured latency table has no entry for a baseline format
        costs = cost_model(data, extra, None)
        costs = dataclasses.replace(
            costs,
            coefficients={k: v for k, v in costs.coefficients.items() if k != "latency-ms"},
        )
    return extra_uniform_points(extra, costs, extra_scores)
