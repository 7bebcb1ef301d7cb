"""Budgets meet candidates: the allocation problem of one analysed model.

Input: the candidate table, every candidate's score (curvature × error, plus its activation
part), the cost model, the first/last-layer policy, ties and the prepared inter-layer terms.
Output: an `AllocationProblem` (or the `AugmentedProblem` around it when pairwise terms enter
through augmented scores) whose ``solve(budgets)`` gives the `Allocation`, and the per-layer
Pareto mask of the scores. Called by the ``allocate`` and ``sweep`` stages and the Python API;
needs no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from lcpaq.allocation.budgets import tie_rule_groups
from lcpaq.allocation.costs import CostModel
from lcpaq.allocation.frontier import build_frontiers
from lcpaq.allocation.pairwise import AugmentedProblem, PairwiseMode
from lcpaq.allocation.problem import AllocationProblem, allowed_candidates
from lcpaq.errors import InputError

if TYPE_CHECKING:  # candidates imports torch; allocation must not
    from lcpaq.allocation.table import CandidateTable

#: The weight format ``--first-last keep-8bit`` pins the first and last layer to.
HIGH_FORMAT = "int8"


def first_last_formats(
    table: CandidateTable, layer_names: Sequence[str], first_last: str
) -> dict[str, str]:
    """Layer → candidate the first/last-layer policy fixes (none for ``search``)."""
    if first_last == "keep-8bit":
        if HIGH_FORMAT not in table.weight_formats:
            raise InputError(
                f"--first-last keep-8bit needs {HIGH_FORMAT} among the analysed formats"
            )
        # With (weight, activation) pairs: 8-bit weights with the widest activation format.
        high = table.format_names[table.candidate_index(HIGH_FORMAT)]
        return {layer_names[0]: high, layer_names[-1]: high}
    if first_last != "search":
        raise InputError(f"--first-last must be 'search' or 'keep-8bit', got {first_last!r}")
    return {}


def build_problem(
    table: CandidateTable,
    scores: np.ndarray,
    costs: CostModel,
    *,
    constant_size_bits: float,
    first_last: str = "search",
    ties: Sequence[Sequence[str]] = (),
    tie_rule: str = "none",
    pairwise: Mapping[tuple[int, int], np.ndarray] | None = None,
    pairwise_mode: PairwiseMode = "augmented",
) -> tuple[AllocationProblem | AugmentedProblem, np.ndarray]:
    """The ILP over ``table`` with ``scores`` [L, C] and ``costs`` (``constant_size_bits``: what
    no layer quantizes), and the [L, C] Pareto mask of the scores. ``pairwise``: the prepared
    inter-layer terms (`lcpaq.allocation.pairwise.prepare_pairwise`), as exact pair products
    (``ilp``) or through augmented scores (``augmented``)."""
    kept = build_frontiers(table, scores)
    fixed = first_last_formats(table, table.layer_names, first_last)
    # The problem prunes by the safe rule over every cost dimension, ties included (METHOD §3).
    allowed = allowed_candidates(table, np.ones_like(kept), fixed)
    groups = [*ties, *tie_rule_groups(table.layer_names, tie_rule)]

    def make_problem(
        values: np.ndarray, pairs: Mapping[tuple[int, int], np.ndarray] | None = None
    ) -> AllocationProblem:
        return AllocationProblem(
            table,
            values,
            allowed,
            constant_size_bits=constant_size_bits,
            costs=costs,
            ties=groups,
            pairwise=pairs,
        )

    if pairwise and pairwise_mode == "augmented":
        return AugmentedProblem(make_problem, scores, pairwise), kept
    return make_problem(scores, pairwise), kept
