"""The layer × candidate heatmap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import assert_png, read_png

from lcpaq.stages.heatmaps import plot_candidate_heatmap

LAYERS = ["features.0", "features.3.conv", "classifier.fc"]
FORMATS = ["int2", "int4", "fp4", "int8"]
SCORES = np.array(
    [
        [3.2e-1, 1.1e-3, 2.0e-3, 0.0],
        [5.0e0, 2.0e-2, 1.0e-2, 4.0e-6],
        [1.0e-2, 8.0e-5, 9.0e-5, 1.0e-8],
    ]
)
KEPT = np.array([[True, True, False, True], [True, False, True, True], [True, True, False, True]])


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
    assert_png(out, tmp_path)
    read_png(out)
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
