"""The ``analyze`` stage: curvature, cross-checks, activation sensitivity, input Hessians, the
candidate table and the inter-layer terms of one model on its calibration data.

`analyze_model` works on a model and data in memory and returns an `Analysis`; `analyze` is its
run-folder wrapper: it loads the model and data a `RunConfig` names, removes what a previous
analysis left downstream (`lcpaq.runfolder.DOWNSTREAM_ARTIFACTS`) and writes ``run_config.json``,
``layers.json``, ``curvature.npz``, ``candidates.npz`` and, when measured, ``hutchinson.npz``,
``pyhessian.json``, ``activations.npz``, ``input_hessians.safetensors``, ``interactions.npz`` and
``step_sizes.npz``.
The next stage is ``allocate``.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from lcpaq import runfolder
from lcpaq.allocation.budgets import counts_activation_bits
from lcpaq.allocation.channel_groups import (
    CHANNEL_ERRORS_FILE,
    ChannelErrors,
    channel_error_arrays,
)
from lcpaq.allocation.table import CandidateTable, activation_bits
from lcpaq.config import ResumeSettings, RunConfig
from lcpaq.model.data import Dataset
from lcpaq.model.graph import KeptWeight, LayerInfo, Survey, discover_layers, survey_weights
from lcpaq.model.zoo import file_sha256
from lcpaq.quant.formats import get_format
from lcpaq.sensitivity import distributed
from lcpaq.sensitivity.activation_file import save_activation_sensitivity
from lcpaq.sensitivity.candidates import quantize_candidates, table_from_weights
from lcpaq.sensitivity.channel_errors import measure_channel_errors
from lcpaq.sensitivity.interaction_terms import InteractionTerms, save_interactions
from lcpaq.sensitivity.limpq import (
    LearnedStepSizes,
    indicator_columns,
    learn_step_sizes,
    save_step_sizes,
)
from lcpaq.stages.feasibility import check_budgets
from lcpaq.stages.folder import (
    INPUT_HESSIANS_FILE,
    LayersFile,
    ensure_writable,
    load_model_and_data,
    timed,
)
from lcpaq.stages.measure import (
    Measurements,
    layer_input_hessians,
    measure_interactions,
    measure_sensitivity,
)
from lcpaq.stages.resume import (
    NO_ANALYSIS_STATE,
    AnalysisState,
    finished_analysis,
    open_state,
    saves_state,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Analysis:
    """What ``analyze`` measured on one model under ``config``: its layers, sizes in bits, the
    `Measurements` (curvature, cross-checks, activation sensitivity), the candidate table, the
    GPTQ input Hessians, the inter-layer terms and the learned step sizes (None when not asked
    for), with wall times in seconds."""

    config: RunConfig
    layers: tuple[LayerInfo, ...]
    fp32_size_bits: int
    unquantized_size_bits: int
    measurements: Measurements
    candidates: CandidateTable
    input_hessians: dict[str, torch.Tensor] | None = None
    input_hessians_seconds: float | None = None
    interactions: InteractionTerms | None = None
    interactions_seconds: float | None = None
    step_sizes: LearnedStepSizes | None = None
    channel_errors: ChannelErrors | None = None


def with_default_activations(config: RunConfig) -> RunConfig:
    """A run whose budgets count activation bits (BitOps, EBOPs, latency) and that names no
    ``--act-formats`` quantizes its layer inputs to INT8: the cost model counts 8-bit
    activations, so the checkpoint gets what the budget paid for (INT8 inputs cost no measurable
    accuracy on the shared ResNets, docs/results.md). ``--act-formats fp32`` keeps them FP32,
    counted as 32 bits. The search does the same (`lcpaq.search.search_space`)."""
    if config.analysis.act_formats or not counts_activation_bits(config.allocation.budgets):
        return config
    logger.info(
        "%s counts activation bits: layer inputs are quantized to INT8 (--act-formats int8; "
        "--act-formats fp32 keeps them FP32)",
        ", ".join(config.allocation.budgets),
    )
    return config.with_analysis(act_formats=("int8",))


def model_sizes(model: nn.Module, layers: Sequence[LayerInfo]) -> tuple[int, int]:
    """(bits of the whole FP32 state, bits of the state the layers do not quantize)."""
    weight_keys = {layer.weight_key for layer in layers}
    state = model.state_dict()
    unquantized_bits = sum(
        t.numel() * t.element_size() * 8 for key, t in state.items() if key not in weight_keys
    )
    fp32_bits = sum(t.numel() * t.element_size() * 8 for t in state.values())
    return fp32_bits, unquantized_bits


def analyze_model(
    config: RunConfig,
    model: nn.Module,
    layers: Sequence[LayerInfo],
    calib: Dataset,
    *,
    pair_data: Dataset | None = None,
    progress: bool = True,
    state: AnalysisState = NO_ANALYSIS_STATE,
) -> Analysis:
    """Measure ``model`` on the calibration images ``calib`` (``num_samples`` of them) as the
    options of ``config.analysis`` say. ``pair_data``: the images of the inter-layer terms
    (``pair_samples``; default the first ones of ``calib``). ``state``: where the estimators save
    their running state, and continue an interrupted analysis from (`lcpaq.stages.resume`)."""
    analysis = config.analysis
    fp32_bits, unquantized_bits = model_sizes(model, layers)
    measured = measure_sensitivity(config, model, layers, calib, progress=progress, state=state)
    start = time.perf_counter()
    input_hessians = layer_input_hessians(config, model, layers, calib.inputs, state)
    input_hessians_seconds = time.perf_counter() - start if input_hessians else None
    for name in analysis.act_formats:
        activation_bits(name)  # an unknown name fails before any work
    weights, quantized = quantize_candidates(
        model, layers, analysis.formats, analysis.scheme, input_hessians
    )
    diagonal = measured.curvature.diagonal
    table = table_from_weights(
        layers,
        weights,
        quantized,
        analysis.formats,
        analysis.scheme,
        diagonal,
        analysis.act_formats,
        input_hessians,
    )
    channels = measure_channel_errors(
        layers, weights, quantized, analysis.formats, diagonal, input_hessians
    )
    del weights, quantized
    step_sizes = learned_steps(config, model, layers, calib)
    if step_sizes is not None:
        indicator = indicator_columns(step_sizes, table.layer_names, table.weight_formats)
        table = replace(table, learned_step=indicator)
    interactions = interactions_seconds = None
    if analysis.pairwise != "none":
        if pair_data is None:
            pair_data = calib.subset(0, min(analysis.pair_samples, len(calib)))
        start = time.perf_counter()
        interactions = measure_interactions(config, model, layers, pair_data, input_hessians)
        interactions_seconds = time.perf_counter() - start
    return Analysis(
        config,
        tuple(layers),
        fp32_bits,
        unquantized_bits,
        measured,
        table,
        input_hessians,
        input_hessians_seconds,
        interactions,
        interactions_seconds,
        step_sizes,
        channels,
    )


def learned_steps(
    config: RunConfig, model: nn.Module, layers: Sequence[LayerInfo], calib: Dataset
) -> LearnedStepSizes | None:
    """LIMPQ's step sizes of the integer candidate formats (``--limpq-steps``; None when 0)."""
    analysis = config.analysis
    if analysis.limpq_steps == 0:
        return None
    formats = [name for name in analysis.formats if get_format(name).kind == "int"]
    device = next(model.parameters()).device
    return learn_step_sizes(
        model,
        layers,
        calib.inputs.to(device),
        formats,
        steps=analysis.limpq_steps,
        batch_size=analysis.batch_size,
        symmetric=analysis.scheme.symmetric,
        seed=analysis.seed,
    )


