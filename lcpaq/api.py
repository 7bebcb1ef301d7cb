"""The Python API over objects already in memory: a model, calibration data a notebook has (a
torch ``Dataset``, a ``DataLoader`` or ``(inputs, labels)`` tensors) and a budget.

``lcpaq.quantize(model, calib, budget="avg-bits=3")`` runs the stages ``analyze`` → ``allocate``
→ ``export`` in memory and returns a `QuantizeResult` (the allocation, the quantized model and
the report data); ``out=PATH`` also writes the normal run folder (with its figures and report).
The steps are there one by one too: `analyze`, `allocate`, `export`, `evaluate`. Options are the
fields of `lcpaq.config.AnalysisConfig`, `RecoveryConfig` and `AllocationConfig` by name (e.g.
``formats=("int2", "int4", "int8")``, ``num_samples=128``, ``scorer="diagonal"``); the same
options as the CLI flags, with the same defaults. docs/api.md has a runnable example.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lcpaq import runfolder
from lcpaq.allocation.budgets import Budget, parse_budget
from lcpaq.allocation.curves import budget_table
from lcpaq.allocation.pairwise import AugmentedProblem
from lcpaq.allocation.problem import AllocationProblem
from lcpaq.allocation.result import Allocation
from lcpaq.config import AllocationConfig, AnalysisConfig, RecoveryConfig, RunConfig
from lcpaq.errors import InputError
from lcpaq.model.data import Dataset
from lcpaq.model.graph import discover_layers
from lcpaq.model.text_data import RetrievalPairs
from lcpaq.stages.allocate import (
    ProblemData,
    allocation_record,
    check_solvable,
    optimum,
    options_record,
    problem_of,
)
from lcpaq.stages.analyze import Analysis, analyze_model, with_default_activations, write_analysis
from lcpaq.stages.evaluate import evaluate_models
from lcpaq.stages.export import QuantizedModel, export_model, manifest_extra, write_checkpoint
from lcpaq.stages.folder import ensure_writable
from lcpaq.stages.plot import plot
from lcpaq.stages.report import report

#: Where an in-memory run's calibration data "comes from" in ``run_config.json``.
IN_MEMORY = "<in memory>"

__all__ = ["QuantizeResult", "allocate", "analyze", "as_dataset", "evaluate", "export", "quantize"]


@dataclass(frozen=True)
class QuantizeResult:
    """What `quantize` returns. ``formats``: layer → chosen candidate (e.g. ``int4``, or
    ``int4/int8`` with activation formats); ``model``: the quantized model (dequantized weights,
    layer-input quantizers attached, batch-norm statistics corrected); ``predicted_loss_increase``
    (nats) and ``budget_table`` (limit, used, slack, binding, limiting per budget) as the report
    shows them; ``analysis`` and ``allocation`` for step-by-step use; ``run_dir``: the run folder
    written with ``out=``, else None."""

    formats: dict[str, str]
    model: nn.Module
    predicted_loss_increase: float
    average_bits: float
    size_bytes: float
    costs: dict[str, float]
    budget_table: list[dict[str, Any]]
    allocation: Allocation
    analysis: Analysis
    quantized: QuantizedModel
    run_dir: Path | None = None


def as_dataset(data: object, source: str = IN_MEMORY) -> Dataset:
    """Inputs and labels as lcpaq's `Dataset`: an ``(inputs, labels)`` pair of tensors or arrays,
    a ``DataLoader`` or any iterable of ``(inputs, labels)`` batches, or a map-style torch
    ``Dataset`` of ``(input, label)`` items. Inputs are taken as the model takes them (already
    normalised)."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, tuple | list) and len(data) == 2:
        inputs, labels = (torch.as_tensor(np.asarray(part)) for part in data)
    elif isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        items = [data[index] for index in range(len(data))]
        inputs = torch.stack([torch.as_tensor(item[0]) for item in items])
        labels = torch.as_tensor([int(item[1]) for item in items])
    elif isinstance(data, Iterable):
        batches = list(data)
        inputs = torch.cat([torch.as_tensor(batch[0]) for batch in batches])
        labels = torch.cat([torch.as_tensor(batch[1]).reshape(-1) for batch in batches])
    else:
        raise InputError(
            f"calibration data must be (inputs, labels), a DataLoader or a torch Dataset, "
            f"got {type(data).__name__}"
        )
    if len(inputs) == 0 or len(inputs) != len(labels):
        raise InputError(
            f"need as many labels as inputs (> 0), got {len(inputs)} and {len(labels)}"
        )
    return Dataset(inputs.float(), labels.long(), source)


