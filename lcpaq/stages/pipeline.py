"""The pipeline over a run folder: analyze → allocate → export → evaluate → sweep → plot → report.

Each stage reads the artifacts of the stages before it from the run folder and writes its own, so any
stage can be re-run alone (re-allocating under a new budget takes seconds: it never touches the
Hessian). File layout (all written atomically):

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
    quantized/        model.safetensors + manifest.json        (export)
    evaluation.json   FP32 and quantized top-1                 (evaluate)
    infeasible.json   why the last budgets could not be met     (allocate, if infeasible)
    sweep.json        model-level Pareto curves, uniform points (sweep)
    plots/*.png, report.md, report.json, timings.json
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lcpaq import runfolder
from lcpaq.allocation.budgets import Budget, counts_activation_bits, tie_rule_groups
from lcpaq.allocation.costs import CostModel, build_cost_model, load_latency_table
from lcpaq.allocation.curves import (
    BASELINE_FORMATS,
    budget_table,
    extra_uniform_points,
    sweep_metric,
    uniform_points,
)
from lcpaq.allocation.diagnose import infeasibility_report
from lcpaq.allocation.frontier import build_frontiers, pareto_mask, score_candidates
from lcpaq.allocation.pairwise import (
    AugmentedProblem,
    PairClip,
    PairwiseMode,
    align_terms,
    pair_views,
    prepare_pairwise,
)
from lcpaq.allocation.problem import AllocationProblem, allowed_candidates
from lcpaq.allocation.result import Allocation
from lcpaq.allocation.table import (
    PAIR_SEPARATOR,
    CandidateTable,
    activation_format_of,
    weight_format_of,
)
from lcpaq.config import AllocationConfig, FirstLastPolicy, RunConfig
from lcpaq.errors import InputError
from lcpaq.model.data import Dataset, load_dataset
from lcpaq.model.evaluate import evaluate_accuracy, paired_difference
from lcpaq.model.graph import LayerInfo, discover_layers
from lcpaq.model.recovery import (
    collect_input_hessians,
    collect_reference_stats,
    correct_statistics,
)
from lcpaq.model.zoo import build_model, file_sha256, load_model, num_classes_of
from lcpaq.quant.activations import (
    ActivationQuantizer,
    activation_quantizers,
    attach_activation_quantizers,
)
from lcpaq.quant.checkpoint import (
    load_quantized,
    manifest_activation_quantizers,
    quantize_model,
    read_manifest,
    write_quantized_checkpoint,
)
from lcpaq.quant.formats import get_format
from lcpaq.sensitivity import distributed
from lcpaq.sensitivity.activation import (
    ActivationSensitivity,
    activation_scores,
    load_activation_sensitivity,
    save_activation_sensitivity,
)
from lcpaq.sensitivity.candidates import (
    activation_score_matrix,
    assign_activations,
    measure_candidates,
)
from lcpaq.sensitivity.curvature import CurvatureEstimate
from lcpaq.sensitivity.gauss_newton import gauss_newton_traces
from lcpaq.sensitivity.hutchinson import hutchinson_traces, single_layer_hutchinson_traces
from lcpaq.sensitivity.interaction_terms import load_interactions, save_interactions, select_pairs
from lcpaq.sensitivity.interactions import compute_interactions, pair_formats
from lcpaq.sensitivity.pyhessian_check import PyHessianCheck, pyhessian_check

logger = logging.getLogger(__name__)

HIGH_FORMAT = "int8"
#: Per-layer input second moments E[x xᵀ] that GPTQ rounding needs (written by ``analyze``).
INPUT_HESSIANS_FILE = "input_hessians.safetensors"


# -- run folder helpers ------------------------------------------------------------------------


def ensure_writable(run_dir: Path) -> None:
    """Fail early, naming the folder, if the run folder cannot be created or written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise InputError(f"output folder {run_dir} is not writable: {error.strerror}") from None


@contextmanager
def timed(run_dir: Path, stage: str) -> Iterator[None]:
    """Record the wall time of a stage in ``timings.json`` (seconds, merged across stages)."""
    start = time.perf_counter()
    yield
    elapsed = time.perf_counter() - start
    path = run_dir / "timings.json"
    timings = runfolder.read_json(path, "timings") if path.is_file() else {}
    timings.pop("schema_version", None)
    timings[stage] = round(elapsed, 3)
    runfolder.write_json(path, timings)
    logger.info("stage %s took %.1f s", stage, elapsed)


def read_config(run_dir: Path) -> RunConfig:
    return RunConfig.from_dict(
        runfolder.read_json(run_dir / "run_config.json", "run configuration")
    )


def read_layers(run_dir: Path) -> tuple[tuple[LayerInfo, ...], float]:
    data = runfolder.read_json(run_dir / "layers.json", "layer list (lcpaq analyze)")
    layers = tuple(LayerInfo.from_dict(item) for item in data["layers"])  # type: ignore[union-attr]
    return layers, float(data["unquantized_size_bits"])  # type: ignore[arg-type]


def _load_fp_model(config: RunConfig) -> nn.Module:
    """The run's FP32 model, as ``analyze`` loaded it."""
    analysis = config.analysis
    return load_model(
        analysis.model, analysis.checkpoint, allow_unsafe_pickle=analysis.allow_unsafe_pickle
    )


def _load_model_and_data(config: RunConfig, num_samples: int) -> tuple[nn.Module, Dataset]:
    analysis = config.analysis
    model = _load_fp_model(config)
    calib = load_dataset(
        analysis.calib,
        normalization=analysis.normalize,
        num_classes=num_classes_of(model),
        image_size=analysis.image_size,
    )
    return model, calib.subset(0, min(num_samples, len(calib)))


