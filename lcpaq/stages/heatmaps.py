"""The heatmaps of the ``plot`` stage: layer × candidate scores with the choice outlined
(``plots/candidate_heatmap.png``) and layer × layer inter-layer terms
(``plots/interactions.png``). Shared styles: `lcpaq.stages.figure_style`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from lcpaq.stages.figure_style import entry, log_floor, new_figure, save, short


def plot_candidate_heatmap(
    path: str | os.PathLike[str],
    *,
    layer_names: Sequence[str],
    format_names: Sequence[str],
    values: np.ndarray,
    chosen: Sequence[str] | None,
    allowed: np.ndarray | None,
    title: str,
    value_label: str = "predicted loss increase (nats)",
) -> Path:
    """Heatmap of layer × candidate format, log colour scale, the chosen cell outlined.

    Args:
        path: Destination PNG file; parent folders are created.
        layer_names: Layer names, length ``L`` (rows, execution order).
        format_names: Candidate names, length ``C`` (columns).
        values: Float array ``[L, C]`` (e.g. the score); values ≤ 0 are drawn at a floor a decade
            below the smallest positive value, NaN cells are blank.
        chosen: Chosen candidate per layer (outlined in red, with a star), or None.
        allowed: Bool ``[L, C]``; candidates the ILP could not pick (pruned as dominated, or
            excluded by the layer policy) are crossed out. None: all allowed.
        title: Figure title; should name the model and the budget.
        value_label: Colour bar label.

    Returns:
        The path of the written PNG.
    """
    values = np.asarray(values, dtype=float)
    n_layers, n_formats = len(layer_names), len(format_names)
    if values.shape != (n_layers, n_formats):
        raise ValueError("values must have shape [len(layer_names), len(format_names)]")
    if allowed is not None and np.shape(allowed) != values.shape:
        raise ValueError("allowed must have the shape of values")
    if chosen is not None and len(chosen) != n_layers:
        raise ValueError("chosen must name one format per layer")
    floor = log_floor(values)
    shown = np.where(np.isfinite(values), np.maximum(values, floor), np.nan)
    finite = shown[np.isfinite(shown)]
    high = float(finite.max()) if finite.size else 1.0
    norm = LogNorm(vmin=min(floor, high), vmax=max(high, floor * 10))
    fig = new_figure(max(6.0, 0.75 * n_formats + 4.0), max(3.5, 0.3 * n_layers + 2.2))
    ax = fig.subplots()
    image = ax.imshow(shown, aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
    colorbar = fig.colorbar(image, ax=ax, pad=0.01)
    colorbar.set_label(f"{value_label} (log)")
    ax.set_xticks(np.arange(n_formats), list(format_names), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(np.arange(n_layers), [short(name) for name in layer_names], fontsize=7)
    ax.set_xlabel("candidate format")
    ax.set_ylabel("layer (execution order)")
    if n_layers * n_formats <= 600:  # numbers stay legible on small grids only
        _cell_numbers(ax, values, shown, norm)
    handles = _marks(ax, format_names, chosen, allowed)
    if handles:
        above: dict[str, Any] = {
            "loc": "lower center",
            "bbox_to_anchor": (0.5, 1.01),
            "frameon": False,
        }
        ax.legend(handles=handles, fontsize=8, ncols=len(handles), **above)
    fig.suptitle(title, fontsize=12)
    return save(fig, path)


def _cell_numbers(ax: Axes, values: np.ndarray, shown: np.ndarray, norm: LogNorm) -> None:
    """Each finite value in its cell, white on the dark half of the colour scale."""
    for row, column in np.ndindex(values.shape):
        if np.isfinite(values[row, column]):
            light = norm(shown[row, column]) < 0.5
            ax.text(
                column,
                row,
                f"{values[row, column]:.1g}",
                ha="center",
                va="center",
                fontsize=5.5,
                color="white" if light else "black",
            )


def _marks(
    ax: Axes,
    format_names: Sequence[str],
    chosen: Sequence[str] | None,
    allowed: np.ndarray | None,
) -> list[Patch | Line2D]:
    """Cross out candidates the ILP could not pick, outline the chosen ones; legend entries."""
    handles: list[Patch | Line2D] = []
    if allowed is not None and not np.all(allowed):
        rows, columns = np.nonzero(~np.asarray(allowed, dtype=bool))
        # In the cell's corner, so the value stays legible.
        ax.plot(columns + 0.34, rows - 0.26, "x", color="lightgray", ms=4, mew=1.0, lw=0)
        handles.append(
            entry(
                "not selectable (dominated or fixed by policy)",
                {"color": "lightgray", "marker": "x", "lw": 0},
            )
        )
    if chosen is not None:
        column_of = {name: k for k, name in enumerate(format_names)}
        for row, name in enumerate(chosen):
            if name in column_of:
                box = Rectangle(
                    (column_of[name] - 0.5, row - 0.5), 1, 1, fill=False, ec="red", lw=2.2, zorder=5
                )
                ax.add_patch(box)
        handles.append(Patch(facecolor="none", edgecolor="red", lw=2.2, label="chosen format"))
    return handles


def plot_interaction_heatmap(
    path: str | os.PathLike[str],
    *,
    layer_names: Sequence[str],
    pairs: Sequence[tuple[int, int]],
    panels: Sequence[tuple[str, np.ndarray, np.ndarray]],
    title: str,
) -> Path:
    """Layer × layer heatmaps of signed inter-layer terms C_ij, one panel per view.

    Args:
        path: Destination PNG file; parent folders are created.
        layer_names: Layer names, length ``L``, in execution order.
        pairs: The measured pairs (i, j), i < j; other cells (and the diagonal) are drawn gray.
        panels: (label, values [P], significant [P]) per panel: a signed value per pair (e.g. the
            entry of largest magnitude over format pairs, or C at the chosen formats) and whether
            it passed the significance test (|C| ≥ z·SE), marked with a dot.
        title: Figure title; should name the model and the source of the terms.

    Returns:
        The path of the written PNG.
    """
    n_layers = len(layer_names)
    pairs = [(int(i), int(j)) for i, j in pairs]
    if any(not 0 <= i < j < n_layers for i, j in pairs):
        raise ValueError(f"pairs must satisfy 0 <= i < j < {n_layers}")
    if not panels:
        raise ValueError("give at least one panel")
    size = max(4.5, 0.3 * n_layers + 2.5)
    fig = new_figure(size * len(panels) + 0.8, size + 0.9)
    axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)).ravel()
    cmap = colormaps["RdBu_r"].with_extremes(bad="0.88")
    for ax, (label, values, significant) in zip(axes, panels):
        values = np.asarray(values, dtype=float)
        significant = np.asarray(significant, dtype=bool)
        if values.shape != (len(pairs),) or significant.shape != values.shape:
            raise ValueError(f"panel {label!r}: values and significant need one entry per pair")
        matrix = np.full((n_layers, n_layers), np.nan)
        for (i, j), value in zip(pairs, values):
            matrix[i, j] = matrix[j, i] = value
        finite = np.abs(values[np.isfinite(values)])
        limit = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        # Symmetric limits: white is exactly 0, red raises the loss, blue lowers it.
        image = ax.imshow(
            np.ma.masked_invalid(matrix), cmap=cmap, vmin=-limit, vmax=limit, interpolation="none"
        )
        marked = [(i, j) for (i, j), keep in zip(pairs, significant) if keep]
        if marked:
            rows = np.array([p for i, j in marked for p in (i, j)])
            cols = np.array([p for i, j in marked for p in (j, i)])
            ax.plot(cols, rows, "o", color="black", ms=2.5, lw=0)
        ticks = np.arange(n_layers)
        names = [short(name, 22) for name in layer_names]
        ax.set_xticks(ticks, names, rotation=70, ha="right", fontsize=6)
        ax.set_yticks(ticks, names, fontsize=6)
        ax.set_xlabel("layer j (execution order)")
        ax.set_ylabel("layer i (execution order)")
        ax.set_title(label, fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8, label="C_ij (nats; > 0 raises the loss)")
    handles = [
        entry("significant (|C| ≥ z·SE)", {"color": "black", "marker": "o", "ms": 3, "lw": 0}),
        Patch(facecolor="0.88", edgecolor="none", label="pair not measured / diagonal"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    return save(fig, path)
