"""The JSON entry of the models section of scripts/bench_hessian.py: per-layer rows and per-estimator
summaries (times in HVP-equivalents, probes for 5 %, Spearman between estimators) of a `ModelRun`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from lcpaq.model.graph import LayerInfo
from lcpaq.sensitivity.curvature import CurvatureEstimate
from lcpaq.sensitivity.hutchinson import probes_for_tolerance


@dataclass
class ModelRun:
    """Every estimator's result on one checkpoint, with its wall (and CPU) seconds."""

    name: str
    layers: tuple[LayerInfo, ...]
    num_samples: int
    hvp: dict[str, Any]
    gn: CurvatureEstimate
    gn_seconds: float
    gn_cpu_seconds: float
    pyh: dict[str, Any]
    controlled: CurvatureEstimate
    controlled_seconds: float
    #: The long plain reference, on the first ``count`` images, and Gauss-Newton on those.
    hutch: CurvatureEstimate
    hutch_seconds: float
    count: int
    gn_ref: CurvatureEstimate

    @property
    def unit(self) -> float:
        """Seconds of one whole-weight HVP: the unit of the HVP-equivalents."""
        return float(self.hvp["hvp_seconds"])


def _probes_for_5pct(run: ModelRun) -> np.ndarray:
    """Per layer, the plain reference's probes for 5 %, from its measured variance."""
    variance = run.hutch.trace_stderr**2 * run.hutch.probes_per_layer
    return probes_for_tolerance(run.hutch.trace, variance, 0.05)


def _hutchinson_5pct_hvp(run: ModelRun) -> float:
    """HVP-equivalents of the plain reference at 5 %: this run's seconds per single-layer probe,
    scaled linearly (the cost is linear in the images) to all the model's images."""
    seconds_per_probe = run.hutch_seconds / run.hutch.num_probes * run.num_samples / run.count
    return float(_probes_for_5pct(run).sum() * seconds_per_probe / run.unit)


def layer_rows(run: ModelRun) -> list[dict[str, object]]:
    """One row per layer: every estimator's trace and standard error."""
    gn, hutch, controlled = run.gn, run.hutch, run.controlled
    taken = hutch.probes_per_layer
    assert taken is not None
    needed = _probes_for_5pct(run)
    hutch_rel = hutch.trace_stderr / np.abs(hutch.trace)
    return [
        {
            "name": info.name,
            "num_params": info.num_params,
            "gauss_newton": float(gn.trace[i]),
            "gauss_newton_stderr": float(gn.trace_stderr[i]),
            "gauss_newton_on_reference_samples": float(run.gn_ref.trace[i]),
            "hutchinson": float(hutch.trace[i]),
            "hutchinson_stderr": float(hutch.trace_stderr[i]),
            "hutchinson_relative_stderr": float(hutch_rel[i]),
            "hutchinson_probes": int(taken[i]),
            "hutchinson_probes_for_5pct": float(needed[i]),
            "hessian_gn_control": float(controlled.trace[i]),
            "hessian_gn_control_stderr": float(controlled.trace_stderr[i]),
        }
        for i, info in enumerate(run.layers)
    ]


def gauss_newton_summary(run: ModelRun) -> dict[str, object]:
    gn, unit = run.gn, run.unit
    gn_rel = gn.trace_stderr / np.abs(gn.trace)
    assert gn.sample_traces is not None
    return {
        "seconds": run.gn_seconds,
        "hvp_equivalents": run.gn_seconds / unit,
        "cpu_seconds": run.gn_cpu_seconds,
        "hvp_equivalents_cpu": run.gn_cpu_seconds / run.hvp["hvp_cpu_seconds"],
        "sum": float(gn.trace.sum()),
        "sum_stderr": float(np.std(gn.sample_traces.sum(1), ddof=1) / np.sqrt(run.num_samples)),
        "probe_noise": "none (exact per sample); stderr is over calibration samples",
        "max_relative_stderr_over_samples": float(gn_rel.max()),
        "median_relative_stderr_over_samples": float(np.median(gn_rel)),
    }