def _analysis_inputs(config: RunConfig) -> tuple[nn.Module, Dataset, Survey]:
    """The model (on this process's GPU when CUDA is available), calibration data and its
    weights: the layers to quantize (``--include``/``--exclude``) and those kept in FP32; the
    run's budgets are checked against the candidates' costs here, before any measurement."""
    model, calib = load_model_and_data(config, config.analysis.num_samples)
    survey = survey_weights(
        model, calib.inputs, include=config.analysis.include, exclude=config.analysis.exclude
    )
    layers = discover_layers(model, calib.inputs[:0], survey=survey)  # fails if none is left
    if survey.kept:
        logger.warning(
            "%d weight tensor(s) kept in FP32 (%.1f %% of weight parameters): %s",
            len(survey.kept),
            100 * (1 - survey.quantized_share()),
            "; ".join(f"{kept.key}: {kept.reason}" for kept in survey.kept),
        )
    fp32_bits, unquantized_bits = model_sizes(model, layers)
    check_budgets(config, layers, fp32_size_bits=fp32_bits, unquantized_size_bits=unquantized_bits)
    return model.to(distributed.default_device()), calib, survey


def _pair_data(config: RunConfig) -> Dataset | None:
    """The ``pair_samples`` images of the inter-layer terms (None without ``--pairwise``)."""
    if config.analysis.pairwise == "none":
        return None
    return load_model_and_data(config, config.analysis.pair_samples)[1]


