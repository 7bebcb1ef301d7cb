"""The ``allocate`` stage: every candidate's score, the cost model and the inter-layer terms of an
analysis, the ILP under the budgets (`lcpaq.allocation.build.build_problem`), and its solution.

`ProblemData` holds what the problem is built from, taken from an in-memory
`lcpaq.stages.analyze.Analysis` or read from the run folder (``layers.json``, ``candidates.npz``,
``curvature.npz``, ``activations.npz``, ``interactions.npz``); `allocate_data` solves it;
`allocate` is the run-folder wrapper that writes ``frontiers.npz`` and ``allocation.json`` (or
``infeasible.json``). The next stage is ``export``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lcpaq import runfolder
from lcpaq.allocation.budgets import Budget
from lcpaq.allocation.build import build_problem
from lcpaq.allocation.costs import CostModel, build_cost_model, load_latency_table
from lcpaq.allocation.curves import budget_table
from lcpaq.allocation.diagnose import infeasibility_report
from lcpaq.allocation.frontier import score_candidates
from lcpaq.allocation.pairwise import (
    DEFAULT_PAIR_CLIP,
    DEFAULT_PAIR_Z,
    DEFAULT_PAIRWISE_MODE,
    DEFAULT_PAIRWISE_WEIGHT,
    AugmentedProblem,
    PairClip,
    PairwiseMode,
    align_terms,
    prepare_pairwise,
)
from lcpaq.allocation.problem import AllocationProblem
from lcpaq.allocation.result import Allocation
from lcpaq.allocation.table import CandidateTable, activation_score_matrix, weight_format_of
from lcpaq.config import FirstLastPolicy
from lcpaq.errors import InputError
from lcpaq.model.graph import LayerInfo
from lcpaq.sensitivity.activation import ActivationSensitivity, activation_scores
from lcpaq.sensitivity.activation_file import load_activation_sensitivity
from lcpaq.sensitivity.curvature import CurvatureEstimate
from lcpaq.sensitivity.interaction_terms import InteractionTerms, load_interactions
from lcpaq.stages.folder import read_config, read_layers, read_layers_file, timed

if TYPE_CHECKING:
    from lcpaq.stages.analyze import Analysis

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProblemData:
    """What the allocation problem of one analysis is built from: its layers, sizes in bits,
    candidate table and curvature, the activation sensitivity (paired tables; None otherwise),
    the inter-layer terms (None when not measured or not used) and whether the scheme is
    symmetric (the cost of a weight's sign bit). ``source``: where it came from, for messages."""

    layers: tuple[LayerInfo, ...]
    unquantized_size_bits: float
    fp32_size_bits: float
    table: CandidateTable
    curvature: CurvatureEstimate
    activations: ActivationSensitivity | None
    interactions: InteractionTerms | None
    symmetric: bool
    source: str = "the analysis"

    @classmethod
    def of_analysis(cls, analysis: Analysis, symmetric: bool) -> ProblemData:
        measured = analysis.measurements
        return cls(
            analysis.layers,
            float(analysis.unquantized_size_bits),
            float(analysis.fp32_size_bits),
            analysis.candidates,
            measured.curvature,
            measured.activations if analysis.candidates.paired else None,
            analysis.interactions,
            symmetric,
        )


def read_problem_data(run_dir: Path, *, pairwise_weight: float = 1.0) -> ProblemData:
    """`ProblemData` of an analysed run folder (its inter-layer terms only when they enter,
    ``pairwise_weight`` ≠ 0; its activation sensitivity only for a paired table)."""
    layers, unquantized_bits = read_layers(run_dir)
    table = runfolder.load_candidates(run_dir / "candidates.npz")
    activations_path = run_dir / "activations.npz"
    interactions_path = run_dir / "interactions.npz"
    return ProblemData(
        layers,
        unquantized_bits,
        float(read_layers_file(run_dir, "layer list")["fp32_size_bits"]),
        table,
        runfolder.load_curvature(run_dir / "curvature.npz"),
        load_activation_sensitivity(activations_path)
        if table.paired and activations_path.is_file()
        else None,
        load_interactions(interactions_path)
        if pairwise_weight != 0 and interactions_path.is_file()
        else None,
        read_config(run_dir).analysis.scheme.symmetric,
        source=str(activations_path),
    )


def activation_term_of(
    sensitivity: ActivationSensitivity | None, table: CandidateTable, scorer: str, where: str
) -> np.ndarray:
    """[L, C] activation part of every candidate's score: the activation sensitivity through
    `lcpaq.sensitivity.activation.activation_scores` (``diagonal`` for the diagonal weight scorer,
    ``trace`` otherwise). Zero for an unpaired table (its 8-bit activations are only a cost
    assumption), without a measurement, and for formats it did not measure."""
    if not table.paired or sensitivity is None:
        return np.zeros(table.error_sq.shape)
    if tuple(sensitivity.layer_names) != tuple(table.layer_names):
        raise InputError(f"{where} lists other layers than candidates.npz: run lcpaq analyze again")
    values = activation_scores(sensitivity, "diagonal" if scorer == "diagonal" else "trace")
    by_format = {name: values[:, k] for k, name in enumerate(sensitivity.format_names)}
    return activation_score_matrix(table, by_format)


def activation_term(run_dir: Path, table: CandidateTable, scorer: str) -> np.ndarray:
    """`activation_term_of` the run's ``activations.npz`` (measured by ``analyze --act-formats``)."""
    path = run_dir / "activations.npz"
    if not table.paired or not path.is_file():
        return np.zeros(table.error_sq.shape)
    return activation_term_of(load_activation_sensitivity(path), table, scorer, str(path))


def cost_model(data: ProblemData, table: CandidateTable, latency_table: str | None) -> CostModel:
    """Every cost metric of a candidate table of this analysis (the ILP's table, or baselines)."""
    return build_cost_model(
        table,
        constant_size_bits=data.unquantized_size_bits,
        fp32_size_bits=data.fp32_size_bits,
        macs_per_sample=np.array([layer.macs_per_sample for layer in data.layers], dtype=float),
        weight_shapes=[layer.weight_shape for layer in data.layers],
        weight_sign_bits=table.weight_sign_bits(data.symmetric),
        latency_table=load_latency_table(latency_table) if latency_table else None,
    )


def candidate_costs(
    run_dir: Path, table: CandidateTable, latency_table: str | None = None
) -> CostModel:
    """Every cost metric of a candidate table of this run (the ILP's table, or baselines)."""
    return cost_model(read_problem_data(run_dir, pairwise_weight=0), table, latency_table)


def pairwise_scores(
    terms: InteractionTerms | None,
    table: CandidateTable,
    scores: np.ndarray,
    *,
    weight: float = DEFAULT_PAIRWISE_WEIGHT,
    z: float = DEFAULT_PAIR_Z,
    clip: PairClip = DEFAULT_PAIR_CLIP,
) -> tuple[np.ndarray, dict[tuple[int, int], np.ndarray]]:
    """The ILP's scores and pairwise terms (none without terms or with λ = 0)."""
    if weight == 0 or terms is None:
        return scores, {}
    cross, stderr = align_terms(terms, table.layer_names, table.weight_formats)
    return prepare_pairwise(scores, cross, stderr, weight=weight, z=z, clip=clip)


def problem_of(
    data: ProblemData,
    *,
    first_last: FirstLastPolicy | str = "search",
    scorer: str = "hawq_v2",
    ties: Sequence[Sequence[str]] = (),
    tie_rule: str = "none",
    latency_table: str | None = None,
    pairwise_weight: float = DEFAULT_PAIRWISE_WEIGHT,
    pair_z: float = DEFAULT_PAIR_Z,
    pair_clip: PairClip = DEFAULT_PAIR_CLIP,
    pairwise_mode: PairwiseMode = DEFAULT_PAIRWISE_MODE,
) -> tuple[AllocationProblem | AugmentedProblem, np.ndarray, np.ndarray]:
    """The ILP of an analysis (`lcpaq.allocation.build.build_problem`) with its [L, C] scores
    and Pareto mask: scores, activation part, inter-layer terms, costs, ties, first/last."""
    table = data.table
    scores = score_candidates(table, data.curvature.clamped_trace(), scorer)
    scores = scores + activation_term_of(data.activations, table, scorer, data.source)
    scores, pairwise = pairwise_scores(
        data.interactions, table, scores, weight=pairwise_weight, z=pair_z, clip=pair_clip
    )
    problem, kept = build_problem(
        table,
        scores,
        cost_model(data, table, latency_table),
        constant_size_bits=data.unquantized_size_bits,
        first_last=first_last,
        ties=ties,
        tie_rule=tie_rule,
        pairwise=pairwise,
        pairwise_mode=pairwise_mode,
    )
    return problem, scores, kept


def check_solvable(
    problem: AllocationProblem | AugmentedProblem,
    budgets: Sequence[Budget],
    cost_weights: Mapping[str, float] | None = None,
) -> None:
    """Refuse what no solve can answer: no budget, or cost weights with augmented pair terms."""
    if not budgets:
        raise InputError("give at least one --budget, e.g. --budget avg-bits=3")
    if cost_weights and isinstance(problem, AugmentedProblem):
        raise InputError(
            "cost weights are not supported with pairwise_mode 'augmented' (the default when "
            "interactions.npz exists); use --pairwise-mode ilp or --pairwise-weight 0"
        )


def optimum(
    problem: AllocationProblem | AugmentedProblem,
    budgets: Sequence[Budget],
    cost_weights: Mapping[str, float] | None = None,
) -> Allocation:
    """The optimum under ``budgets`` (``cost_weights``: {metric: λ ≥ 0}, the objective adds
    Σ λ·cost/budget); `check_solvable` first."""
    if cost_weights:
        assert isinstance(problem, AllocationProblem), "refused by check_solvable"
        return problem.solve(budgets, cost_weights=cost_weights)
    return problem.solve(budgets)


def allocate(
    run_dir: Path,
    budgets: Sequence[Budget],
    *,
    first_last: FirstLastPolicy = "search",
    scorer: str = "hawq_v2",
    ties: Sequence[Sequence[str]] = (),
    tie_rule: str = "none",
    latency_table: str | None = None,
    pairwise_weight: float = DEFAULT_PAIRWISE_WEIGHT,
    pair_z: float = DEFAULT_PAIR_Z,
    pair_clip: PairClip = DEFAULT_PAIR_CLIP,
    pairwise_mode: PairwiseMode = DEFAULT_PAIRWISE_MODE,
    cost_weights: Mapping[str, float] | None = None,
) -> Allocation:
    """Solve the ILP under ``budgets`` and write ``frontiers.npz`` and ``allocation.json``.

    ``pairwise_*``/``pair_*``: how the inter-layer terms enter (`AllocationConfig`, `problem_of`).
    ``cost_weights``: {metric: λ ≥ 0}, the objective adds Σ λ·cost/budget
    (`AllocationProblem.solve`; recorded in ``allocation.json``).
    """
    if not budgets:
        raise InputError("give at least one --budget, e.g. --budget avg-bits=3")
    # The same options build the problem and are recorded in allocation.json.
    choices: dict[str, Any] = {
        "first_last": first_last,
        "scorer": scorer,
        "ties": ties,
        "tie_rule": tie_rule,
        "latency_table": latency_table,
        "pairwise_weight": pairwise_weight,
        "pair_z": pair_z,
        "pair_clip": pair_clip,
        "pairwise_mode": pairwise_mode,
    }
    with timed(run_dir, "allocate"):
        problem, scores, kept = problem_of(
            read_problem_data(run_dir, pairwise_weight=pairwise_weight), **choices
        )
        check_solvable(problem, budgets, cost_weights)
        try:
            allocation = optimum(problem, budgets, cost_weights)
        except InputError as error:
            # Keep the reason next to the run: the report explains which budgets conflict.
            with contextlib.suppress(InputError):
                explanation = infeasibility_report(problem, budgets, error)
                runfolder.write_json(run_dir / "infeasible.json", explanation)
            raise
        (run_dir / "infeasible.json").unlink(missing_ok=True)
        runfolder.write_npz(
            run_dir / "frontiers.npz",
            {"scores": scores, "kept": kept, "allowed": np.asarray(problem.allowed)},
        )
        record = allocation_record(
            problem, budgets, allocation, cost_weights, options_record(**choices)
        )
        runfolder.write_json(run_dir / "allocation.json", record)
    _warn_pruned_layers(allocation)
    logger.info(
        "allocated %.3f average bits, %.4f MB, predicted loss increase %.4g (%s, %.3f s)",
        allocation.average_bits,
        allocation.size_bytes / 1e6,
        allocation.predicted_loss_increase,
        allocation.status,
        allocation.solve_time_s,
    )
    return allocation


def _warn_pruned_layers(allocation: Allocation) -> None:
    """Whole layers pruned: a second-order score is far outside its range there (ResNet20:
    layer3.2.conv2 predicted +0.002 nats, measured −22 points; docs/results.md)."""
    pruned = [
        name
        for name, candidate in zip(allocation.layer_names, allocation.formats)
        if weight_format_of(candidate) == "pruned"
    ]
    if pruned:
        logger.warning(
            "whole layers pruned (%s): second-order scores badly underestimate removing a layer; "
            "measure the checkpoint, or leave pruned out of --formats",
            ", ".join(pruned),
        )


def options_record(
    *,
    first_last: str,
    scorer: str,
    ties: Sequence[Sequence[str]],
    tie_rule: str,
    latency_table: str | None,
    pairwise_weight: float,
    pair_z: float,
    pair_clip: str,
    pairwise_mode: str,
) -> dict[str, object]:
    """The options block of ``allocation.json``, the pair options under ``pairwise``."""
    return {
        "first_last": first_last,
        "scorer": scorer,
        "ties": [list(group) for group in ties],
        "tie_rule": tie_rule,
        "latency_table": latency_table,
        "pairwise": {
            "pairwise_weight": pairwise_weight,
            "pair_z": pair_z,
            "pair_clip": pair_clip,
            "pairwise_mode": pairwise_mode,
        },
    }


def allocation_record(
    problem: AllocationProblem | AugmentedProblem,
    budgets: Sequence[Budget],
    allocation: Allocation,
    cost_weights: Mapping[str, float] | None,
    options: Mapping[str, object],
) -> dict[str, object]:
    """``allocation.json``: the options (``pairwise``: the pair options, to which the number of
    pairs and terms used are added), the solution and its budget table."""
    pair_options = options["pairwise"]
    assert isinstance(pair_options, Mapping)
    return {
        **options,
        "pairwise": {
            **pair_options,
            "pairs_used": len(problem.pairwise),
            "terms_used": int(sum(np.count_nonzero(c) for c in problem.pairwise.values())),
        },
        **allocation.to_dict(),
        "budget_table": budget_table(problem, budgets, allocation, cost_weights),
    }
