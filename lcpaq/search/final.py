"""The final step of a search: full evaluation of the top-k, the choice, and ``best/``.

Input: a `Search` whose study holds scored trials, and the ``--eval`` data if given. Output:
the chosen configuration as ``best_config.json``, its ordinary run folder ``best/`` (allocate,
export, evaluate, plot, report), and the search's tables, plots and report
(`lcpaq.search.summary`). Only the top-k by proxy (and lcpaq's default) are fully evaluated; the
best replaces the default only when its paired gain exceeds ``--min-gain-se`` standard errors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from optuna.trial import FrozenTrial, TrialState

from lcpaq import runfolder
from lcpaq.allocation.budgets import parse_budget
from lcpaq.config import RunConfig
from lcpaq.errors import InputError
from lcpaq.model.data import Dataset, load_dataset
from lcpaq.model.evaluate import Accuracy, evaluate_accuracy, paired_difference
from lcpaq.model.zoo import num_classes_of
from lcpaq.search.plots import search_plots
from lcpaq.search.summary import report_markdown, summary_of, write_tables
from lcpaq.stages import pipeline

if TYPE_CHECKING:
    from lcpaq.search.runner import Search

logger = logging.getLogger(__name__)


def finish(search: Search) -> dict[str, object]:
    """Full evaluation of the top-k (and the default), best_config.json, best/, tables,
    plots and the search report."""
    options = search.options
    trials = search.study.get_trials(deepcopy=False)
    complete = [
        t for t in trials if t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs
    ]
    if not complete:
        errors = [str(t.user_attrs["error"]) for t in trials if "error" in t.user_attrs]
        reason = (
            f"; {len(errors)} configuration(s) did not fit the budgets, e.g. {errors[0]}"
            if errors
            else ""
        )
        raise InputError(
            f"study {options.study_name!r} has no complete trial: nothing to choose from{reason}"
        )
    ranked = sorted(complete, key=lambda t: (_value(t), t.number))
    top = ranked[: options.top_k]
    default_params = search.space.default_params()
    default_trial = next((t for t in complete if t.params == default_params), None)
    evaluate_trials = list(top)
    if default_trial is not None and default_trial not in evaluate_trials:
        evaluate_trials.append(default_trial)
    eval_data = _eval_data(search)
    evaluations: dict[int, Accuracy] = {}
    final_timings = {"final_prepare_s": 0.0, "full_eval_s": 0.0}
    selection: dict[str, object]
    if eval_data is not None:
        evaluations = _evaluate(search, evaluate_trials, eval_data, final_timings)
        top_scoring = max(
            evaluate_trials, key=lambda t: (evaluations[t.number].top1, -_value(t), -t.number)
        )
        best = keep_default_unless_better(
            top_scoring, default_trial, evaluations, options.min_gain_se
        )
        selection = {
            "rule": f"the best top-1 replaces the default if its paired gain > "
            f"{options.min_gain_se:g} SE",
            "min_gain_se": options.min_gain_se,
            "best_top1_trial": top_scoring.number,
            "kept_default": best is not top_scoring,
        }
    else:
        best = ranked[0]
        selection = {"rule": "lowest proxy (no --eval data)"}
    best_config = search.space.config(search.trial_base(), best.params)
    runfolder.write_json(options.out / "best_config.json", best_config.to_dict())
    start = time.perf_counter()
    best_run = run_best(search, best, best_config)
    final_timings["best_run_s"] = time.perf_counter() - start
    summary = summary_of(
        search, trials, top, best, default_trial, evaluations, final_timings, best_run, selection
    )
    write_tables(search, trials, evaluations)
    plots = search_plots(search, trials, best, default_trial, evaluations, summary)
    summary["plots"] = [str(path.relative_to(options.out)) for path in plots]
    runfolder.write_json(options.out / "search_report.json", summary)
    runfolder.write_text(options.out / "search_report.md", report_markdown(summary))
    return summary


def _value(trial: FrozenTrial) -> float:
    """The proxy of a complete trial (complete trials always have one)."""
    assert trial.value is not None, f"trial {trial.number} has no value"
    return trial.value


def _eval_data(search: Search) -> Dataset | None:
    """The ``--eval`` data, normalised as the calibration data; None without ``--eval``."""
    if not search.options.eval_path:
        return None
    analysis = search.base.analysis
    return load_dataset(
        search.options.eval_path,
        normalization=analysis.normalize,
        num_classes=num_classes_of(search.context.cache.model),
        image_size=analysis.image_size,
    )


def _evaluate(
    search: Search,
    trials: Sequence[FrozenTrial],
    eval_data: Dataset,
    final_timings: dict[str, float],
) -> dict[int, Accuracy]:
    """Top-1 of each trial's quantized model on the evaluation data (timings added up)."""
    context = search.context
    evaluations: dict[int, Accuracy] = {}
    for trial in trials:
        start = time.perf_counter()
        config = search.space.config(search.trial_base(), trial.params)
        prepared = context.prepare(config)
        final_timings["final_prepare_s"] += time.perf_counter() - start
        start = time.perf_counter()
        quantized = context.build(prepared)
        evaluations[trial.number] = evaluate_accuracy(quantized, eval_data)
        final_timings["full_eval_s"] += time.perf_counter() - start
        logger.info(
            "full evaluation of trial %d: top-1 %.2f %%",
            trial.number,
            100 * evaluations[trial.number].top1,
        )
    return evaluations


def keep_default_unless_better(
    best: FrozenTrial,
    default: FrozenTrial | None,
    evaluations: Mapping[int, Accuracy],
    min_gain_se: float,
) -> FrozenTrial:
    """Keep lcpaq's default unless ``best`` beats it by more than ``min_gain_se`` paired
    standard errors: the maximum of k noisy accuracies is biased upwards, and a gain within
    the noise of the evaluation data is as likely a loss on other data."""
    if default is None or best.number == default.number:
        return best
    gain, stderr = paired_difference(evaluations[best.number], evaluations[default.number])
    if gain > min_gain_se * stderr:
        return best
    logger.info(
        "the best configuration (trial %d) beats the default by %+.2f ± %.2f points on the "
        "evaluation data, within %.1f SE: keeping the default",
        best.number,
        100 * gain,
        100 * stderr,
        min_gain_se,
    )
    return default


def run_best(search: Search, best: FrozenTrial, config: RunConfig) -> dict[str, object]:
    """The ordinary stages on ``best/``: allocate, export, evaluate, plot, report."""
    context, cache = search.context, search.context.cache
    best_dir = search.options.out / "best"
    folder, estimate, _ = cache.curvature(config)
    table = cache.table(config, estimate)
    context.write_analysis(best_dir, config, folder, table)
    budgets = [parse_budget(text) for text in config.allocation.budgets]
    allocation = pipeline.allocate(best_dir, budgets, **config.allocation.options())
    expected = best.user_attrs.get("assignment")
    if expected is not None and list(allocation.formats) != list(expected):
        raise RuntimeError(
            f"best/ allocation differs from trial {best.number}'s: the stages are not "
            "deterministic on this machine"
        )
    pipeline.export(best_dir)
    result: dict[str, object] = {"folder": str(best_dir)}
    if search.options.eval_path:
        evaluation = pipeline.evaluate(best_dir, search.options.eval_path)
        result["evaluation"] = evaluation
    pipeline.plot(best_dir)
    result["report"] = str(pipeline.report(best_dir))
    return result