def _load_eval(config: RunConfig, model: nn.Module, eval_path: str) -> Dataset:
    return load_dataset(
        eval_path,
        normalization=config.analysis.normalize,
        num_classes=num_classes_of(model),
        image_size=config.analysis.image_size,
    )


# -- stage 1: analyze --------------------------------------------------------------------------


#: Artifacts derived from an analysis; a new analysis removes them so nothing stale is reported.
DOWNSTREAM_ARTIFACTS = (
    "frontiers.npz",
    "allocation.json",
    "evaluation.json",
    "onnx.json",
    "sweep.json",
    "infeasible.json",
    "report.md",
    "report.json",
    "timings.json",
)


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


def measure_sensitivity(
    config: RunConfig,
    model: nn.Module,
    layers: Sequence[LayerInfo],
    calib: Dataset,
    *,
    progress: bool = True,
) -> Measurements:
    """Everything ``analyze`` measures on calibration data: the curvature used for scoring
    (``estimator``), the Hutchinson cross-check (``hutchinson_probes`` with gauss-newton) and the
    activation sensitivity (``act_formats``).

    Under torchrun every process calls this with the same arguments: each measurement splits the
    calibration batches across the processes and reduces, in this fixed order, so every process
    gets the single-process result (bitwise for Gauss–Newton and the activation curvature; the
    Hutchinson per-probe sums are added in another order, equal to float rounding).
    """
    analysis = config.analysis
    starts = range(0, len(calib), analysis.batch_size)
    batches = [calib.inputs[start : start + analysis.batch_size] for start in starts]
    labelled = _labelled_batches(calib, analysis.batch_size)
    share = distributed.batch_share()
    start = time.perf_counter()
    if analysis.estimator == "hutchinson":
        # The exact Gauss-Newton traces are the control variate: Hutchinson estimates H - G only.
        exact_part = gauss_newton_traces(
            model,
            layers,
            batches,
            loss=analysis.loss,
            seed=analysis.seed,
            keep_diagonal=False,
            share=share,
        )
        curvature = single_layer_hutchinson_traces(
            model,
            layers,
            labelled,
            # A sampled Fisher (> 64 classes) is no exact control variate: plain Hutchinson then.
            gauss_newton=exact_part if exact_part.method == "gauss_newton" else None,
            rel_tol=analysis.hutchinson_rel_tol,
            min_probes=_hutchinson_min_probes(analysis.hutchinson_probes, len(layers)),
            max_probes_per_layer=analysis.hutchinson_probes,
            max_total_probes=analysis.hutchinson_probes,
            seed=analysis.seed,
            loss=analysis.loss,
            share=share,
            progress=progress,
        )
    else:
        curvature = gauss_newton_traces(
            model,
            layers,
            batches,
            loss=analysis.loss,
            seed=analysis.seed,
            share=share,
            progress=progress,
        )
    measured: dict[str, object] = {
        "curvature": curvature,
        "curvature_seconds": time.perf_counter() - start,
    }
    if analysis.hutchinson_probes and analysis.estimator == "gauss-newton":
        subset = calib.subset(0, min(analysis.hutchinson_samples, len(calib)))
        start = time.perf_counter()
        measured["hutchinson"] = hutchinson_traces(
            model,
            layers,
            _labelled_batches(subset, analysis.batch_size),
            max_probes=analysis.hutchinson_probes,
            min_probes=min(8, analysis.hutchinson_probes),
            rel_tol=analysis.hutchinson_rel_tol,
            seed=analysis.seed,
            loss=analysis.loss,
            share=share,
            progress=progress,
        )
        measured["hutchinson_seconds"] = time.perf_counter() - start
    if analysis.pyhessian_iters and distributed.is_main_process():
        # A cross-check, not split over processes: PyHessian runs on rank 0 alone.
        subset = calib.subset(0, min(analysis.hutchinson_samples, len(calib)))
        measured["pyhessian"] = pyhessian_check(
            model,
            layers,
            _labelled_batches(subset, analysis.batch_size),
            max_iter=analysis.pyhessian_iters,
            seed=analysis.seed,
        )
    if analysis.act_formats:
        start = time.perf_counter()
        measured["activations"] = measure_activations(
            config, model, layers, calib.inputs, progress=progress
        )
        measured["activations_seconds"] = time.perf_counter() - start
    return Measurements(**measured)  # type: ignore[arg-type]


def measure_activations(
    config: RunConfig,
    model: nn.Module,
    layers: Sequence[LayerInfo],
    inputs: torch.Tensor,
    *,
    progress: bool = False,
) -> ActivationSensitivity:
    """The activation sensitivity and calibrated ranges of ``act_formats`` on ``inputs`` (the
    curvature's images, in its batches), as ``analyze`` writes them to ``activations.npz``."""
    analysis = config.analysis
    starts = range(0, len(inputs), analysis.batch_size)
    return distributed.activation_sensitivity_distributed(
        model,
        layers,
        [inputs[start : start + analysis.batch_size] for start in starts],
        analysis.act_formats,
        loss=analysis.loss,
        clipping=analysis.act_clipping,
        seed=analysis.seed,
        progress=progress,
    )


def _analysis_inputs(config: RunConfig) -> tuple[nn.Module, Dataset, tuple[LayerInfo, ...]]:
    """The model (on this process's GPU when CUDA is available), calibration data and layers."""
    model, calib = _load_model_and_data(config, config.analysis.num_samples)
    layers = discover_layers(model, calib.inputs)
    return model.to(distributed.default_device()), calib, layers


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


