"""PNG plots of a proxy search (`lcpaq.search`): proxy score per trial with the best so far,
parameter importances, and proxy against full-evaluation accuracy; `search_plots` draws all
three for a finished search into ``OUT/plots/``.

Like `lcpaq.stages.figures`: Agg canvas without pyplot, axis labels with units, a title naming the model
and the budget, written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from lcpaq.search.summary import rows_of
from lcpaq.stages.figure_style import new_figure, save

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

    from lcpaq.model.evaluate import Accuracy
    from lcpaq.search.runner import Search

PROXY_LABELS = {
    "kl": "mean KL(p_FP32 ‖ p_quantized), nats",
    "loss": "cross-entropy of the quantized model",
    "sqnr": "−SQNR of the logits, dB (lower is better)",
}


class _Scored(NamedTuple):
    """A scored trial's row of ``trials.json``: its proxy at the largest slice it reached."""

    number: int
    proxy: float
    images: int | None
    state: str


def _scored(trials: Sequence[Mapping[str, Any]]) -> list[_Scored]:
    """The rows with a proxy value, failed trials left out."""
    return [
        _Scored(int(row["number"]), float(row["proxy"]), row["proxy_images"], str(row["state"]))
        for row in trials
        if row.get("proxy") is not None and row["state"] != "FAIL"
    ]


