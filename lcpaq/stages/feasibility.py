"""Budgets checked against candidate costs right after the model is loaded, before any curvature.

Whether a budget can be met depends only on the layers' shapes, the candidate formats, the scheme
and the layer policy (first/last, ties), never on what ``analyze`` measures: `check_budgets` builds
the allocation problem from a cost-only candidate table (`lcpaq.sensitivity.candidates.cost_table`,
scores zero) and refuses an infeasible budget with the smallest and largest achievable value of
its metric, so ``lcpaq run --budget avg-bits=1`` fails in seconds instead of after the analysis.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lcpaq.allocation.budgets import parse_budget
from lcpaq.allocation.diagnose import feasible_alone
from lcpaq.allocation.problem import AllocationProblem
from lcpaq.allocation.table import CandidateTable
from lcpaq.config import RunConfig
from lcpaq.errors import InputError
from lcpaq.model.graph import LayerInfo
from lcpaq.quant.formats import LEVEL_KINDS, get_format
from lcpaq.sensitivity.candidates import cost_table
from lcpaq.sensitivity.curvature import CurvatureEstimate
from lcpaq.stages.allocate import ProblemData, problem_of


def check_budgets(
    config: RunConfig,
    layers: Sequence[LayerInfo],
    *,
    fp32_size_bits: float,
    unquantized_size_bits: float,
) -> None:
    """Raise `InputError` when a budget of ``config.allocation`` cannot be met by any assignment
    of its candidates (alone, or together with the other budgets)."""
    budgets = [parse_budget(text) for text in config.allocation.budgets]
    if not budgets:
        return
    analysis = config.analysis
    table = cost_table(layers, analysis.formats, analysis.scheme, analysis.act_formats)
    count = len(layers)
    no_curvature = CurvatureEstimate(
        tuple(layer.name for layer in layers),
        np.ones(count),
        np.zeros(count),
        num_samples=0,
        method="none",
        num_probes=0,
        flags=("",) * count,
    )
    data = ProblemData(
        tuple(layers),
        unquantized_size_bits,
        fp32_size_bits,
        table,
        no_curvature,
        None,
        None,
        analysis.scheme.symmetric,
        source="the budget check",
    )
    problem, _, _ = problem_of(data, **config.allocation.problem_options())
    # Without inter-layer terms (none are measured yet) the problem is a plain one.
    assert isinstance(problem, AllocationProblem)
    problems = []
    for budget in budgets:
        low = problem.smallest_achievable(budget.metric)
        high = problem.largest_achievable(budget.metric)
        if not feasible_alone(budget, low):
            problems.append(
                f"budget {budget} is infeasible: with candidates {', '.join(table.format_names)} "
                f"and this layer policy {budget.metric} ranges from {low:.4g} to {high:.4g} "
                "(checked before the analysis)" + _below_two_bits_hint(budget.metric, table)
            )
    if problems:
        raise InputError("; ".join(problems))
    if len(budgets) > 1 and not problem.feasible(budgets):
        raise InputError(
            f"budgets {', '.join(map(str, budgets))} cannot be met together by any assignment "
            "of the candidates (each alone can; checked before the analysis)"
        )


def _below_two_bits_hint(metric: str, table: CandidateTable) -> str:
    """Where the INT/FP candidates stop at 2 bits: how to go below."""
    if metric != "avg-bits" or any(
        get_format(name).kind in LEVEL_KINDS for name in table.weight_formats
    ):
        return ""
    return "; budgets below 2 average bits need ternary, binary or pruned among --formats"
