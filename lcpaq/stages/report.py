"""The ``report`` stage: ``report.json`` (every number) and ``report.md`` (the same numbers for a
person), built only from the artifacts in the run folder (``run_config.json``, ``layers.json``,
``curvature.npz`` and whichever of ``hutchinson.npz``, ``pyhessian.json``, ``allocation.json``,
``evaluation.json``, ``onnx.json``, ``sweep.json``, ``infeasible.json``, ``timings.json`` and
``interactions.npz`` exist). The last stage; the Markdown sections are in
`lcpaq.stages.report_sections`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypedDict, cast

import numpy as np
from scipy.stats import spearmanr

from lcpaq import runfolder
from lcpaq.allocation.pairwise import DEFAULT_PAIR_Z, pair_views
from lcpaq.allocation.table import weight_format_of
from lcpaq.sensitivity.curvature import CurvatureEstimate
from lcpaq.sensitivity.interaction_terms import load_interactions
from lcpaq.stages import report_metrics
from lcpaq.stages import report_sections as sections
from lcpaq.stages.folder import read_layers_file

#: A JSON object as read from the run folder.
Json = dict[str, Any]


class ReportData(TypedDict):
    """``report.json``: the run's numbers, one key per section of ``report.md`` (None where
    the stage that writes the file did not run)."""

    model: str
    config: Json
    checkpoint_sha256: str | None
    fp32_size_bytes: float
    layers: list[Json]
    curvature: Json
    allocation: Json | None
    evaluation: Json | None
    onnx: Json | None
    sweep: Json | None
    infeasible: Json | None
    timings_s: Json | None
    interactions: Json | None


def ranking_stability(curvature: CurvatureEstimate, seed: int = 0) -> dict[str, float] | None:
    """How stable the per-layer trace ranking is under resampling of the calibration images.

    ``split_half_spearman``: rank correlation between traces from even and odd samples;
    ``bootstrap_spearman_median``/``_p05``: over 200 bootstrap resamples vs the full estimate.
    """
    samples = curvature.sample_traces
    if samples is None or len(samples) < 4 or samples.shape[1] < 3:
        return None
    split = float(spearmanr(samples[0::2].mean(0), samples[1::2].mean(0)).statistic)
    rng = np.random.default_rng(seed)
    full = samples.mean(0)
    values = [
        spearmanr(samples[rng.integers(0, len(samples), len(samples))].mean(0), full).statistic
        for _ in range(200)
    ]
    return {
        "split_half_spearman": split,
        "bootstrap_spearman_median": float(np.median(values)),
        "bootstrap_spearman_p05": float(np.percentile(values, 5)),
    }


def _optional(run_dir: Path, name: str) -> Json | None:
    path = run_dir / name
    return runfolder.read_json(path, name) if path.is_file() else None


def _layer_rows(
    layers: list[Json],
    curvature: CurvatureEstimate,
    hutchinson: CurvatureEstimate | None,
    chosen: Mapping[str, str],
) -> list[Json]:
    """One row per layer: size, trace ± SE, flag, the Hutchinson check and the chosen format."""
    rows = []
    for index, layer in enumerate(layers):
        row = {
            "name": layer["name"],
            "kind": layer["kind"],
            "num_params": layer["num_params"],
            "macs_per_sample": layer["macs_per_sample"],
            "trace": float(curvature.trace[index]),
            "trace_stderr": float(curvature.trace_stderr[index]),
            "flag": curvature.flags[index],
            "format": chosen.get(layer["name"]),
        }
        if hutchinson is not None:
            row["hutchinson_trace"] = float(hutchinson.trace[index])
            row["hutchinson_stderr"] = float(hutchinson.trace_stderr[index])
        rows.append(row)
    return rows


def _curvature_summary(
    run_dir: Path,
    curvature: CurvatureEstimate,
    hutchinson: CurvatureEstimate | None,
    seconds: Mapping[str, Any],
    rows: list[Json],
) -> Json:
    """The estimator, trace sum ± SE, ranking stability and the cross-checks that ran."""
    summary: Json = {
        "method": curvature.method,
        "num_samples": curvature.num_samples,
        "trace_sum": float(curvature.trace.sum()),
        "trace_sum_stderr": (
            float(curvature.sample_traces.sum(1).std(ddof=1) / np.sqrt(curvature.num_samples))
            if curvature.sample_traces is not None
            else None
        ),
        "seconds": seconds.get("curvature_seconds"),
        "ranking_stability": ranking_stability(curvature),
        "flagged_layers": [row["name"] for row in rows if row["flag"]],
    }
    if hutchinson is not None:
        summary["hutchinson"] = {
            "num_probes": hutchinson.num_probes,
            "num_samples": hutchinson.num_samples,
            "seconds": seconds.get("hutchinson_seconds"),
            "spearman_vs_gauss_newton": float(
                spearmanr(hutchinson.trace, curvature.trace).statistic
            ),
            "trace_sum": float(hutchinson.trace.sum()),
            "trace_sum_stderr": float(np.sqrt((hutchinson.trace_stderr**2).sum())),
        }
    pyhessian = _optional(run_dir, "pyhessian.json")
    if pyhessian is not None:
        # PyHessian's trace is over the whole weight block-diagonal: Σ_l tr(H_ll).
        difference = float(curvature.trace.sum()) - float(pyhessian["trace"])
        summary["pyhessian"] = {
            **pyhessian,
            "layer_sum_minus_pyhessian": difference,
            "difference_in_pyhessian_stderr": difference / float(pyhessian["trace_stderr"])
            if pyhessian["trace_stderr"]
            else None,
        }
    return summary


def build_report(run_dir: Path) -> ReportData:
    """Every number of the run, from its files."""
    config = runfolder.read_json(run_dir / "run_config.json", "run configuration")
    layer_data = read_layers_file(run_dir, "layer list")
    curvature = runfolder.load_curvature(run_dir / "curvature.npz")
    hutchinson = (
        runfolder.load_curvature(run_dir / "hutchinson.npz")
        if (run_dir / "hutchinson.npz").is_file()
        else None
    )
    allocation = _optional(run_dir, "allocation.json")
    chosen = dict(allocation["assignment"]) if allocation else {}
    rows = _layer_rows(layer_data["layers"], curvature, hutchinson, chosen)
    seconds = cast(Mapping[str, Any], layer_data)
    return {
        "model": layer_data["model"],
        "config": {key: value for key, value in config.items() if key != "schema_version"},
        "checkpoint_sha256": layer_data["checkpoint_sha256"],
        "fp32_size_bytes": float(layer_data["fp32_size_bits"]) / 8,
        "layers": rows,
        "curvature": _curvature_summary(run_dir, curvature, hutchinson, seconds, rows),
        "allocation": allocation,
        "evaluation": _optional(run_dir, "evaluation.json"),
        "onnx": _optional(run_dir, "onnx.json"),
        "sweep": _optional(run_dir, "sweep.json"),
        "infeasible": _optional(run_dir, "infeasible.json"),
        "timings_s": _optional(run_dir, "timings.json"),
        "interactions": interaction_summary(run_dir, allocation),
    }


def interaction_summary(
    run_dir: Path, allocation: Mapping[str, Any] | None, top: int = 5
) -> dict[str, Any] | None:
    """The inter-layer terms of ``interactions.npz``: source, counts, the largest pairs and
    whether (and how) the allocation used them; None when the analysis measured none."""
    if not (run_dir / "interactions.npz").is_file():
        return None
    terms = load_interactions(run_dir / "interactions.npz")
    used = dict(allocation.get("pairwise") or {}) if allocation else {}
    z = float(used.get("pair_z", DEFAULT_PAIR_Z))
    chosen = [weight_format_of(str(f)) for f in allocation["formats"]] if allocation else None
    views = pair_views(terms, chosen, z)
    order = np.argsort(-np.abs(views["chosen"] if chosen else views["largest"]))[:top]
    blocks, errors = terms.stacked()
    return {
        **terms.header(),
        "num_significant": int((np.abs(blocks) >= z * errors).sum()),
        "num_negative_significant": int(((blocks < 0) & (np.abs(blocks) >= z * errors)).sum()),
        "median_ratio_to_diagonal": float(np.nanmedian(views["ratio"])) if len(order) else None,
        "allocation": used or None,
        "top_pairs": [
            {
                "layers": [
                    terms.layer_names[terms.pairs[k][0]],
                    terms.layer_names[terms.pairs[k][1]],
                ],
                "largest": float(views["largest"][k]),
                "at_chosen": float(views["chosen"][k]) if chosen else None,
            }
            for k in order
        ],
    }


def render_markdown(report: ReportData) -> str:
    """``report.md``: allocation, infeasible request, accuracy, ONNX, curvature, layers,
    model-level curves, inter-layer terms and timings, each section where its data exists."""
    lines = [f"# lcpaq report — {report['model']}", ""]
    if report["allocation"]:
        lines += sections.allocation_lines(
            report["allocation"], report["fp32_size_bytes"], report["config"]
        )
    if report.get("infeasible"):
        lines += sections.infeasible_lines(report["infeasible"] or {})
    if report["evaluation"]:
        lines += report_metrics.accuracy_lines(report["evaluation"])
    if report.get("onnx"):
        lines += sections.onnx_lines(report["onnx"] or {})
    lines += sections.curvature_lines(report["curvature"])
    lines += sections.layer_lines(report["layers"])
    if report["sweep"]:
        evaluation = report["evaluation"] or {}
        lines += sections.sweep_lines(
            report["sweep"], evaluation.get("fp32"), evaluation.get("metric")
        )
    if report.get("interactions"):
        lines += sections.interaction_lines(report["interactions"] or {})
    if report["timings_s"]:
        lines += sections.timing_lines(report["timings_s"])
    lines += [
        "",
        "Plots: `plots/frontiers.png`, `plots/candidate_heatmap.png`, `plots/bit_allocation.png`"
        + (", `plots/model_curve*.png` (one per swept metric)" if report.get("sweep") else "")
        + (", `plots/interactions.png`." if report.get("interactions") else "."),
        "",
    ]
    return "\n".join(lines)


def report(run_dir: Path) -> Path:
    """Write ``report.json`` and ``report.md``; returns the path of ``report.md``."""
    data = build_report(run_dir)
    runfolder.write_json(run_dir / "report.json", data)
    return runfolder.write_text(run_dir / "report.md", render_markdown(data))
