"""The allocation objective (METHOD §1c, §4), evaluated in one place.

Σ_i s_i(f_i) + Σ_{(i,j)} C_ij(f_i, f_j): separable scores plus pairwise terms, for a choice of one
column per row (a format per layer, or per unit of tied layers: the same formula). With cost
weights the minimised objective adds Σ_k factor_k·cost_k (`weighted_objective`). The dynamic
programs of `lcpaq.allocation.exact` evaluate the same sum on their own padded option arrays,
vectorised (`lcpaq.allocation.exact.ChainSolver.value`). Numpy only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

Pair = tuple[int, int]
#: {(i, j): C [F, F]}: C[f, g] is added when row i holds column f and row j holds column g.
PairTerms = Mapping[Pair, np.ndarray]


def objective_value(scores: np.ndarray, pairs: PairTerms, choice: np.ndarray) -> float:
    """Σ scores[i, choice_i] + Σ_{(i,j)} C_ij[choice_i, choice_j] (the pairs added in order)."""
    total = float(scores[np.arange(len(choice)), choice].sum())
    for (i, j), matrix in pairs.items():
        total += float(matrix[choice[i], choice[j]])
    return total


def weighted_objective(
    value: float, cost_of: Callable[[str], float], factors: Mapping[str, float]
) -> float:
    """``value`` + Σ_k factor_k·cost_k, ``cost_of(metric)`` giving each weighted metric's cost."""
    total = value
    for metric, factor in factors.items():
        total += factor * cost_of(metric)
    return total
