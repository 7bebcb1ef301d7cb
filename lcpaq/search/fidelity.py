"""Multi-fidelity trials (``--fidelity multi``): a cheap first rung, full fidelity for survivors.

Input: a trial's `RunConfig` and ``--cheap-samples``. Output: the first rung's proxy, measured on
the cheap configuration (at most ``--cheap-samples`` curvature, GPTQ and correction images, the
proxy on the first slice), which the successive-halving pruner compares across trials; only the
trials it keeps are prepared at their own settings for the later slices. The cheap configuration
of every trial shares one curvature pass, one set of quantized weights per (scheme, format) and
one set of FP32 correction statistics (the caches are keyed by sample count), so the first rung
costs an allocation, a correction on few images and a proxy on few images.

`agreement` reports, over the trials that reached full fidelity, the rank agreement (Spearman)
of the cheap first rung with the full proxy on the same slice and on the last slice, and the
seconds spent per rung, so a user can see whether the cheap rung ranks like the full one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState
from scipy.stats import spearmanr

from lcpaq.config import RunConfig
from lcpaq.search.context import SearchContext

FIDELITIES = ("full", "multi")
#: The timings a trial records (seconds), per stage of its preparation and scoring.
STAGE_TIMINGS = ("hessian_s", "candidates_s", "ilp_s", "correction_s", "proxy_s")


def cheap_config(config: RunConfig, samples: int) -> RunConfig:
    """``config`` with at most ``samples`` curvature/GPTQ images and correction images."""
    cheap = config.with_analysis(num_samples=min(config.analysis.num_samples, samples))
    if config.recovery.enabled:
        recovery = replace(config.recovery, num_samples=min(config.recovery.num_samples, samples))
        cheap = replace(cheap, recovery=recovery)
    return cheap


def cheap_rung(
    context: SearchContext, trial: optuna.Trial, config: RunConfig, images: int
) -> float:
    """The proxy of the cheap configuration ``config`` on the first ``images`` proxy images;
    its timings are stored as ``cheap_<stage>_s``. Raises `Infeasible` as ``prepare`` does."""
    prepared = context.prepare(config)
    assert prepared.quantized is not None  # prepare builds by default
    start = time.perf_counter()
    sums = context.scorer.sums(prepared.quantized, 0, images)
    prepared.timings["proxy_s"] = time.perf_counter() - start
    value = context.scorer.value(sums, images)
    for name, seconds in prepared.timings.items():
        trial.set_user_attr(f"cheap_{name}", seconds)
    trial.set_user_attr("cheap_proxy", value)
    return value


def _seconds(trial: FrozenTrial, prefix: str) -> float:
    return sum(float(trial.user_attrs.get(prefix + name, 0.0)) for name in STAGE_TIMINGS)


def _spearman(first: Sequence[float], second: Sequence[float]) -> float | None:
    if len(first) < 3 or len(set(first)) < 2 or len(set(second)) < 2:
        return None
    return float(spearmanr(first, second).statistic)


def agreement(trials: Sequence[FrozenTrial]) -> dict[str, object]:
    """Per-rung cost and the rank agreement between the cheap and the full rungs."""
    scored = [t for t in trials if "duplicate_of" not in t.user_attrs]
    cheap = [t for t in scored if "cheap_proxy" in t.user_attrs]
    full = [t for t in scored if t.user_attrs.get("full_fidelity")]
    both = [
        t for t in cheap if t.state == TrialState.COMPLETE and "full_first_rung" in t.user_attrs
    ]
    cheap_values = [float(t.user_attrs["cheap_proxy"]) for t in both]
    return {
        "cheap_rung_trials": len(cheap),
        "full_fidelity_trials": len(full),
        "cheap_rung_s": float(np.sum([_seconds(t, "cheap_") for t in cheap])),
        "full_fidelity_s": float(np.sum([_seconds(t, "") for t in full])),
        "compared_trials": len(both),
        "spearman_cheap_vs_full_first_rung": _spearman(
            cheap_values, [float(t.user_attrs["full_first_rung"]) for t in both]
        ),
        "spearman_cheap_vs_full_last_rung": _spearman(
            cheap_values, [float(t.value) for t in both if t.value is not None]
        ),
    }
