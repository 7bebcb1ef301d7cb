"""Smoke tests for the PNG plots: each function writes a real, complete PNG atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lcpaq.plots import plot_bit_allocation, plot_layer_frontiers, plot_model_curve

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
