"""The search's tables and report: what ``lcpaq search`` writes about its trials.

Input: the `Search` (options, space, study, timings) with its trials, their full evaluations
and the ``best/`` run. Output: ``trials.json`` and ``trials.csv`` (one row per trial), the
summary that becomes ``search_report.json`` (best against default, fANOVA importances, wall
time split) and its Markdown rendering ``search_report.md``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from lcpaq import runfolder
from lcpaq.model.evaluate import Accuracy, paired_difference
from lcpaq.search.fidelity import agreement

if TYPE_CHECKING:
    from lcpaq.search.runner import Search

logger = logging.getLogger(__name__)

TIMING_KEYS = ("hessian_s", "candidates_s", "ilp_s", "correction_s", "proxy_s")


def rows_of(
    search: Search, trials: Sequence[FrozenTrial], evaluations: Mapping[int, Accuracy]
) -> list[dict[str, object]]:
    """One row per trial: state, proxy per rung, parameters, allocation, top-1, timings."""
    rows = []
    for trial in trials:
        attrs = trial.user_attrs
        steps = trial.intermediate_values
        row: dict[str, object] = {
            "number": trial.number,
            "state": trial.state.name,
            "proxy": trial.value
            if trial.value is not None
            else (steps[max(steps)] if steps else None),
            "proxy_images": max(steps) if steps else None,
            **{f"proxy_{rung}": steps.get(rung) for rung in search.options.rungs},
            **{name: trial.params.get(name) for name in search.space.names},
            "avg_bits": attrs.get("avg_bits"),
            "size_bytes": attrs.get("size_bytes"),
            "predicted_loss_increase": attrs.get("predicted_loss_increase"),
            "top1": evaluations[trial.number].top1 if trial.number in evaluations else None,
            "default": bool(attrs.get("default", False)),
            "duplicate_of": attrs.get("duplicate_of"),
            "error": attrs.get("error"),
            **{name: attrs.get(name) for name in TIMING_KEYS},
            "duration_s": trial.duration.total_seconds() if trial.duration else None,
        }
        rows.append(row)
    return rows


def write_tables(
    search: Search, trials: Sequence[FrozenTrial], evaluations: Mapping[int, Accuracy]
) -> None:
    """``trials.json`` and ``trials.csv``: the rows of `rows_of`."""
    rows = rows_of(search, trials, evaluations)
    runfolder.write_json(search.options.out / "trials.json", {"trials": rows})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["number"])
    writer.writeheader()
    writer.writerows(rows)
    runfolder.write_text(search.options.out / "trials.csv", buffer.getvalue())


def summary_of(
    search: Search,
    trials: Sequence[FrozenTrial],
    top: Sequence[FrozenTrial],
    best: FrozenTrial,
    default_trial: FrozenTrial | None,
    evaluations: Mapping[int, Accuracy],
    final_timings: Mapping[str, float],
    best_run: Mapping[str, object],
    selection: Mapping[str, object],
) -> dict[str, object]:
    """The content of ``search_report.json`` (``plots`` is added by the caller)."""
    options = search.options
    return {
        "study": options.study_name,
        "storage": options.storage_url,
        "budgets": list(search.space.config(search.trial_base(), best.params).allocation.budgets),
        "user_budgets": list(search.base.allocation.budgets),
        "size_cap_mb": search.study.user_attrs.get("size_cap_mb"),
        # trial 0's parameters (lcpaq's default unless it does not fit the budgets) and why
        "start": search.study.user_attrs.get("start"),
        "proxy": options.proxy,
        "slices": search.context.slices.to_dict(),
        "space": search.space.describe(),
        "trials": _trial_counts(trials),
        "best": {
            **_entry(best, evaluations),
            "config": str(options.out / "best_config.json"),
            "run": dict(best_run),
        },
        "default": None if default_trial is None else _entry(default_trial, evaluations),
        "best_vs_default": _comparison(best, default_trial, evaluations),
        "selection": dict(selection),
        "top_k": [t.number for t in top],
        "full_evaluations": len(evaluations),
        "eval_data": options.eval_path,
        "spearman_proxy_vs_top1": _spearman(trials, evaluations),
        # per-rung cost and rank agreement of the cheap first rung (--fidelity multi)
        "fidelity": {"mode": options.fidelity, **agreement(trials)},
        "importances": importances_of(search, trials),
        "wall_time_split_s": _time_split(search, trials, final_timings),
        "this_process_wall_s": time.perf_counter() - search.wall_start,
        # CPU seconds of all threads: less sensitive than wall time to other jobs on the host.
        "this_process_cpu_s": time.process_time() - search.cpu_start,
        "curvature_computations": search.context.cache.analyze_calls,
    }


def _trial_counts(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    states = [t.state for t in trials]
    params_distinct = {
        json.dumps(t.params, sort_keys=True, default=str) for t in trials if t.params
    }
    return {
        "total": len(trials),
        "complete": states.count(TrialState.COMPLETE),
        "pruned": states.count(TrialState.PRUNED),
        "failed": states.count(TrialState.FAIL),
        "running": states.count(TrialState.RUNNING),
        "duplicates": sum("duplicate_of" in t.user_attrs for t in trials),
        "distinct_configurations": len(params_distinct),
    }


def _entry(trial: FrozenTrial, evaluations: Mapping[int, Accuracy]) -> dict[str, object]:
    """A trial's line of the report: parameters, proxy, top-1 (if evaluated), bits, size."""
    return {
        "trial": trial.number,
        "params": trial.params,
        "proxy": trial.value,
        "top1": evaluations[trial.number].top1 if trial.number in evaluations else None,
        "avg_bits": trial.user_attrs.get("avg_bits"),
        "size_bytes": trial.user_attrs.get("size_bytes"),
    }


