"""A format per group of G output channels (``--allocate-per channel-group[:G]``; G = 1 is HGQ's
per-channel limit): the candidate table over channel groups instead of layers.

Each *unit* is the output channels [c0, c1) of one layer (``layer[c0:c1]``, G channels, fewer in a
layer's last group). Its row of the table is the layer's row scaled to the unit: weight bits and
stored bits (codes and the per-channel or per-group scales, which split with the channels; a
per-tensor scale is split in proportion, a per-unit scale costs the same) times c1−c0 over
C_out, and the errors summed over the unit's channels from ``channel_errors.npz``
(`lcpaq.sensitivity.channel_errors`), so they add up to the layer's. Its curvature is its own
share of the Gauss–Newton trace (the sum of the exact diagonal over its weights, per channel, not
the layer's mean), so the HAWQ-V2 / output scores of a unit, tr_u/n_u · error_u, weigh each group
by its own curvature. The allocation problem (`lcpaq.allocation.problem`) is then the same
multiple-choice knapsack over units. Numpy only, like all of `lcpaq.allocation`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lcpaq.allocation.table import CandidateTable
from lcpaq.errors import InputError

FIELDS = ("error_sq", "weighted_error", "output_error")
CHANNEL_ERRORS_FILE = "channel_errors.npz"
_UNIT = re.compile(r"^(?P<layer>.+)\[(?P<start>\d+):(?P<stop>\d+)\]$")


@dataclass(frozen=True)
class ChannelErrors:
    """Per layer: [C_out, F] error arrays (``errors[layer][field]``) over ``format_names`` and the
    [C_out] share of the curvature trace (NaN without the exact diagonal)."""

    format_names: tuple[str, ...]
    errors: dict[str, dict[str, np.ndarray]]
    trace: dict[str, np.ndarray]


def parse_allocate_per(text: str) -> int | None:
    """``layer`` → None; ``channel-group`` → 16; ``channel-group:G`` → G (≥ 1)."""
    if text == "layer":
        return None
    name, _, size = text.partition(":")
    if name != "channel-group" or (size and not size.isdigit()) or size == "0":
        raise InputError(
            f"--allocate-per must be 'layer' or 'channel-group[:G]' with G ≥ 1, got {text!r}"
        )
    return int(size) if size else 16


def unit_name(layer: str, start: int, stop: int) -> str:
    return f"{layer}[{start}:{stop}]"


def split_unit(name: str) -> tuple[str, int, int]:
    """``conv1[0:16]`` → (``conv1``, 0, 16)."""
    match = _UNIT.match(name)
    if match is None:
        raise InputError(f"{name!r} is not a channel-group unit (expected layer[start:stop])")
    return match["layer"], int(match["start"]), int(match["stop"])


def channel_ranges(channels: int, group: int) -> list[tuple[int, int]]:
    return [(start, min(start + group, channels)) for start in range(0, channels, group)]


def group_table(
    table: CandidateTable, channels: ChannelErrors, group: int
) -> tuple[CandidateTable, np.ndarray, np.ndarray]:
    """The candidate table over channel groups of ``group`` channels, with each unit's curvature
    trace [U] and the index of its layer [U]."""
    if table.paired:
        raise InputError(
            "per-channel-group allocation takes weight formats only (no --act-formats)"
        )
    missing = [name for name in table.weight_formats if name not in channels.format_names]
    if missing:
        raise InputError(
            f"channel errors cover {', '.join(channels.format_names)}, not "
            f"{', '.join(missing)}: rerun lcpaq analyze"
        )
    # The table may be a subset of the analysed candidates (`CandidateTable.select`).
    columns = [channels.format_names.index(name) for name in table.weight_formats]
    names: list[str] = []
    rows: list[dict[str, np.ndarray]] = []
    traces: list[float] = []
    owners: list[int] = []
    for index, layer in enumerate(table.layer_names):
        errors, trace = channels.errors[layer], channels.trace[layer]
        count = len(trace)
        for start, stop in channel_ranges(count, group):
            share = (stop - start) / count
            names.append(unit_name(layer, start, stop))
            rows.append(
                {
                    "num_params": np.asarray(table.num_params[index] * share),
                    "weight_bits": table.weight_bits[index] * share,
                    "size_bits": table.size_bits[index] * share,
                    **{name: errors[name][start:stop, columns].sum(axis=0) for name in FIELDS},
                }
            )
            traces.append(float(np.sum(trace[start:stop])))
            owners.append(index)
    num_params = np.array([row["num_params"] for row in rows])
    if not np.allclose(num_params, np.round(num_params)):
        raise InputError("a layer's weight count does not split evenly over its output channels")
    units = CandidateTable(
        layer_names=tuple(names),
        format_names=table.format_names,
        num_params=np.round(num_params).astype(np.int64),
        bits=table.bits,
        weight_bits=np.stack([row["weight_bits"] for row in rows]),
        size_bits=np.stack([row["size_bits"] for row in rows]),
        error_sq=np.stack([row["error_sq"] for row in rows]),
        weighted_error=np.stack([row["weighted_error"] for row in rows]),
        output_error=np.stack([row["output_error"] for row in rows]),
    )
    return units, np.array(traces), np.array(owners)


def layer_groups(
    unit_names: Sequence[str], formats: Sequence[str]
) -> dict[str, list[tuple[int, int, str]]]:
    """Layer → [(c0, c1, format), …] in channel order, from a unit allocation."""
    result: dict[str, list[tuple[int, int, str]]] = {}
    for name, fmt in zip(unit_names, formats):
        layer, start, stop = split_unit(name)
        result.setdefault(layer, []).append((start, stop, fmt))
    return {layer: sorted(groups) for layer, groups in result.items()}


def channel_counts(
    groups: Mapping[str, Sequence[tuple[int, int, str]]], format_names: Sequence[str]
) -> dict[str, dict[str, int]]:
    """Layer → format → how many output channels got it (the per-layer bar plot)."""
    return {
        layer: {
            fmt: sum(stop - start for start, stop, f in spans if f == fmt) for fmt in format_names
        }
        for layer, spans in groups.items()
    }


def channel_error_arrays(channels: ChannelErrors) -> dict[str, np.ndarray]:
    """The arrays of ``channel_errors.npz`` (written by analyze through `lcpaq.runfolder`)."""
    arrays: dict[str, np.ndarray] = {"format_names": np.array(channels.format_names)}
    for layer, fields in channels.errors.items():
        for name, values in fields.items():
            arrays[f"{layer}/{name}"] = values
        arrays[f"{layer}/trace"] = channels.trace[layer]
    return arrays


def save_channel_errors(path: Path, channels: ChannelErrors) -> None:
    np.savez(path, **channel_error_arrays(channels))  # type: ignore[arg-type]


def load_channel_errors(path: Path, layer_names: Sequence[str]) -> ChannelErrors:
    """The per-channel errors of these layers; `InputError` naming the file when it lacks one."""
    if not path.is_file():
        raise InputError(
            f"{path} is missing: per-channel-group allocation needs an analysis that recorded "
            "per-channel errors (rerun lcpaq analyze)"
        )
    with np.load(path, allow_pickle=False) as data:
        names = tuple(str(name) for name in data["format_names"])
        errors, trace = {}, {}
        for layer in layer_names:
            if f"{layer}/trace" not in data:
                raise InputError(f"{path} has no per-channel errors of layer {layer!r}")
            errors[layer] = {name: np.asarray(data[f"{layer}/{name}"]) for name in FIELDS}
            trace[layer] = np.asarray(data[f"{layer}/trace"])
    return ChannelErrors(names, errors, trace)
