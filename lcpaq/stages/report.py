"""The run report: ``report.json`` (every number) and ``report.md`` (the same numbers for a person),
built only from the artifacts in the run folder."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from lcpaq import runfolder
from lcpaq.allocation.costs import ACTIVATION_METRICS
from lcpaq.allocation.table import PAIR_SEPARATOR
from lcpaq.sensitivity.curvature import CurvatureEstimate


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


def _optional(run_dir: Path, name: str) -> dict[str, object] | None:
    path = run_dir / name
    return runfolder.read_json(path, name) if path.is_file() else None


def build_report(run_dir: Path) -> dict[str, object]:
    config = runfolder.read_json(run_dir / "run_config.json", "run configuration")
    layer_data = runfolder.read_json(run_dir / "layers.json", "layer list")
    curvature = runfolder.load_curvature(run_dir / "curvature.npz")
    hutchinson = (
        runfolder.load_curvature(run_dir / "hutchinson.npz")
        if (run_dir / "hutchinson.npz").is_file()
        else None
    )
    allocation = _optional(run_dir, "allocation.json")
    chosen = dict(allocation["assignment"]) if allocation else {}  # type: ignore[arg-type]
    rows = []
    for index, layer in enumerate(layer_data["layers"]):  # type: ignore[union-attr]
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
    curvature_summary: dict[str, object] = {
        "method": curvature.method,
        "num_samples": curvature.num_samples,
        "trace_sum": float(curvature.trace.sum()),
        "trace_sum_stderr": (
            float(curvature.sample_traces.sum(1).std(ddof=1) / np.sqrt(curvature.num_samples))
            if curvature.sample_traces is not None
            else None
        ),
        "seconds": layer_data.get("curvature_seconds"),
        "ranking_stability": ranking_stability(curvature),
        "flagged_layers": [row["name"] for row in rows if row["flag"]],
    }
    if hutchinson is not None:
        curvature_summary["hutchinson"] = {
            "num_probes": hutchinson.num_probes,
            "num_samples": hutchinson.num_samples,
            "seconds": layer_data.get("hutchinson_seconds"),
            "spearman_vs_gauss_newton": float(
                spearmanr(hutchinson.trace, curvature.trace).statistic
            ),
            "trace_sum": float(hutchinson.trace.sum()),
            "trace_sum_stderr": float(np.sqrt((hutchinson.trace_stderr**2).sum())),
        }
    pyhessian = _optional(run_dir, "pyhessian.json")
    if pyhessian is not None:
        # PyHessian's trace is over the whole weight block-diagonal: Σ_l tr(H_ll).
        difference = float(curvature.trace.sum()) - float(pyhessian["trace"])  # type: ignore[arg-type]
        curvature_summary["pyhessian"] = {
            **pyhessian,
            "layer_sum_minus_pyhessian": difference,
            "difference_in_pyhessian_stderr": difference / float(pyhessian["trace_stderr"])  # type: ignore[arg-type]
            if pyhessian["trace_stderr"]
            else None,
        }
    return {
        "model": layer_data["model"],
        "config": {key: value for key, value in config.items() if key != "schema_version"},
        "checkpoint_sha256": layer_data["checkpoint_sha256"],
        "fp32_size_bytes": float(layer_data["fp32_size_bits"]) / 8,  # type: ignore[arg-type]
        "layers": rows,
        "curvature": curvature_summary,
        "allocation": allocation,
        "evaluation": _optional(run_dir, "evaluation.json"),
        "onnx": _optional(run_dir, "onnx.json"),
        "sweep": _optional(run_dir, "sweep.json"),
        "infeasible": _optional(run_dir, "infeasible.json"),
        "timings_s": _optional(run_dir, "timings.json"),
        "interactions": interaction_summary(run_dir, allocation),
    }


def interaction_summary(
    run_dir: Path, allocation: dict[str, object] | None, top: int = 5
) -> dict[str, object] | None:
    """The inter-layer terms of ``interactions.npz``: source, counts, the largest pairs and
    whether (and how) the allocation used them; None when the analysis measured none."""
    if not (run_dir / "interactions.npz").is_file():
        return None
    from lcpaq.allocation.pairwise import pair_views
    from lcpaq.allocation.table import weight_format_of
    from lcpaq.sensitivity.interaction_terms import load_interactions

    terms = load_interactions(run_dir / "interactions.npz")
    used = dict(allocation.get("pairwise") or {}) if allocation else {}  # type: ignore[call-overload]
    z = float(used.get("pair_z", 2.0))
    chosen = [weight_format_of(str(f)) for f in allocation["formats"]] if allocation else None  # type: ignore[union-attr]
    views = pair_views(terms, chosen, z)
    order = np.argsort(-np.abs(views["chosen"] if chosen else views["largest"]))[:top]
    blocks = np.array([terms.cross[pair] for pair in terms.pairs])
    errors = np.array([terms.stderr[pair] for pair in terms.pairs])
    return {
        "method": terms.method,
        "num_samples": terms.num_samples,
        "formats": list(terms.format_names),
        "num_pairs": len(terms.pairs),
        "num_terms": int(blocks.size),
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


def _pct(value: object) -> str:
    return "–" if value is None else f"{100 * float(value):.2f}"  # type: ignore[arg-type]


def _number(value: object, spec: str = ".4g") -> str:
    return "–" if value is None else format(float(value), spec)  # type: ignore[arg-type]


def budget_lines(allocation: Mapping[str, Any]) -> list[str]:
    """The budget table (limit, used, slack, binding, limiting) and every cost metric used.

    ``budget_table`` rows come from `lcpaq.allocation.curves.budget_table`; allocations written before it
    existed show their ``budgets`` (limit, used, binding) with the slack computed here.
    """
    rows = allocation.get("budget_table") or [
        {**use, "slack": use["limit"] - use["used"], "slack_frac": 1 - use["used"] / use["limit"]}
        for use in allocation["budgets"]
    ]
    lines = [
        "",
        "### Budgets",
        "",
        "| budget | limit | used | slack | slack (% of limit) | binding | limiting "
        "(predicted ΔL without it) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        limiting = (
            "–"
            if "limiting" not in row
            else ("yes" if row["limiting"] else "no")
            + f" ({_number(row['predicted_loss_without'])})"
        )
        lines.append(
            f"| {row['metric']} | {row['limit']:.6g} | {row['used']:.6g} | {row['slack']:.4g} | "
            f"{100 * row['slack_frac']:.2f} | {'yes' if row['binding'] else 'no'} | {limiting} |"
        )
    costs = allocation.get("costs") or {}
    if costs:
        lines += [
            "",
            "Every cost metric of the allocation: "
            + "; ".join(f"{metric} {value:.6g}" for metric, value in costs.items())
            + ".",
        ]
    unpaired = not any(PAIR_SEPARATOR in str(name) for name in allocation.get("formats", ()))
    if unpaired and any(metric in ACTIVATION_METRICS for metric in costs):
        lines += [
            "",
            "BitOps, EBOPs and latency count 8-bit activations, but this run quantizes weights "
            "only: its activations stay FP32 (`--act-formats` quantizes them and pays for it).",
        ]
    return lines


def infeasible_lines(infeasible: Mapping[str, Any]) -> list[str]:
    """Why the last ``lcpaq allocate`` request could not be met (``infeasible.json``)."""
    lines = [
        "## Infeasible request",
        f"- budgets {', '.join(infeasible['budgets'])} cannot be met; the allocation above (if any) "
        "is the last feasible one",
        "",
        "| budget | limit | smallest achievable | feasible alone | short by |",
        "|---|---|---|---|---|",
    ]
    for row in infeasible["per_budget"]:
        lines.append(
            f"| {row['metric']} | {row['limit']:.6g} | {row['smallest_achievable']:.6g} | "
            f"{'yes' if row['feasible_alone'] else 'no'} | {row['shortfall']:.4g} |"
        )
    alone = all(row["feasible_alone"] for row in infeasible["per_budget"])
    pairs = infeasible["conflicting_pairs"]
    if pairs:
        text = "; ".join(" with ".join(pair) for pair in pairs)
        lines += ["", f"- conflicting pairs: {text}"]
    elif alone:
        lines += ["", "- every pair of budgets is feasible; only all of them together conflict"]
    lines += ["", f"- solver message: {infeasible['message']}", ""]
    return lines


def sweep_lines(sweep: Mapping[str, Any]) -> list[str]:
    """One table per swept metric: uniform baselines, then the mixed-precision optima."""
    curves = sweep.get("curves") or {"avg-bits": sweep["points"]}
    held = ", ".join(sweep.get("fixed_budgets", []))
    lines = ["", "## Model-level curves"]
    for metric, points in curves.items():
        others = ", ".join(b for b in held.split(", ") if b and not b.startswith(f"{metric}="))
        lines += [
            "",
            f"### Over {metric}" + (f" (held: {others})" if others else ""),
            "",
            f"| assignment | {metric} | avg bits | size (MB) | BitOps (G) | predicted ΔL | top-1 % |",
            "|---|---|---|---|---|---|---|",
        ]
        rows = [
            (
                f"uniform {point['format']}"
                + ("" if point.get("in_candidates", True) else " (not a candidate)"),
                point,
            )
            for point in sweep["uniform"]
        ]
        for point in points:
            budgets = point.get("budgets") or [point.get("budget_avg_bits")]
            span = (
                _number(max(budgets))
                if len(budgets) == 1
                else f"{_number(min(budgets))}…{_number(max(budgets))}"
            )
            rows.append((f"lcpaq, budget {span}", point))
        for label, point in rows:
            costs = point.get("costs") or {}
            lines.append(
                f"| {label} | {_number(costs.get(metric, point.get('avg_bits')))} | "
                f"{point['avg_bits']:.3f} | {point['size_bytes'] / 1e6:.4f} | "
                f"{_number(costs.get('bitops-g'))} | {point['predicted_loss_increase']:.4g} | "
                f"{_pct(point['top1'])} |"
            )
    return lines


def _inputs_text(evaluation: Mapping[str, Any]) -> str:
    """Which layer inputs the evaluated checkpoint quantized (older evaluations do not say)."""
    counts = evaluation.get("quantized_inputs")
    if counts is None:
        return "weights"
    if not counts:
        return "weights only, activations FP32"
    inputs = ", ".join(f"{name} ×{count}" for name, count in sorted(counts.items()))
    return f"weights and layer inputs: {inputs}"


def onnx_lines(onnx: Mapping[str, Any]) -> list[str]:
    """`lcpaq onnx`'s file and its check against PyTorch (``onnx.json``)."""
    lines = [
        "## ONNX",
        f"- file: {onnx['onnx']} ({onnx['file_bytes'] / 1e6:.3f} MB, QDQ)",
        f"- ONNX Runtime vs PyTorch on {onnx['images']} images of {onnx['check_data']}: top-1 "
        f"agreement {_pct(onnx['top1_agreement'])} %, max |logit difference| "
        f"{onnx['max_abs_logit_difference']:.3g} (mean {onnx['mean_abs_logit_difference']:.2g})",
    ]
    if onnx.get("onnx_top1") is not None:
        lines.append(
            f"- top-1: ONNX Runtime {_pct(onnx['onnx_top1'])} %, PyTorch {_pct(onnx['torch_top1'])} %"
        )
    return [*lines, ""]