def _comparison(
    best: FrozenTrial, default_trial: FrozenTrial | None, evaluations: Mapping[int, Accuracy]
) -> dict[str, object]:
    """Best against default, paired on the evaluation images (empty without both)."""
    if default_trial is None or best.number not in evaluations:
        return {}
    chosen, default = evaluations[best.number], evaluations[default_trial.number]
    difference, stderr = paired_difference(chosen, default)
    return {
        "best_top1": chosen.top1,
        "default_top1": default.top1,
        "paired_difference": difference,
        "paired_difference_stderr": stderr,
        "eval_images": chosen.num_samples,
    }


def _spearman(trials: Sequence[FrozenTrial], evaluations: Mapping[int, Accuracy]) -> float | None:
    """Spearman(−proxy, top-1) over the evaluated trials (None below 3 or if undefined)."""
    evaluated = [t for t in trials if t.number in evaluations and t.value is not None]
    if len(evaluated) < 3:
        return None
    from scipy.stats import spearmanr

    rho = spearmanr(
        [-t.value for t in evaluated if t.value is not None],
        [evaluations[t.number].top1 for t in evaluated],
    ).statistic
    return None if not np.isfinite(rho) else float(rho)


def _time_split(
    search: Search, trials: Sequence[FrozenTrial], final_timings: Mapping[str, float]
) -> dict[str, float]:
    """Wall seconds per part: the trials' stages, this process's setup and final step."""
    split = {name: 0.0 for name in TIMING_KEYS}
    for trial in trials:
        for name in TIMING_KEYS:
            split[name] += float(trial.user_attrs.get(name, 0.0))
    split["hessian_s"] += search.process_timings.get("hessian_s", 0.0)
    split.update({name: float(value) for name, value in final_timings.items()})
    split["setup_s"] = search.process_timings["setup_s"]
    return split