def _split_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    """Options by the config dataclass that declares them (analysis, recovery, allocation)."""
    parts: tuple[dict[str, Any], ...] = ({}, {}, {})
    owners = (AnalysisConfig, RecoveryConfig, AllocationConfig)
    for name, value in options.items():
        for part, owner in zip(parts, owners):
            if name in {field.name for field in dataclasses.fields(owner)}:
                part[name] = value
                break
        else:
            raise InputError(f"unknown option {name!r}: see lcpaq.config for the options")
    for name in ("model", "checkpoint", "calib", "budgets"):
        if name in options:
            raise InputError(f"option {name!r} is given by the arguments of the API call")
    if "formats" in parts[0]:
        parts[0]["formats"] = tuple(parts[0]["formats"])
    if "act_formats" in parts[0]:
        parts[0]["act_formats"] = tuple(parts[0]["act_formats"])
    return parts


def _budgets(budget: str | Sequence[str]) -> tuple[str, ...]:
    return (budget,) if isinstance(budget, str) else tuple(budget)


def run_config(model: nn.Module, budget: str | Sequence[str] = (), **options: Any) -> RunConfig:
    """The `RunConfig` of an in-memory run (the model named by its class, ``module:Class``)."""
    analysis, recovery, allocation = _split_options(options)
    config = RunConfig(
        analysis=AnalysisConfig(
            model=f"{type(model).__module__}:{type(model).__qualname__}",
            checkpoint=None,
            calib=IN_MEMORY,
            **analysis,
        ),
        recovery=RecoveryConfig(**recovery),
        allocation=AllocationConfig(budgets=_budgets(budget), **allocation),
    )
    return with_default_activations(config)


def analyze(model: nn.Module, calib: object, *, progress: bool = False, **options: Any) -> Analysis:
    """The ``analyze`` stage on ``model`` and ``calib`` (the first ``num_samples`` of it)."""
    return _analyze(run_config(model, (), **options), model, calib, progress)


def _analyze(config: RunConfig, model: nn.Module, calib: object, progress: bool) -> Analysis:
    data = as_dataset(calib)
    options = config.analysis
    subset = data.subset(0, min(options.num_samples, len(data)))
    model.eval()
    layers = discover_layers(model, subset.inputs, include=options.include, exclude=options.exclude)
    pair_data = data.subset(0, min(options.pair_samples, len(data)))
    return analyze_model(config, model, layers, subset, pair_data=pair_data, progress=progress)


def _solve(
    analysis: Analysis, config: AllocationConfig
) -> tuple[AllocationProblem | AugmentedProblem, Allocation, np.ndarray, np.ndarray]:
    data = ProblemData.of_analysis(analysis, analysis.config.analysis.scheme.symmetric)
    problem, scores, kept = problem_of(data, **config.problem_options())
    budgets = [parse_budget(text) for text in config.budgets]
    weights = dict(config.cost_weights) or None
    check_solvable(problem, budgets, weights)
    return problem, optimum(problem, budgets, weights), scores, kept


def allocate(analysis: Analysis, budget: str | Sequence[str], **options: Any) -> Allocation:
    """The ``allocate`` stage: the optimal format per layer under ``budget`` (``METRIC=VALUE``
    texts, e.g. ``"avg-bits=3"``); ``options``: fields of `AllocationConfig`."""
    config = AllocationConfig(budgets=_budgets(budget), **options)
    return _solve(analysis, config)[1]


