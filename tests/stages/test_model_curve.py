"""The model-level curve figure over any budget metric."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import assert_png, read_png

from lcpaq.stages.model_curve import plot_model_curve


def test_plot_model_curve(tmp_path: Path) -> None:
    sweep = [
        {"avg_bits": 3.0, "predicted_loss_increase": 0.2, "top1": 0.61, "top1_stderr": 0.02},
        {"avg_bits": 4.0, "predicted_loss_increase": 0.01, "top1": None},
        {"avg_bits": 6.0, "predicted_loss_increase": 0.0, "top1": 0.70},
    ]
    uniform = [
        {"format": "int4", "avg_bits": 4.0, "predicted_loss_increase": 0.05, "top1": 0.55},
        {"format": "int8", "avg_bits": 8.0, "predicted_loss_increase": 1e-5, "top1": None},
    ]
    chosen = {"avg_bits": 4.0, "predicted_loss_increase": 0.01, "top1": None}
    out = tmp_path / "curve.png"
    assert (
        plot_model_curve(
            out,
            sweep=sweep,
            uniform=uniform,
            chosen=chosen,
            fp32_value=0.71,
            fp32_stderr=0.01,
            title="tinynet",
        )
        == out
    )
    assert_png(out, tmp_path)


def test_plot_model_curve_without_accuracy(tmp_path: Path) -> None:
    sweep = [
        {"avg_bits": b, "predicted_loss_increase": 10.0 ** (-b), "top1": None} for b in (2, 4, 6)
    ]
    out = tmp_path / "curve.png"
    plot_model_curve(out, sweep=sweep, uniform=[], chosen=None, fp32_value=None, title="tinynet")
    assert_png(out, tmp_path)


@pytest.mark.parametrize("metric", ["bitops-g", "size-mb", "latency-ms"])
def test_model_curve_over_any_budget_metric(tmp_path: Path, metric: str) -> None:
    def point(bits: float, loss: float, top1: float | None, **extra: object) -> dict:
        costs = {"avg-bits": bits, "size-mb": bits / 80, "bitops-g": bits * 0.04}
        return {
            "costs": costs,
            "avg_bits": bits,
            "size_bytes": bits / 80 * 1e6,
            "predicted_loss_increase": loss,
            "top1": top1,
            **extra,
        }

    sweep = [point(2.5, 0.3, 0.6), point(3.0, 0.1, 0.8), point(4.0, 0.02, 0.9)]
    uniform = [
        point(8.0, 1e-4, 0.92, format="int8"),
        point(4.0, 0.05, 0.85, format="int4"),
        point(8.0, 1e-3, 0.91, format="fp8_e4m3", weight_format="fp8_e4m3"),
    ]
    out = tmp_path / f"curve_{metric}.png"
    plot_model_curve(
        out,
        sweep=sweep,
        uniform=uniform,
        chosen=point(3.0, 0.1, 0.8),
        fp32_value=0.93,
        title="tinynet",
        metric=metric,
    )
    assert_png(out, tmp_path)
    read_png(out)


def test_model_curve_of_a_lower_is_better_metric(tmp_path: Path) -> None:
    """Perplexity: plain numbers on a log axis, error bars from ``perplexity_stderr``."""
    sweep = [
        {"avg_bits": b, "predicted_loss_increase": 10.0 ** (-b), "perplexity": 30.0 / b}
        | {"perplexity_stderr": 0.5}
        for b in (2, 4, 6)
    ]
    uniform = [
        {"format": "int4", "avg_bits": 4.0, "predicted_loss_increase": 1e-3, "perplexity": 9.0}
    ]
    out = tmp_path / "curve.png"
    plot_model_curve(
        out,
        sweep=sweep,
        uniform=uniform,
        chosen=None,
        fp32_value=5.2,
        fp32_stderr=0.1,
        title="tiny LM",
        score="perplexity",
    )
    assert_png(out, tmp_path)