def analyze(config: RunConfig, run_dir: Path, *, progress: bool = True) -> None:
    """Measure curvature and per-candidate weight errors; write the analysis artifacts.

    Under torchrun (`lcpaq.sensitivity.distributed`) every process measures a share of the calibration
    batches; only rank 0 writes the run folder.
    """
    if not distributed.is_main_process():
        model, calib, layers = _analysis_inputs(config)
        measure_sensitivity(config, model, layers, calib, progress=False)
        return
    ensure_writable(run_dir)
    for name in DOWNSTREAM_ARTIFACTS:
        (run_dir / name).unlink(missing_ok=True)
    for folder in ("quantized", "plots"):
        shutil.rmtree(run_dir / folder, ignore_errors=True)
    analysis = config.analysis
    with timed(run_dir, "analyze"):
        model, calib, layers = _analysis_inputs(config)
        weight_keys = {layer.weight_key for layer in layers}
        state = model.state_dict()
        unquantized_bits = sum(
            t.numel() * t.element_size() * 8 for key, t in state.items() if key not in weight_keys
        )
        fp32_bits = sum(t.numel() * t.element_size() * 8 for t in state.values())
        measured = measure_sensitivity(config, model, layers, calib, progress=progress)
        curvature = measured.curvature
        curvature_seconds = measured.curvature_seconds
        hutchinson_seconds = measured.hutchinson_seconds
        if measured.hutchinson is not None:
            runfolder.save_curvature(run_dir / "hutchinson.npz", measured.hutchinson)
        else:
            (run_dir / "hutchinson.npz").unlink(missing_ok=True)
        if measured.pyhessian is not None:
            runfolder.write_json(run_dir / "pyhessian.json", measured.pyhessian.to_dict())
        else:
            (run_dir / "pyhessian.json").unlink(missing_ok=True)
        if measured.activations is not None:
            save_activation_sensitivity(run_dir / "activations.npz", measured.activations)
        else:
            (run_dir / "activations.npz").unlink(missing_ok=True)
        start = time.perf_counter()
        input_hessians = layer_input_hessians(config, model, layers, calib.inputs)
        input_hessians_seconds = time.perf_counter() - start if input_hessians else None
        if input_hessians is not None:
            runfolder.save_tensors(run_dir / INPUT_HESSIANS_FILE, input_hessians)
        else:
            (run_dir / INPUT_HESSIANS_FILE).unlink(missing_ok=True)
        table = measure_candidates(
            model,
            layers,
            analysis.formats,
            analysis.scheme,
            curvature.diagonal,
            activation_formats=analysis.act_formats,
            input_hessians=input_hessians,
        )
        interactions_seconds = analyze_interactions(
            config, model, layers, run_dir, progress, input_hessians
        )
        checkpoint_sha = file_sha256(Path(analysis.checkpoint)) if analysis.checkpoint else None
        runfolder.write_json(run_dir / "run_config.json", config.to_dict())
        runfolder.write_json(
            run_dir / "layers.json",
            {
                "model": analysis.model,
                "checkpoint_sha256": checkpoint_sha,
                "fp32_size_bits": fp32_bits,
                "unquantized_size_bits": unquantized_bits,
                "curvature_seconds": curvature_seconds,
                "hutchinson_seconds": hutchinson_seconds,
                "activations_seconds": measured.activations_seconds,
                "interactions_seconds": interactions_seconds,
                "input_hessians_seconds": input_hessians_seconds,
                "layers": [layer.to_dict() for layer in layers],
            },
        )
        runfolder.save_curvature(run_dir / "curvature.npz", curvature)
        runfolder.save_candidates(run_dir / "candidates.npz", table)
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
    analysis = config.analysis
    path = run_dir / "interactions.npz"
    if analysis.pairwise == "none":
        path.unlink(missing_ok=True)
        return None
    formats = pair_formats(analysis.formats, analysis.pair_max_bits)
    if not formats:
        raise InputError(
            f"--pair-max-bits {analysis.pair_max_bits} leaves none of the formats "
            f"{', '.join(analysis.formats)} for inter-layer terms"
        )
    names = [layer.name for layer in layers]
    pairs = select_pairs(len(layers), analysis.pair_rule, analysis.pair_window, names)
    _, data = _load_model_and_data(config, analysis.pair_samples)
    if analysis.pairwise == "hessian" and len(data) <= analysis.batch_size:
        # Its standard errors are over batches; the significance filter needs them.
        raise InputError(
            f"--pairwise hessian needs at least two batches for its standard errors: "
            f"{len(data)} pair samples with --batch-size {analysis.batch_size}"
        )
    start = time.perf_counter()
    logger.info(
        "inter-layer terms (%s): %d pairs x %d formats on %d samples",
        analysis.pairwise,
        len(pairs),
        len(formats),
        len(data),
    )
    terms = compute_interactions(
        model,
        layers,
        data.inputs,
        data.labels if analysis.pairwise == "hessian" or analysis.pair_loss != "kl" else None,
        formats,
        source=analysis.pairwise,
        pairs=pairs,
        scheme=analysis.scheme,
        batch_size=analysis.batch_size,
        curvature_loss=analysis.loss,
        forward_loss=analysis.pair_loss,
        input_hessians=input_hessians,
    )
    save_interactions(path, terms)
    return time.perf_counter() - start


def load_pairwise(
    run_dir: Path,
    table: CandidateTable,
    scores: np.ndarray,
    *,
    weight: float = 1.0,
    z: float = 2.0,
    clip: PairClip = "none",
) -> tuple[np.ndarray, dict[tuple[int, int], np.ndarray]]:
    """The ILP's scores and pairwise terms from ``interactions.npz`` (none if absent or λ = 0)."""
    path = run_dir / "interactions.npz"
    if weight == 0 or not path.is_file():
        return scores, {}
    terms = load_interactions(path)
    cross, stderr = align_terms(terms, table.layer_names, table.weight_formats)
    return prepare_pairwise(scores, cross, stderr, weight=weight, z=z, clip=clip)