def importances_of(search: Search, trials: Sequence[FrozenTrial]) -> dict[str, float]:
    """fANOVA importances of the first-rung proxy over every scored trial (complete and
    pruned): the last rung is reached by a few trials only. KL and loss are taken in log10."""
    first = search.options.rungs[0]
    varied = [d for d in search.space.dimensions if len(d.choices) > 1]
    scored = [
        t
        for t in trials
        if first in t.intermediate_values
        and "duplicate_of" not in t.user_attrs
        and all(d.name in t.params for d in varied)
    ]
    if len(scored) < 3 or not varied:
        return {}
    memory = optuna.create_study(direction="minimize")
    distributions: dict[str, optuna.distributions.BaseDistribution] = {
        d.name: optuna.distributions.CategoricalDistribution(d.choices) for d in varied
    }
    for trial in scored:
        value = float(trial.intermediate_values[first])
        if search.options.proxy != "sqnr":
            value = math.log10(max(value, 1e-300))
        memory.add_trial(
            optuna.trial.create_trial(
                params={d.name: trial.params[d.name] for d in varied},
                distributions=distributions,
                value=value,
            )
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importances = optuna.importance.get_param_importances(
                memory,
                evaluator=optuna.importance.FanovaImportanceEvaluator(seed=search.options.seed),
            )
    except (RuntimeError, ValueError) as error:
        logger.warning("parameter importances not computed: %s", error)
        return {}
    return {name: float(value) for name, value in importances.items()}


def report_markdown(summary: Mapping[str, Any]) -> str:
    trials = summary["trials"]
    best, default = summary["best"], summary["default"]
    lines = [
        f"# lcpaq search: study `{summary['study']}`",
        "",
        f"Budgets (hard, every trial): {', '.join(summary['budgets'])}"
        + (
            f" (the size cap is {_start_name(summary.get('start'))}'s size at {', '.join(summary['user_budgets'])})"
            if summary.get("size_cap_mb")
            else ""
        )
        + ".",
        *_start_lines(summary.get("start")),
        f"Proxy: `{summary['proxy']}` on calibration images {summary['slices']['proxy']} "
        f"(rungs {summary['slices']['proxy_rungs']}); curvature and correction use images "
        f"{summary['slices']['curvature_and_correction']}.",
        f"Trials: {trials['total']} ({trials['complete']} complete, {trials['pruned']} pruned, "
        f"{trials['failed']} failed, {trials['duplicates']} repeats of an earlier configuration; "
        f"{trials['distinct_configurations']} distinct configurations). Full evaluations: "
        f"{summary['full_evaluations']}"
        + (
            f" on `{summary['eval_data']}`."
            if summary["eval_data"]
            else " (no --eval: chosen by proxy)."
        ),
        "",
        "| | trial | proxy | top-1 % | avg bits | size bytes |",
        "|---|---|---|---|---|---|",
    ]
    for label, entry in (("best", best), ("default", default)):
        if entry is None:
            continue
        top1 = "" if entry["top1"] is None else f"{100 * entry['top1']:.2f}"
        lines.append(
            f"| {label} | {entry['trial']} | {entry['proxy']:.5g} | {top1} | "
            f"{entry['avg_bits']:.3f} | {entry['size_bytes']:.0f} |"
        )
    comparison = summary["best_vs_default"]
    if comparison:
        lines += [
            "",
            f"Best vs default, paired on {comparison['eval_images']} images: "
            f"{100 * comparison['paired_difference']:+.2f} ± "
            f"{100 * comparison['paired_difference_stderr']:.2f} points.",
        ]
    selection = summary.get("selection") or {}
    if selection.get("kept_default"):
        lines += [
            "",
            f"Trial {selection['best_top1_trial']} had the best top-1, but its gain over the "
            f"default was within {selection['min_gain_se']:g} paired SE: the default is kept.",
        ]
    lines += ["", "Best configuration (differences from the default in bold):", ""]
    for name, value in best["params"].items():
        changed = default is not None and default["params"].get(name) != value
        lines.append(f"- {name}: {'**' if changed else ''}{value}{'**' if changed else ''}")
    lines += ["", "## Wall time", "", "| part | seconds |", "|---|---|"]
    lines += [
        f"| {name[:-2]} | {seconds:.1f} |" for name, seconds in summary["wall_time_split_s"].items()
    ]
    if summary["importances"]:
        lines += ["", "## Parameter importances (fANOVA on the first-rung proxy)", ""]
        lines += [f"- {name}: {value:.3f}" for name, value in summary["importances"].items()]
    if summary["spearman_proxy_vs_top1"] is not None:
        lines += [
            "",
            f"Spearman(−proxy, top-1) over the {summary['full_evaluations']} evaluated "
            f"configurations: {summary['spearman_proxy_vs_top1']:.2f}.",
        ]
    lines += ["", f"Ordinary run folder of the best configuration: `{best['run']['folder']}`.", ""]
    return "\n".join(lines)


def _start_lines(start: Mapping[str, Any] | None) -> list[str]:
    """The report's line on the starting configuration, when it is not lcpaq's default."""
    if not start or not start.get("note"):
        return []
    return [f"Start: {start['note']}."]


def _start_name(start: Mapping[str, Any] | None) -> str:
    return (
        "the starting configuration"
        if start and start.get("note")
        else "lcpaq's default configuration"
    )