def hutchinson_summary(run: ModelRun, args: argparse.Namespace) -> dict[str, object]:
    hutch, needed = run.hutch, _probes_for_5pct(run)
    hutch_rel = hutch.trace_stderr / np.abs(hutch.trace)
    return {
        "seconds": run.hutch_seconds,
        "hvp_equivalents": run.hutch_seconds / run.unit,
        "num_probes": hutch.num_probes,
        "probe_caps": {
            "total": args.hutchinson_probes_per_layer * len(run.layers),
            "per_layer": args.hutchinson_max_per_layer,
            "rel_tol": args.rel_tol,
        },
        "sum": float(hutch.trace.sum()),
        "sum_stderr": float(np.sqrt((hutch.trace_stderr**2).sum())),
        "relative_stderr_median": float(np.median(hutch_rel)),
        "relative_stderr_max": float(hutch_rel.max()),
        "layers_at_5pct": int((hutch_rel <= 0.05).sum()),
        "median_probes_for_5pct": float(np.median(needed)),
        "max_probes_for_5pct": float(needed.max()),
        "total_probes_for_5pct": float(needed.sum()),
        "hvp_equivalents_for_5pct": _hutchinson_5pct_hvp(run),
        "num_samples": run.count,
        "note": "on the first num_samples images; probes for 5% extrapolated from the measured "
        "per-layer variance; HVP-equivalents for 5% use this run's mean seconds per "
        "single-layer probe, scaled linearly to all the model's images",
    }


def control_variate_summary(run: ModelRun) -> dict[str, object]:
    controlled = run.controlled
    residual = controlled.trace - run.gn.trace
    return {
        "seconds": run.controlled_seconds,
        "hvp_equivalents": run.controlled_seconds / run.unit,
        "num_probes": controlled.num_probes,
        "relative_stderr_max": float(np.max(controlled.trace_stderr / np.abs(controlled.trace))),
        "max_relative_residual_trace": float(np.max(np.abs(residual) / np.abs(run.gn.trace))),
        "note": "tr(H_ll) = tr(G_ll) (exact) + mean of v(H_ll - G_ll)v over single-layer probes",
    }


def comparison(run: ModelRun, args: argparse.Namespace) -> dict[str, object]:
    gn_cost = run.gn_seconds / run.unit
    return {
        "spearman_gauss_newton_vs_hutchinson": float(
            spearmanr(run.gn_ref.trace, run.hutch.trace).statistic
        ),
        "spearman_expected_from_reference_noise": spearman_under_noise(
            run.gn_ref.trace, run.hutch.trace_stderr, args.seed
        ),
        "reference_samples": run.count,
        "spearman_gauss_newton_vs_gn_controlled_hessian": float(
            spearmanr(run.gn.trace, run.controlled.trace).statistic
        ),
        "hutchinson_5pct_over_gauss_newton_cost": _hutchinson_5pct_hvp(run) / gn_cost,
        "pyhessian_5pct_over_gauss_newton_cost": run.pyh["probes_for_5pct"] / gn_cost,
        "pyhessian_run_over_gauss_newton_cost": run.pyh["seconds"] / run.gn_seconds,
    }


def spearman_under_noise(traces: np.ndarray, stderr: np.ndarray, seed: int) -> dict[str, float]:
    """Spearman between ``traces`` and ``traces`` + N(0, stderr²) noise, over 2000 draws: what a
    reference with these standard errors gives even if it measures exactly ``traces``."""
    rng = np.random.default_rng(seed)
    values = [spearmanr(traces, traces + rng.normal(0.0, stderr)).statistic for _ in range(2000)]
    return {
        "median": float(np.median(values)),
        "p05": float(np.percentile(values, 5)),
        "p95": float(np.percentile(values, 95)),
    }