# -- stage 2: allocate -------------------------------------------------------------------------


def activation_term(run_dir: Path, table: CandidateTable, scorer: str) -> np.ndarray:
    """[L, C] activation part of every candidate's score: ``activations.npz`` (measured by
    ``analyze --act-formats``) through `lcpaq.sensitivity.activation.activation_scores` (``diagonal`` for the
    diagonal weight scorer, ``trace`` otherwise). Zero for an unpaired table (its 8-bit activations
    are only a cost assumption), without the file, and for formats it did not measure."""
    path = run_dir / "activations.npz"
    if not table.paired or not path.is_file():
        return np.zeros(table.error_sq.shape)
    sensitivity = load_activation_sensitivity(path)
    if tuple(sensitivity.layer_names) != tuple(table.layer_names):
        raise InputError(f"{path} lists other layers than candidates.npz: run lcpaq analyze again")
    values = activation_scores(sensitivity, "diagonal" if scorer == "diagonal" else "trace")
    by_format = {name: values[:, k] for k, name in enumerate(sensitivity.format_names)}
    return activation_score_matrix(table, by_format)


def candidate_costs(
    run_dir: Path, table: CandidateTable, latency_table: str | None = None
) -> CostModel:
    """Every cost metric of a candidate table of this run (the ILP's table, or baselines)."""
    layers, unquantized_bits = read_layers(run_dir)
    return build_cost_model(
        table,
        constant_size_bits=unquantized_bits,
        fp32_size_bits=float(
            runfolder.read_json(run_dir / "layers.json", "layer list")["fp32_size_bits"]  # type: ignore[arg-type]
        ),
        macs_per_sample=np.array([layer.macs_per_sample for layer in layers], dtype=float),
        weight_shapes=[layer.weight_shape for layer in layers],
        weight_sign_bits=table.weight_sign_bits(read_config(run_dir).analysis.scheme.symmetric),
        latency_table=load_latency_table(latency_table) if latency_table else None,
    )


def build_problem(
    run_dir: Path,
    first_last: FirstLastPolicy,
    scorer: str,
    *,
    ties: Sequence[Sequence[str]] = (),
    tie_rule: str = "none",
    latency_table: str | None = None,
    pairwise_weight: float = 1.0,
    pair_z: float = 2.0,
    pair_clip: PairClip = "none",
    pairwise_mode: PairwiseMode = "augmented",
) -> tuple[AllocationProblem | AugmentedProblem, CandidateTable, np.ndarray, np.ndarray]:
    """The ILP for a run folder: scores, Pareto mask, costs, ties and the first/last-layer policy,
    plus the inter-layer terms of ``interactions.npz`` if present (`load_pairwise`)."""
    layers, unquantized_bits = read_layers(run_dir)
    table = runfolder.load_candidates(run_dir / "candidates.npz")
    curvature = runfolder.load_curvature(run_dir / "curvature.npz")
    scores = score_candidates(table, curvature.clamped_trace(), scorer)
    scores = scores + activation_term(run_dir, table, scorer)
    scores, pairwise = load_pairwise(
        run_dir, table, scores, weight=pairwise_weight, z=pair_z, clip=pair_clip
    )
    kept = build_frontiers(table, scores)
    fixed: dict[str, str] = {}
    if first_last == "keep-8bit":
        if HIGH_FORMAT not in table.weight_formats:
            raise InputError(
                f"--first-last keep-8bit needs {HIGH_FORMAT} among the analysed formats"
            )
        # With (weight, activation) pairs: 8-bit weights with the widest activation format.
        high = table.format_names[table.candidate_index(HIGH_FORMAT)]
        fixed = {layers[0].name: high, layers[-1].name: high}
    elif first_last != "search":
        raise InputError(f"--first-last must be 'search' or 'keep-8bit', got {first_last!r}")
    # The problem prunes by the safe rule over every cost dimension, ties included (METHOD §3).
    allowed = allowed_candidates(table, np.ones_like(kept), fixed)
    costs = candidate_costs(run_dir, table, latency_table)
    groups = [*ties, *tie_rule_groups(table.layer_names, tie_rule)]

    def make_problem(
        values: np.ndarray, pairs: dict[tuple[int, int], np.ndarray] | None = None
    ) -> AllocationProblem:
        return AllocationProblem(
            table,
            values,
            allowed,
            constant_size_bits=unquantized_bits,
            costs=costs,
            ties=groups,
            pairwise=pairs,
        )

    if pairwise and pairwise_mode == "augmented":
        return AugmentedProblem(make_problem, scores, pairwise), table, scores, kept
    return make_problem(scores, pairwise), table, scores, kept


