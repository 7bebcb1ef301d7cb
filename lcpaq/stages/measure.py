"""The measurements of the ``analyze`` stage, over a model and calibration data in memory: the
curvature used for scoring, its cross-checks (Hutchinson, PyHessian), the activation
sensitivity, the layers' input Hessians for GPTQ rounding and the inter-layer terms. Nothing here
reads or writes the run folder (`lcpaq.stages.analyze` does)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import nn

from lcpaq.config import RunConfig
from lcpaq.errors import InputError
from lcpaq.model.data import Dataset
from lcpaq.model.graph import LayerInfo
from lcpaq.quant.input_stats import collect_input_hessians
from lcpaq.sensitivity import distributed
from lcpaq.sensitivity.activation import ActivationSensitivity, activation_sensitivity
from lcpaq.sensitivity.curvature import CurvatureEstimate
from lcpaq.sensitivity.gauss_newton import gauss_newton_traces
from lcpaq.sensitivity.hutchinson import hutchinson_traces, single_layer_hutchinson_traces
from lcpaq.sensitivity.interaction_terms import InteractionTerms, select_pairs
from lcpaq.sensitivity.interactions import compute_interactions, pair_formats
from lcpaq.sensitivity.losses import LossName, default_loss
from lcpaq.sensitivity.pyhessian_check import PyHessianCheck, pyhessian_check
from lcpaq.stages.resume import NO_ANALYSIS_STATE, AnalysisState

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Measurements:
    """What `measure_sensitivity` measured, with wall times in seconds."""

    curvature: CurvatureEstimate
    curvature_seconds: float
    hutchinson: CurvatureEstimate | None = None
    hutchinson_seconds: float | None = None
    activations: ActivationSensitivity | None = None
    activations_seconds: float | None = None
    pyhessian: PyHessianCheck | None = None


def _labelled_batches(data: Dataset, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (data.inputs[start : start + size], data.labels[start : start + size])
        for start in range(0, len(data), size)
    ]


def _hutchinson_min_probes(probe_cap: int, num_layers: int) -> int:
    """Probes every layer gets before budgets follow its variance: 4, fewer if the cap is tight."""
    if probe_cap < 2 * num_layers:
        raise InputError(
            f"--hutchinson-probes {probe_cap} is below 2 probes per layer for estimator hutchinson "
            f"({num_layers} layers): give at least {2 * num_layers}"
        )
    return min(4, probe_cap // num_layers)


def curvature_loss(config: RunConfig, model: nn.Module, has_labels: bool = True) -> LossName:
    """The loss of ``--loss``, ``auto`` replaced by the model's default
    (`lcpaq.sensitivity.losses.default_loss`: cross-entropy for image and text classifiers with
    labels, the squared error to FP32's pooled embedding for encoders, KL to FP32 for causal LMs)."""
    loss = config.analysis.loss
    if loss == "auto":
        return default_loss(getattr(model, "task", None), has_labels)
    return loss


def _check_text_options(config: RunConfig, model: nn.Module) -> None:
    """The measurements that do not take text models yet fail before any work, naming the flag."""
    task = getattr(model, "task", None)
    if task is None:
        return
    analysis = config.analysis
    wanted = {"encoder": ("mse",), "causal-lm": ("kl", "cross_entropy")}.get(task)
    if wanted and analysis.loss not in ("auto", *wanted):
        raise InputError(
            f"--loss {analysis.loss} does not apply to {task} models: use "
            f"{' or '.join(wanted)} (or auto)"
        )
    unsupported = [
        flag
        for flag, asked in (
            ("--hutchinson-probes", analysis.hutchinson_probes > 0),
            ("--pyhessian-iters", analysis.pyhessian_iters > 0),
            ("--act-formats", bool(analysis.act_formats)),
            ("--pairwise", analysis.pairwise != "none"),
            ("--limpq-steps", analysis.limpq_steps > 0),
        )
        if asked
    ]
    if unsupported:
        raise InputError(
            f"{', '.join(unsupported)}: not supported for transformers models (hf:) yet; the "
            "Gauss-Newton traces are"
        )


def scoring_curvature(
    config: RunConfig,
    model: nn.Module,
    layers: Sequence[LayerInfo],
    calib: Dataset,
    *,
    progress: bool = True,
    state: AnalysisState = NO_ANALYSIS_STATE,
) -> CurvatureEstimate:
    """The per-layer traces the scores use: Gauss–Newton, or (``estimator hutchinson``) the
    exact-Hessian single-layer Hutchinson traces with Gauss–Newton as control variate. ``state``:
    where the estimators save their running state (`lcpaq.stages.resume`)."""
    analysis = config.analysis
    loss = curvature_loss(config, model, calib.has_labels)
    starts = range(0, len(calib), analysis.batch_size)
    batches = [calib.inputs[start : start + analysis.batch_size] for start in starts]
    share = distributed.batch_share()
    if analysis.estimator != "hutchinson":
        return gauss_newton_traces(
            model,
            layers,
            batches,
            loss=loss,
            seed=analysis.seed,
            share=share,
            progress=progress,
            state_file=state.file("gauss_newton"),
        )
    # The exact Gauss-Newton traces are the control variate: Hutchinson estimates H - G only.
    exact_part = gauss_newton_traces(
        model,
        layers,
        batches,
        loss=loss,
        seed=analysis.seed,
        keep_diagonal=False,
        share=share,
        state_file=state.file("gauss_newton_control"),
    )
    return single_layer_hutchinson_traces(
        model,
        layers,
        _labelled_batches(calib, analysis.batch_size),
        # A sampled Fisher (> 64 classes) is no exact control variate: plain Hutchinson then.
        gauss_newton=exact_part if exact_part.method == "gauss_newton" else None,
        rel_tol=analysis.hutchinson_rel_tol,
        min_probes=_hutchinson_min_probes(analysis.hutchinson_probes, len(layers)),
        max_probes_per_layer=analysis.hutchinson_probes,
        max_total_probes=analysis.hutchinson_probes,
        seed=analysis.seed,
        loss=loss,
        share=share,
        progress=progress,
        state_file=state.file("hutchinson_single_layer"),
    )


def measure_sensitivity(
    config: RunConfig,
    model: nn.Module,
    layers: Sequence[LayerInfo],
    calib: Dataset,
    *,
    progress: bool = True,
    state: AnalysisState = NO_ANALYSIS_STATE,
) -> Measurements:
    """Everything ``analyze`` measures on calibration data: the curvature used for scoring
    (``estimator``), the Hutchinson cross-check (``hutchinson_probes`` with gauss-newton) and the
    activation sensitivity (``act_formats``).

    Under torchrun every process calls this with the same arguments: each measurement splits the
    calibration batches across the processes and reduces, in this fixed order, so every process
    gets the single-process result (bitwise for Gauss–Newton and the activation curvature; the
    Hutchinson per-probe sums are added in another order, equal to float rounding).

    ``state``: where the estimators save their running state after batches, and from which an
    interrupted analysis continues (`lcpaq.stages.resume`).
    """
    analysis = config.analysis
    _check_text_options(config, model)
    loss = curvature_loss(config, model, calib.has_labels)
    start = time.perf_counter()
    curvature = scoring_curvature(config, model, layers, calib, progress=progress, state=state)
    curvature_seconds = time.perf_counter() - start
    hutchinson = hutchinson_seconds = None
    if analysis.hutchinson_probes and analysis.estimator == "gauss-newton":
        subset = calib.subset(0, min(analysis.hutchinson_samples, len(calib)))
        start = time.perf_counter()
        hutchinson = hutchinson_traces(
            model,
            layers,
            _labelled_batches(subset, analysis.batch_size),
            max_probes=analysis.hutchinson_probes,
            min_probes=min(8, analysis.hutchinson_probes),
            rel_tol=analysis.hutchinson_rel_tol,
            seed=analysis.seed,
            loss=loss,
            share=distributed.batch_share(),
            progress=progress,
            state_file=state.file("hutchinson"),
        )
        hutchinson_seconds = time.perf_counter() - start
    pyhessian = None
    if analysis.pyhessian_iters and distributed.is_main_process():
        # A cross-check, not split over processes: PyHessian runs on rank 0 alone.
        subset = calib.subset(0, min(analysis.hutchinson_samples, len(calib)))
        pyhessian = pyhessian_check(
            model,
            layers,
            _labelled_batches(subset, analysis.batch_size),
            max_iter=analysis.pyhessian_iters,
            seed=analysis.seed,
        )
    activations = activations_seconds = None
    if analysis.act_formats:
        start = time.perf_counter()
        activations = measure_activations(
            config, model, layers, calib.inputs, progress=progress, state=state
        )
        activations_seconds = time.perf_counter() - start
    return Measurements(
        curvature,
        curvature_seconds,
        hutchinson,
        hutchinson_seconds,
        activations,
        activations_seconds,
        pyhessian,
    )


def measure_activations(
    config: RunConfig,
    model: nn.Module,
    layers: Sequence[LayerInfo],
    inputs: torch.Tensor,
    *,
    progress: bool = False,
    state: AnalysisState = NO_ANALYSIS_STATE,
) -> ActivationSensitivity:
    """The activation sensitivity and calibrated ranges of ``act_formats`` on ``inputs`` (the
    curvature's images, in its batches), as ``analyze`` writes them to ``activations.npz``."""
    analysis = config.analysis
    loss = curvature_loss(config, model)
    starts = range(0, len(inputs), analysis.batch_size)
    return activation_sensitivity(
        model,
        layers,
        [inputs[start : start + analysis.batch_size] for start in starts],
        analysis.act_formats,
        loss=loss,
        clipping=analysis.act_clipping,
        seed=analysis.seed,
        share=distributed.batch_share(),
        progress=progress,
        state_file=state.file("activations"),
    )


def layer_input_hessians(
    config: RunConfig,
    model: nn.Module,
    layers: Sequence[LayerInfo],
    inputs: torch.Tensor,
    state: AnalysisState = NO_ANALYSIS_STATE,
) -> dict[str, torch.Tensor] | None:
    """Input second moments of every layer on ``inputs`` (the curvature's calibration images)
    when the scheme rounds with GPTQ; None for round-to-nearest, which needs no data."""
    if config.analysis.scheme.rounding != "gptq":
        return None
    names = [layer.name for layer in layers]
    return collect_input_hessians(
        model,
        names,
        inputs,
        batch_size=config.analysis.batch_size,
        state_file=state.file("input_hessians"),
    )


def measure_interactions(
    config: RunConfig,
    model: nn.Module,
    layers: Sequence[LayerInfo],
    data: Dataset,
    input_hessians: Mapping[str, torch.Tensor] | None = None,
) -> InteractionTerms:
    """The inter-layer terms of ``--pairwise`` on the ``pair_samples`` images ``data``.
    ``input_hessians``: what ``--rounding gptq`` needs (`layer_input_hessians`)."""
    analysis = config.analysis
    formats = pair_formats(analysis.formats, analysis.pair_max_bits)
    if not formats:
        raise InputError(
            f"--pair-max-bits {analysis.pair_max_bits} leaves none of the formats "
            f"{', '.join(analysis.formats)} for inter-layer terms"
        )
    names = [layer.name for layer in layers]
    pairs = select_pairs(len(layers), analysis.pair_rule, analysis.pair_window, names)
    if analysis.pairwise == "hessian" and len(data) <= analysis.batch_size:
        # Its standard errors are over batches; the significance filter needs them.
        raise InputError(
            f"--pairwise hessian needs at least two batches for its standard errors: "
            f"{len(data)} pair samples with --batch-size {analysis.batch_size}"
        )
    logger.info(
        "inter-layer terms (%s): %d pairs x %d formats on %d samples",
        analysis.pairwise,
        len(pairs),
        len(formats),
        len(data),
    )
    return compute_interactions(
        model,
        layers,
        data.inputs,
        data.labels if analysis.pairwise == "hessian" or analysis.pair_loss != "kl" else None,
        formats,
        source=analysis.pairwise,
        pairs=pairs,
        scheme=analysis.scheme,
        batch_size=analysis.batch_size,
        # kl's Gauss–Newton curvature is cross-entropy's (`lcpaq.sensitivity.losses`), which
        # the interaction estimators compute for it; their annotation names the other two only.
        curvature_loss=cast(Literal["cross_entropy", "mse"], curvature_loss(config, model)),
        forward_loss=analysis.pair_loss,
        input_hessians=input_hessians,
    )
