"""The per-layer bar plot of a per-channel-group allocation: how many output channels of each
layer got each format (`lcpaq.stages.group_allocate`)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps

from lcpaq.quant.formats import get_format
from lcpaq.stages.figure_style import new_figure, save, short


def plot_channel_formats(
    path: str | os.PathLike[str],
    *,
    counts: Mapping[str, Mapping[str, int]],
    format_names: Sequence[str],
    title: str,
) -> Path:
    """Stacked bars, one per layer (in ``counts`` order): output channels per format, formats
    ordered by the bits they count (pruned at the bottom, in grey: the structured sparsity)."""
    layers = list(counts)
    ordered = sorted(format_names, key=lambda name: get_format(name).budget_bits)
    ramp = colormaps["viridis"](np.linspace(0.15, 0.95, max(len(ordered), 1)))
    colors = {name: ramp[index] for index, name in enumerate(ordered)}
    if "pruned" in colors:
        colors["pruned"] = np.array([0.75, 0.75, 0.75, 1.0])
    x = np.arange(len(layers))
    fig = new_figure(max(8.0, 0.32 * len(layers) + 3.0), 5.5)
    ax = fig.subplots()
    bottom = np.zeros(len(layers))
    for name in ordered:
        heights = np.array([counts[layer].get(name, 0) for layer in layers], dtype=float)
        if not heights.any():
            continue
        label = f"{name} ({get_format(name).budget_bits:.3g} bits)"
        ax.bar(
            x,
            heights,
            bottom=bottom,
            color=colors[name],
            edgecolor="black",
            lw=0.3,
            width=0.75,
            label=label,
            zorder=2,
        )
        bottom += heights
    ax.set_xticks(x, [short(layer) for layer in layers], rotation=60, ha="right", fontsize=7)
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.set_ylabel("output channels")
    ax.set_xlabel("layer (execution order)")
    ax.grid(True, axis="y", alpha=0.3, zorder=0)
    ax.legend(
        fontsize=8,
        ncols=min(len(ordered), 5),
        loc="lower center",
        bbox_to_anchor=(0.5, 1.01),
        frameon=False,
    )
    fig.suptitle(title, fontsize=12)
    return save(fig, path)
