"""The report stage on one end-to-end run with (weight, activation) pairs and a BitOps budget."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_digits_files

from lcpaq.cli import main
from lcpaq.runfolder import load_candidates
from lcpaq.sensitivity.activation_file import load_activation_sensitivity


@pytest.fixture()
def digits_run_files(tmp_path: Path) -> dict[str, Path]:
    checkpoint, data = write_digits_files(tmp_path, num_images=48)
    return {"checkpoint": checkpoint, "data": data}


def test_run_with_activation_pairs_and_a_bitops_budget(digits_run_files, tmp_path) -> None:
    out = tmp_path / "run"
    args = ["-q", "run", "--model", "demo-digits", "--normalize", "none"]
    args += ["--checkpoint", str(digits_run_files["checkpoint"])]
    args += ["--calib", str(digits_run_files["data"]), "--num-samples", "16"]
    args += ["--correction-samples", "16", "--formats", "int2,int4,int8,fp4_e2m1"]
    args += ["--act-formats", "int4,int8", "--first-last", "keep-8bit", "--sweep-points", "3"]
    args += ["--sweep-eval-samples", "all"]  # the points measured, not only predicted
    args += ["--budget", "bitops-g=0.006", "--eval", str(digits_run_files["data"])]
    assert main([*args, "--out", str(out)]) == 0
    allocation = json.loads((out / "allocation.json").read_text())
    assert all("/" in name for name in allocation["formats"])
    assert allocation["assignment"]["conv1"] == "int8/int8"  # keep-8bit: widest activations
    (row,) = allocation["budget_table"]
    assert row["metric"] == "bitops-g" and row["used"] <= 0.006
    assert row["slack"] == pytest.approx(0.006 - row["used"])
    # activations.npz (analyze --act-formats) adds the activation term: INT4 activations are
    # noisier than INT8 ones, so the same weights score worse with them.
    assert (out / "activations.npz").is_file()
    scores = np.load(out / "frontiers.npz")["scores"]
    table = load_candidates(out / "candidates.npz")
    w4a4, w4a8 = table.format_index("int4/int4"), table.format_index("int4/int8")
    assert bool((scores[:, w4a4] > scores[:, w4a8]).all())
    manifest = json.loads((out / "quantized" / "manifest.json").read_text())
    sensitivity = load_activation_sensitivity(out / "activations.npz")
    assert sensitivity.clipping == "mse"
    for entry in manifest["layers"]:
        candidate = allocation["assignment"][entry["name"]]
        assert candidate == f"{entry['format']}/{entry['activation_format']}"
        # Activations are quantized at inference, with the range analyze calibrated (MSE
        # clipping by default: each format its own range, inside the observed one).
        row = sensitivity.layer_names.index(entry["name"])
        low, high = sensitivity.range_of(row, entry["activation_format"])
        assert sensitivity.low[row] <= low <= high <= sensitivity.high[row]
        assert entry["activation_quantizer"] == {
            "format": entry["activation_format"],
            "low": low,
            "high": high,
            "symmetric": False,
        }
    evaluation = json.loads((out / "evaluation.json").read_text())
    counts: dict[str, int] = {}
    for entry in manifest["layers"]:
        counts[entry["activation_format"]] = counts.get(entry["activation_format"], 0) + 1
    assert evaluation["quantized_inputs"] == counts
    inputs = ", ".join(f"{name} ×{count}" for name, count in sorted(counts.items()))
    assert (
        f"(exported checkpoint, weights and layer inputs: {inputs})"
        in (out / "report.md").read_text()
    )
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["metrics"] == ["bitops-g"] and sweep["points"] == sweep["curves"]["bitops-g"]
    baselines = {point["format"]: point for point in sweep["uniform"]}
    assert {"int8/int8", "int4/int4", "fp8_e4m3/fp8_e4m3"} <= set(baselines)
    # Measured with their inputs quantized too (an FP8 baseline's with the observed range, as
    # the analysis did not calibrate FP8 activations).
    assert all(point["top1"] is not None for point in [*sweep["uniform"], *sweep["points"]])
    assert baselines["fp8_e4m3/fp8_e4m3"]["in_candidates"] is False
    # Uniform W4A4 costs a quarter of W8A8's BitOps.
    assert baselines["int4/int4"]["costs"]["bitops-g"] == pytest.approx(
        baselines["int8/int8"]["costs"]["bitops-g"] / 4
    )
    for name in ("frontiers.png", "candidate_heatmap.png", "model_curve.png"):
        assert (out / "plots" / name).stat().st_size > 5_000
    report = (out / "report.md").read_text()
    assert "| bitops-g | 0.006 |" in report and "### Over bitops-g" in report
    # An infeasible request leaves infeasible.json; the report explains it.
    assert main(["-q", "allocate", str(out), "--budget", "bitops-g=1e-9"]) == 2
    infeasible = json.loads((out / "infeasible.json").read_text())
    assert infeasible["per_budget"][0]["feasible_alone"] is False
    assert main(["-q", "report", str(out)]) == 0
    assert "## Infeasible request" in (out / "report.md").read_text()
    assert main(["-q", "allocate", str(out), "--budget", "bitops-g=0.006"]) == 0
    assert not (out / "infeasible.json").exists()
