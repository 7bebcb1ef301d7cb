"""The ``sweep`` stage: model-level Pareto curves of the ILP optima over a range of budgets, and
uniform baselines, each point with every cost metric, its predicted loss increase and (given
evaluation data) its measured metric with its standard error (the model's: top-1, recall@1 with
recall@10 and the cosine to FP32, or perplexity; `lcpaq.model.evaluate`).

Measuring a point means quantizing, correcting and evaluating the whole model, which made the
default ``lcpaq run`` spend most of its time here. So: each layer's quantized weight in each
format is computed once for all points (`_WeightCache`: GPTQ codes depend on the layer and the
format only); ``eval_samples`` bounds the evaluation samples per point (``lcpaq run`` measures
none by default: the curve is predicted, see ``--sweep-eval-samples``); and the point equal to the
exported allocation takes the metric the ``evaluate`` stage measured on the same data.

Reads the analysis files, ``allocation.json`` (the options and budgets it was solved with) and
``input_hessians.safetensors``; writes ``sweep.json``. The next stages are ``plot`` and
``report``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
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
from lcpaq.model.data import Dataset
from lcpaq.model.evaluate import MetricResult, evaluate_model, first_samples
from lcpaq.model.graph import LayerInfo, get_module, layer_weight
from lcpaq.model.recovery import collect_reference_stats
from lcpaq.model.text_data import RetrievalPairs
from lcpaq.quant.formats import QuantScheme, get_format
from lcpaq.quant.weights import dequantize_weight, quantize_weight
from lcpaq.sensitivity.candidates import measure_candidates
from lcpaq.sensitivity.limpq import LearnedStepSizes
from lcpaq.stages.allocate import (
    ProblemData,
    activation_term_of,
    cost_model,
    problem_of,
    read_problem_data,
)
from lcpaq.stages.evaluate import metric_fields
from lcpaq.stages.export import (
    activation_quantizers_of,
    learned_codes,
    read_learned_steps,
    recover_quantized,
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
    eval_samples: int | None = None,
    progress: bool = True,
) -> dict[str, object]:
    """Model-level Pareto curves and uniform baselines (``sweep.json``).

    For each metric of ``metrics`` (default: the metrics of the run's budgets) the distinct ILP
    optima over ``num_points`` budgets from the smallest achievable value to the unconstrained
    optimum (`lcpaq.allocation.curves.sweep_metric`; ``min_bits``/``max_bits`` bound an ``avg-bits``
    sweep), the run's budgets on other metrics held fixed. Uniform baselines: every weight format
    of the candidates plus `lcpaq.allocation.curves.BASELINE_FORMATS` (INT8, INT4, FP8 E4M3), measured on the
    model when they are not candidates. Every point has every cost metric, the predicted loss
    increase and, given eval data, the model's metric ± its standard error (``top1`` for a
    classifier; `point_metric_keys`) after the same quantization and statistics correction as
    the export (each distinct weight assignment measured once) on the first ``eval_samples``
    samples (None: all; 0: none, only the exported allocation's point gets the metric of
    ``evaluation.json``)."""
    if num_points < 2:
        raise InputError(f"--sweep-points must be at least 2, got {num_points}")
    if eval_samples is not None and eval_samples < 0:
        raise InputError(f"--sweep-eval-samples must be >= 0, got {eval_samples}")
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
        everything = [point for curve in curves.values() for point in curve] + uniform
        metric: dict[str, object] = {}
        if eval_path is not None and eval_samples != 0:
            metric = measure_points(
                run_dir, config, data, everything, eval_path, progress, eval_samples
            )
        reused, reused_metric = reuse_evaluation(run_dir, everything, allocation.formats, eval_path)
        result: dict[str, object] = {
            "first_last": options.first_last,
            **(metric or reused_metric),
            "eval_data": eval_path or reused,
            "eval_samples": eval_samples,
            "metrics": metrics,
            "fixed_budgets": [str(budget) for budget in fixed],
            "curves": curves,
            "points": curves[metrics[0]],
            "uniform": uniform,
        }
        runfolder.write_json(run_dir / "sweep.json", result)
    return result


class _WeightCache:
    """Each layer's dequantized weight in each weight format, computed once for every point
    (GPTQ's codes depend on the layer's FP32 input Hessian and the format only)."""

    def __init__(
        self,
        model: nn.Module,
        scheme: QuantScheme,
        input_hessians: Mapping[str, torch.Tensor] | None,
        learned_steps: LearnedStepSizes | None = None,
    ) -> None:
        self.model = model
        self.scheme = scheme
        self.input_hessians = input_hessians or {}
        self.learned_steps = learned_steps
        self.weights: dict[tuple[str, str], torch.Tensor] = {}

    def quantized_model(self, layers: Sequence[LayerInfo], assignment: Mapping[str, str]):
        """A copy of the model whose assigned layers hold their quantized weights."""
        quantized = copy.deepcopy(self.model).eval()
        with torch.no_grad():
            for layer in layers:
                if layer.name not in assignment:
                    continue
                weight = layer_weight(get_module(quantized, layer.name))
                weight.copy_(self._weight(layer.name, assignment[layer.name], weight))
        return quantized

    def _weight(self, name: str, format_name: str, weight: torch.Tensor) -> torch.Tensor:
        key = (name, format_name)
        if key not in self.weights:
            hessian = self.input_hessians.get(name)
            codes = None
            if self.learned_steps is not None:  # --learn-scales: at the learned steps
                codes = learned_codes(
                    weight, name, format_name, self.learned_steps, self.scheme, hessian
                )
            if codes is None:
                codes = quantize_weight(weight, get_format(format_name), self.scheme, hessian)
            self.weights[key] = dequantize_weight(codes, weight.dtype)
        return self.weights[key]


def _record(point: Point, name: str, values: Mapping[str, float], samples: int) -> None:
    """Put a measured metric on ``point``; another metric than top-1 replaces the ``top1``
    placeholder (None) every point starts with (`lcpaq.allocation.curves`)."""
    if name != "top1" and point.get("top1") is None:
        point.pop("top1", None)
    point.update(values)
    point["eval_images"] = samples


def point_metric_keys(result: MetricResult) -> dict[str, float]:
    """What a sweep point holds of a measured metric: the value under its name, ``<name>_stderr``
    and the secondary metrics (a classifier's point: ``top1`` and ``top1_stderr``)."""
    return {
        result.name: result.value,
        f"{result.name}_stderr": result.stderr,
        **result.secondary,
    }


def measure_points(
    run_dir: Path,
    config: RunConfig,
    data: ProblemData,
    points: Sequence[Point],
    eval_path: str,
    progress: bool = True,
    eval_samples: int | None = None,
) -> dict[str, object]:
    """Add the model's metric (`point_metric_keys`) and ``eval_images`` (samples) to every point:
    its candidates quantized and corrected as ``export`` does, evaluated on the first
    ``eval_samples`` samples of ``eval_path`` (None: all), each distinct assignment once.
    Returns the metric's name and direction (`lcpaq.stages.evaluate.metric_fields`)."""
    model, calib = load_model_and_data(config, config.recovery.num_samples)
    dataset: Dataset | RetrievalPairs = load_eval(config, model, eval_path)
    if eval_samples is not None:
        dataset = first_samples(dataset, eval_samples)
    names = [layer.name for layer in data.layers]
    reference = (
        collect_reference_stats(model, calib.inputs, names) if config.recovery.enabled else None
    )
    weights = _WeightCache(
        model,
        config.analysis.scheme,
        read_input_hessians(run_dir, config),
        read_learned_steps(run_dir, config),
    )
    layer_names = data.table.layer_names
    # An encoder's points carry their cosine to the FP32 embeddings: measure those once.
    fp32 = evaluate_model(model, dataset) if isinstance(dataset, RetrievalPairs) else None

    def measure(candidates: Sequence[str]) -> MetricResult:
        quantized_model = weights.quantized_model(
            data.layers, weight_assignment(layer_names, candidates)
        )
        recover_quantized(
            model,
            quantized_model,
            names,
            config,
            calib.inputs,
            reference,
            # The ranges were read once for every point (``data.activations``).
            activation_quantizers_of(run_dir, layer_names, candidates, data.activations),
        )
        return evaluate_model(quantized_model, dataset, reference=fp32)

    seen: dict[tuple[str, ...], MetricResult] = {}
    for point in tqdm(points, desc="measuring", disable=not progress, unit="point"):
        candidates = _point_candidates(point, len(data.layers))
        key = tuple(candidates)
        if key not in seen:
            seen[key] = measure(candidates)
        _record(point, seen[key].name, point_metric_keys(seen[key]), len(dataset))
    if not seen:
        return {}
    return metric_fields(next(iter(seen.values())))


def reuse_evaluation(
    run_dir: Path, points: Sequence[Point], chosen: Sequence[str], eval_path: str | None
) -> tuple[str | None, dict[str, object]]:
    """Give the points whose candidates are the exported allocation's (``chosen``) the metric
    that ``evaluate`` measured (``evaluation.json``) when it used ``eval_path`` (any data when
    None) and more samples than the sweep did. Returns the evaluation data used (or None) and
    the metric's fields (name, direction; empty when there was no evaluation)."""
    path = run_dir / "evaluation.json"
    if not path.is_file():
        return None, {}
    evaluation = runfolder.read_json(path, "evaluation")
    source = evaluation.get("eval_data")
    if eval_path is not None and source != eval_path:
        return None, {}
    measured = evaluation.get("quantized")
    if not isinstance(measured, dict):
        raise runfolder.damaged(path, "no 'quantized' accuracy")
    name = str(evaluation.get("metric", "top1"))  # files from before other metrics: top-1
    if name not in measured:
        raise runfolder.damaged(path, f"no {name!r} in 'quantized'")
    images = int(measured["num_samples"])
    values = {
        key: float(value)
        for key, value in measured.items()
        if key not in (name, "stderr", "num_samples")
    }
    for point in points:
        if _point_candidates(point, len(chosen)) == list(chosen) and images > int(
            point.get("eval_images") or 0
        ):
            values[name], values[f"{name}_stderr"] = (
                float(measured[name]),
                float(measured["stderr"]),
            )
            _record(point, name, values, images)
    fields = {
        "metric": name,
        "higher_is_better": bool(evaluation.get("higher_is_better", True)),
        "paired_quantity": str(evaluation.get("paired_quantity", name)),
    }
    return str(source), fields


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
