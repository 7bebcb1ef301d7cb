"""The report's measured numbers in the model's metric: a classifier's lines as before, an
encoder's recall@1 with recall@10 and cosine to FP32, a causal LM's perplexity (lower is better)
with its paired NLL difference."""

from __future__ import annotations

from lcpaq.stages.report_metrics import (
    accuracy_lines,
    noise_lines,
    score_header,
    score_text,
    within_noise,
)
from lcpaq.stages.report_sections import sweep_lines


def test_classifier_lines_unchanged() -> None:
    evaluation = {
        "eval_data": "test.npz",
        "fp32": {"top1": 0.9164, "stderr": 0.0087, "num_samples": 1000},
        "quantized": {"top1": 0.9101, "stderr": 0.009, "num_samples": 1000},
        "paired_difference": -0.0063,
        "paired_difference_stderr": 0.0021,
        "quantized_inputs": {},
    }
    assert accuracy_lines(evaluation) == [
        "## Accuracy",
        "- data: test.npz (1000 samples)",
        "- FP32 top-1: 91.64 % ± 0.87",
        "- quantized top-1 (exported checkpoint, weights only, activations FP32): 91.01 % ± 0.90",
        "- paired difference: -0.63 ± 0.21 points",
        "",
    ]
    assert score_header("top1") == "top-1 % ± SE"


def test_retrieval_lines() -> None:
    evaluation = {
        "eval_data": "pairs.jsonl",
        "metric": "recall@1",
        "higher_is_better": True,
        "paired_quantity": "recall@1",
        "fp32": {"recall@1": 0.837, "stderr": 0.012, "num_samples": 1000, "recall@10": 0.968}
        | {"recall@10_stderr": 0.006},
        "quantized": {"recall@1": 0.83, "stderr": 0.012, "num_samples": 1000, "recall@10": 0.96}
        | {"recall@10_stderr": 0.006, "cosine_to_fp32": 0.9512, "cosine_to_fp32_stderr": 0.001},
        "paired_difference": -0.007,
        "paired_difference_stderr": 0.004,
    }
    lines = accuracy_lines(evaluation)
    assert lines[0] == "## Evaluation (recall@1)"
    assert "- FP32 recall@1: 83.70 % ± 1.20" in lines
    assert "- recall@10: FP32 96.80 ± 0.60 %, quantized 96.00 ± 0.60 %" in lines
    assert "- cosine to FP32: FP32 –, quantized 0.9512 ± 0.001" in lines
    assert "- paired difference: -0.70 ± 0.40 points" in lines


def test_perplexity_lines_and_noise() -> None:
    evaluation = {
        "eval_data": "heldout.txt",
        "metric": "perplexity",
        "higher_is_better": False,
        "paired_quantity": "nll",
        "fp32": {"perplexity": 12.5, "stderr": 0.4, "num_samples": 64, "nll": 2.526}
        | {"nll_stderr": 0.03, "tokens": 4000.0},
        "quantized": {"perplexity": 13.1, "stderr": 0.45, "num_samples": 64, "nll": 2.573}
        | {"nll_stderr": 0.03, "tokens": 4000.0},
        "paired_difference": 0.0469,
        "paired_difference_stderr": 0.005,
    }
    lines = accuracy_lines(evaluation)
    assert "- FP32 perplexity: 12.5 ± 0.4" in lines
    assert "- NLL (nats/token): FP32 2.526 ± 0.03, quantized 2.573 ± 0.03" in lines
    assert "- paired difference: +0.0469 ± 0.005 (NLL (nats/token), quantized − FP32)" in lines
    assert not any("tokens" in line for line in lines)
    near = {"perplexity": 12.7, "perplexity_stderr": 0.3}
    far = {"perplexity": 20.0, "perplexity_stderr": 0.3}
    assert within_noise(near, far, "perplexity") is None
    assert within_noise(near, {"perplexity": 12.9, "perplexity_stderr": 0.3}, "perplexity")
    notes = noise_lines([("a", near), ("b", far)], evaluation["fp32"], "perplexity")
    assert notes[1].startswith("Within noise (perplexity difference")
    assert "a vs FP32: +0.2 ± 0.5" in notes[1] and "b vs" not in notes[1]
    assert score_text(far, "perplexity") == "20 ± 0.3"
    assert score_header("perplexity") == "perplexity ± SE"


def test_sweep_table_of_an_encoder() -> None:
    def point(bits: float, recall: float, cosine: float, **extra: object) -> dict:
        return {
            "costs": {"avg-bits": bits},
            "avg_bits": bits,
            "size_bytes": 1e6,
            "predicted_loss_increase": 1 / bits,
            "recall@1": recall,
            "recall@1_stderr": 0.01,
            "recall@10": 0.96,
            "cosine_to_fp32": cosine,
            "cosine_to_fp32_stderr": 0.001,
            **extra,
        }

    sweep = {
        "metric": "recall@1",
        "curves": {"avg-bits": [point(3.0, 0.83, 0.97, budgets=[3.0])]},
        "uniform": [point(4.0, 0.82, 0.95, format="int4")],
    }
    lines = sweep_lines(sweep)
    header = "| predicted ΔL | recall@1 % ± SE | recall@10 % ± SE | cosine to FP32 ± SE |"
    assert any(line.endswith(header) for line in lines)
    assert any(line.endswith("| 83.00 ± 1.00 | 96.00 | 0.9700 ± 0.001 |") for line in lines)
