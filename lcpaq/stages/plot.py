"""PNG plots of a quantization analysis, meant to be read without looking at any code.

Every figure carries axis labels with units, a legend and a title naming the model and the
budget (passed in by the caller as ``title``). Figures are rendered with the Agg backend through
an explicit ``FigureCanvasAgg`` rather than through ``pyplot``, so plotting never changes the
process-wide matplotlib backend and works headless. Each PNG is written to a temporary file in
the target folder and renamed into place, so an interrupted run never leaves a half-written
image behind.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from lcpaq.runfolder import atomic_path

_DPI = 120
_NAME_CHARS = 34
# Marker styles shared by the plotted points and their legend entries.
_KEPT = {"color": "tab:blue", "marker": "o", "ms": 4, "lw": 1.3}
_PRUNED = {"color": "gray", "marker": "o", "mfc": "none", "ms": 4, "lw": 0, "alpha": 0.5}
_CHOSEN = {"color": "red", "marker": "*", "mec": "darkred", "ms": 12, "lw": 0, "zorder": 6}
_ZERO = {"color": "black", "marker": "v", "mfc": "white", "ms": 6, "lw": 0, "zorder": 5}
_TRACE = {"fmt": "o", "color": "black", "mec": "white", "mew": 0.8, "ms": 5, "capsize": 2}


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically, release the figure and return the path."""
    target = Path(path)
    try:
        with atomic_path(target) as temp:
            fig.savefig(temp, format="png", dpi=_DPI)
    finally:
        fig.clear()
    return target


def _log_floor(values: np.ndarray) -> float:
    """A positive floor for log axes: a decade below the smallest positive finite value."""
    positive = values[np.isfinite(values) & (values > 0)]
    return float(positive.min()) / 10.0 if positive.size else 1e-12


def _short(name: str, limit: int = _NAME_CHARS) -> str:
    """Keep the informative tail of a long dotted module name."""
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]


def _entry(label: str, style: Mapping[str, object]) -> Line2D:
    """A legend entry drawn like the plotted points."""
    return Line2D([], [], label=label, **style)