def quantizer_line(config: Mapping[str, Any]) -> str:
    """One line saying how weights were mapped to codes, from the run configuration."""
    analysis = config.get("analysis", {})
    scheme = analysis.get("scheme", {})
    granularity = scheme.get("granularity", "channel")
    if granularity == "group":
        granularity = f"group of {scheme.get('group_size')}"
    clipping = scheme.get("clipping", "mse")
    if clipping == "percentile":
        clipping = f"p{scheme.get('percentile'):g} clipping"
    else:
        clipping = f"{clipping} clipping"
    rounding = scheme.get("rounding", "nearest")
    if rounding == "gptq":
        rounding = (
            f"GPTQ rounding (δ {scheme.get('gptq_damp'):g}, input second moments on "
            f"{analysis.get('num_samples')} calibration samples)"
        )
    else:
        rounding = "round to nearest"
    recovery = config.get("recovery", {})
    correction = (
        f"statistics correction on {recovery.get('num_samples')} samples"
        if recovery.get("enabled", True)
        else "no statistics correction"
    )
    codes = "symmetric" if scheme.get("symmetric") else "asymmetric"
    act_formats = analysis.get("act_formats") or []
    activations = (
        f"layer inputs quantized to {'/'.join(act_formats)} (static per-tensor ranges, "
        f"{analysis.get('act_clipping', 'minmax')} clipping)"
        if act_formats
        else "activations FP32"
    )
    return (
        f"- quantizer: {codes}, per {granularity}, {clipping}, {rounding}; {activations}; "
        f"{correction}"
    )


