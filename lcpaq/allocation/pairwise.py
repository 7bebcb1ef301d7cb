"""Inter-layer terms for the allocation: align, filter, shrink, clip, and the augmented score.

Input: `lcpaq.sensitivity.interaction_terms.InteractionTerms` (``interactions.npz``) and the separable scores [L, F]
of the ILP. Output: the ``pairwise`` dict {(i, j): [F, F]} that `lcpaq.allocation.problem.AllocationProblem`
adds to its objective, or an `AugmentedProblem` (METHOD §1d) that keeps the ILP separable (the same
`lcpaq.allocation.problem.Allocator` interface); `pair_views` summarises the terms for the report.
Numpy and the allocation package only (no torch).

Order of the transformations (METHOD §1c, §1c'): significance filter on the raw terms (C := 0 where
|C| < z·SE), then the weight λ (shrinkage), then optional clipping: ``negative`` (C := max(C, 0): the
ILP can no longer exploit a negative cross term the real loss may not have) or ``psd`` (CLADO's
projection of Ω, below). The objective is Σ_i s_i(f_i) + Σ_{(i,j)∈P} λ·C_ij(f_i, f_j); for the
curvature sources this is the quadratic model ½ΔwᵀMΔw written blockwise (the cross blocks appear
twice in the quadratic form, so once without the ½), for ``forward`` the measured pair increase.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from lcpaq.allocation import pareto
from lcpaq.allocation.budgets import Budget
from lcpaq.allocation.costs import CostModel
from lcpaq.allocation.objective import Pair, objective_value
from lcpaq.allocation.problem import AllocationProblem
from lcpaq.allocation.result import Allocation, ParetoPoint
from lcpaq.allocation.table import CandidateTable
from lcpaq.errors import InputError

if TYPE_CHECKING:  # interactions imports torch; this module must not
    from lcpaq.sensitivity.interaction_terms import InteractionTerms

Pairwise = dict[Pair, np.ndarray]
PairClip = Literal["none", "negative", "psd"]
PAIR_CLIPS: tuple[str, ...] = ("none", "negative", "psd")
PairwiseMode = Literal["ilp", "augmented"]
PAIRWISE_MODES: tuple[str, ...] = ("ilp", "augmented")
# The defaults of the pair options, here once (`lcpaq.config.AllocationConfig`, the stage functions):
# λ = 1 keeps the measured terms at their scale; z = 2 drops terms within two standard errors of 0.
DEFAULT_PAIRWISE_WEIGHT = 1.0
DEFAULT_PAIR_Z = 2.0
DEFAULT_PAIR_CLIP: PairClip = "none"
DEFAULT_PAIRWISE_MODE: PairwiseMode = "augmented"


def align_terms(
    terms: InteractionTerms, layer_names: Sequence[str], column_formats: Sequence[str]
) -> tuple[Pairwise, Pairwise]:
    """Cross terms and standard errors as [C, C] blocks over the candidate table's columns.

    ``column_formats[c]`` is the weight format of column c (`CandidateTable.weight_formats`; the
    terms depend on the weights only, so columns that share a weight format share their terms).
    Columns whose weight format was not measured (wider than ``--pair-max-bits``) get 0 ± 0.
    Raises `InputError` when the terms belong to other layers or formats (a stale file).
    """
    if tuple(terms.layer_names) != tuple(layer_names):
        raise InputError(
            "interactions.npz was computed for other layers than candidates.npz; re-run lcpaq analyze"
        )
    missing = [name for name in terms.format_names if name not in column_formats]
    if missing:
        raise InputError(
            f"interactions.npz has weight format {missing[0]!r}, which is not a candidate; "
            "re-run lcpaq analyze"
        )
    measured = list(terms.format_names)
    columns = np.array([c for c, name in enumerate(column_formats) if name in measured], dtype=int)
    rows = np.array([measured.index(column_formats[c]) for c in columns], dtype=int)
    cross: Pairwise = {}
    stderr: Pairwise = {}
    size = len(column_formats)
    for pair in terms.pairs:
        for source, target in ((terms.cross, cross), (terms.stderr, stderr)):
            block = np.zeros((size, size))
            block[np.ix_(columns, columns)] = np.asarray(source[pair])[np.ix_(rows, rows)]
            target[pair] = block
    return cross, stderr


def significant_terms(
    cross: Mapping[Pair, np.ndarray], stderr: Mapping[Pair, np.ndarray], z: float
) -> Pairwise:
    """C := 0 where |C| < z·SE (METHOD §1c); ``z = 0`` keeps everything."""
    if z < 0 or not np.isfinite(z):
        raise InputError(f"pair-z must be a finite number >= 0, got {z}")
    if z == 0:
        return {pair: np.asarray(value, dtype=float).copy() for pair, value in cross.items()}
    result = {}
    for pair, value in cross.items():
        error = np.asarray(stderr[pair], dtype=float)
        if np.isnan(error).any():
            raise InputError(
                f"the inter-layer terms of layers {pair} have no standard error (one calibration "
                "batch); use more pair samples or --pair-z 0"
            )
        result[pair] = np.where(np.abs(value) >= z * error, value, 0.0)
    return result


def psd_project(
    scores: np.ndarray, pairwise: Mapping[Pair, np.ndarray]
) -> tuple[np.ndarray, Pairwise]:
    """CLADO's denoiser: clip the negative eigenvalues of Ω and read the terms back.

    Ω is the symmetric [L·F, L·F] matrix with Ω[(i,f),(i,f)] = 2·s_i(f) and Ω[(i,f),(j,g)] =
    Ω[(j,g),(i,f)] = C_ij(f, g), so that xᵀΩx = 2·(Σ s + Σ C) for one-hot x. After the projection the
    new scores are diag/2 and the new C the entries of the selected pairs (the projection also fills
    entries of unselected pairs; they are dropped, as the ILP only has the selected ones).
    """
    num_layers, num_formats = scores.shape
    omega = np.zeros((num_layers * num_formats,) * 2)
    omega[np.diag_indices_from(omega)] = 2.0 * scores.reshape(-1)
    for (i, j), block in pairwise.items():
        rows = slice(i * num_formats, (i + 1) * num_formats)
        cols = slice(j * num_formats, (j + 1) * num_formats)
        omega[rows, cols] += block
        omega[cols, rows] += np.asarray(block).T
    values, vectors = np.linalg.eigh(omega)
    projected = (vectors * np.maximum(values, 0.0)) @ vectors.T
    new_scores = np.diagonal(projected).reshape(num_layers, num_formats) / 2.0
    new_pairs = {
        (i, j): projected[
            i * num_formats : (i + 1) * num_formats, j * num_formats : (j + 1) * num_formats
        ].copy()
        for (i, j) in pairwise
    }
    return new_scores, new_pairs


def prepare_pairwise(
    scores: np.ndarray,
    cross: Mapping[Pair, np.ndarray],
    stderr: Mapping[Pair, np.ndarray],
    *,
    weight: float = DEFAULT_PAIRWISE_WEIGHT,
    z: float = DEFAULT_PAIR_Z,
    clip: PairClip = DEFAULT_PAIR_CLIP,
) -> tuple[np.ndarray, Pairwise]:
    """Scores and pairwise terms for the ILP: significance filter, then λ, then clipping."""
    if weight < 0 or not np.isfinite(weight):
        raise InputError(f"pairwise-weight must be a finite number >= 0, got {weight}")
    if clip not in PAIR_CLIPS:
        raise InputError(f"pair-clip must be one of {', '.join(PAIR_CLIPS)}, got {clip!r}")
    pairwise = {pair: weight * value for pair, value in significant_terms(cross, stderr, z).items()}
    if clip == "negative":
        pairwise = {pair: np.maximum(value, 0.0) for pair, value in pairwise.items()}
    elif clip == "psd":
        scores, pairwise = psd_project(scores, pairwise)
    # Drop all-zero blocks: they only add variables and rows to the ILP.
    return scores, {pair: value for pair, value in pairwise.items() if np.any(value != 0)}


def augmented_scores(
    scores: np.ndarray, pairwise: Mapping[Pair, np.ndarray], reference: np.ndarray
) -> np.ndarray:
    """METHOD §1d: s̃_i(f) = s_i(f) + Σ_{j∈P(i)} C_ij(f, g_j), g_j = the format j holds in
    ``reference`` (format index per layer): layer i's objective change with every other layer fixed."""
    augmented = np.asarray(scores, dtype=float).copy()
    for (i, j), block in pairwise.items():
        augmented[i] += block[:, reference[j]]
        augmented[j] += block[reference[i], :]
    return augmented


