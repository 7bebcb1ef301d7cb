"""Report sections: budgets with limit, used value, slack, binding/limiting; infeasible requests;
model-level curves per swept metric; the quantizer line."""

from __future__ import annotations

from lcpaq.stages.report_metrics import within_noise
from lcpaq.stages.report_sections import (
    budget_lines,
    infeasible_lines,
    quantizer_line,
    sweep_lines,
)


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


def test_measured_points_show_their_noise() -> None:
    """Every measured top-1 shows ± its standard error; points whose difference is below the
    standard error of the difference are named as within noise, against FP32 and neighbours."""

    def point(bits: float, top1: float, stderr: float, **extra: object) -> dict:
        return {
            "costs": {"avg-bits": bits},
            "avg_bits": bits,
            "size_bytes": 1e5,
            "predicted_loss_increase": 1 / bits,
            "top1": top1,
            "top1_stderr": stderr,
            **extra,
        }

    low = point(2.0, 0.80, 0.01, budgets=[2.0])
    mid = point(2.86, 0.922, 0.005, budgets=[2.86])
    uniform = [point(3.0, 0.905, 0.005, format="int3"), point(5.0, 0.9, 0.005, format="int5")]
    fp32 = {"top1": 0.918, "stderr": 0.005}
    lines = sweep_lines({"curves": {"avg-bits": [low, mid]}, "uniform": uniform}, fp32)
    assert "| lcpaq, budget 2.86 | 2.86 | 2.860 | 0.1000 | – | 0.3497 | 92.20 ± 0.50 |" in lines
    notes = [line for line in lines if line.startswith("Within noise")]
    assert len(notes) == 1
    # 92.2 vs FP32 91.8 (0.4 < 0.71) and INT5 vs INT3 (-0.5 < 0.71) are within noise; the
    # 2-bit point (80 %) is not within noise of anything.
    assert "lcpaq, budget 2.86 vs FP32: +0.40 ± 0.71" in notes[0]
    assert "uniform int5 vs uniform int3: -0.50 ± 0.71" in notes[0]
    assert "budget 2 " not in notes[0]
    assert within_noise(low, mid) is None
    assert within_noise(mid, {**mid, "top1_stderr": None}) is None


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
