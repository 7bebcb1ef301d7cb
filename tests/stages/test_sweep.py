"""Sweep points in the model's metric: the measured keys of a point, and the exported
allocation's point taking evaluation.json's numbers (top-1 files from before other metrics, and
perplexity files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lcpaq import runfolder
from lcpaq.model.evaluate import Accuracy, MetricResult
from lcpaq.stages.sweep import point_metric_keys, reuse_evaluation


def test_point_keys() -> None:
    accuracy = Accuracy(0.5, 0.25, 2, np.array([True, False]))
    assert point_metric_keys(accuracy) == {"top1": 0.5, "top1_stderr": 0.25}
    retrieval = MetricResult(
        "recall@1", 0.8, 0.1, 10, np.ones(10), secondary={"cosine_to_fp32": 0.97}
    )
    assert point_metric_keys(retrieval) == {
        "recall@1": 0.8,
        "recall@1_stderr": 0.1,
        "cosine_to_fp32": 0.97,
    }


def _points() -> list[dict[str, object]]:
    return [
        {"formats": ["int4", "int8"], "eval_images": 0, "top1": None},
        {"format": "int4"},
    ]


def test_reuse_an_old_top1_file(tmp_path: Path) -> None:
    evaluation = {
        "eval_data": "test.npz",
        "fp32": {"top1": 0.9, "stderr": 0.01, "num_samples": 100},
        "quantized": {"top1": 0.88, "stderr": 0.012, "num_samples": 100},
    }
    runfolder.write_json(tmp_path / "evaluation.json", evaluation)
    points = _points()
    source, fields = reuse_evaluation(tmp_path, points, ["int4", "int8"], None)
    assert source == "test.npz" and fields["metric"] == "top1"
    assert points[0] == {
        "formats": ["int4", "int8"],
        "eval_images": 100,
        "top1": 0.88,
        "top1_stderr": 0.012,
    }
    assert "top1" not in points[1]
    assert reuse_evaluation(tmp_path, _points(), ["int4", "int8"], "other.npz") == (None, {})


def test_reuse_a_perplexity_file(tmp_path: Path) -> None:
    evaluation = {
        "eval_data": "heldout.txt",
        "metric": "perplexity",
        "higher_is_better": False,
        "paired_quantity": "nll",
        "fp32": {"perplexity": 10.0, "stderr": 0.2, "num_samples": 8, "nll": 2.3},
        "quantized": {"perplexity": 11.0, "stderr": 0.3, "num_samples": 8, "nll": 2.4},
    }
    runfolder.write_json(tmp_path / "evaluation.json", evaluation)
    points = _points()
    _, fields = reuse_evaluation(tmp_path, points, ["int4", "int8"], "heldout.txt")
    assert fields == {"metric": "perplexity", "higher_is_better": False, "paired_quantity": "nll"}
    assert points[0]["perplexity"] == 11.0 and points[0]["perplexity_stderr"] == 0.3
    assert points[0]["nll"] == 2.4 and points[0]["eval_images"] == 8
    assert "top1" not in points[0]  # the placeholder of unmeasured points goes