def render_markdown(report: dict[str, object]) -> str:
    lines = [f"# lcpaq report — {report['model']}", ""]
    allocation = report["allocation"]
    evaluation = report["evaluation"]
    if allocation:
        budgets = ", ".join(f"{b['metric']}={b['limit']:g}" for b in allocation["budgets"])  # type: ignore[index]
        lines += [
            "## Allocation",
            f"- budget: {budgets}; first/last layers: {allocation['first_last']}; scorer: {allocation['scorer']}",  # type: ignore[index]
            f"- average weight bits: {allocation['average_bits']:.3f}; size: {allocation['size_bytes'] / 1e6:.4f} MB "  # type: ignore[index]
            f"(FP32 {report['fp32_size_bytes'] / 1e6:.4f} MB, {report['fp32_size_bytes'] / allocation['size_bytes']:.1f}× smaller)",  # type: ignore[index, operator]
            f"- predicted loss increase: {allocation['predicted_loss_increase']:.4g} nats",  # type: ignore[index]
            f"- solver: HiGHS {allocation['status']}, MIP gap {allocation['mip_gap']:.2g}, {allocation['solve_time_s'] * 1000:.1f} ms",  # type: ignore[index]
            quantizer_line(report["config"]),  # type: ignore[arg-type]
        ]
        lines += budget_lines(allocation)  # type: ignore[arg-type]
        lines.append("")
    if report.get("infeasible"):
        lines += infeasible_lines(report["infeasible"])  # type: ignore[arg-type]
    if evaluation:
        lines += [
            "## Accuracy",
            f"- data: {evaluation['eval_data']} ({evaluation['fp32']['num_samples']} samples)",  # type: ignore[index]
            f"- FP32 top-1: {_pct(evaluation['fp32']['top1'])} % ± {_pct(evaluation['fp32']['stderr'])}",  # type: ignore[index]
            f"- quantized top-1 (exported checkpoint, {_inputs_text(evaluation)}): {_pct(evaluation['quantized']['top1'])} % ± {_pct(evaluation['quantized']['stderr'])}",  # type: ignore[index]
            f"- paired difference: {100 * evaluation['paired_difference']:+.2f} ± {100 * evaluation['paired_difference_stderr']:.2f} points",  # type: ignore[index]
            "",
        ]
    if report.get("onnx"):
        lines += onnx_lines(report["onnx"])  # type: ignore[arg-type]
    curvature = report["curvature"]
    lines += [
        "## Curvature",
        f"- estimator: {curvature['method']} on {curvature['num_samples']} calibration samples"  # type: ignore[index]
        + (f" ({curvature['seconds']:.1f} s)" if curvature.get("seconds") else ""),  # type: ignore[union-attr]
        f"- sum of per-layer traces: {curvature['trace_sum']:.4g}"  # type: ignore[index]
        + (f" ± {curvature['trace_sum_stderr']:.2g}" if curvature.get("trace_sum_stderr") else ""),  # type: ignore[union-attr]
    ]
    stability = curvature.get("ranking_stability")  # type: ignore[union-attr]
    if stability:
        lines.append(
            f"- layer ranking stability: split-half Spearman {stability['split_half_spearman']:.3f}; "
            f"bootstrap Spearman median {stability['bootstrap_spearman_median']:.3f} (5th percentile {stability['bootstrap_spearman_p05']:.3f})"
        )
    if curvature.get("hutchinson"):  # type: ignore[union-attr]
        check = curvature["hutchinson"]  # type: ignore[index]
        lines.append(
            f"- Hutchinson check ({check['num_probes']} probes, {check['num_samples']} samples): sum {check['trace_sum']:.4g} ± {check['trace_sum_stderr']:.2g}; "
            f"Spearman vs Gauss–Newton {check['spearman_vs_gauss_newton']:.3f}"
        )
    if curvature.get("pyhessian"):  # type: ignore[union-attr]
        check = curvature["pyhessian"]  # type: ignore[index]
        eigenvalues = ", ".join(f"{value:.4g}" for value in check["top_eigenvalues"])
        lines.append(
            f"- PyHessian check ({check['num_probes']} probes, {check['num_samples']} samples): whole-weight trace {check['trace']:.4g} ± {check['trace_stderr']:.2g} "
            f"(Σ layer traces − PyHessian = {check['layer_sum_minus_pyhessian']:+.3g}); top eigenvalue {eigenvalues}"
        )
    flagged = curvature["flagged_layers"]  # type: ignore[index]
    lines.append(
        f"- flagged layers (negative or < 2 SE): {', '.join(flagged) if flagged else 'none'}"
    )
    lines += ["", "## Layers", ""]
    has_check = any("hutchinson_trace" in row for row in report["layers"])  # type: ignore[union-attr]
    header = (
        "| layer | params | MACs/sample | trace ± SE | flag |"
        + (" Hutchinson ± SE |" if has_check else "")
        + " format |"
    )
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for row in report["layers"]:  # type: ignore[union-attr]
        cells = [
            row["name"],
            f"{row['num_params']:,}",
            f"{row['macs_per_sample']:,}",
            f"{row['trace']:.4g} ± {row['trace_stderr']:.2g}",
            row["flag"] or "",
        ]
        if has_check:
            cells.append(
                f"{row.get('hutchinson_trace', float('nan')):.4g} ± {row.get('hutchinson_stderr', float('nan')):.2g}"
            )
        cells.append(row["format"] or "–")
        lines.append("| " + " | ".join(cells) + " |")
    sweep = report["sweep"]
    if sweep:
        lines += sweep_lines(sweep)  # type: ignore[arg-type]
    pairs = report.get("interactions")
    if pairs:
        used = pairs["allocation"]  # type: ignore[index]
        lines += [
            "",
            "## Inter-layer terms",
            f"- source: {pairs['method']} on {pairs['num_samples']} samples, formats {', '.join(pairs['formats'])}; "  # type: ignore[index]
            f"{pairs['num_pairs']} pairs, {pairs['num_significant']} of {pairs['num_terms']} terms significant "  # type: ignore[index]
            f"({pairs['num_negative_significant']} of them negative); median |largest C_ij| / √(d_i·d_j): "  # type: ignore[index]
            + (
                f"{pairs['median_ratio_to_diagonal']:.2g}"
                if pairs["median_ratio_to_diagonal"] is not None
                else "–"
            ),  # type: ignore[index]
            "- used by the allocation: "
            + (
                f"λ = {used['pairwise_weight']:g}, z = {used['pair_z']:g}, clip {used['pair_clip']}, "
                f"{used['pairwise_mode']}; {used['pairs_used']} pairs, {used['terms_used']} nonzero terms"
                if used and used.get("pairwise_weight")
                else "no (λ = 0)"
            ),
            "",
            "| pair | largest C_ij | C_ij at the chosen formats |",
            "|---|---|---|",
        ]
        for row in pairs["top_pairs"]:  # type: ignore[index]
            at_chosen = "–" if row["at_chosen"] is None else f"{row['at_chosen']:.3g}"
            lines.append(f"| {' × '.join(row['layers'])} | {row['largest']:.3g} | {at_chosen} |")
    timings = report["timings_s"]
    if timings:
        lines += ["", "## Timings", "", "| stage | seconds |", "|---|---|"]
        lines += [
            f"| {stage} | {seconds:.1f} |"
            for stage, seconds in timings.items()
            if stage != "schema_version"
        ]  # type: ignore[union-attr]
    lines += [
        "",
        "Plots: `plots/frontiers.png`, `plots/candidate_heatmap.png`, `plots/bit_allocation.png`"
        + (", `plots/model_curve*.png` (one per swept metric)" if report.get("sweep") else "")
        + (", `plots/interactions.png`." if report.get("interactions") else "."),
        "",
    ]
    return "\n".join(lines)


def write_report(run_dir: Path) -> Path:
    report = build_report(run_dir)
    runfolder.write_json(run_dir / "report.json", report)
    return runfolder.write_text(run_dir / "report.md", render_markdown(report))
