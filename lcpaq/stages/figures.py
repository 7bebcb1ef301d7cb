"""The per-layer figures of the ``plot`` stage: each layer's candidates as predicted loss
against weight bits with its Pareto frontier (``plots/frontiers.png``), and the chosen bits per
layer next to its Hessian trace (``plots/bit_allocation.png``). Shared styles:
`lcpaq.stages.figure_style`."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from lcpaq.stages.figure_style import (
    CHOSEN,
    KEPT,
    NAME_CHARS,
    PRUNED,
    TRACE,
    ZERO,
    entry,
    log_floor,
    new_figure,
    save,
    short,
)


def plot_layer_frontiers(
    path: str | os.PathLike[str],
    *,
    layer_names: Sequence[str],
    format_names: Sequence[str],
    bits: np.ndarray,
    scores: np.ndarray,
    kept: np.ndarray,
    chosen: Sequence[str] | None,
    title: str,
    kinds: Sequence[str] | None = None,
    activation_formats: Sequence[str] | None = None,
) -> Path:
    """Plot each layer's candidate formats as predicted loss increase against weight bits.

    INT formats are drawn as circles, FP formats as diamonds (``kinds``); with (weight,
    activation) candidate pairs each activation format gets its own colour and a small sideways
    offset, and its own frontier line.

    Args:
        path: Destination PNG file; parent folders are created.
        layer_names: Layer names, length ``L``, in execution order.
        format_names: Candidate format names, length ``F``.
        bits: Int array ``[F]``, code width of each format.
        scores: Float array ``[L, F]``, predicted loss increase in nats; zeros are drawn at a
            floor a decade below the layer's smallest positive score, with a marker.
        kept: Bool array ``[L, F]``, True where the format is on the layer's Pareto frontier.
        chosen: Chosen format name per layer, or None when nothing was allocated yet.
        title: Figure title; should name the model and the budget.
        kinds: ``"int"`` or ``"fp"`` per format (marker shape); default all INT.
        activation_formats: Activation format per candidate (colour), or None.

    Returns:
        The path of the written PNG.
    """
    bits = np.asarray(bits, dtype=float)
    kinds = list(kinds) if kinds is not None else ["int"] * len(format_names)
    acts = list(activation_formats) if activation_formats is not None else [""] * len(bits)
    if len(kinds) != len(format_names) or len(acts) != len(format_names):
        raise ValueError("kinds and activation_formats need one entry per format")
    scores = np.asarray(scores, dtype=float)
    kept = np.asarray(kept, dtype=bool)
    n_layers = len(layer_names)
    if scores.shape != (n_layers, len(format_names)) or kept.shape != scores.shape:
        raise ValueError("scores and kept must have shape [len(layer_names), len(format_names)]")
    if chosen is not None and len(chosen) != n_layers:
        raise ValueError("chosen must name one format per layer")
    layout = _Layout(bits, acts, np.array([kind == "fp" for kind in kinds], dtype=bool))
    zero = np.isfinite(scores) & (scores <= 0)
    column = {name: i for i, name in enumerate(format_names)}

    ncols = max(1, min(5, n_layers))
    nrows = max(1, math.ceil(n_layers / ncols))
    fig = new_figure(max(3.0 * ncols + 0.6, 6.5), 2.2 * nrows + 1.3)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, squeeze=False)).ravel()
    for index, ax in enumerate(axes):
        if index >= n_layers:
            ax.set_visible(False)
            continue
        pick = column.get(chosen[index]) if chosen is not None else None
        _draw_layer(ax, layout, scores[index], kept[index], zero[index], pick)
        label = short(layer_names[index])
        if pick is not None and chosen is not None:
            label = f"{short(layer_names[index], NAME_CHARS - 8)} → {chosen[index]}"
        ax.set_title(label, fontsize=8)
        if index + ncols >= n_layers:  # nothing below this panel: it carries the x axis labels
            ax.tick_params(labelbottom=True)
            ax.set_xlabel("weight bits", fontsize=9)

    handles = _frontier_legend(layout, chosen is not None, bool(zero.any()))
    legend_cols = len(handles) if ncols >= 3 else 2  # narrow figures stack the legend
    fig.legend(handles=handles, loc="outside lower center", ncols=legend_cols, fontsize=9)
    fig.suptitle(title, fontsize=12)
    fig.supylabel("predicted loss increase (nats, log scale)", fontsize=10)
    return save(fig, path)


class _Layout:
    """Where and how each candidate is drawn: x = weight bits, shifted sideways per activation
    format so pairs that share a weight format sit side by side instead of on top of each
    other; one colour per activation format; FP formats as diamonds."""

    def __init__(self, bits: np.ndarray, acts: list[str], is_fp: np.ndarray) -> None:
        self.bits = bits
        self.acts = acts
        self.is_fp = is_fp
        self.act_names = list(dict.fromkeys(acts))
        self.color = (
            dict(zip(self.act_names, colormaps["tab10"](np.arange(len(self.act_names)) % 10)))
            if len(self.act_names) > 1
            else {self.act_names[0]: KEPT["color"]}
        )
        spread = 0.5 if len(self.act_names) > 1 else 0.0
        offset = {
            name: spread * (k / max(len(self.act_names) - 1, 1) - 0.5)
            for k, name in enumerate(self.act_names)
        }
        self.x = bits + np.array([offset[name] for name in acts])

    def of_activation(self, name: str) -> np.ndarray:
        return np.array([act == name for act in self.acts])


def _draw_layer(
    ax: Axes,
    layout: _Layout,
    scores: np.ndarray,
    on_front: np.ndarray,
    zero: np.ndarray,
    pick: int | None,
) -> None:
    """One layer's panel: frontier lines, kept and pruned candidates, zeros, the choice."""
    x_all = layout.x
    # Each layer gets its own floor so one tiny score elsewhere does not squash this panel.
    finite = np.isfinite(scores)  # NaN/inf scores are left out, not drawn
    row = np.where(finite, np.maximum(scores, log_floor(scores)), np.nan)
    for name in layout.act_names:
        line = on_front & layout.of_activation(name)
        order = np.lexsort((-row[line], x_all[line]))
        ax.plot(x_all[line][order], row[line][order], color=layout.color[name], lw=1.3)
    for fp, marker in ((False, "o"), (True, "D")):
        for name in layout.act_names:
            group = (layout.is_fp == fp) & layout.of_activation(name)
            style = {**KEPT, "marker": marker, "lw": 0, "color": layout.color[name]}
            ax.plot(x_all[group & on_front], row[group & on_front], **style)
            ax.plot(
                x_all[group & ~on_front],
                row[group & ~on_front],
                **{**PRUNED, "marker": marker},
            )
    ax.plot(x_all[zero], row[zero], **ZERO)
    if pick is not None:
        ax.plot(x_all[pick], row[pick], clip_on=False, **CHOSEN)
    ax.set_yscale("log")
    ax.tick_params(labelsize=7)
    ax.grid(True, which="major", alpha=0.3)
    ax.set_xticks(np.unique(layout.bits))
    ax.margins(x=0.08, y=0.12)


