"""The sections of ``report.md``, each a list of Markdown lines rendered from one part of the
report data (`lcpaq.stages.report.ReportData`, the content of ``report.json``). Missing optional
fields (files written by older versions) render as "–"."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lcpaq.allocation.costs import ACTIVATION_METRICS
from lcpaq.allocation.table import PAIR_SEPARATOR
from lcpaq.stages.report_metrics import noise_lines, score_header, score_text, secondary_columns


def _pct(value: Any) -> str:
    return "–" if value is None else f"{100 * float(value):.2f}"


def _number(value: Any, spec: str = ".4g") -> str:
    return "–" if value is None else format(float(value), spec)


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


def sweep_lines(
    sweep: Mapping[str, Any], fp32: Mapping[str, Any] | None = None, score: str | None = None
) -> list[str]:
    """One table per swept metric: uniform baselines, then the mixed-precision optima, with
    every measured ``score`` ± its standard error (default: the sweep's ``metric``, else top-1),
    its secondary metrics where measured (recall@10, cosine to FP32), and which points are
    within noise of each other and of FP32 (``fp32``: ``evaluation.json``'s FP32 result)."""
    score = score or str(sweep.get("metric") or "top1")
    curves = sweep.get("curves") or {"avg-bits": sweep["points"]}
    held = ", ".join(sweep.get("fixed_budgets", []))
    extra = secondary_columns([*sweep["uniform"], *(p for c in curves.values() for p in c)], score)
    lines = ["", "## Model-level curves"]
    for metric, points in curves.items():
        others = ", ".join(b for b in held.split(", ") if b and not b.startswith(f"{metric}="))
        lines += [
            "",
            f"### Over {metric}" + (f" (held: {others})" if others else ""),
            "",
            f"| assignment | {metric} | avg bits | size (MB) | BitOps (G) | predicted ΔL | "
            f"{score_header(score)} |" + "".join(f" {score_header(key)} |" for key in extra),
            "|---|---|---|---|---|---|---|" + "---|" * len(extra),
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
                f"{score_text(point, score)} |"
                + "".join(f" {score_text(point, key)} |" for key in extra)
            )
        by_cost = sorted(rows, key=lambda row: float(_metric_value(row[1], metric)))
        lines += noise_lines(by_cost, fp32, score)
    return lines


def _metric_value(point: Mapping[str, Any], metric: str) -> float:
    costs = point.get("costs") or {}
    value = costs.get(metric, point.get("avg_bits"))
    return float("inf") if value is None else float(value)


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


def allocation_lines(
    allocation: Mapping[str, Any], fp32_size_bytes: float, config: Mapping[str, Any]
) -> list[str]:
    """Budget, size, predicted loss, solver, quantizer and the budget table."""
    budgets = ", ".join(f"{b['metric']}={b['limit']:g}" for b in allocation["budgets"])
    lines = [
        "## Allocation",
        f"- budget: {budgets}; first/last layers: {allocation['first_last']}; scorer: {allocation['scorer']}",
        f"- average weight bits: {allocation['average_bits']:.3f}; size: {allocation['size_bytes'] / 1e6:.4f} MB "
        f"(FP32 {fp32_size_bytes / 1e6:.4f} MB, {fp32_size_bytes / allocation['size_bytes']:.1f}× smaller)",
        f"- predicted loss increase: {allocation['predicted_loss_increase']:.4g} nats",
        f"- solver: HiGHS {allocation['status']}, MIP gap {allocation['mip_gap']:.2g}, {allocation['solve_time_s'] * 1000:.1f} ms",
        quantizer_line(config),
    ]
    return [*lines, *budget_lines(allocation), ""]


def curvature_lines(curvature: Mapping[str, Any]) -> list[str]:
    """The estimator, the trace sum, ranking stability, cross-checks and flagged layers."""
    lines = [
        "## Curvature",
        f"- estimator: {curvature['method']} on {curvature['num_samples']} calibration samples"
        + (f" ({curvature['seconds']:.1f} s)" if curvature.get("seconds") else ""),
        f"- sum of per-layer traces: {curvature['trace_sum']:.4g}"
        + (f" ± {curvature['trace_sum_stderr']:.2g}" if curvature.get("trace_sum_stderr") else ""),
    ]
    stability = curvature.get("ranking_stability")
    if stability:
        lines.append(
            f"- layer ranking stability: split-half Spearman {stability['split_half_spearman']:.3f}; "
            f"bootstrap Spearman median {stability['bootstrap_spearman_median']:.3f} (5th percentile {stability['bootstrap_spearman_p05']:.3f})"
        )
    if curvature.get("hutchinson"):
        check = curvature["hutchinson"]
        lines.append(
            f"- Hutchinson check ({check['num_probes']} probes, {check['num_samples']} samples): sum {check['trace_sum']:.4g} ± {check['trace_sum_stderr']:.2g}; "
            f"Spearman vs Gauss–Newton {check['spearman_vs_gauss_newton']:.3f}"
        )
    if curvature.get("pyhessian"):
        check = curvature["pyhessian"]
        eigenvalues = ", ".join(f"{value:.4g}" for value in check["top_eigenvalues"])
        lines.append(
            f"- PyHessian check ({check['num_probes']} probes, {check['num_samples']} samples): whole-weight trace {check['trace']:.4g} ± {check['trace_stderr']:.2g} "
            f"(Σ layer traces − PyHessian = {check['layer_sum_minus_pyhessian']:+.3g}); top eigenvalue {eigenvalues}"
        )
    flagged = curvature["flagged_layers"]
    lines.append(
        f"- flagged layers (negative or < 2 SE): {', '.join(flagged) if flagged else 'none'}"
    )
    return lines


def layer_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One table row per layer: size, trace, flag, Hutchinson check (if run) and format."""
    lines = ["", "## Layers", ""]
    has_check = any("hutchinson_trace" in row for row in rows)
    header = (
        "| layer | params | MACs/sample | trace ± SE | flag |"
        + (" Hutchinson ± SE |" if has_check else "")
        + " format |"
    )
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
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
    return lines


def interaction_lines(pairs: Mapping[str, Any]) -> list[str]:
    """The inter-layer terms: source, counts, how the allocation used them, the largest pairs."""
    used = pairs["allocation"]
    lines = [
        "",
        "## Inter-layer terms",
        f"- source: {pairs['method']} on {pairs['num_samples']} samples, formats {', '.join(pairs['formats'])}; "
        f"{pairs['num_pairs']} pairs, {pairs['num_significant']} of {pairs['num_terms']} terms significant "
        f"({pairs['num_negative_significant']} of them negative); median |largest C_ij| / √(d_i·d_j): "
        + (
            f"{pairs['median_ratio_to_diagonal']:.2g}"
            if pairs["median_ratio_to_diagonal"] is not None
            else "–"
        ),
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
    for row in pairs["top_pairs"]:
        at_chosen = "–" if row["at_chosen"] is None else f"{row['at_chosen']:.3g}"
        lines.append(f"| {' × '.join(row['layers'])} | {row['largest']:.3g} | {at_chosen} |")
    return lines


def timing_lines(timings: Mapping[str, Any]) -> list[str]:
    """Wall seconds per stage (``timings.json``)."""
    lines = ["", "## Timings", "", "| stage | seconds |", "|---|---|"]
    return lines + [
        f"| {stage} | {seconds:.1f} |"
        for stage, seconds in timings.items()
        if stage != "schema_version"
    ]
