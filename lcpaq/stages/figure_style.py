"""What every figure of the ``plot`` stage shares: the Agg canvas, atomic PNG writes, marker
styles, log-axis floors and label shortening.

Every figure carries axis labels with units, a legend and a title naming the model and the
budget (passed in by the caller as ``title``). Figures are rendered with the Agg backend through
an explicit ``FigureCanvasAgg`` rather than through ``pyplot``, so plotting never changes the
process-wide matplotlib backend and works headless. Each PNG is written to a temporary file in
the target folder and renamed into place, so an interrupted run never leaves a half-written
image behind.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lcpaq.runfolder import atomic_path

DPI = 120
NAME_CHARS = 34
# Marker styles shared by the plotted points and their legend entries.
KEPT: dict[str, Any] = {"color": "tab:blue", "marker": "o", "ms": 4, "lw": 1.3}
PRUNED: dict[str, Any] = {
    "color": "gray",
    "marker": "o",
    "mfc": "none",
    "ms": 4,
    "lw": 0,
    "alpha": 0.5,
}
CHOSEN: dict[str, Any] = {
    "color": "red",
    "marker": "*",
    "mec": "darkred",
    "ms": 12,
    "lw": 0,
    "zorder": 6,
}
ZERO: dict[str, Any] = {
    "color": "black",
    "marker": "v",
    "mfc": "white",
    "ms": 6,
    "lw": 0,
    "zorder": 5,
}
TRACE: dict[str, Any] = {
    "fmt": "o",
    "color": "black",
    "mec": "white",
    "mew": 0.8,
    "ms": 5,
    "capsize": 2,
}


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically, release the figure and return the path."""
    target = Path(path)
    try:
        with atomic_path(target) as temp:
            fig.savefig(temp, format="png", dpi=DPI)
    finally:
        fig.clear()
    return target


def log_floor(values: np.ndarray) -> float:
    """A positive floor for log axes: a decade below the smallest positive finite value."""
    positive = values[np.isfinite(values) & (values > 0)]
    return float(positive.min()) / 10.0 if positive.size else 1e-12


def short(name: str, limit: int = NAME_CHARS) -> str:
    """Keep the informative tail of a long dotted module name."""
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]


def entry(label: str, style: Mapping[str, Any]) -> Line2D:
    """A legend entry drawn like the plotted points."""
    return Line2D([], [], label=label, **style)


def annotate_points(ax: Axes, x: np.ndarray, y: np.ndarray, names: Sequence[str]) -> None:
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