class AugmentedProblem:
    """Separable ILPs on augmented scores around the incumbent, instead of exact pair products.

    `solve` starts from the diagonal-only optimum, re-solves with s̃ around the last assignment until
    an assignment repeats (or ``max_rounds``), and returns the visited assignment with the lowest
    full objective Σ s + Σ C (which is what ``predicted_loss_increase`` reports). Costs, budgets
    and allowed candidates are the diagonal-only problem's (``base``); it serves the same
    `lcpaq.allocation.problem.Allocator` interface as `AllocationProblem`.

    Args:
        make_problem: builds an `AllocationProblem` without pairs from [L, F] scores.
        scores: separable scores [L, F].
        pairwise: the (already filtered and weighted) pairwise terms.
    """

    def __init__(
        self,
        make_problem: Callable[[np.ndarray], AllocationProblem],
        scores: np.ndarray,
        pairwise: Mapping[Pair, np.ndarray],
        *,
        max_rounds: int = 8,
    ) -> None:
        self.make_problem = make_problem
        self.base = make_problem(scores)
        self.scores = np.asarray(scores, dtype=float)
        self.pairwise = dict(pairwise)
        self.max_rounds = max_rounds
        self.rounds_used = 0

    # -- the diagonal-only problem's data ----------------------------------------------------
    @property
    def table(self) -> CandidateTable:
        return self.base.table

    @property
    def costs(self) -> CostModel:
        return self.base.costs

    @property
    def allowed(self) -> np.ndarray:
        return self.base.allowed

    def metric_value(self, metric: str, choice: np.ndarray) -> float:
        return self.base.metric_value(metric, choice)

    def smallest_achievable(self, metric: str) -> float:
        return self.base.smallest_achievable(metric)

    def feasible(self, budgets: Sequence[Budget]) -> bool:
        """Augmented scores change the objective only: feasibility is the base problem's."""
        return self.base.feasible(budgets)

    # -- solves ------------------------------------------------------------------------------
    def objective(self, choice: np.ndarray) -> float:
        return objective_value(self.scores, self.pairwise, choice)

    def _choice(self, allocation: Allocation) -> np.ndarray:
        names = list(self.base.table.format_names)
        return np.array([names.index(name) for name in allocation.formats])

    def solve(
        self, budgets: Sequence[Budget], *, cost_weights: Mapping[str, float] | None = None
    ) -> Allocation:
        if cost_weights and any(cost_weights.values()):
            raise InputError("cost weights are not supported with pairwise_mode 'augmented'")
        allocation = self.base.solve(budgets)
        best = (self.objective(self._choice(allocation)), allocation)
        seen = {allocation.formats}
        total_time = allocation.solve_time_s
        self.rounds_used = 0
        for _ in range(self.max_rounds):
            reference = self._choice(allocation)
            allocation = self.make_problem(
                augmented_scores(self.scores, self.pairwise, reference)
            ).solve(budgets)
            total_time += allocation.solve_time_s
            self.rounds_used += 1
            value = self.objective(self._choice(allocation))
            if value < best[0]:
                best = (value, allocation)
            if allocation.formats in seen:
                break
            seen.add(allocation.formats)
        return dataclasses.replace(
            best[1], predicted_loss_increase=best[0], solve_time_s=total_time
        )

    def pareto_curve(
        self,
        metric: str,
        num_points: int = 50,
        *,
        budgets: Sequence[Budget] = (),
        low: float | None = None,
        high: float | None = None,
        cost_weights: Mapping[str, float] | None = None,
    ) -> list[ParetoPoint]:
        """`AllocationProblem.pareto_curve` with the augmented `solve` at every budget (from
        ``high`` down to ``low``, ``budgets`` held); distinct assignments by increasing ``metric``."""
        if cost_weights and any(cost_weights.values()):
            raise InputError("cost weights are not supported with pairwise_mode 'augmented'")
        pareto.check_points(num_points)
        others = [budget for budget in budgets if budget.metric != metric]
        if low is None:
            low = self.base.smallest_achievable(metric)
        if high is None:
            high = self.solve(others).costs[metric]
        values = pareto.sweep_values(high, low, num_points)
        optima = [self._optimum([*others, Budget(metric, float(value))]) for value in values]
        points = [
            ParetoPoint(
                budgets=tuple(sorted(swept)),
                costs=allocation.costs,
                predicted_loss_increase=allocation.predicted_loss_increase,
                formats=allocation.formats,
                mip_gap=allocation.mip_gap,
            )
            for allocation, swept in pareto.distinct_optima(values, optima)
        ]
        return sorted(points, key=lambda point: point.costs[metric])

    def _optimum(self, budgets: Sequence[Budget]) -> tuple[tuple[str, ...], Allocation] | None:
        try:
            allocation = self.solve(budgets)
        except InputError:  # this value is infeasible together with the other budgets
            return None
        return allocation.formats, allocation