def analyze(
    config: RunConfig,
    run_dir: Path,
    *,
    progress: bool = True,
    resume: ResumeSettings | None = None,
) -> None:
    """Measure curvature and per-candidate weight errors; write the analysis artifacts.

    The estimators save their running state in ``run_dir`` as they go; ``resume`` continues an
    interrupted analysis from it, or (``run --resume``) keeps a finished one with the same
    options (`lcpaq.stages.resume`). Under torchrun (`lcpaq.sensitivity.distributed`) every
    process measures a share of the calibration batches; only rank 0 writes the run folder.
    """
    resume = resume or ResumeSettings()
    if not saves_state(resume) and not distributed.is_main_process():
        model, calib, survey = _analysis_inputs(config)
        measure_sensitivity(config, model, survey.layers, calib, progress=False)
        return
    ensure_writable(run_dir)
    if resume.resume and finished_analysis(run_dir, config):
        logger.info("--resume: the analysis in %s is finished; kept", run_dir)
        return
    with timed(run_dir, "analyze"):
        # Bad inputs and infeasible budgets fail here, before anything of the folder is removed.
        model, calib, survey = _analysis_inputs(config)
        state = open_state(run_dir, config, resume)
        for name in runfolder.DOWNSTREAM_ARTIFACTS:
            (run_dir / name).unlink(missing_ok=True)
        for folder in ("quantized", "plots"):
            shutil.rmtree(run_dir / folder, ignore_errors=True)
        try:
            result = analyze_model(
                config,
                model,
                survey.layers,
                calib,
                pair_data=_pair_data(config),
                progress=progress,
                state=state,
            )
            write_analysis(run_dir, config, result, survey.kept)
        except KeyboardInterrupt:
            if state.folder is not None:
                logger.warning(
                    "analysis interrupted; its state is in %s: `lcpaq analyze --resume` (or "
                    "`run --resume`) with the same options continues it",
                    state.folder,
                )
            raise
        state.finish()
    curvature = result.measurements.curvature
    flagged = [name for name, flag in zip(curvature.layer_names, curvature.flags) if flag]
    if flagged:
        logger.warning("curvature flagged for %d layer(s): %s", len(flagged), ", ".join(flagged))


def analyze_interactions(
    config: RunConfig,
    model: nn.Module,
    layers: Sequence[LayerInfo],
    run_dir: Path,
    progress: bool = True,
    input_hessians: Mapping[str, torch.Tensor] | None = None,
) -> float | None:
    """Write ``interactions.npz`` (``--pairwise``) or remove a stale one; returns the seconds.
    ``input_hessians``: what ``--rounding gptq`` needs (`layer_input_hessians`)."""
    path = run_dir / "interactions.npz"
    data = _pair_data(config)
    if data is None:
        path.unlink(missing_ok=True)
        return None
    start = time.perf_counter()
    save_interactions(path, measure_interactions(config, model, layers, data, input_hessians))
    return time.perf_counter() - start


def _write_optional(run_dir: Path, result: Analysis) -> None:
    """The files only some analyses measure; a stale one from an earlier analysis is removed."""
    measured = result.measurements
    stale: list[str] = []
    if measured.hutchinson is not None:
        runfolder.save_curvature(run_dir / "hutchinson.npz", measured.hutchinson)
    else:
        stale.append("hutchinson.npz")
    if measured.pyhessian is not None:
        runfolder.write_json(run_dir / "pyhessian.json", measured.pyhessian.to_dict())
    else:
        stale.append("pyhessian.json")
    if measured.activations is not None:
        save_activation_sensitivity(run_dir / "activations.npz", measured.activations)
    else:
        stale.append("activations.npz")
    if result.input_hessians is not None:
        runfolder.save_tensors(run_dir / INPUT_HESSIANS_FILE, result.input_hessians)
    else:
        stale.append(INPUT_HESSIANS_FILE)
    if result.interactions is not None:
        save_interactions(run_dir / "interactions.npz", result.interactions)
    else:
        stale.append("interactions.npz")
    if result.step_sizes is not None:
        save_step_sizes(run_dir / "step_sizes.npz", result.step_sizes)
    else:
        stale.append("step_sizes.npz")
    if result.channel_errors is not None:
        runfolder.write_npz(
            run_dir / CHANNEL_ERRORS_FILE, channel_error_arrays(result.channel_errors)
        )
    else:
        stale.append(CHANNEL_ERRORS_FILE)
    for name in stale:
        (run_dir / name).unlink(missing_ok=True)


def write_analysis(
    run_dir: Path, config: RunConfig, result: Analysis, kept: Sequence[KeptWeight] = ()
) -> None:
    """The analysis files of ``result``; ``kept``: the weights left in FP32 and why."""
    analysis = config.analysis
    measured = result.measurements
    _write_optional(run_dir, result)
    checkpoint_sha = file_sha256(Path(analysis.checkpoint)) if analysis.checkpoint else None
    runfolder.write_json(run_dir / "run_config.json", config.to_dict())
    layers_file: LayersFile = {
        "model": analysis.model,
        "checkpoint_sha256": checkpoint_sha,
        "fp32_size_bits": result.fp32_size_bits,
        "unquantized_size_bits": result.unquantized_size_bits,
        "curvature_seconds": measured.curvature_seconds,
        "hutchinson_seconds": measured.hutchinson_seconds,
        "activations_seconds": measured.activations_seconds,
        "interactions_seconds": result.interactions_seconds,
        "input_hessians_seconds": result.input_hessians_seconds,
        "layers": [layer.to_dict() for layer in result.layers],
        "kept_fp32": [weight.to_dict() for weight in kept],
    }
    runfolder.write_json(run_dir / "layers.json", layers_file)
    runfolder.save_curvature(run_dir / "curvature.npz", measured.curvature)
    runfolder.save_candidates(run_dir / "candidates.npz", result.candidates)
