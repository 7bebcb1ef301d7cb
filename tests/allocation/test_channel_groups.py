"""Channel-group units in `lcpaq.allocation.channel_groups`: the table over groups adds up to the
layer table, names round-trip, the allocation maps back to spans per layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lcpaq.allocation.channel_groups import (
    ChannelErrors,
    channel_counts,
    group_table,
    layer_groups,
    load_channel_errors,
    parse_allocate_per,
    save_channel_errors,
    split_unit,
    unit_name,
)
from lcpaq.allocation.table import CandidateTable
from lcpaq.errors import InputError

FORMATS = ("ternary", "int2", "int4")


def _case() -> tuple[CandidateTable, ChannelErrors]:
    rng = np.random.default_rng(0)
    channels = {"a": 5, "b": 3}
    fan_in = {"a": 4, "b": 6}
    errors, trace = {}, {}
    for layer, count in channels.items():
        errors[layer] = {
            name: rng.random((count, len(FORMATS)))
            for name in ("error_sq", "weighted_error", "output_error")
        }
        trace[layer] = rng.random(count)
    names = tuple(channels)
    params = np.array([channels[n] * fan_in[n] for n in names])
    bits = np.array([1.585, 2.0, 4.0])
    table = CandidateTable(
        layer_names=names,
        format_names=FORMATS,
        num_params=params,
        bits=bits,
        weight_bits=params[:, None] * bits[None, :],
        size_bits=params[:, None] * bits[None, :] + 100.0,
        error_sq=np.stack([errors[n]["error_sq"].sum(0) for n in names]),
        weighted_error=np.stack([errors[n]["weighted_error"].sum(0) for n in names]),
        output_error=np.stack([errors[n]["output_error"].sum(0) for n in names]),
    )
    return table, ChannelErrors(FORMATS, errors, trace)


@pytest.mark.parametrize("group", [1, 2, 4, 16])
def test_units_add_up_to_their_layers(group: int) -> None:
    table, channels = _case()
    units, traces, owners = group_table(table, channels, group)
    for index, layer in enumerate(table.layer_names):
        mine = owners == index
        assert units.num_params[mine].sum() == table.num_params[index]
        for field in ("weight_bits", "size_bits", "error_sq", "weighted_error", "output_error"):
            assert np.allclose(getattr(units, field)[mine].sum(0), getattr(table, field)[index])
        assert np.isclose(traces[mine].sum(), channels.trace[layer].sum())
    expected = sum(-(-len(channels.trace[layer]) // group) for layer in table.layer_names)
    assert len(units.layer_names) == expected


def test_unit_names_and_spans() -> None:
    assert split_unit(unit_name("layer1.0.conv1", 16, 32)) == ("layer1.0.conv1", 16, 32)
    with pytest.raises(InputError):
        split_unit("conv1")
    groups = layer_groups(["a[2:4]", "a[0:2]", "b[0:3]"], ["int2", "ternary", "int4"])
    assert groups == {"a": [(0, 2, "ternary"), (2, 4, "int2")], "b": [(0, 3, "int4")]}
    counts = channel_counts(groups, FORMATS)
    assert counts["a"] == {"ternary": 2, "int2": 2, "int4": 0}


@pytest.mark.parametrize(
    ("text", "group"), [("layer", None), ("channel-group", 16), ("channel-group:1", 1)]
)
def test_parse_allocate_per(text: str, group: int | None) -> None:
    assert parse_allocate_per(text) == group


@pytest.mark.parametrize("text", ["channel-group:0", "channel-group:x", "channels", ""])
def test_parse_allocate_per_refuses(text: str) -> None:
    with pytest.raises(InputError, match="--allocate-per"):
        parse_allocate_per(text)


def test_channel_errors_file_round_trip(tmp_path: Path) -> None:
    _, channels = _case()
    save_channel_errors(tmp_path / "c.npz", channels)
    loaded = load_channel_errors(tmp_path / "c.npz", ["a", "b"])
    assert loaded.format_names == FORMATS
    assert np.array_equal(loaded.errors["b"]["output_error"], channels.errors["b"]["output_error"])
    with pytest.raises(InputError, match="no per-channel errors of layer 'c'"):
        load_channel_errors(tmp_path / "c.npz", ["c"])
    with pytest.raises(InputError, match="missing"):
        load_channel_errors(tmp_path / "none.npz", ["a"])


def test_a_subset_of_the_analysed_formats_takes_their_columns() -> None:
    table, channels = _case()
    subset = table.select([2, 0])  # int4, ternary
    units, _, _ = group_table(subset, channels, 2)
    first = channels.errors["a"]["error_sq"][0:2]
    assert np.allclose(units.error_sq[0], first[:, [2, 0]].sum(0))
    with pytest.raises(InputError, match="not ternary, int4"):
        group_table(table, ChannelErrors(("int2",), channels.errors, channels.trace), 2)
