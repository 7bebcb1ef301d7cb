"""``lcpaq run`` on tiny random transformers folders, measured in their own metric: a BERT
encoder on query/document pairs (recall@1, recall@10, cosine to FP32) and a GPT-2 causal LM on
text (perplexity, lower is better), through evaluate, a measured sweep, the plots and the report."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

pytest.importorskip("lcpaq.model.text", reason="needs hf:DIR models (lcpaq.model.text)")
from hf_models import VOCAB, save_model_folder, tiny_model  # noqa: E402

from lcpaq import cli  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def _sentence(rng: random.Random, length: int) -> str:
    return " ".join(rng.choice(VOCAB[5:]) for _ in range(length))


def _run(tmp_path: Path, kind: str, eval_name: str, eval_text: str) -> Path:
    rng = random.Random(0)
    model_dir = save_model_folder(tiny_model(kind), tmp_path / kind)
    calib = tmp_path / "calib.txt"
    calib.write_text("".join(_sentence(rng, rng.randint(4, 10)) + "\n" for _ in range(16)))
    eval_path = tmp_path / eval_name
    eval_path.write_text(eval_text)
    out = tmp_path / "run"
    code = cli.main(
        ["--quiet", "run", "--model", f"hf:{model_dir}", "--calib", str(calib)]
        + ["--eval", str(eval_path), "--budget", "avg-bits=4", "--seq-len", "16"]
        + ["--num-samples", "16", "--sweep-points", "2", "--sweep-eval-samples", "all"]
        + ["--no-hf-folder", "--compressed-tensors", "off", "--out", str(out)]
    )
    assert code == 0
    return out


def test_encoder_run_in_recall(tmp_path: Path) -> None:
    rng = random.Random(1)
    rows = []
    for _ in range(10):
        query = _sentence(rng, 5)
        rows.append({"query": query, "document": query.split()[0] + " " + _sentence(rng, 6)})
    text = "".join(json.dumps(row) + "\n" for row in rows)
    out = _run(tmp_path, "bert", "pairs.jsonl", text)
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["metric"] == "recall@1" and evaluation["higher_is_better"] is True
    assert evaluation["fp32"]["num_samples"] == 10
    assert 0.0 <= evaluation["quantized"]["recall@1"] <= evaluation["quantized"]["recall@10"]
    assert 0.9 < evaluation["quantized"]["cosine_to_fp32"] <= 1.0 + 1e-6
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["metric"] == "recall@1"
    for point in [*sweep["uniform"], *sweep["points"]]:
        assert {"recall@1", "recall@1_stderr", "recall@10", "cosine_to_fp32"} <= set(point)
        assert "top1" not in point
    report = (out / "report.md").read_text()
    assert "## Evaluation (recall@1)" in report and "cosine to FP32" in report
    assert "recall@1 % ± SE | recall@10 % ± SE | cosine to FP32 ± SE |" in report
    assert (out / "plots" / "model_curve.png").is_file()


def test_causal_lm_run_in_perplexity(tmp_path: Path) -> None:
    rng = random.Random(2)
    text = "".join(_sentence(rng, rng.randint(3, 9)) + "\n" for _ in range(8))
    out = _run(tmp_path, "gpt2", "heldout.txt", text)
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["metric"] == "perplexity" and evaluation["higher_is_better"] is False
    assert evaluation["paired_quantity"] == "nll"
    fp32, quantized = evaluation["fp32"], evaluation["quantized"]
    # A random 64-word model: perplexity near the vocabulary size, NLL its logarithm.
    assert 10 < fp32["perplexity"] < 200
    assert evaluation["paired_difference"] == pytest.approx(quantized["nll"] - fp32["nll"])
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["metric"] == "perplexity" and sweep["higher_is_better"] is False
    assert all("perplexity" in point for point in sweep["uniform"])
    report = (out / "report.md").read_text()
    assert "## Evaluation (perplexity)" in report and "nats/token" in report