def allocate(
    run_dir: Path,
    budgets: Sequence[Budget],
    *,
    first_last: FirstLastPolicy = "search",
    scorer: str = "hawq_v2",
    ties: Sequence[Sequence[str]] = (),
    tie_rule: str = "none",
    latency_table: str | None = None,
    pairwise_weight: float = 1.0,
    pair_z: float = 2.0,
    pair_clip: PairClip = "none",
    pairwise_mode: PairwiseMode = "augmented",
    cost_weights: Mapping[str, float] | None = None,
) -> Allocation:
    """Solve the ILP under ``budgets`` and write ``frontiers.npz`` and ``allocation.json``.

    ``pairwise_*``/``pair_*``: how the inter-layer terms enter (`AllocationConfig`, `load_pairwise`).
    ``cost_weights``: {metric: λ ≥ 0}, the objective adds Σ λ·cost/budget
    (`AllocationProblem.solve`; recorded in ``allocation.json``).
    """
    if not budgets:
        raise InputError("give at least one --budget, e.g. --budget avg-bits=3")
    pair_options = {
        "pairwise_weight": pairwise_weight,
        "pair_z": pair_z,
        "pair_clip": pair_clip,
        "pairwise_mode": pairwise_mode,
    }
    with timed(run_dir, "allocate"):
        problem, table, scores, kept = build_problem(
            run_dir,
            first_last,
            scorer,
            ties=ties,
            tie_rule=tie_rule,
            latency_table=latency_table,
            **pair_options,  # type: ignore[arg-type]
        )
        if cost_weights and isinstance(problem, AugmentedProblem):
            raise InputError(
                "cost weights are not supported with pairwise_mode 'augmented' (the default when "
                "interactions.npz exists); use --pairwise-mode ilp or --pairwise-weight 0"
            )
        try:
            allocation = (
                problem.solve(budgets, cost_weights=cost_weights)
                if cost_weights
                else problem.solve(budgets)
            )
        except InputError as error:
            # Keep the reason next to the run: the report explains which budgets conflict.
            with contextlib.suppress(InputError):
                explanation = infeasibility_report(problem, budgets, error)
                runfolder.write_json(run_dir / "infeasible.json", explanation)
            raise
        (run_dir / "infeasible.json").unlink(missing_ok=True)
        budget_rows = budget_table(problem, budgets, allocation, cost_weights)
        runfolder.write_npz(
            run_dir / "frontiers.npz", {"scores": scores, "kept": kept, "allowed": problem.allowed}
        )
        runfolder.write_json(
            run_dir / "allocation.json",
            {
                "first_last": first_last,
                "scorer": scorer,
                "ties": [list(group) for group in ties],
                "tie_rule": tie_rule,
                "latency_table": latency_table,
                "pairwise": {
                    **pair_options,
                    "pairs_used": len(problem.pairwise),
                    "terms_used": int(sum(np.count_nonzero(c) for c in problem.pairwise.values())),
                },
                **allocation.to_dict(),
                "budget_table": budget_rows,
            },
        )
    logger.info(
        "allocated %.3f average bits, %.4f MB, predicted loss increase %.4g (%s, %.3f s)",
        allocation.average_bits,
        allocation.size_bytes / 1e6,
        allocation.predicted_loss_increase,
        allocation.status,
        allocation.solve_time_s,
    )
    return allocation


def pair_options_of(allocation_data: dict[str, object]) -> dict[str, object]:
    """The pairwise options an allocation used (defaults for files written before they existed)."""
    stored = allocation_data.get("pairwise") or {}
    defaults = AllocationConfig()
    return {
        name: stored.get(name, getattr(defaults, name))  # type: ignore[union-attr]
        for name in ("pairwise_weight", "pair_z", "pair_clip", "pairwise_mode")
    }


def read_allocation(run_dir: Path) -> tuple[Allocation, dict[str, object]]:
    data = runfolder.read_json(run_dir / "allocation.json", "allocation (lcpaq allocate)")
    return Allocation.from_dict(data), data


# -- stage 3: export ---------------------------------------------------------------------------


def weight_assignment(layer_names: Sequence[str], candidates: Sequence[str]) -> dict[str, str]:
    """Layer → weight format of its chosen candidate (``int4/fp8_e4m3`` → ``int4``)."""
    return {name: weight_format_of(candidate) for name, candidate in zip(layer_names, candidates)}


def layer_input_hessians(
    config: RunConfig, model: nn.Module, layers: Sequence[LayerInfo], inputs: torch.Tensor
) -> dict[str, torch.Tensor] | None:
    """Input second moments of every layer on ``inputs`` (the curvature's calibration images)
    when the scheme rounds with GPTQ; None for round-to-nearest, which needs no data."""
    if config.analysis.scheme.rounding != "gptq":
        return None
    names = [layer.name for layer in layers]
    return collect_input_hessians(model, names, inputs, batch_size=config.analysis.batch_size)


def read_input_hessians(run_dir: Path, config: RunConfig) -> dict[str, torch.Tensor] | None:
    """``input_hessians.safetensors`` of an analysed run with ``--rounding gptq``, else None."""
    if config.analysis.scheme.rounding != "gptq":
        return None
    return runfolder.load_tensors(run_dir / INPUT_HESSIANS_FILE, "input Hessians (analyze)")


def paired_activation_formats(
    layer_names: Sequence[str], candidates: Sequence[str]
) -> dict[str, str]:
    """Layer → activation format quantized at inference: the activation half of each paired
    candidate other than fp32. Unpaired candidates (no ``--act-formats``) keep FP32 activations."""
    formats = {
        name: activation_format_of(candidate)
        for name, candidate in zip(layer_names, candidates)
        if PAIR_SEPARATOR in candidate
    }
    return {name: format_name for name, format_name in formats.items() if format_name != "fp32"}


def activation_quantizers_of(
    run_dir: Path,
    layer_names: Sequence[str],
    candidates: Sequence[str],
    sensitivity: ActivationSensitivity | None = None,
) -> dict[str, ActivationQuantizer]:
    """The input quantizer of every layer `paired_activation_formats` names, with the range
    ``analyze --act-formats`` calibrated (``activations.npz``, unless ``sensitivity`` is that
    file already read)."""
    formats = paired_activation_formats(layer_names, candidates)
    if not formats:
        return {}
    if sensitivity is None:
        sensitivity = load_activation_sensitivity(run_dir / "activations.npz")
    return activation_quantizers(sensitivity, formats)


