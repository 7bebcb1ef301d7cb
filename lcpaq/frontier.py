"""Stage 2b: sensitivity scores per (layer, format) and per-layer Pareto frontiers (METHOD §1a, §3).

Input: a `CandidateTable` and per-layer traces. Output: scores [L, F] (predicted loss increase) and a
``kept`` mask [L, F] of non-dominated candidates (``frontiers.npz``). Numpy only.

Scorers share one signature, ``scorer(table, trace) -> [L, F]``, so later scorers (inter-layer or
activation terms) plug in by adding an entry to `SCORERS`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from lcpaq.candidates import CandidateTable
from lcpaq.errors import InputError

Scorer = Callable[[CandidateTable, np.ndarray], np.ndarray]


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


SCORERS: dict[str, Scorer] = {"hawq_v2": hawq_v2_score, "diagonal": diagonal_score}


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
