"""The report's measured numbers in the model's own metric (`lcpaq.model.evaluate.METRICS`): the
evaluation section and the measured columns of the model-level curves, with which differences are
within noise. A classifier's lines read as they always did (top-1 in %, differences in points);
perplexity is a plain number where lower is better and its paired difference is in NLL nats/token.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from lcpaq.model.evaluate import metric_info

#: Secondary metrics the curve tables show beside the main one when points carry them.
SECONDARY_COLUMNS = ("recall@10", "cosine_to_fp32")


def _scaled(value: Any, score: str) -> str:
    if value is None:
        return "–"
    if metric_info(score).percent:
        return f"{100 * float(value):.2f}"
    return format(float(value), metric_info(score).spec)


def score_header(score: str) -> str:
    """The column header of a measured metric (``top-1 % ± SE`` for a classifier)."""
    info = metric_info(score)
    label = "top-1" if score == "top1" else info.label
    return f"{label}{' %' if info.percent else ''} ± SE"


def score_text(point: Mapping[str, Any], score: str = "top1") -> str:
    """A point's ``score`` ± its standard error (``<score>_stderr``), "–" when not measured."""
    value, stderr = point.get(score), point.get(f"{score}_stderr")
    if value is None:
        return "–"
    if stderr is None:
        return _scaled(value, score)
    if metric_info(score).percent:
        return f"{_scaled(value, score)} ± {_scaled(stderr, score)}"
    return f"{_scaled(value, score)} ± {float(stderr):.2g}"


def secondary_columns(points: Sequence[Mapping[str, Any]], score: str) -> list[str]:
    """The `SECONDARY_COLUMNS` that some point carries (none for a classifier)."""
    return [
        key
        for key in SECONDARY_COLUMNS
        if key != score and any(point.get(key) is not None for point in points)
    ]


def within_noise(
    first: Mapping[str, Any], second: Mapping[str, Any], score: str = "top1"
) -> float | None:
    """The standard error of two measured values' difference, √(SE₁² + SE₂²), when they differ
    by less than it (unpaired: conservative for models measured on the same samples); else None."""
    keys = (score, f"{score}_stderr")
    if any(p.get(key) is None for p in (first, second) for key in keys):
        return None
    value_a, se_a, value_b, se_b = (float(p[key]) for p in (first, second) for key in keys)
    scale = math.hypot(se_a, se_b)
    return scale if abs(value_a - value_b) < scale else None


def noise_lines(
    labelled: Sequence[tuple[str, Mapping[str, Any]]],
    fp32: Mapping[str, Any] | None,
    score: str = "top1",
) -> list[str]:
    """Which measured points are within noise of FP32 and of their neighbours in cost order
    (``labelled`` is sorted by cost): a difference smaller than its standard error is no
    evidence that one is better."""
    measured = [(label, p) for label, p in labelled if p.get(score) is not None]
    pairs = list(zip(measured, measured[1:]))
    if fp32 is not None and fp32.get(score) is not None:
        reference = {score: fp32[score], f"{score}_stderr": fp32.get("stderr")}
        pairs = [(("FP32", reference), item) for item in measured] + pairs
    scale_of = 100.0 if metric_info(score).percent else 1.0
    spec = ".2f" if metric_info(score).percent else ".3g"
    notes = []
    for (label_a, a), (label_b, b) in pairs:
        scale = within_noise(a, b, score)
        if scale is not None:
            difference = scale_of * (float(b[score]) - float(a[score]))
            notes.append(
                f"{label_b} vs {label_a}: {difference:+{spec}} ± {scale_of * scale:{spec}}"
            )
    if not notes:
        return []
    name = "top-1" if score == "top1" else metric_info(score).label
    return [
        "",
        f"Within noise ({name} difference smaller than its standard error; neither is shown "
        "better): " + "; ".join(notes) + ".",
    ]


def _inputs_text(evaluation: Mapping[str, Any]) -> str:
    """Which layer inputs the evaluated checkpoint quantized (older evaluations do not say)."""
    counts = evaluation.get("quantized_inputs")
    if counts is None:
        return "weights"
    if not counts:
        return "weights only, activations FP32"
    inputs = ", ".join(f"{name} ×{count}" for name, count in sorted(counts.items()))
    return f"weights and layer inputs: {inputs}"


def _paired_text(evaluation: Mapping[str, Any]) -> str:
    """The paired difference in its own unit: points for fractions, nats/token for NLL."""
    quantity = str(evaluation.get("paired_quantity") or evaluation.get("metric") or "top1")
    difference = float(evaluation["paired_difference"])
    stderr = float(evaluation["paired_difference_stderr"])
    if metric_info(quantity).percent:
        return f"{100 * difference:+.2f} ± {100 * stderr:.2f} points"
    return f"{difference:+.4g} ± {stderr:.2g} ({metric_info(quantity).label}, quantized − FP32)"


def _result_text(result: Mapping[str, Any], score: str) -> str:
    """One model's value and standard error (``evaluation.json``'s ``fp32``/``quantized``)."""
    value, stderr = result[score], result["stderr"]
    if metric_info(score).percent:
        return f"{_scaled(value, score)} % ± {_scaled(stderr, score)}"
    return f"{_scaled(value, score)} ± {float(stderr):.2g}"


def accuracy_lines(evaluation: Mapping[str, Any]) -> list[str]:
    """The metric of both models on the evaluation data (a classifier's top-1; recall@1 with
    recall@10 and cosine to FP32; perplexity with its NLL), and their paired difference."""
    fp32, quantized = evaluation["fp32"], evaluation["quantized"]
    score = str(evaluation.get("metric") or "top1")
    name = "top-1" if score == "top1" else metric_info(score).label
    secondary = [
        key
        for key in quantized
        if key not in (score, "stderr", "num_samples", "tokens") and not key.endswith("_stderr")
    ]
    lines = [
        "## Accuracy" if score == "top1" else f"## Evaluation ({name})",
        f"- data: {evaluation['eval_data']} ({fp32['num_samples']} samples)",
        f"- FP32 {name}: {_result_text(fp32, score)}",
        f"- quantized {name} (exported checkpoint, {_inputs_text(evaluation)}): "
        f"{_result_text(quantized, score)}",
    ]
    for key in secondary:
        key_unit = " %" if metric_info(key).percent else ""
        lines.append(
            f"- {metric_info(key).label}: FP32 {score_text(fp32, key)}{key_unit}, "
            f"quantized {score_text(quantized, key)}{key_unit}"
        )
    return [*lines, f"- paired difference: {_paired_text(evaluation)}", ""]
