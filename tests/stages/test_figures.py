"""The per-layer figures (frontiers, bit allocation): each writes a real, complete PNG atomically
and rejects inputs of the wrong shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import assert_png, read_png

from lcpaq.stages.figures import plot_bit_allocation, plot_layer_frontiers

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


def _frontiers(
    out: Path, chosen: list[str] | None, title: str, layer_names: list[str] = LAYERS
) -> Path:
    """The frontier figure of the module's table (``layer_names``: to pass a wrong count)."""
    return plot_layer_frontiers(
        out,
        layer_names=layer_names,
        format_names=FORMATS,
        bits=BITS,
        scores=SCORES,
        kept=KEPT,
        chosen=chosen,
        title=title,
    )


def _uniform_allocation(out: Path) -> Path:
    """The bit-allocation figure of three 4-bit layers."""
    return plot_bit_allocation(
        out,
        layer_names=LAYERS,
        bits=[4, 4, 4],
        num_params=np.ones(3),
        trace=np.ones(3),
        trace_stderr=np.zeros(3),
        title="tinynet",
    )


@pytest.mark.parametrize("chosen", [["int4", "fp4", "int2"], None])
def test_plot_layer_frontiers(tmp_path: Path, chosen: list[str] | None) -> None:
    out = tmp_path / "nested" / "frontiers.png"
    result = _frontiers(out, chosen, "tinynet, budget 4.0 bits")
    assert result == out
    assert_png(out, out.parent)


def test_plot_layer_frontiers_rejects_bad_shape(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        _frontiers(tmp_path / "bad.png", None, "bad", layer_names=LAYERS[:2])
    assert list(tmp_path.iterdir()) == []


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
    assert_png(out, tmp_path)


def test_overwrites_existing_file(tmp_path: Path) -> None:
    out = tmp_path / "alloc.png"
    out.write_bytes(b"stale")
    _uniform_allocation(out)
    assert_png(out, tmp_path)


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
    assert_png(out, tmp_path)


def test_chosen_must_match_layers(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        _frontiers(tmp_path / "bad.png", ["int4"], "bad")


def test_failed_render_leaves_no_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    def broken(self: Figure, *args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError):
        _uniform_allocation(tmp_path / "alloc.png")
    assert list(tmp_path.iterdir()) == []


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
    assert_png(out, tmp_path)
    read_png(out)
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