def _annotate_points(ax: Axes, x: np.ndarray, y: np.ndarray, names: Sequence[str]) -> None:
    """Label points by name; coinciding points share one label, stacked points alternate sides."""
    groups: dict[tuple[float, float], list[str]] = {}
    for px, py, name in zip(x, y, names):
        groups.setdefault((round(float(px), 6), float(f"{py:.3g}")), []).append(name)
    seen_x: dict[float, int] = {}
    right_edge = float(np.max(x)) - 0.15 * float(np.ptp(x)) if len(x) > 1 else np.inf
    for (px, py), group in sorted(groups.items(), key=lambda item: (item[0][0], -item[0][1])):
        nth = seen_x.get(px, 0)
        seen_x[px] = nth + 1
        dx = 7 if nth % 2 == 0 and px < right_edge else -7  # left of points at the right edge
        ax.annotate(
            " / ".join(group),
            (px, py),
            xytext=(dx, 5 if nth % 2 == 0 else -12),
            textcoords="offset points",
            ha="left" if dx > 0 else "right",
            bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.75},
            fontsize=8,
            color="saddlebrown",
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
    act_names = list(dict.fromkeys(acts))
    act_color = (
        dict(zip(act_names, colormaps["tab10"](np.arange(len(act_names)) % 10)))
        if len(act_names) > 1
        else {act_names[0]: _KEPT["color"]}
    )
    # Pairs that share a weight format sit side by side instead of on top of each other.
    spread = 0.5 if len(act_names) > 1 else 0.0
    offset = {
        name: spread * (k / max(len(act_names) - 1, 1) - 0.5) for k, name in enumerate(act_names)
    }
    x_all = bits + np.array([offset[name] for name in acts])
    is_fp = np.array([kind == "fp" for kind in kinds], dtype=bool)
    scores = np.asarray(scores, dtype=float)
    kept = np.asarray(kept, dtype=bool)
    n_layers = len(layer_names)
    if scores.shape != (n_layers, len(format_names)) or kept.shape != scores.shape:
        raise ValueError("scores and kept must have shape [len(layer_names), len(format_names)]")
    if chosen is not None and len(chosen) != n_layers:
        raise ValueError("chosen must name one format per layer")
    zero = np.isfinite(scores) & (scores <= 0)
    column = {name: i for i, name in enumerate(format_names)}

    ncols = max(1, min(5, n_layers))
    nrows = max(1, math.ceil(n_layers / ncols))
    fig = _new_figure(max(3.0 * ncols + 0.6, 6.5), 2.2 * nrows + 1.3)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, squeeze=False)).ravel()
    for index, ax in enumerate(axes):
        if index >= n_layers:
            ax.set_visible(False)
            continue
        # Each layer gets its own floor so one tiny score elsewhere does not squash this panel.
        finite = np.isfinite(scores[index])  # NaN/inf scores are left out, not drawn
        row = np.where(finite, np.maximum(scores[index], _log_floor(scores[index])), np.nan)
        on_front = kept[index]
        for name in act_names:
            line = on_front & np.array([act == name for act in acts])
            order = np.lexsort((-row[line], x_all[line]))
            ax.plot(x_all[line][order], row[line][order], color=act_color[name], lw=1.3)
        for fp, marker in ((False, "o"), (True, "D")):
            for name in act_names:
                group = (is_fp == fp) & np.array([act == name for act in acts])
                style = {**_KEPT, "marker": marker, "lw": 0, "color": act_color[name]}
                ax.plot(x_all[group & on_front], row[group & on_front], **style)
                ax.plot(
                    x_all[group & ~on_front],
                    row[group & ~on_front],
                    **{**_PRUNED, "marker": marker},
                )
        ax.plot(x_all[zero[index]], row[zero[index]], **_ZERO)
        label = _short(layer_names[index])
        if chosen is not None and chosen[index] in column:
            pick = column[chosen[index]]
            ax.plot(x_all[pick], row[pick], clip_on=False, **_CHOSEN)
            label = f"{_short(layer_names[index], _NAME_CHARS - 8)} → {chosen[index]}"
        ax.set_yscale("log")
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xticks(np.unique(bits))
        ax.margins(x=0.08, y=0.12)
        if index + ncols >= n_layers:  # nothing below this panel: it carries the x axis labels
            ax.tick_params(labelbottom=True)
            ax.set_xlabel("weight bits", fontsize=9)

    handles = [_entry("Pareto frontier (kept)", _KEPT), _entry("pruned (dominated)", _PRUNED)]
    if is_fp.any():
        handles = [
            _entry("INT format, kept", _KEPT),
            _entry("FP format, kept", {**_KEPT, "marker": "D"}),
            _entry("pruned (hollow)", _PRUNED),
        ]
    if len(act_names) > 1:
        handles += [
            _entry(f"activations {name}", {**_KEPT, "color": act_color[name]}) for name in act_names
        ]
    if chosen is not None:
        handles.append(_entry("chosen format", _CHOSEN))
    if zero.any():
        handles.append(_entry("exactly 0 (drawn at floor)", _ZERO))
    legend_cols = len(handles) if ncols >= 3 else 2  # narrow figures stack the legend
    fig.legend(handles=handles, loc="outside lower center", ncols=legend_cols, fontsize=9)
    fig.suptitle(title, fontsize=12)
    fig.supylabel("predicted loss increase (nats, log scale)", fontsize=10)
    return _save(fig, path)


#: Axis labels of the budget metrics (`lcpaq.allocation.costs.COST_METRICS`).
METRIC_LABELS = {
    "avg-bits": "average weight bits",
    "size-mb": "model size (MB)",
    "size-frac": "size (fraction of FP32)",
    "bitops-g": "BitOps (GBOPs per sample)",
    "ebops-g": "EBOPs (G per sample)",
    "latency-ms": "latency estimate (ms per sample)",
}


def _metric_of(point: Mapping, metric: str) -> float | None:
    """A point's value of a cost metric: ``costs[metric]``, or ``avg_bits`` for older points."""
    costs = point.get("costs") or {}
    if metric in costs:
        return float(costs[metric])
    if metric == "avg-bits" and point.get("avg_bits") is not None:
        return float(point["avg_bits"])
    if metric == "size-mb" and point.get("size_bytes") is not None:
        return float(point["size_bytes"]) / 1e6
    return None


