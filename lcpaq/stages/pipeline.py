"""The pipeline over a run folder, stage by stage in `ORDER`: analyze → allocate → export →
evaluate → sweep → plot → report (``onnx`` is an optional stage after ``export``).

Each stage reads the artifacts of the stages before it from the run folder and writes its own, so
any stage can be re-run alone (re-allocating under a new budget takes seconds: it never touches
the Hessian). Every stage lives in its own module of `lcpaq.stages` as a function over data plus
its run-folder wrapper; this module gathers the wrappers (the names the CLI, the search and
scripts/ call) and `run`, which chains them. File layout (all written atomically):

    run_config.json   model, data and analysis options         (analyze)
    layers.json       quantizable layers, unquantized size     (analyze)
    curvature.npz     per-layer traces ± standard errors       (analyze)
    hutchinson.npz    Hutchinson cross-check, if requested     (analyze)
    pyhessian.json    PyHessian cross-check, if requested      (analyze)
    activations.npz   activation curvature × format noise      (analyze, with --act-formats)
    candidates.npz    cost and weight error per layer×format   (analyze)
    interactions.npz  inter-layer terms C_ij ± SE, if --pairwise (analyze)
    frontiers.npz     scores and Pareto mask                   (allocate)
    allocation.json   chosen format per layer, solver report   (allocate)
    infeasible.json   why the last budgets could not be met     (allocate, if infeasible)
    quantized/        model.safetensors + manifest.json        (export)
    quantized/hf/, quantized/compressed-tensors/, exports.json     (export, transformers models)
    evaluation.json   FP32 and quantized metric (top-1, ...)   (evaluate)
    onnx.json         ONNX Runtime check of model.onnx         (onnx)
    sweep.json        model-level Pareto curves, uniform points (sweep)
    plots/*.png                                                (plot)
    report.md, report.json                                     (report)
    timings.json      wall seconds of every stage              (every stage)
    analysis_state/   running state of an unfinished analysis  (analyze; removed when it ends)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lcpaq.allocation.budgets import Budget, parse_budget
from lcpaq.config import ExportSettings, ResumeSettings, RunConfig
from lcpaq.errors import InputError
from lcpaq.stages.allocate import allocate, candidate_costs
from lcpaq.stages.analyze import analyze, analyze_interactions, with_default_activations
from lcpaq.stages.evaluate import evaluate
from lcpaq.stages.export import (
    activation_quantizers_of,
    export,
    paired_activation_formats,
    quantize_and_recover,
    recover_quantized,
    weight_assignment,
)
from lcpaq.stages.folder import (
    INPUT_HESSIANS_FILE,
    ensure_writable,
    pair_options_of,
    read_allocation,
    read_config,
    read_input_hessians,
    read_layers,
)
from lcpaq.stages.measure import measure_activations
from lcpaq.stages.onnx import export_onnx
from lcpaq.stages.plot import plot
from lcpaq.stages.report import report
from lcpaq.stages.sweep import sweep

#: The stages in the order `run` (and ``lcpaq run``) executes them; each reads what the ones
#: before it wrote.
ORDER = ("analyze", "allocate", "export", "evaluate", "sweep", "plot", "report")

__all__ = [
    "INPUT_HESSIANS_FILE",
    "ORDER",
    "activation_quantizers_of",
    "allocate",
    "analyze",
    "analyze_interactions",
    "candidate_costs",
    "ensure_writable",
    "evaluate",
    "export",
    "export_onnx",
    "finish",
    "measure_activations",
    "pair_options_of",
    "paired_activation_formats",
    "plot",
    "quantize_and_recover",
    "recover_quantized",
    "read_allocation",
    "read_config",
    "read_input_hessians",
    "read_layers",
    "report",
    "run",
    "sweep",
    "weight_assignment",
    "with_default_activations",
]


def finish(
    run_dir: Path,
    eval_path: str | None = None,
    *,
    sweep_points: int = 0,
    sweep_min_bits: float | None = None,
    sweep_metrics: Sequence[str] | None = None,
    sweep_eval_samples: int | None = 0,
    progress: bool = True,
    export_settings: ExportSettings | None = None,
) -> Path:
    """The stages after ``allocate`` in `ORDER`: ``evaluate`` needs ``eval_path``, ``sweep``
    needs ``sweep_points`` (without it a stale ``sweep.json`` is removed) and measures its points
    on ``sweep_eval_samples`` images (0: none, None: all). Returns the report."""
    export(run_dir, settings=export_settings)
    if eval_path:
        evaluate(run_dir, eval_path)
    if sweep_points:
        sweep(
            run_dir,
            eval_path,
            num_points=sweep_points,
            min_bits=sweep_min_bits,
            metrics=sweep_metrics,
            eval_samples=sweep_eval_samples,
            progress=progress,
        )
    else:
        (run_dir / "sweep.json").unlink(missing_ok=True)
    plot(run_dir)
    return report(run_dir)


def run(
    config: RunConfig,
    run_dir: Path,
    eval_path: str | None = None,
    *,
    sweep_points: int = 0,
    sweep_min_bits: float | None = None,
    sweep_metrics: Sequence[str] | None = None,
    sweep_eval_samples: int | None = 0,
    progress: bool = True,
    export_settings: ExportSettings | None = None,
    resume: ResumeSettings | None = None,
) -> Path | None:
    """Every stage of `ORDER` on ``run_dir`` under ``config.allocation.budgets`` (with
    `with_default_activations`); ``resume`` continues an interrupted analysis or keeps a
    finished one (`lcpaq.stages.resume`). Returns the report's path (None on a torchrun rank
    other than 0, which only shares the analysis)."""
    from lcpaq.sensitivity import distributed

    if not config.allocation.budgets:
        raise InputError("give at least one --budget, e.g. --budget avg-bits=3")
    config = with_default_activations(config)
    analyze(config, run_dir, progress=progress, resume=resume)
    if not distributed.is_main_process():
        return None
    budgets: list[Budget] = [parse_budget(text) for text in config.allocation.budgets]
    allocate(run_dir, budgets, **config.allocation.options())
    return finish(
        run_dir,
        eval_path,
        sweep_points=sweep_points,
        sweep_min_bits=sweep_min_bits,
        sweep_metrics=sweep_metrics,
        sweep_eval_samples=sweep_eval_samples,
        progress=progress,
        export_settings=export_settings,
    )
