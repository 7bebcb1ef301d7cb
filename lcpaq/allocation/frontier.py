"""Sensitivity scores per (layer, format) and per-layer Pareto frontiers (METHOD §1a, §3; allocate).

Input: a `CandidateTable` and per-layer traces. Output: scores [L, F] (predicted loss increase) and a
``kept`` mask [L, F] of non-dominated candidates (``frontiers.npz``). Numpy only.

Scorers share one signature, ``scorer(table, trace) -> [L, F]``, so later scorers (inter-layer or
activation terms) plug in by adding an entry to `SCORERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from lcpaq.allocation.table import CandidateTable
from lcpaq.errors import InputError

Scorer = Callable[["CandidateTable", np.ndarray], np.ndarray]


def hawq_v2_score(table: CandidateTable, trace: np.ndarray) -> np.ndarray:
    """½ · tr(H_ll)/n_l · ‖Q_f(W_l) − W_l‖², the HAWQ-V2 score as a second-order loss increase."""
    return 0.5 * (trace / table.num_params)[:, None] * table.error_sq


def diagonal_score(table: CandidateTable, trace: np.ndarray) -> np.ndarray:
    """½ · Σ_k G_kk Δw_k²: the curvature diagonal weights each element's error where it falls,
    instead of spreading the layer's trace evenly over its weights as HAWQ-V2 does."""
    if np.isnan(table.weighted_error).any():
        raise InputError(
            "the 'diagonal' scorer needs the per-element curvature diagonal, which this analysis "
            "did not record (it is produced by the gauss_newton estimator)"
        )
    del trace  # the diagonal already sums to the trace
    return 0.5 * table.weighted_error


def output_score(table: CandidateTable, trace: np.ndarray) -> np.ndarray:
    """½ · tr(H_ll)/n_l · ‖ΔW_l‖²_S: HAWQ-V2 with the weight error measured through the layer's
    input second moments S = E[x xᵀ] (``output_error``). It is the Kronecker-factored
    second-order term ½·tr(A ΔW S ΔWᵀ) with the output factor A replaced by its mean, tr(H)/(d_out·s̄)
    (tr H = tr A · tr S), and equals HAWQ-V2 when the inputs are white. Rounding that trades weight
    error for output error (GPTQ) is scored by what it preserves: the layer's outputs."""
    output_error = table.output_error
    assert output_error is not None  # CandidateTable.__post_init__ fills it (NaN when unmeasured)
    if np.isnan(output_error).any():
        raise InputError(
            "the 'output' scorer needs each layer's input second moments, which analyze records "
            "with GPTQ rounding (--rounding gptq, the default)"
        )
    return 0.5 * (trace / table.num_params)[:, None] * output_error


def limpq_score(table: CandidateTable, trace: np.ndarray) -> np.ndarray:
    """LIMPQ's indicator: the learned step size of the candidate's weight format
    (``learned_step``, `lcpaq.sensitivity.limpq`). Not a loss increase: the ILP minimises the sum of
    step sizes, so a layer's bits go where its step shrinks most per bit of cost."""
    learned = table.learned_step
    assert learned is not None  # CandidateTable.__post_init__ fills it (NaN when unmeasured)
    missing = sorted({table.format_names[c] for c in np.flatnonzero(np.isnan(learned).any(axis=0))})
    if missing:
        raise InputError(
            "the 'limpq' scorer needs learned step sizes for every candidate: run analyze with "
            f"--limpq-steps N (integer formats only); missing for {', '.join(missing)}"
        )
    del trace  # the indicator is learned, not derived from the curvature
    return learned.astype(float)


SCORERS: dict[str, Scorer] = {
    "hawq_v2": hawq_v2_score,
    "diagonal": diagonal_score,
    "output": output_score,
    "limpq": limpq_score,
}


def score_candidates(table: CandidateTable, trace: np.ndarray, scorer: str) -> np.ndarray:
    """Predicted loss increase of every (layer, format) candidate under the named scorer."""
    try:
        function = SCORERS[scorer]
    except KeyError:
        raise InputError(f"unknown scorer {scorer!r}; known: {', '.join(SCORERS)}") from None
    if trace.shape != (len(table.layer_names),):
        raise ValueError(
            f"trace has shape {trace.shape}, expected one value per layer ({len(table.layer_names)})"
        )
    return function(table, trace)