def plot_model_curve(
    path: str | os.PathLike[str],
    *,
    sweep: Sequence[Mapping],
    uniform: Sequence[Mapping],
    chosen: Mapping | None,
    fp32_top1: float | None,
    title: str,
    metric: str = "avg-bits",
) -> Path:
    """Plot whole-model predicted loss and measured accuracy against one budget metric.

    Args:
        path: Destination PNG file; parent folders are created.
        sweep: Mixed-precision allocations over a budget sweep; each mapping has ``costs``
            (metric → value; older points: ``avg_bits``), ``predicted_loss_increase`` (nats) and
            ``top1`` (fraction in [0, 1] or None).
        uniform: Single-format baselines, the same keys plus ``format`` (e.g. ``"int8"``); FP
            formats (names starting with ``fp``) are drawn as diamonds, INT ones as squares.
        chosen: The exported allocation (same keys as ``sweep``), or None.
        fp32_top1: Top-1 accuracy of the unquantized model as a fraction, or None.
        title: Figure title; should name the model and the budget.
        metric: The x axis, one of `METRIC_LABELS`; points without it are left out.

    Returns:
        The path of the written PNG.
    """
    sweep = [p for p in sweep if _metric_of(p, metric) is not None]
    uniform = [p for p in uniform if _metric_of(p, metric) is not None]
    if chosen is not None and _metric_of(chosen, metric) is None:
        chosen = None
    sweep = sorted(sweep, key=lambda point: float(_metric_of(point, metric)))  # type: ignore[arg-type]
    everything = [*sweep, *uniform, *([chosen] if chosen is not None else [])]
    losses = np.array([float(p["predicted_loss_increase"]) for p in everything], dtype=float)
    floor = _log_floor(losses)

    def xy(points: Sequence[Mapping], key: str) -> tuple[np.ndarray, np.ndarray]:
        rows = [p for p in points if p.get(key) is not None]
        x = np.array([_metric_of(p, metric) for p in rows], dtype=float)
        y = np.array([float(p[key]) for p in rows], dtype=float)
        return x, (np.maximum(y, floor) if key == "predicted_loss_increase" else 100.0 * y)

    def is_fp(point: Mapping) -> bool:
        return str(point.get("weight_format", point.get("format", ""))).startswith("fp")

    fig = _new_figure(12.0, 5.0)
    left, right = fig.subplots(1, 2, sharex=True)
    for ax, key in ((left, "predicted_loss_increase"), (right, "top1")):
        sx, sy = xy(sweep, key)
        if sx.size:
            ax.plot(sx, sy, "o-", color="tab:blue", ms=5, label="lcpaq mixed precision")
        for fp, marker, color, text in (
            (False, "s", "tab:orange", "uniform INT format"),
            (True, "D", "tab:purple", "uniform FP format"),
        ):
            ux, uy = xy([p for p in uniform if is_fp(p) == fp], key)
            if ux.size:
                ax.plot(ux, uy, marker, color=color, ms=7, mec="black", lw=0, label=text)
        ux, uy = xy(uniform, key)
        if ux.size:  # one pass, so coinciding INT and FP points share one label
            names = [str(p.get("format", "")) for p in uniform if p.get(key) is not None]
            _annotate_points(ax, ux, uy, names)
        if chosen is not None and chosen.get(key) is not None:
            cx, cy = xy([chosen], key)
            ax.plot(
                cx,
                cy,
                label=f"chosen ({_metric_of(chosen, metric):.4g} {metric})",
                **{**_CHOSEN, "ms": 16},
            )
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.1)
        ax.set_xlabel(METRIC_LABELS.get(metric, metric))

    left.set_yscale("log")
    left.set_ylabel("predicted loss increase (nats, log)")
    left.set_title("predicted cost", fontsize=10)
    right.set_ylabel("top-1 accuracy (%)")
    right.set_title("measured accuracy", fontsize=10)
    if fp32_top1 is not None:
        fp32 = 100.0 * fp32_top1
        right.axhline(fp32, ls="--", color="black", lw=1.2, label=f"FP32 ({fp32:.2f}%)")
    if not any(p.get("top1") is not None for p in everything):
        centre = {"transform": right.transAxes, "ha": "center", "va": "center", "color": "gray"}
        right.text(0.5, 0.5, "accuracy not measured", fontsize=13, **centre)
        right.set_yticks([])
        right.grid(False)
    for ax in (left, right):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=12)
    return _save(fig, path)