def quantize_and_recover(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    assignment: dict[str, str],
    config: RunConfig,
    correction_inputs: torch.Tensor | None,
    reference: object | None = None,
    input_hessians: Mapping[str, torch.Tensor] | None = None,
    activation_quantizers: Mapping[str, ActivationQuantizer] | None = None,
) -> tuple[nn.Module, dict]:
    """The quantized model (weights to ``assignment``, inputs through ``activation_quantizers``)
    with its BN statistics corrected on ``correction_inputs``: the correction sees the
    quantized activations, so it also removes the mean shift their rounding causes."""
    quantized_model, codes = quantize_model(
        model, layers, assignment, config.analysis.scheme, input_hessians
    )
    attach_activation_quantizers(quantized_model, activation_quantizers or {})
    if config.recovery.enabled and correction_inputs is not None:
        correct_statistics(
            model, quantized_model, correction_inputs, list(assignment), reference=reference
        )
    return quantized_model, codes


def export(run_dir: Path, *, out_dir: Path | None = None) -> Path:
    """Quantize to the allocation, correct statistics, write the quantized checkpoint."""
    config = read_config(run_dir)
    layers, _ = read_layers(run_dir)
    allocation, allocation_data = read_allocation(run_dir)
    out_dir = out_dir or run_dir / "quantized"
    with timed(run_dir, "export"):
        model, calib = _load_model_and_data(config, config.recovery.num_samples)
        assignment = weight_assignment(allocation.layer_names, allocation.formats)
        input_quantizers = activation_quantizers_of(
            run_dir, allocation.layer_names, allocation.formats
        )
        quantized_model, codes = quantize_and_recover(
            model,
            layers,
            assignment,
            config,
            calib.inputs,
            input_hessians=read_input_hessians(run_dir, config),
            activation_quantizers=input_quantizers,
        )
        layer_data = runfolder.read_json(run_dir / "layers.json", "layer list")
        manifest_extra = {
            "model": config.analysis.model,
            "source_checkpoint": config.analysis.checkpoint,
            "source_sha256": layer_data["checkpoint_sha256"],
            "budget": [str(Budget(use.metric, use.limit)) for use in allocation.budgets],
            "first_last": allocation_data["first_last"],
            "scheme": config.analysis.scheme.to_dict(),
            "recovery": {
                "statistics_correction": config.recovery.enabled,
                "num_samples": min(config.recovery.num_samples, len(calib)),
            },
            "totals": {
                "average_bits": allocation.average_bits,
                "size_bytes": allocation.size_bytes,
                "fp32_size_bytes": float(layer_data["fp32_size_bits"]) / 8,  # type: ignore[arg-type]
                "quantized_params": int(sum(layer.num_params for layer in layers)),
            },
        }
        path = write_quantized_checkpoint(
            out_dir,
            quantized_model.state_dict(),
            layers,
            codes,
            manifest_extra,
            config.analysis.scheme,
            activation_formats={
                name: activation_format_of(candidate)
                for name, candidate in zip(allocation.layer_names, allocation.formats)
            },
            activation_quantizers=input_quantizers,
        )
    logger.info("wrote quantized checkpoint %s", path)
    return path


# -- stage 4: evaluate -------------------------------------------------------------------------


def evaluate(
    run_dir: Path, eval_path: str, *, quantized_dir: Path | None = None
) -> dict[str, object]:
    """Top-1 of the FP32 model and of the exported checkpoint, read back from disk, paired."""
    config = read_config(run_dir)
    quantized_dir = quantized_dir or run_dir / "quantized"
    with timed(run_dir, "evaluate"):
        fp_model = _load_fp_model(config)
        dataset = _load_eval(config, fp_model, eval_path)
        # Build the architecture from the FP32 state dict (depth inference), then load the
        # exported codes: the figure is for the file a user ships, not an in-memory model.
        skeleton = build_model(config.analysis.model, fp_model.state_dict())
        quantized_model = load_quantized(quantized_dir, skeleton)
        input_quantizers = manifest_activation_quantizers(
            read_manifest(quantized_dir), quantized_dir / "manifest.json"
        )
        fp_accuracy = evaluate_accuracy(fp_model, dataset)
        q_accuracy = evaluate_accuracy(quantized_model, dataset)
        difference, difference_se = paired_difference(q_accuracy, fp_accuracy)
        result = {
            "eval_data": eval_path,
            "fp32": fp_accuracy.to_dict(),
            "quantized": q_accuracy.to_dict(),
            "paired_difference": difference,
            "paired_difference_stderr": difference_se,
            # Layers whose inputs the evaluated checkpoint quantizes, per activation format.
            "quantized_inputs": dict(
                Counter(quantizer.format_name for quantizer in input_quantizers.values())
            ),
        }
        runfolder.write_json(run_dir / "evaluation.json", result)
    logger.info(
        "top-1: FP32 %.2f %%, quantized %.2f %% (paired difference %+.2f ± %.2f points)",
        100 * fp_accuracy.top1,
        100 * q_accuracy.top1,
        100 * difference,
        100 * difference_se,
    )
    return result


