"""Allocation per group of output channels (``--allocate-per channel-group[:G]``): the allocation
problem of an analysed run folder over channel-group units (`lcpaq.allocation.channel_groups`),
solved by the same exact solvers under the same budgets, and its answer per layer."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lcpaq.allocation.budgets import Budget
from lcpaq.allocation.channel_groups import (
    CHANNEL_ERRORS_FILE,
    channel_counts,
    channel_ranges,
    group_table,
    layer_groups,
    load_channel_errors,
)
from lcpaq.allocation.result import Allocation
from lcpaq.errors import InputError
from lcpaq.model.graph import LayerInfo
from lcpaq.quant.state_keys import stores_transposed
from lcpaq.sensitivity.curvature import CurvatureEstimate
from lcpaq.stages.allocate import ProblemData, optimum, problem_of, read_problem_data


@dataclass(frozen=True)
class GroupAllocation:
    """The unit allocation, its formats per layer as (c0, c1, format) spans, how many channels
    of each layer got each format, and the seconds building and solving took."""

    allocation: Allocation
    groups: dict[str, list[tuple[int, int, str]]]
    channel_counts: dict[str, dict[str, int]]
    build_seconds: float
    solve_seconds: float

    def to_dict(self) -> dict[str, object]:
        return {
            "allocation": self.allocation.to_dict(),
            "groups": {
                layer: [list(span) for span in spans] for layer, spans in self.groups.items()
            },
            "channel_counts": self.channel_counts,
            "build_seconds": self.build_seconds,
            "solve_seconds": self.solve_seconds,
        }


def _unit_layers(layer: LayerInfo, group: int) -> list[LayerInfo]:
    """The layer's channel groups as layers of their own (MACs and weights split evenly)."""
    channels = layer.weight_shape[0]
    units = []
    for start, stop in channel_ranges(channels, group):
        share = (stop - start) / channels
        units.append(
            dataclasses.replace(
                layer,
                name=f"{layer.name}[{start}:{stop}]",
                weight_shape=(stop - start, *layer.weight_shape[1:]),
                num_params=round(layer.num_params * share),
                macs_per_sample=round(layer.macs_per_sample * share),
            )
        )
    return units


def group_problem_data(data: ProblemData, run_dir: Path, group: int) -> ProblemData:
    """``data`` with channel-group units for layers; their curvature is their own share of the
    exact Gauss–Newton diagonal (the layer's trace split evenly where no diagonal was kept)."""
    if data.interactions is not None or data.activations is not None:
        raise InputError(
            "per-channel-group allocation takes no inter-layer terms or activation formats"
        )
    transposed = [layer.name for layer in data.layers if stores_transposed(layer.kind)]
    if transposed:
        raise InputError(f"per-channel-group allocation of in×out weights: {transposed[0]}")
    channels = load_channel_errors(run_dir / CHANNEL_ERRORS_FILE, data.table.layer_names)
    table, traces, owners = group_table(data.table, channels, group)
    layer_trace = data.curvature.clamped_trace()
    share = table.num_params / data.table.num_params[owners]
    traces = np.where(np.isfinite(traces), traces, layer_trace[owners] * share)
    curvature = CurvatureEstimate(
        table.layer_names,
        traces,
        data.curvature.trace_stderr[owners] * np.sqrt(share),
        num_samples=data.curvature.num_samples,
        method=data.curvature.method,
        num_probes=data.curvature.num_probes,
        flags=tuple(data.curvature.flags[index] for index in owners),
    )
    units = tuple(unit for layer in data.layers for unit in _unit_layers(layer, group))
    return dataclasses.replace(data, layers=units, table=table, curvature=curvature)


def allocate_groups(
    run_dir: Path,
    budgets: Sequence[Budget],
    group: int,
    *,
    scorer: str = "hawq_v2",
    formats: Sequence[str] | None = None,
    cost_weights: Mapping[str, float] | None = None,
) -> GroupAllocation:
    """The optimum under ``budgets`` with a format per ``group`` output channels (``formats``: a
    subset of the analysed ones, default all)."""
    start = time.perf_counter()
    data = read_problem_data(run_dir, pairwise_weight=0)
    if formats is not None:
        data = dataclasses.replace(data, table=data.table.select(data.table.columns_of(formats)))
    units = group_problem_data(data, run_dir, group)
    problem, _, _ = problem_of(units, scorer=scorer, pairwise_weight=0)
    built = time.perf_counter()
    allocation = optimum(problem, budgets, cost_weights)
    solved = time.perf_counter()
    groups = layer_groups(allocation.layer_names, allocation.formats)
    return GroupAllocation(
        allocation,
        groups,
        channel_counts(groups, units.table.weight_formats),
        built - start,
        solved - built,
    )