def _frontier_legend(layout: _Layout, chosen: bool, zero: bool) -> list[Line2D]:
    handles = [entry("Pareto frontier (kept)", KEPT), entry("pruned (dominated)", PRUNED)]
    if layout.is_fp.any():
        handles = [
            entry("INT format, kept", KEPT),
            entry("FP format, kept", {**KEPT, "marker": "D"}),
            entry("pruned (hollow)", PRUNED),
        ]
    if len(layout.act_names) > 1:
        handles += [
            entry(f"activations {name}", {**KEPT, "color": layout.color[name]})
            for name in layout.act_names
        ]
    if chosen:
        handles.append(entry("chosen format", CHOSEN))
    if zero:
        handles.append(entry("exactly 0 (drawn at floor)", ZERO))
    return handles


def plot_bit_allocation(
    path: str | os.PathLike[str],
    *,
    layer_names: Sequence[str],
    bits: Sequence[float],
    num_params: np.ndarray,
    trace: np.ndarray,
    trace_stderr: np.ndarray,
    title: str,
) -> Path:
    """Plot the chosen bit width per layer next to each layer's Hessian trace.

    Args:
        path: Destination PNG file; parent folders are created.
        layer_names: Layer names, length ``L``, in execution order.
        bits: Chosen weight bits per layer (log2(3) for ternary, 0 for pruned).
        num_params: Weight count per layer ``[L]``, used for the parameter-weighted average.
        trace: Estimated Hessian trace ``tr(H_ll)`` per layer ``[L]``.
        trace_stderr: Standard error of each trace estimate ``[L]``.
        title: Figure title; should name the model and the budget.

    Returns:
        The path of the written PNG.
    """
    bit_values = np.asarray(bits, dtype=float)
    params = np.asarray(num_params, dtype=float)
    trace = np.asarray(trace, dtype=float)
    stderr = np.abs(np.asarray(trace_stderr, dtype=float))
    n_layers = len(layer_names)
    if not (bit_values.shape == params.shape == trace.shape == stderr.shape == (n_layers,)):
        raise ValueError(
            "bits, num_params, trace and trace_stderr must each have one entry per layer"
        )
    total = float(params.sum())
    average = f"{float((bit_values * params).sum()) / total:.2f} bits" if total > 0 else "n/a"

    levels = sorted(set(bit_values.tolist()))
    ramp = colormaps["viridis"](np.linspace(0.3, 0.95, len(levels)) if len(levels) > 1 else [0.5])
    palette = dict(zip(levels, ramp))  # sequential: darker = fewer bits
    x = np.arange(n_layers)
    fig = new_figure(max(8.0, 0.32 * n_layers + 3.0), 6.0)
    ax = fig.subplots()
    colors = [palette[b] for b in bit_values.tolist()]
    ax.bar(x, bit_values, color=colors, edgecolor="black", linewidth=0.4, width=0.75, zorder=2)
    ax.set_xticks(x, [short(name) for name in layer_names], rotation=60, ha="right", fontsize=7)
    ax.set_xlim(-0.6, n_layers - 0.4)
    top = int(bit_values.max(initial=8))
    ax.set_ylim(0, top + 0.5)
    ax.set_yticks(range(0, top + 1))
    ax.set_ylabel("weight bits")
    ax.set_xlabel("layer (execution order)")
    ax.grid(True, axis="y", alpha=0.3, zorder=0)

    twin = ax.twinx()
    floor = log_floor(trace)
    shown = np.maximum(trace, floor)
    lower = shown - np.maximum(shown - stderr, floor)
    twin.errorbar(x, shown, yerr=[lower, stderr], lw=0.8, zorder=4, **TRACE)
    nonpositive = np.isfinite(trace) & (trace <= 0)
    twin.plot(x[nonpositive], shown[nonpositive], **ZERO)
    twin.set_yscale("log")
    twin.set_ylabel("Hessian trace tr(H_ll) (log)")

    handles: list[Patch | Line2D] = [
        Patch(facecolor=palette[b], edgecolor="black", label=f"{b:.3g} bits") for b in levels
    ]
    handles.append(entry("Hessian trace ± stderr", {"color": "black", "marker": "o", "ms": 4}))
    if nonpositive.any():
        handles.append(entry("trace ≤ 0 (drawn at floor)", ZERO))
    above: dict[str, Any] = {"loc": "lower center", "bbox_to_anchor": (0.5, 1.01), "frameon": False}
    ax.legend(handles=handles, fontsize=8, ncols=len(handles), **above)
    fig.suptitle(f"{title}\nparameter-weighted average: {average}", fontsize=12)
    return save(fig, path)
