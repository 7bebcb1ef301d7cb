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
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

_DPI = 120
_NAME_CHARS = 34
_UMASK = os.umask(0)
os.umask(_UMASK)


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically, release the figure and return the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        fig.savefig(temp, format="png", dpi=_DPI)
        os.chmod(temp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the usual file mode
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
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
) -> Path:
    """Plot each layer's candidate formats as predicted loss increase against weight bits.

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

    Returns:
        The path of the written PNG.
    """
    bits = np.asarray(bits, dtype=float)
    scores = np.asarray(scores, dtype=float)
    kept = np.asarray(kept, dtype=bool)
    n_layers = len(layer_names)
    if scores.shape != (n_layers, len(format_names)) or kept.shape != scores.shape:
        raise ValueError("scores and kept must have shape [len(layer_names), len(format_names)]")
    zero = np.isfinite(scores) & (scores <= 0)
    column = {name: i for i, name in enumerate(format_names)}

    ncols = max(1, min(5, n_layers))
    nrows = max(1, math.ceil(n_layers / ncols))
    fig = _new_figure(3.0 * ncols + 0.6, 2.2 * nrows + 1.3)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, squeeze=False)).ravel()
    for index, ax in enumerate(axes):
        if index >= n_layers:
            ax.set_visible(False)
            continue
        # Each layer gets its own floor so one tiny score elsewhere does not squash this panel.
        row = np.maximum(np.nan_to_num(scores[index], nan=0.0), _log_floor(scores[index]))
        on_front = kept[index]
        order = np.lexsort((-row[on_front], bits[on_front]))
        ax.plot(bits[on_front][order], row[on_front][order], "o-", color="tab:blue", ms=4, lw=1.3)
        ax.plot(
            bits[~on_front], row[~on_front], "o", mfc="none", mec="gray", alpha=0.45, ms=4, lw=0
        )
        ax.plot(bits[zero[index]], row[zero[index]], "v", color="black", ms=5, lw=0, zorder=4)
        label = _short(layer_names[index])
        if chosen is not None and chosen[index] in column:
            pick = column[chosen[index]]
            ax.plot(
                bits[pick],
                row[pick],
                "*",
                color="red",
                ms=12,
                mec="darkred",
                zorder=5,
                clip_on=False,
            )
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

    handles = [
        Line2D([], [], color="tab:blue", marker="o", ms=4, label="Pareto frontier (kept)"),
        Line2D(
            [],
            [],
            color="gray",
            marker="o",
            mfc="none",
            lw=0,
            alpha=0.6,
            label="pruned (dominated)",
        ),
    ]
    if chosen is not None:
        handles.append(
            Line2D(
                [], [], color="red", marker="*", mec="darkred", ms=12, lw=0, label="chosen format"
            )
        )
    if zero.any():
        handles.append(
            Line2D(
                [], [], color="black", marker="v", ms=5, lw=0, label="exactly 0 (drawn at floor)"
            )
        )
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=9)
    fig.suptitle(title, fontsize=12)
    fig.supylabel("predicted loss increase (nats, log scale)", fontsize=10)
    return _save(fig, path)