def export(
    model: nn.Module, analysis: Analysis, allocation: Allocation, calib: object
) -> QuantizedModel:
    """The ``export`` stage in memory: ``model`` quantized to ``allocation``, its statistics
    corrected on the first ``correction_samples`` of ``calib``."""
    config = analysis.config
    data = as_dataset(calib)
    inputs = data.subset(0, min(config.recovery.num_samples, len(data))).inputs
    return export_model(
        model,
        analysis.layers,
        allocation,
        config,
        inputs if config.recovery.enabled else None,
        input_hessians=analysis.input_hessians,
        activations=analysis.measurements.activations,
    )


def evaluate(model: nn.Module, quantized: nn.Module, data: object) -> dict[str, object]:
    """The ``evaluate`` stage in memory: the model's metric for both models on ``data`` (labelled
    data; query/document `RetrievalPairs` for an encoder; token data for a causal LM) and their
    paired difference (``evaluation.json``'s keys)."""
    pairs = data if isinstance(data, RetrievalPairs) else None
    return evaluate_models(model, quantized, pairs or as_dataset(data), {})


def quantize(
    model: nn.Module,
    calib: object,
    budget: str | Sequence[str] = "avg-bits=3",
    out: str | Path | None = None,
    *,
    progress: bool = False,
    **options: Any,
) -> QuantizeResult:
    """Analyze ``model`` on ``calib``, allocate formats under ``budget`` and quantize it.
    ``out``: also write the run folder there (analysis files, ``allocation.json``,
    ``quantized/``, ``plots/``, ``report.md``); the stages that reload the model from its name
    (export, evaluate, sweep on the CLI) need a model the zoo knows."""
    config = run_config(model, budget, **options)
    data = as_dataset(calib)
    analysis = _analyze(config, model, data, progress)
    problem, allocation, scores, kept = _solve(analysis, config.allocation)
    quantized = export(model, analysis, allocation, data)
    weights = dict(config.allocation.cost_weights) or None
    budgets = [parse_budget(text) for text in config.allocation.budgets]
    run_dir = None
    if out is not None:
        run_dir = Path(out)
        corrected = min(config.recovery.num_samples, len(data))
        _write_run(run_dir, analysis, problem, allocation, quantized, (scores, kept), corrected)
    return QuantizeResult(
        formats=dict(zip(allocation.layer_names, allocation.formats)),
        model=quantized.model,
        predicted_loss_increase=allocation.predicted_loss_increase,
        average_bits=allocation.average_bits,
        size_bytes=allocation.size_bytes,
        costs=dict(allocation.costs),
        budget_table=budget_table(problem, budgets, allocation, weights),
        allocation=allocation,
        analysis=analysis,
        quantized=quantized,
        run_dir=run_dir,
    )


def _write_run(
    run_dir: Path,
    analysis: Analysis,
    problem: AllocationProblem | AugmentedProblem,
    allocation: Allocation,
    quantized: QuantizedModel,
    frontiers: tuple[np.ndarray, np.ndarray],
    correction_samples: int,
) -> None:
    """The run folder the CLI stages would have written for this run (``correction_samples``:
    the images the statistics correction saw)."""
    config = analysis.config
    ensure_writable(run_dir)
    for name in runfolder.DOWNSTREAM_ARTIFACTS:
        (run_dir / name).unlink(missing_ok=True)
    for folder in ("quantized", "plots"):
        shutil.rmtree(run_dir / folder, ignore_errors=True)
    write_analysis(run_dir, config, analysis)
    scores, kept = frontiers
    runfolder.write_npz(
        run_dir / "frontiers.npz",
        {"scores": scores, "kept": kept, "allowed": np.asarray(problem.allowed)},
    )
    record_options = options_record(**config.allocation.problem_options())
    budgets = [Budget(use.metric, use.limit) for use in allocation.budgets]
    weights = dict(config.allocation.cost_weights) or None
    record = allocation_record(problem, budgets, allocation, weights, record_options)
    runfolder.write_json(run_dir / "allocation.json", record)
    extra = manifest_extra(
        config,
        analysis.layers,
        allocation,
        first_last=config.allocation.first_last,
        source_sha256=None,
        fp32_size_bits=float(analysis.fp32_size_bits),
        correction_samples=correction_samples,
    )
    write_checkpoint(run_dir / "quantized", quantized, analysis.layers, allocation, config, extra)
    plot(run_dir)
    report(run_dir)