def export_onnx(
    run_dir: Path,
    *,
    quantized_dir: Path | None = None,
    out_path: Path | None = None,
    check_path: str | None = None,
    check_images: int = 1024,
) -> dict[str, object]:
    """The exported checkpoint as an ONNX QDQ model (default ``RUN/quantized/model.onnx``), run in
    ONNX Runtime next to PyTorch on ``check_images`` images of ``check_path`` (labelled data:
    top-1 of both too) or, without it, of the calibration data; the check goes to ``onnx.json``."""
    from lcpaq.quant.onnx_qdq import check_onnx, export_onnx

    if check_images < 1:
        raise InputError(f"--images must be at least 1, got {check_images}")
    config = read_config(run_dir)
    quantized_dir = quantized_dir or run_dir / "quantized"
    out_path = out_path or quantized_dir / "model.onnx"
    with timed(run_dir, "onnx"):
        fp_model = _load_fp_model(config)
        data = _load_eval(config, fp_model, check_path or config.analysis.calib)
        data = data.subset(0, min(check_images, len(data)))
        skeleton = build_model(config.analysis.model, fp_model.state_dict())
        export_onnx(skeleton, quantized_dir, out_path, data.inputs[:2])  # loads the weights
        # ... so PyTorch's side of the check is `load_quantized`'s model without a second read.
        quantizers = manifest_activation_quantizers(
            read_manifest(quantized_dir), quantized_dir / "manifest.json"
        )
        attach_activation_quantizers(skeleton, quantizers)
        check = check_onnx(out_path, skeleton, data.inputs, data.labels if check_path else None)
        result = {
            "onnx": str(out_path),
            "file_bytes": out_path.stat().st_size,
            "quantized": str(quantized_dir),
            "check_data": check_path or config.analysis.calib,
            **check.to_dict(),
        }
        runfolder.write_json(run_dir / "onnx.json", result)
    logger.info(
        "wrote %s; ONNX Runtime vs PyTorch on %d images: top-1 agreement %.2f %%, "
        "max |logit difference| %.2g",
        out_path,
        check.images,
        100 * check.top1_agreement,
        check.max_abs_logit_difference,
    )
    return result


# -- stage 5: sweep ----------------------------------------------------------------------------


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
    layers, _ = read_layers(run_dir)
    allocation, allocation_data = read_allocation(run_dir)
    fixed = [Budget(use.metric, use.limit) for use in allocation.budgets]
    metrics = list(dict.fromkeys(metrics or [budget.metric for budget in fixed] or ["avg-bits"]))
    first_last = str(allocation_data["first_last"])
    with timed(run_dir, "sweep"):
        problem, table, scores, _ = build_problem(
            run_dir,
            first_last,  # type: ignore[arg-type]
            str(allocation_data["scorer"]),
            ties=allocation_data.get("ties", []),  # type: ignore[arg-type]
            tie_rule=str(allocation_data.get("tie_rule", "none")),
            latency_table=allocation_data.get("latency_table"),  # type: ignore[arg-type]
            **pair_options_of(allocation_data),
        )
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
        uniform = uniform_points(problem, table)
        model: nn.Module | None = None
        missing = [name for name in BASELINE_FORMATS if name not in table.weight_formats]
        if missing:
            model = _load_model_and_data(config, 1)[0]
            uniform += baseline_points(
                run_dir,
                model,
                table,
                missing,
                str(allocation_data["scorer"]),
                allocation_data.get("latency_table"),  # type: ignore[arg-type]
            )
        if eval_path is not None:
            model, calib = _load_model_and_data(config, config.recovery.num_samples)
            dataset = _load_eval(config, model, eval_path)
            names = [layer.name for layer in layers]
            reference = (
                collect_reference_stats(model, calib.inputs, names)
                if config.recovery.enabled
                else None
            )
            input_hessians = read_input_hessians(run_dir, config)
            # Read once for every measured point (their input ranges).
            ranges_path = run_dir / "activations.npz"
            sensitivity = (
                load_activation_sensitivity(ranges_path)
                if table.paired and ranges_path.is_file()
                else None
            )

            def measure(candidates: Sequence[str]) -> float:
                quantized_model, _ = quantize_and_recover(
                    model,
                    layers,
                    weight_assignment(table.layer_names, candidates),
                    config,
                    calib.inputs,
                    reference,
                    input_hessians,
                    activation_quantizers_of(run_dir, table.layer_names, candidates, sensitivity),
                )
                return evaluate_accuracy(quantized_model, dataset).top1

            everything = [point for curve in curves.values() for point in curve] + uniform
            seen: dict[tuple[str, ...], float] = {}
            for point in tqdm(everything, desc="measuring", disable=not progress, unit="point"):
                candidates = point.get("formats") or [point["format"]] * len(layers)
                key = tuple(candidates)
                if key not in seen:
                    seen[key] = measure(candidates)
                point["top1"] = seen[key]
        result = {
            "first_last": first_last,
            "eval_data": eval_path,
            "metrics": metrics,
            "fixed_budgets": [str(budget) for budget in fixed],
            "curves": curves,
            "points": curves[metrics[0]],
            "uniform": uniform,
        }
        runfolder.write_json(run_dir / "sweep.json", result)
    return result


def baseline_points(
    run_dir: Path,
    model: nn.Module,
    table: CandidateTable,
    formats: Sequence[str],
    scorer: str,
    latency_table: str | None,
) -> list[dict[str, object]]:
    """Uniform baselines of weight formats outside the candidate set, measured on the model with
    the run's scheme and scored by the run's scorer (no pairwise terms). In a paired table the
    activation format is the weight format itself (W8A8, W4A4, FP8/FP8)."""
    layers, _ = read_layers(run_dir)
    curvature = runfolder.load_curvature(run_dir / "curvature.npz")
    config = read_config(run_dir)
    extra = measure_candidates(
        model,
        layers,
        formats,
        config.analysis.scheme,
        curvature.diagonal,
        input_hessians=read_input_hessians(run_dir, config),
    )
    if table.paired:
        extra = assign_activations(extra, formats)
    extra_scores = score_candidates(extra, curvature.clamped_trace(), scorer)
    extra_scores = extra_scores + activation_term(run_dir, extra, scorer)
    try:
        costs = candidate_costs(run_dir, extra, latency_table)
    except InputError:  # the measured latency table has no entry for a baseline format
        costs = candidate_costs(run_dir, extra, None)
        costs = dataclasses.replace(
            costs,
            coefficients={k: v for k, v in costs.coefficients.items() if k != "latency-ms"},
        )
    return extra_uniform_points(extra, costs, extra_scores)


