"""Smoke tests for the PNG plots: each function writes a real, complete PNG atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lcpaq.stages.plot import (
    plot_bit_allocation,
    plot_candidate_heatmap,
    plot_layer_frontiers,
    plot_model_curve,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path, folder: Path) -> None:
    assert path.is_file()
    assert path.stat().st_size > 5_000
    assert path.read_bytes()[:8] == PNG_MAGIC
    leftovers = [
        p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")
    ]
    assert leftovers == []


LAYERS = ["features.0", "features.3.conv", "classifier.fc"]
FORMATS = ["int2", "int4", "fp4", "int8"]
BITS = np.array([2, 4, 4, 8])
SCORES = np.array(
    [
        [3.2e-1, 1.1e-3, 2.0e-3, 0.0],
        [5.0e0, 2.0e-2, 1.0e-2, 4.0e-6],
        [1.0e-2, 8.0e-5, 9.0e-5, 1.0e-8],
    ]
)
KEPT = np.array([[True, True, False, True], [True, False, True, True], [True, True, False, True]])


@pytest.mark.parametrize("chosen", [["int4", "fp4", "int2"], None])
def test_plot_layer_frontiers(tmp_path: Path, chosen: list[str] | None) -> None:
    out = tmp_path / "nested" / "frontiers.png"
    result = plot_layer_frontiers(
        out,
        layer_names=LAYERS,
        format_names=FORMATS,
        bits=BITS,
        scores=SCORES,
        kept=KEPT,
        chosen=chosen,
        title="tinynet, budget 4.0 bits",
    )
    assert result == out
    _assert_png(out, out.parent)


def test_plot_layer_frontiers_rejects_bad_shape(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        plot_layer_frontiers(
            tmp_path / "bad.png",
            layer_names=LAYERS[:2],
            format_names=FORMATS,
            bits=BITS,
            scores=SCORES,
            kept=KEPT,
            chosen=None,
            title="bad",
        )
    assert list(tmp_path.iterdir()) == []


def test_plot_model_curve(tmp_path: Path) -> None:
    sweep = [
        {"avg_bits": 3.0, "predicted_loss_increase": 0.2, "top1": 0.61},
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
            out, sweep=sweep, uniform=uniform, chosen=chosen, fp32_top1=0.71, title="tinynet"
        )
        == out
    )
    _assert_png(out, tmp_path)


def test_plot_model_curve_without_accuracy(tmp_path: Path) -> None:
    sweep = [
        {"avg_bits": b, "predicted_loss_increase": 10.0 ** (-b), "top1": None} for b in (2, 4, 6)
    ]
    out = tmp_path / "curve.png"
    plot_model_curve(out, sweep=sweep, uniform=[], chosen=None, fp32_top1=None, title="tinynet")
    _assert_png(out, tmp_path)


def test_plot_bit_allocation(tmp_path: Path) -> None:
    out = tmp_path / "alloc.png"
    result = plot_bit_allocation(
        out,
        layer_names=LAYERS,
        bits=[8, 4, 2],
        num_params=np.array([432, 36_864, 5_130]),
        trace=np.array([120.0, 3.5, 0.0]),
        trace_stderr=np.array([10.0, 4.0, 0.1]),
        title="tinynet, budget 4.0 bits",
    )
    assert result == out
    _assert_png(out, tmp_path)


def test_overwrites_existing_file(tmp_path: Path) -> None:
    out = tmp_path / "alloc.png"
    out.write_bytes(b"stale")
    plot_bit_allocation(
        out,
        layer_names=LAYERS,
        bits=[4, 4, 4],
        num_params=np.ones(3),
        trace=np.ones(3),
        trace_stderr=np.zeros(3),
        title="tinynet",
    )
    _assert_png(out, tmp_path)


def test_single_layer_all_zero_scores(tmp_path: Path) -> None:
    out = tmp_path / "one.png"
    plot_layer_frontiers(
        out,
        layer_names=["fc"],
        format_names=["int4", "int8"],
        bits=np.array([4, 8]),
        scores=np.zeros((1, 2)),
        kept=np.ones((1, 2), dtype=bool),
        chosen=["int8"],
        title="tinynet",
    )
    _assert_png(out, tmp_path)


def test_chosen_must_match_layers(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        plot_layer_frontiers(
            tmp_path / "bad.png",
            layer_names=LAYERS,
            format_names=FORMATS,
            bits=BITS,
            scores=SCORES,
            kept=KEPT,
            chosen=["int4"],
            title="bad",
        )


def test_failed_render_leaves_no_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    def broken(self: Figure, *args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError):
        plot_bit_allocation(
            tmp_path / "alloc.png",
            layer_names=LAYERS,
            bits=[4, 4, 4],
            num_params=np.ones(3),
            trace=np.ones(3),
            trace_stderr=np.zeros(3),
            title="tinynet",
        )
    assert list(tmp_path.iterdir()) == []


def _read_png(path: Path) -> np.ndarray:
    """Decode the PNG (proves it is complete and readable); returns [H, W, channels]."""
    from matplotlib.image import imread

    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    assert float(image[..., :3].std()) > 0.01  # not a blank canvas
    return image


def test_frontiers_with_fp_markers_and_activation_pairs(tmp_path: Path) -> None:
    names = [f"{w}/{a}" for w in ("int4", "fp4_e2m1", "int8") for a in ("int4", "int8")]
    scores = np.repeat(SCORES[:, [1, 2, 3]], 2, axis=1) + np.tile([1e-3, 0.0], 3)
    out = tmp_path / "frontiers.png"
    plot_layer_frontiers(
        out,
        layer_names=LAYERS,
        format_names=names,
        bits=np.array([4, 4, 4, 4, 8, 8]),
        scores=scores,
        kept=np.ones_like(scores, dtype=bool),
        chosen=["int4/int8", "fp4_e2m1/int4", "int8/int8"],
        title="tinynet, pairs",
        kinds=["int", "int", "fp", "fp", "int", "int"],
        activation_formats=["int4", "int8"] * 3,
    )
    _assert_png(out, tmp_path)
    _read_png(out)
    with pytest.raises(ValueError, match="kinds"):
        plot_layer_frontiers(
            tmp_path / "bad.png",
            layer_names=LAYERS,
            format_names=names,
            bits=np.array([4, 4, 4, 4, 8, 8]),
            scores=scores,
            kept=np.ones_like(scores, dtype=bool),
            chosen=None,
            title="bad",
            kinds=["int"],
        )


def test_candidate_heatmap(tmp_path: Path) -> None:
    out = tmp_path / "heatmap.png"
    allowed = KEPT.copy()
    plot_candidate_heatmap(
        out,
        layer_names=LAYERS,
        format_names=FORMATS,
        values=np.where(SCORES > 0, SCORES, np.nan),
        chosen=["int4", "fp4", "int8"],
        allowed=allowed,
        title="tinynet, budget 4.0 bits",
    )
    _assert_png(out, tmp_path)
    _read_png(out)
    with pytest.raises(ValueError, match="shape"):
        plot_candidate_heatmap(
            tmp_path / "bad.png",
            layer_names=LAYERS[:2],
            format_names=FORMATS,
            values=SCORES,
            chosen=None,
            allowed=None,
            title="bad",
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heatmap.png"]


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
        fp32_top1=0.93,
        title="tinynet",
        metric=metric,
    )
    _assert_png(out, tmp_path)
    _read_png(out)