def plot_proxy_per_trial(
    path: str | os.PathLike[str],
    *,
    trials: Sequence[Mapping[str, Any]],
    rungs: Sequence[int],
    best: int,
    default: int | None,
    log_scale: bool,
    ylabel: str,
    title: str,
) -> Path:
    """Each trial's proxy at the largest slice it reached (colour: slice size; hollow: pruned),
    and the best complete trial so far as a step line.

    Args:
        trials: rows of ``trials.json`` (``number``, ``state``, ``proxy``, ``proxy_images``).
        rungs: the proxy slice sizes, in images.
        best, default: trial numbers to mark.
    """
    fig = new_figure(8.0, 4.5)
    ax = fig.add_subplot()
    colors = {rung: f"C{k}" for k, rung in enumerate(rungs)}
    scored = _scored(trials)
    for rung in rungs:
        for pruned in (False, True):
            rows = [r for r in scored if r.images == rung and (r.state == "PRUNED") == pruned]
            if not rows:
                continue
            ax.plot(
                [r.number for r in rows],
                [r.proxy for r in rows],
                "o",
                color=colors[rung],
                mfc="none" if pruned else colors[rung],
                ms=6,
                label=f"{'pruned at' if pruned else 'complete,'} {rung} images",
            )
    complete = sorted((r for r in scored if r.state == "COMPLETE"), key=lambda r: r.number)
    if complete:
        numbers = [r.number for r in complete]
        running = np.minimum.accumulate([r.proxy for r in complete])
        last = max(r.number for r in scored)
        ax.step(
            [*numbers, last],
            [*running, running[-1]],
            where="post",
            color="black",
            lw=1.2,
            label="best complete so far",
        )
    for number, style, label in ((default, "s", "default configuration"), (best, "*", "chosen")):
        row = next((r for r in scored if r.number == number), None)
        if row is not None:
            ax.plot(
                [row.number],
                [row.proxy],
                style,
                ms=14 if style == "*" else 10,
                mfc="none",
                mec="red" if style == "*" else "black",
                mew=1.5,
                label=label,
            )
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("trial number")
    ax.set_ylabel(ylabel)
    ax.set_title(_wrap(title), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return save(fig, path)


def plot_importances(
    path: str | os.PathLike[str], *, importances: Mapping[str, float], title: str
) -> Path:
    """Horizontal bars, most important on top (fractions summing to 1)."""
    fig = new_figure(7.0, 0.45 * max(len(importances), 2) + 1.3)
    ax = fig.add_subplot()
    if importances:
        names = list(importances)[::-1]
        ax.barh(names, [importances[name] for name in names], color="tab:blue")
        for k, name in enumerate(names):
            ax.text(importances[name], k, f" {importances[name]:.2f}", va="center", fontsize=8)
        ax.set_xlim(0, max(importances.values()) * 1.15 or 1)
    else:
        ax.text(0.5, 0.5, "too few scored trials for importances", ha="center", va="center")
    ax.set_xlabel("importance (fraction of the proxy's variance explained, fANOVA)")
    ax.set_title(_wrap(title), fontsize=9)
    return save(fig, path)


def _wrap(title: str) -> str:
    """Break a long title after its colon (the model and budget go on the second line)."""
    head, sep, tail = title.partition(": ")
    return f"{head}:\n{tail}" if sep and len(title) > 70 else title


def plot_proxy_vs_accuracy(
    path: str | os.PathLike[str],
    *,
    points: Sequence[tuple[int, float, float]],
    best: int,
    default: int | None,
    log_scale: bool,
    xlabel: str,
    title: str,
) -> Path:
    """Top-1 (%) against the proxy for the configurations that got a full evaluation."""
    fig = new_figure(6.5, 4.5)
    ax = fig.add_subplot()
    labels: dict[tuple[float, float], list[str]] = {}
    # The chosen point last, so it stays on top of configurations with the same model.
    for number, proxy, top1 in sorted(points, key=lambda point: point[0] == best):
        marker, color = (
            ("*", "red")
            if number == best
            else ("s", "black")
            if number == default
            else ("o", "tab:blue")
        )
        ax.plot([proxy], [top1], marker, color=color, ms=12 if marker == "*" else 7)
        labels.setdefault((proxy, top1), []).append(str(number))
    # Neighbouring labels alternate above and below their points.
    for index, ((proxy, top1), numbers) in enumerate(sorted(labels.items())):
        ax.annotate(
            " / ".join(sorted(numbers, key=int)),
            (proxy, top1),
            xytext=(5, 5 if index % 2 == 0 else -11),
            textcoords="offset points",
            fontsize=8,
            bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.7},
        )
    ax.plot([], [], "*", color="red", ms=12, label="chosen")
    ax.plot([], [], "s", color="black", ms=7, label="default configuration")
    ax.plot([], [], "o", color="tab:blue", ms=7, label="other top-k by proxy")
    if log_scale:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel + " (trial numbers annotated)")
    ax.set_ylabel("top-1 accuracy, %")
    ax.set_title(_wrap(title), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def search_plots(
    search: Search,
    trials: Sequence[FrozenTrial],
    best: FrozenTrial,
    default_trial: FrozenTrial | None,
    evaluations: Mapping[int, Accuracy],
    summary: Mapping[str, Any],
) -> list[Path]:
    """The search's figures under ``OUT/plots/``: proxy per trial, importances, and (with
    full evaluations) proxy against top-1."""
    folder = search.options.out / "plots"
    title = f"{search.base.analysis.model} — budget {', '.join(summary['budgets'])}"
    proxy_label = PROXY_LABELS[search.options.proxy]
    paths = [
        plot_proxy_per_trial(
            folder / "proxy_per_trial.png",
            trials=rows_of(search, trials, evaluations),
            rungs=search.options.rungs,
            best=best.number,
            default=default_trial.number if default_trial else None,
            log_scale=search.options.proxy != "sqnr",
            ylabel=proxy_label,
            title=f"Proxy score per trial: {title}",
        ),
        plot_importances(
            folder / "importances.png",
            importances=summary["importances"],
            title=f"Parameter importances (fANOVA, first-rung proxy): {title}",
        ),
    ]
    if evaluations:
        paths.append(
            plot_proxy_vs_accuracy(
                folder / "proxy_vs_accuracy.png",
                points=[
                    (t.number, float(t.value), 100 * evaluations[t.number].top1)
                    for t in trials
                    if t.number in evaluations and t.value is not None
                ],
                best=best.number,
                default=default_trial.number if default_trial else None,
                log_scale=search.options.proxy != "sqnr",
                xlabel=proxy_label,
                title=f"Proxy vs top-1 on {Path(search.options.eval_path or '').name}: {title}",
            )
        )
    return paths