def plot_model_curve(
    path: str | os.PathLike[str],
    *,
    sweep: Sequence[Mapping],
    uniform: Sequence[Mapping],
    chosen: Mapping | None,
    fp32_top1: float | None,
    title: str,
) -> Path:
    """Plot whole-model predicted loss and measured accuracy against average weight bits.

    Args:
        path: Destination PNG file; parent folders are created.
        sweep: Mixed-precision allocations over a budget sweep; each mapping has ``avg_bits``,
            ``predicted_loss_increase`` (nats) and ``top1`` (fraction in [0, 1] or None).
        uniform: Single-format baselines, the same keys plus ``format`` (e.g. ``"int8"``).
        chosen: The exported allocation (same keys as ``sweep``), or None.
        fp32_top1: Top-1 accuracy of the unquantized model as a fraction, or None.
        title: Figure title; should name the model and the budget.

    Returns:
        The path of the written PNG.
    """
    sweep = sorted(sweep, key=lambda point: float(point["avg_bits"]))
    everything = [*sweep, *uniform, *([chosen] if chosen is not None else [])]
    losses = np.array([float(p["predicted_loss_increase"]) for p in everything], dtype=float)
    floor = _log_floor(losses)

    def xy(points: Sequence[Mapping], key: str) -> tuple[np.ndarray, np.ndarray]:
        rows = [p for p in points if p.get(key) is not None]
        x = np.array([float(p["avg_bits"]) for p in rows], dtype=float)
        y = np.array([float(p[key]) for p in rows], dtype=float)
        return x, (np.maximum(y, floor) if key == "predicted_loss_increase" else 100.0 * y)

    fig = _new_figure(12.0, 5.0)
    left, right = fig.subplots(1, 2, sharex=True)
    chosen_style = {"marker": "*", "color": "red", "mec": "darkred", "ms": 16, "lw": 0, "zorder": 6}
    for ax, key in ((left, "predicted_loss_increase"), (right, "top1")):
        sx, sy = xy(sweep, key)
        if sx.size:
            ax.plot(sx, sy, "o-", color="tab:blue", ms=5, label="lcpaq mixed precision")
        ux, uy = xy(uniform, key)
        if ux.size:
            ax.plot(ux, uy, "s", color="tab:orange", ms=7, mec="black", label="uniform format")
            rows = [p for p in uniform if p.get(key) is not None]
            for x, y, point in zip(ux, uy, rows):
                ax.annotate(
                    str(point.get("format", "")),
                    (x, y),
                    xytext=(6, 6),
                    textcoords="offset points",
                    fontsize=8,
                    color="saddlebrown",
                )
        if chosen is not None and chosen.get(key) is not None:
            cx, cy = xy([chosen], key)
            ax.plot(cx, cy, label=f"chosen ({float(chosen['avg_bits']):.2f} bits)", **chosen_style)
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("average weight bits")

    left.set_yscale("log")
    left.set_ylabel("predicted loss increase (nats, log)")
    left.set_title("predicted cost", fontsize=10)
    right.set_ylabel("top-1 accuracy (%)")
    right.set_title("measured accuracy", fontsize=10)
    if fp32_top1 is not None:
        right.axhline(
            100.0 * fp32_top1,
            ls="--",
            color="black",
            lw=1.2,
            label=f"FP32 ({100.0 * fp32_top1:.2f}%)",
        )
    if not any(p.get("top1") is not None for p in everything):
        right.text(
            0.5,
            0.5,
            "accuracy not measured",
            transform=right.transAxes,
            ha="center",
            va="center",
            fontsize=13,
            color="gray",
        )
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
    avg_bits = (
        float((bit_values * params).sum() / params.sum()) if params.sum() > 0 else float("nan")
    )

    palette = {b: i for i, b in enumerate(sorted(set(bit_values.tolist())))}
    colors = [f"C{palette[b] % 10}" for b in bit_values.tolist()]
    x = np.arange(n_layers)
    fig = _new_figure(max(8.0, 0.32 * n_layers + 3.0), 6.0)
    ax = fig.subplots()
    ax.bar(x, bit_values, color=colors, edgecolor="black", linewidth=0.4, width=0.75, zorder=2)
    ax.set_xticks(x, [_short(name) for name in layer_names], rotation=60, ha="right", fontsize=7)
    ax.set_xlim(-0.6, n_layers - 0.4)
    top = int(bit_values.max(initial=8))
    ax.set_ylim(0, top + 1.5)
    ax.set_yticks(range(0, top + 1))
    ax.set_ylabel("weight bits")
    ax.set_xlabel("layer (execution order)")
    ax.grid(True, axis="y", alpha=0.3, zorder=0)

    twin = ax.twinx()
    floor = _log_floor(trace)
    shown = np.maximum(trace, floor)
    lower = shown - np.maximum(shown - stderr, floor)
    twin.errorbar(
        x, shown, yerr=[lower, stderr], fmt="o", color="black", ms=4, capsize=2, lw=0.8, zorder=4
    )
    twin.set_yscale("log")
    twin.set_ylabel("Hessian trace tr(H_ll) (log)")

    handles: list[Patch | Line2D] = [
        Patch(facecolor=f"C{i % 10}", edgecolor="black", label=f"{b} bits")
        for b, i in palette.items()
    ]
    handles.append(Line2D([], [], color="black", marker="o", ms=4, label="Hessian trace ± stderr"))
    ax.legend(
        handles=handles, fontsize=8, loc="upper left", ncols=min(len(handles), 6), framealpha=0.9
    )
    fig.suptitle(f"{title}\nparameter-weighted average: {avg_bits:.2f} bits", fontsize=12)
    return _save(fig, path)