# -- stage 6: plots and report -----------------------------------------------------------------


def plot(run_dir: Path) -> list[Path]:
    """Per-layer frontiers (INT and FP markers), the layer × candidate heatmap, the bit
    allocation and, if swept, one model-level curve per swept budget metric, as PNGs."""
    from lcpaq.stages import plot as plots

    with timed(run_dir, "plot"):
        layers, _ = read_layers(run_dir)
        table = runfolder.load_candidates(run_dir / "candidates.npz")
        curvature = runfolder.load_curvature(run_dir / "curvature.npz")
        frontiers = runfolder.read_npz(run_dir / "frontiers.npz", "frontiers (lcpaq allocate)")
        allocation, allocation_data = read_allocation(run_dir)
        model_name = str(runfolder.read_json(run_dir / "layers.json", "layer list")["model"])
        budget_text = ", ".join(str(Budget(use.metric, use.limit)) for use in allocation.budgets)
        title = f"{model_name} — budget {budget_text}"
        # A candidate is on its layer's frontier when no other is cheaper or equal in every cost
        # metric and no worse in score (pairs differ in BitOps only, so weight bits are not enough).
        costs = candidate_costs(
            run_dir,
            table,
            allocation_data.get("latency_table"),  # type: ignore[arg-type]
        )
        stacked = np.stack([costs.coefficients[m] for m in costs.metrics], axis=-1)
        kept = np.array(
            [pareto_mask(stacked[row], frontiers["scores"][row]) for row in range(len(layers))]
        )
        paths = [
            plots.plot_layer_frontiers(
                run_dir / "plots" / "frontiers.png",
                layer_names=table.layer_names,
                format_names=table.format_names,
                bits=table.bits,
                scores=frontiers["scores"],
                kept=kept,
                chosen=allocation.formats,
                title=f"Per-layer Pareto frontiers ({allocation_data['scorer']} score): {title}",
                kinds=[get_format(name).kind for name in table.weight_formats],
                activation_formats=table.activation_formats if table.paired else None,
            ),
            plots.plot_candidate_heatmap(
                run_dir / "plots" / "candidate_heatmap.png",
                layer_names=table.layer_names,
                format_names=table.format_names,
                values=frontiers["scores"],
                chosen=allocation.formats,
                allowed=frontiers["allowed"],
                title=f"Predicted loss increase per layer and candidate: {title}",
            ),
            plots.plot_bit_allocation(
                run_dir / "plots" / "bit_allocation.png",
                layer_names=allocation.layer_names,
                bits=allocation.bits,
                num_params=table.num_params,
                trace=curvature.trace,
                trace_stderr=curvature.trace_stderr,
                title=f"Chosen weight bits per layer: {title}",
            ),
        ]
        if (run_dir / "sweep.json").is_file():
            sweep_data = runfolder.read_json(run_dir / "sweep.json", "sweep")
            evaluation = (
                runfolder.read_json(run_dir / "evaluation.json", "evaluation")
                if (run_dir / "evaluation.json").is_file()
                else None
            )
            chosen = {
                "avg_bits": allocation.average_bits,
                "costs": allocation.costs,
                "predicted_loss_increase": allocation.predicted_loss_increase,
                "top1": evaluation["quantized"]["top1"] if evaluation else None,  # type: ignore[index]
            }
            curves = sweep_data.get("curves") or {"avg-bits": sweep_data["points"]}
            fixed = ", ".join(sweep_data.get("fixed_budgets", []))  # type: ignore[arg-type]
            # The first swept metric keeps the old file name; others get their own file.
            for number, (metric, points) in enumerate(curves.items()):  # type: ignore[union-attr]
                others = ", ".join(b for b in fixed.split(", ") if b and not b.startswith(metric))
                paths.append(
                    plots.plot_model_curve(
                        run_dir
                        / "plots"
                        / ("model_curve.png" if number == 0 else f"model_curve_{metric}.png"),
                        sweep=points,
                        uniform=sweep_data["uniform"],  # type: ignore[arg-type]
                        chosen=chosen,
                        fp32_top1=evaluation["fp32"]["top1"] if evaluation else None,  # type: ignore[index]
                        title=f"Model-level Pareto curve over {metric}"
                        + (f" (held: {others})" if others else "")
                        + f": {model_name}",
                        metric=metric,
                    )
                )
        if (run_dir / "interactions.npz").is_file():
            paths.append(_plot_interactions(run_dir, allocation, allocation_data, model_name))
    return paths


def _plot_interactions(
    run_dir: Path, allocation: Allocation, allocation_data: dict[str, object], model_name: str
) -> Path:
    """``plots/interactions.png``: the largest term of every pair and the term at the choice."""
    from lcpaq.stages import plot as plots

    terms = load_interactions(run_dir / "interactions.npz")
    z = float(pair_options_of(allocation_data)["pair_z"])  # type: ignore[arg-type]
    chosen = [weight_format_of(name) for name in allocation.formats]
    views = pair_views(terms, chosen, z)
    return plots.plot_interaction_heatmap(
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


def report(run_dir: Path) -> Path:
    from lcpaq.stages.report import write_report

    return write_report(run_dir)