def plot_bit_allocation(
    path: str | os.PathLike[str],
    *,
    layer_names: Sequence[str],
    bits: Sequence[int],
    num_params: np.ndarray,
    trace: np.ndarray,
    trace_stderr: np.ndarray,
    title: str,
) -> Path:
    """Plot the chosen bit width per layer next to each layer's Hessian trace.

    Args:
        path: Destination PNG file; parent folders are created.
        layer_names: Layer names, length ``L``, in execution order.
        bits: Chosen weight bit width per layer.
        num_params: Weight count per layer ``[L]``, used for the parameter-weighted average.
        trace: Estimated Hessian trace ``tr(H_ll)`` per layer ``[L]``.
        trace_stderr: Standard error of each trace estimate ``[L]``.
        title: Figure title; should name the model and the budget.

    Returns:
        The path of the written PNG.
    """
    bit_values = np.asarray(bits, dtype=int)
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
    fig = _new_figure(max(8.0, 0.32 * n_layers + 3.0), 6.0)
    ax = fig.subplots()
    colors = [palette[b] for b in bit_values.tolist()]
    ax.bar(x, bit_values, color=colors, edgecolor="black", linewidth=0.4, width=0.75, zorder=2)
    ax.set_xticks(x, [_short(name) for name in layer_names], rotation=60, ha="right", fontsize=7)
    ax.set_xlim(-0.6, n_layers - 0.4)
    top = int(bit_values.max(initial=8))
    ax.set_ylim(0, top + 0.5)
    ax.set_yticks(range(0, top + 1))
    ax.set_ylabel("weight bits")
    ax.set_xlabel("layer (execution order)")
    ax.grid(True, axis="y", alpha=0.3, zorder=0)

    twin = ax.twinx()
    floor = _log_floor(trace)
    shown = np.maximum(trace, floor)
    lower = shown - np.maximum(shown - stderr, floor)
    twin.errorbar(x, shown, yerr=[lower, stderr], lw=0.8, zorder=4, **_TRACE)
    nonpositive = np.isfinite(trace) & (trace <= 0)
    twin.plot(x[nonpositive], shown[nonpositive], **_ZERO)
    twin.set_yscale("log")
    twin.set_ylabel("Hessian trace tr(H_ll) (log)")

    handles: list[Patch | Line2D] = [
        Patch(facecolor=palette[b], edgecolor="black", label=f"{b} bits") for b in levels
    ]
    handles.append(_entry("Hessian trace ± stderr", {"color": "black", "marker": "o", "ms": 4}))
    if nonpositive.any():
        handles.append(_entry("trace ≤ 0 (drawn at floor)", _ZERO))
    above = {"loc": "lower center", "bbox_to_anchor": (0.5, 1.01), "frameon": False}
    ax.legend(handles=handles, fontsize=8, ncols=len(handles), **above)
    fig.suptitle(f"{title}\nparameter-weighted average: {average}", fontsize=12)
    return _save(fig, path)


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
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    values = np.asarray(values, dtype=float)
    n_layers, n_formats = len(layer_names), len(format_names)
    if values.shape != (n_layers, n_formats):
        raise ValueError("values must have shape [len(layer_names), len(format_names)]")
    if allowed is not None and np.shape(allowed) != values.shape:
        raise ValueError("allowed must have the shape of values")
    if chosen is not None and len(chosen) != n_layers:
        raise ValueError("chosen must name one format per layer")
    floor = _log_floor(values)
    shown = np.where(np.isfinite(values), np.maximum(values, floor), np.nan)
    finite = shown[np.isfinite(shown)]
    high = float(finite.max()) if finite.size else 1.0
    norm = LogNorm(vmin=min(floor, high), vmax=max(high, floor * 10))
    fig = _new_figure(max(6.0, 0.75 * n_formats + 4.0), max(3.5, 0.3 * n_layers + 2.2))
    ax = fig.subplots()
    image = ax.imshow(shown, aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
    colorbar = fig.colorbar(image, ax=ax, pad=0.01)
    colorbar.set_label(f"{value_label} (log)")
    ax.set_xticks(np.arange(n_formats), list(format_names), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(np.arange(n_layers), [_short(name) for name in layer_names], fontsize=7)
    ax.set_xlabel("candidate format")
    ax.set_ylabel("layer (execution order)")
    if n_layers * n_formats <= 600:  # numbers stay legible on small grids only
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
    handles: list[Patch | Line2D] = []
    if allowed is not None and not np.all(allowed):
        rows, columns = np.nonzero(~np.asarray(allowed, dtype=bool))
        # In the cell's corner, so the value stays legible.
        ax.plot(columns + 0.34, rows - 0.26, "x", color="lightgray", ms=4, mew=1.0, lw=0)
        handles.append(
            _entry(
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
    if handles:
        above = {"loc": "lower center", "bbox_to_anchor": (0.5, 1.01), "frameon": False}
        ax.legend(handles=handles, fontsize=8, ncols=len(handles), **above)
    fig.suptitle(title, fontsize=12)
    return _save(fig, path)


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
    fig = _new_figure(size * len(panels) + 0.8, size + 0.9)
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
        names = [_short(name, 22) for name in layer_names]
        ax.set_xticks(ticks, names, rotation=70, ha="right", fontsize=6)
        ax.set_yticks(ticks, names, fontsize=6)
        ax.set_xlabel("layer j (execution order)")
        ax.set_ylabel("layer i (execution order)")
        ax.set_title(label, fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8, label="C_ij (nats; > 0 raises the loss)")
    handles = [
        _entry("significant (|C| ≥ z·SE)", {"color": "black", "marker": "o", "ms": 3, "lw": 0}),
        Patch(facecolor="0.88", edgecolor="none", label="pair not measured / diagonal"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)
