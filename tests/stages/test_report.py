"""Report tables: budgets with limit, used value, slack, binding/limiting; infeasible requests;
model-level curves per swept metric; and one end-to-end run with (weight, activation) pairs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_digits_files

from lcpaq.cli import main
from lcpaq.runfolder import load_candidates
from lcpaq.sensitivity.activation import load_activation_sensitivity
from lcpaq.stages.report import budget_lines, infeasible_lines, quantizer_line, sweep_lines


def test_budget_table_rows() -> None:
    allocation = {
        "budgets": [],
        "budget_table": [
            {
                "metric": "size-mb",
                "limit": 0.12,
                "used": 0.1197,
                "slack": 0.12 - 0.1197,
                "slack_frac": (0.12 - 0.1197) / 0.12,
                "binding": True,
                "limiting": True,
                "predicted_loss_without": 0.5,
            },
            {
                "metric": "bitops-g",
                "limit": 1.5,
                "used": 1.2,
                "slack": 0.3,
                "slack_frac": 0.2,
                "binding": False,
                "limiting": False,
                "predicted_loss_without": 0.75,
            },
        ],
        "costs": {"avg-bits": 3.0, "size-mb": 0.1197},
    }
    lines = budget_lines(allocation)
    assert "| size-mb | 0.12 | 0.1197 | 0.0003 | 0.25 | yes | yes (0.5) |" in lines
    assert "| bitops-g | 1.5 | 1.2 | 0.3 | 20.00 | no | no (0.75) |" in lines
    assert lines[-1] == "Every cost metric of the allocation: avg-bits 3; size-mb 0.1197."
    # BitOps of a weights-only run count 8-bit activations its checkpoint does not have: said.
    allocation["costs"] = {"avg-bits": 3.0, "bitops-g": 1.2}
    allocation["formats"] = ["int4", "int2"]
    assert "activations stay FP32" in budget_lines(allocation)[-1]
    allocation["formats"] = ["int4/int8", "int2/int8"]
    assert budget_lines(allocation)[-1].startswith("Every cost metric")


def test_budget_table_of_an_older_allocation() -> None:
    """allocation.json written before the budget table: slack computed from limit and used."""
    lines = budget_lines(
        {"budgets": [{"metric": "avg-bits", "limit": 3.0, "used": 2.5, "binding": False}]}
    )
    assert "| avg-bits | 3 | 2.5 | 0.5 | 16.67 | no | – |" in lines


def test_infeasible_lines() -> None:
    infeasible = {
        "budgets": ["avg-bits=3.9", "latency-ms=3", "size-mb=1e-06"],
        "message": "budget size-mb=1e-06 is infeasible",
        "per_budget": [
            {
                "metric": "avg-bits",
                "limit": 3.9,
                "smallest_achievable": 2.0,
                "feasible_alone": True,
                "shortfall": 0.0,
            },
            {
                "metric": "size-mb",
                "limit": 1e-6,
                "smallest_achievable": 7.5e-6,
                "feasible_alone": False,
                "shortfall": 6.5e-6,
            },
        ],
        "conflicting_pairs": [["avg-bits=3.9", "latency-ms=3"]],
    }
    lines = infeasible_lines(infeasible)
    assert "| size-mb | 1e-06 | 7.5e-06 | no | 6.5e-06 |" in lines
    assert "- conflicting pairs: avg-bits=3.9 with latency-ms=3" in lines
    infeasible["conflicting_pairs"] = []
    infeasible["per_budget"] = infeasible["per_budget"][:1]
    assert any("only all of them together" in line for line in infeasible_lines(infeasible))


def test_sweep_lines_per_metric_and_old_files() -> None:
    point = {
        "costs": {"avg-bits": 3.0, "bitops-g": 0.5},
        "avg_bits": 3.0,
        "size_bytes": 1e5,
        "predicted_loss_increase": 0.25,
        "top1": 0.9,
        "budgets": [0.5, 0.6],
    }
    uniform = {**point, "format": "fp8_e4m3", "in_candidates": False}
    lines = sweep_lines(
        {"curves": {"bitops-g": [point]}, "uniform": [uniform], "fixed_budgets": ["avg-bits=3"]}
    )
    assert "### Over bitops-g (held: avg-bits=3)" in lines
    assert "| lcpaq, budget 0.5…0.6 | 0.5 | 3.000 | 0.1000 | 0.5 | 0.25 | 90.00 |" in lines
    assert any(line.startswith("| uniform fp8_e4m3 (not a candidate) | 0.5 |") for line in lines)
    old = {"avg_bits": 3.0, "size_bytes": 1e5, "predicted_loss_increase": 0.25, "top1": None}
    lines = sweep_lines({"points": [{**old, "budget_avg_bits": 3.0}], "uniform": []})
    assert "| lcpaq, budget 3 | 3 | 3.000 | 0.1000 | – | 0.25 | – |" in lines


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


def test_quantizer_line_names_every_choice() -> None:
    gptq = {
        "analysis": {
            "num_samples": 256,
            "scheme": {
                "symmetric": False,
                "granularity": "channel",
                "clipping": "mse",
                "rounding": "gptq",
                "gptq_damp": 0.01,
            },
        },
        "recovery": {"enabled": True, "num_samples": 1024},
    }
    assert quantizer_line(gptq) == (
        "- quantizer: asymmetric, per channel, mse clipping, GPTQ rounding (δ 0.01, input second "
        "moments on 256 calibration samples); activations FP32; statistics correction on 1024 "
        "samples"
    )
    gptq["analysis"] |= {"act_formats": ["int4", "int8"], "act_clipping": "mse"}
    assert "; layer inputs quantized to int4/int8 (static per-tensor ranges, mse clipping); " in (
        quantizer_line(gptq)
    )
    nearest = {
        "analysis": {
            "scheme": {
                "symmetric": True,
                "granularity": "group",
                "group_size": 64,
                "clipping": "percentile",
                "percentile": 99.9,
            }
        },
        "recovery": {"enabled": False, "num_samples": 1024},
    }
    # Older run configurations have no rounding field: they rounded to nearest.
    assert quantizer_line(nearest) == (
        "- quantizer: symmetric, per group of 64, p99.9 clipping, round to nearest; "
        "activations FP32; no statistics correction"
    )
