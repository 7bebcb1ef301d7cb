"""The model-level figure of the ``plot`` stage (``plots/model_curve*.png``): predicted loss and
the measured metric (top-1, recall@1, perplexity: `lcpaq.model.evaluate.METRICS`) of the
``sweep`` stage's mixed-precision optima and uniform baselines against one budget metric, the
exported allocation marked. Every measured value carries its standard error (error bars; FP32 a
band), so differences within noise are visible as such. Shared styles:
`lcpaq.stages.figure_style`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes

from lcpaq.model.evaluate import metric_info
from lcpaq.stages.figure_style import CHOSEN, annotate_points, log_floor, new_figure, save

#: Axis labels of the budget metrics (`lcpaq.allocation.costs.COST_METRICS`).
METRIC_LABELS = {
    "avg-bits": "average weight bits",
    "size-mb": "model size (MB)",
    "size-frac": "size (fraction of FP32)",
    "bitops-g": "BitOps (GBOPs per sample)",
    "ebops-g": "EBOPs (G per sample)",
    "latency-ms": "latency estimate (ms per sample)",
}


def _metric_of(point: Mapping[str, Any], metric: str) -> float | None:
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
    sweep: Sequence[Mapping[str, Any]],
    uniform: Sequence[Mapping[str, Any]],
    chosen: Mapping[str, Any] | None,
    fp32_value: float | None,
    title: str,
    metric: str = "avg-bits",
    fp32_stderr: float | None = None,
    score: str = "top1",
) -> Path:
    """Plot whole-model predicted loss and the measured metric against one budget metric.

    Args:
        path: Destination PNG file; parent folders are created.
        sweep: Mixed-precision allocations over a budget sweep; each mapping has ``costs``
            (metric → value; older points: ``avg_bits``), ``predicted_loss_increase`` (nats) and
            ``score``'s value (``top1``: a fraction in [0, 1]; or None) with
            ``<score>_stderr`` (its standard error, drawn as an error bar; absent for older
            points).
        uniform: Single-format baselines, the same keys plus ``format`` (e.g. ``"int8"``); FP
            formats (names starting with ``fp``) are drawn as diamonds, INT ones as squares.
        chosen: The exported allocation (same keys as ``sweep``), or None.
        fp32_value: ``score`` of the unquantized model (fractions as fractions), or None.
        title: Figure title; should name the model and the budget.
        metric: The x axis, one of `METRIC_LABELS`; points without it are left out.
        fp32_stderr: Standard error of ``fp32_value``, drawn as a band around its line.
        score: The measured metric's name (`lcpaq.model.evaluate.METRICS`): ``top1``,
            ``recall@1``, ``perplexity`` (lower is better: a log axis), ...

    Returns:
        The path of the written PNG.
    """
    sweep = [p for p in sweep if _metric_of(p, metric) is not None]
    uniform = [p for p in uniform if _metric_of(p, metric) is not None]
    if chosen is not None and _metric_of(chosen, metric) is None:
        chosen = None
    sweep = sorted(sweep, key=lambda point: _metric_of(point, metric) or 0.0)
    everything = [*sweep, *uniform, *([chosen] if chosen is not None else [])]
    losses = np.array([float(p["predicted_loss_increase"]) for p in everything], dtype=float)
    panel = _Panel(metric, log_floor(losses), score)
    fig = new_figure(12.0, 5.0)
    left, right = fig.subplots(1, 2, sharex=True)
    for ax, key in ((left, "predicted_loss_increase"), (right, score)):
        panel.draw(ax, key, sweep, uniform, chosen)

    left.set_yscale("log")
    left.set_ylabel("predicted loss increase (nats, log)")
    left.set_title("predicted cost", fontsize=10)
    info = metric_info(score)
    what = "accuracy" if score == "top1" else info.label
    unit = " (%)" if info.percent else ""
    right.set_ylabel(f"{info.label}{unit}" + ("" if info.higher_is_better else ", lower is better"))
    right.set_title(f"measured {what}", fontsize=10)
    measured = [float(p[score]) for p in everything if p.get(score) is not None]
    measured += [fp32_value] if fp32_value is not None else []
    if not info.percent and measured and min(measured) > 0 and max(measured) > 3 * min(measured):
        right.set_yscale("log")  # perplexity grows without bound at low bit widths
    if fp32_value is not None:
        fp32 = panel.scale * fp32_value
        band = panel.scale * (fp32_stderr or 0.0)
        digits = ".2f" if info.percent else ".4g"
        label = f"FP32 ({fp32:{digits}}" + (f" ± {band:{digits}}" if band else "")
        label += "%)" if info.percent else ")"
        right.axhline(fp32, ls="--", color="black", lw=1.2, label=label)
        if band:
            right.axhspan(fp32 - band, fp32 + band, color="black", alpha=0.08, lw=0)
    if not any(p.get(score) is not None for p in everything):
        centre = {"transform": right.transAxes, "ha": "center", "va": "center", "color": "gray"}
        right.text(0.5, 0.5, f"{what} not measured", fontsize=13, **centre)
        right.set_yticks([])
        right.grid(False)
    for ax in (left, right):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=12)
    return save(fig, path)


def _is_fp(point: Mapping[str, Any]) -> bool:
    return str(point.get("weight_format", point.get("format", ""))).startswith("fp")


class _Panel:
    """One side of the figure: ``key`` (predicted loss, log with a floor, or the measured
    ``score``, fractions in %) against ``metric``."""

    def __init__(self, metric: str, floor: float, score: str = "top1") -> None:
        self.metric = metric
        self.floor = floor
        self.score = score
        self.scale = 100.0 if metric_info(score).percent else 1.0

    def xy(self, points: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
        rows = [p for p in points if p.get(key) is not None]
        x = np.array([_metric_of(p, self.metric) for p in rows], dtype=float)
        y = np.array([float(p[key]) for p in rows], dtype=float)
        if key == "predicted_loss_increase":
            return x, np.maximum(y, self.floor)
        return x, self.scale * y

    def error_bars(self, ax: Axes, points: Sequence[Mapping[str, Any]], key: str) -> None:
        """The measured score ± its standard error (points measured without one get none)."""
        if key != self.score:
            return
        se_key = f"{key}_stderr"
        rows = [p for p in points if p.get(key) is not None and p.get(se_key) is not None]
        if not rows:
            return
        x, y = self.xy(rows, key)
        errors = self.scale * np.array([float(p[se_key]) for p in rows])
        ax.errorbar(x, y, yerr=errors, fmt="none", ecolor="dimgray", elinewidth=1, capsize=3)

    def draw(
        self,
        ax: Axes,
        key: str,
        sweep: Sequence[Mapping[str, Any]],
        uniform: Sequence[Mapping[str, Any]],
        chosen: Mapping[str, Any] | None,
    ) -> None:
        self.error_bars(ax, [*sweep, *uniform, *([chosen] if chosen is not None else [])], key)
        sx, sy = self.xy(sweep, key)
        if sx.size:
            ax.plot(sx, sy, "o-", color="tab:blue", ms=5, label="lcpaq mixed precision")
        for fp, marker, color, text in (
            (False, "s", "tab:orange", "uniform INT format"),
            (True, "D", "tab:purple", "uniform FP format"),
        ):
            ux, uy = self.xy([p for p in uniform if _is_fp(p) == fp], key)
            if ux.size:
                ax.plot(ux, uy, marker, color=color, ms=7, mec="black", lw=0, label=text)
        ux, uy = self.xy(uniform, key)
        if ux.size:  # one pass, so coinciding INT and FP points share one label
            names = [str(p.get("format", "")) for p in uniform if p.get(key) is not None]
            annotate_points(ax, ux, uy, names)
        if chosen is not None and chosen.get(key) is not None:
            cx, cy = self.xy([chosen], key)
            ax.plot(
                cx,
                cy,
                label=f"chosen ({_metric_of(chosen, self.metric):.4g} {self.metric})",
                **{**CHOSEN, "ms": 16},
            )
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.1)
        ax.set_xlabel(METRIC_LABELS.get(self.metric, self.metric))