def pareto_mask(costs: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Which points no other point dominates.

    Args:
        costs: [P, K] cost vectors (lower is better in every dimension).
        scores: [P] predicted loss increases.
    Returns:
        bool [P]; g dominates f when it is no worse in every cost and the score and strictly better in
        one. Of exact duplicates the first is kept. No convex-hull pruning: non-convex points can be
        optimal under some budget (METHOD §3).
    """
    count = len(scores)
    values = np.column_stack([costs, scores])
    kept = np.ones(count, dtype=bool)
    for index in range(count):
        no_worse = np.all(values <= values[index], axis=1)
        strictly = np.any(values < values[index], axis=1)
        dominated_by = no_worse & strictly
        duplicate_before = np.all(values == values[index], axis=1) & (np.arange(count) < index)
        if dominated_by.any() or duplicate_before.any():
            kept[index] = False
    return kept


def build_frontiers(table: CandidateTable, scores: np.ndarray) -> np.ndarray:
    """Non-dominated mask [L, F] over (weight bits, size bits, score) per layer."""
    kept = np.zeros_like(scores, dtype=bool)
    for row in range(len(table.layer_names)):
        costs = np.column_stack([table.weight_bits[row], table.size_bits[row]])
        kept[row] = pareto_mask(costs, scores[row])
    return kept


def pairwise_score_bounds(
    scores: np.ndarray,
    allowed: np.ndarray,
    pairwise: Mapping[tuple[int, int], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest score a candidate can contribute once its pairwise terms are counted.

    For unit i and format f: s_i(f) + Σ_{j∈P(i)} min_h C_ij(f, h) and the same with max, where h runs
    over the formats j may take (``allowed``). Without pairs both equal the scores.
    """
    low, high = scores.astype(float).copy(), scores.astype(float).copy()
    for (i, j), matrix in (pairwise or {}).items():
        matrix = np.asarray(matrix, dtype=float)
        towards_j = np.where(allowed[j][None, :], matrix, np.nan)  # rows: i's formats
        towards_i = np.where(allowed[i][:, None], matrix, np.nan).T  # rows: j's formats
        for unit, block in ((i, towards_j), (j, towards_i)):
            rows = allowed[unit]
            low[unit, rows] += np.nanmin(block[rows], axis=1)
            high[unit, rows] += np.nanmax(block[rows], axis=1)
    return low, high


def safe_pareto_mask(
    costs: np.ndarray,
    scores: np.ndarray,
    allowed: np.ndarray,
    pairwise: Mapping[tuple[int, int], np.ndarray] | None = None,
) -> np.ndarray:
    """Candidates that may appear in an optimum, for every budget on every cost dimension.

    Drop f of unit i when an allowed g costs no more in every dimension and switching i from f to g
    never raises the objective, whatever the other units hold:
    s_i(g) − s_i(f) + Σ_{j∈P(i)} max_h [C_ij(g, h) − C_ij(f, h)] ≤ 0, h over j's allowed formats.
    This is METHOD §3's safe rule made tighter: the rule there compares s_i(g) + Σ_j max_h C_ij(g, h)
    with s_i(f) + Σ_j min_h C_ij(f, h), which bounds the same difference from above. Pruning a
    unit shrinks its partners' h ranges, so the rule is applied until nothing changes. Of
    candidates equal in everything the first is kept. Without pairs this is `pareto_mask` per unit.

    Args:
        costs: [U, F, K] cost of every candidate in K dimensions (lower is better).
        scores: [U, F] separable scores.
        allowed: [U, F] candidates to consider (others are neither kept nor used to prune).
        pairwise: {(i, j): C [F, F]} pairwise terms, C[f, g] for unit i in f and unit j in g.
    Returns:
        bool [U, F], a subset of ``allowed`` with at least one candidate per unit that has one.
    """
    kept = allowed.copy()
    num_units, num_formats = scores.shape
    partners: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(num_units)]
    for (i, j), matrix in (pairwise or {}).items():
        matrix = np.asarray(matrix, dtype=float)
        partners[i].append((j, matrix))  # rows: i's formats
        partners[j].append((i, matrix.T))
    # No worse in every cost: cheaper[u, g, f] is True when g costs at most f everywhere.
    cheaper = np.all(costs[:, :, None, :] <= costs[:, None, :, :], axis=-1)
    strictly = np.any(costs[:, :, None, :] < costs[:, None, :, :], axis=-1)
    lower_index = np.arange(num_formats)[:, None] < np.arange(num_formats)[None, :]
    changed = True
    while changed:
        changed = False
        for unit in range(num_units):
            # worst[g, f]: the most the objective can rise when unit switches from f to g.
            worst = scores[unit][:, None] - scores[unit][None, :]
            for other, matrix in partners[unit]:
                options = matrix[:, kept[other]]  # [F, H]
                worst = worst + (options[:, None, :] - options[None, :, :]).max(axis=-1)
            no_worse = cheaper[unit] & (worst <= 0)
            strict = strictly[unit] | (worst < 0) | lower_index
            beats = no_worse & strict & kept[unit][:, None] & kept[unit][None, :]
            np.fill_diagonal(beats, False)
            drop = beats.any(axis=0)
            if drop.any():
                # Dropping all beaten candidates at once is safe: "beats" is transitive (the max
                # of a sum is at most the sum of the maxima) and has no cycle (two candidates beat
                # each other only when equal in everything, and then only the lower index wins),
                # so every dropped candidate is beaten by one that stays.
                kept[unit] &= ~drop
                changed = True
    assert num_formats == 0 or (kept.any(axis=1) == allowed.any(axis=1)).all()
    return kept