def pair_views(
    terms: InteractionTerms, chosen: Sequence[str] | None = None, z: float = DEFAULT_PAIR_Z
) -> dict[str, np.ndarray]:
    """Per-pair summaries for plots and the report, in ``terms.pairs`` order.

    ``largest``: the signed entry of largest magnitude over the measured format pairs, with
    ``largest_significant`` (|C| ≥ z·SE; NaN standard errors count as not significant);
    ``chosen``/``chosen_significant``: C at the weight formats of ``chosen`` (one per layer;
    formats that were not measured give 0, not significant); ``ratio``: |largest| over
    √(d_i·d_j) of the matching diagonal terms (how large a cross term is next to its diagonal).
    """
    pairs = terms.pairs
    largest, largest_sig, ratio = [], [], []
    at_chosen, chosen_sig = [], []
    formats = list(terms.format_names)
    for i, j in pairs:
        block, error = np.asarray(terms.cross[(i, j)]), np.asarray(terms.stderr[(i, j)])
        f, g = np.unravel_index(int(np.argmax(np.abs(block))), block.shape)
        largest.append(block[f, g])
        largest_sig.append(bool(abs(block[f, g]) >= z * error[f, g]))
        scale = np.sqrt(abs(terms.diagonal[i, f] * terms.diagonal[j, g]))
        ratio.append(abs(block[f, g]) / scale if scale > 0 else np.nan)
        if chosen is not None:
            fi, gj = chosen[i], chosen[j]
            if fi in formats and gj in formats:
                value = block[formats.index(fi), formats.index(gj)]
                bar = error[formats.index(fi), formats.index(gj)]
                at_chosen.append(value)
                chosen_sig.append(bool(abs(value) >= z * bar))
            else:
                at_chosen.append(0.0)
                chosen_sig.append(False)
    views = {
        "largest": np.array(largest, dtype=float),
        "largest_significant": np.array(largest_sig, dtype=bool),
        "ratio": np.array(ratio, dtype=float),
    }
    if chosen is not None:
        views["chosen"] = np.array(at_chosen, dtype=float)
        views["chosen_significant"] = np.array(chosen_sig, dtype=bool)
    return views
