"""The pipeline on transformers folders (issue 15): ``lcpaq run`` on a tiny BERT encoder,
analyze → allocate → export on a tiny Llama causal LM, the text options' errors, and a smoke
analysis of the real all-MiniLM-L6-v2 (skipped when it is absent)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_models import VOCAB, save_model_folder, tiny_model

from lcpaq import load_quantized, runfolder
from lcpaq.cli import main
from lcpaq.model.graph import DEAD_REASON
from lcpaq.model.hf import load_hf_model, load_tokenizer
from lcpaq.model.text_data import load_text_data

pytestmark = pytest.mark.usefixtures("single_thread")


def _texts(path: Path, count: int, seed: int = 0) -> Path:
    generator = random.Random(seed)
    words = VOCAB[5:]
    lines = [" ".join(generator.choices(words, k=generator.randint(2, 12))) for _ in range(count)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_run_on_a_tiny_bert_folder(tmp_path: Path) -> None:
    folder = save_model_folder(tiny_model("bert"), tmp_path / "bert")
    calib = _texts(tmp_path / "calib.txt", 24)
    out = tmp_path / "run"
    argv = ["-q", "run", "--model", f"hf:{folder}", "--calib", str(calib), "--out", str(out)]
    assert main([*argv, "--budget", "avg-bits=4", "--num-samples", "16", "--seq-len", "16"]) == 0
    config = runfolder.read_json(out / "run_config.json", "config")["analysis"]
    assert config["loss"] == "auto" and config["text"]["seq_len"] == 16
    layers = runfolder.read_json(out / "layers.json", "layers")
    assert len(layers["layers"]) == 12
    assert {"key": "model.pooler.dense.weight", "num_params": 32 * 32, "reason": DEAD_REASON} in (
        layers["kept_fp32"]
    )
    curvature = np.load(out / "curvature.npz")
    assert (curvature["trace"] > 0).all() and (curvature["trace_stderr"] > 0).all()
    allocation = runfolder.read_json(out / "allocation.json", "allocation")
    assert allocation["average_bits"] == pytest.approx(4.0, abs=1e-6)
    # The ready-to-load folder and the lcpaq checkpoint give the same embeddings.
    texts = load_text_data(calib, load_tokenizer(folder), seq_len=16)
    exported = load_hf_model(out / "quantized" / "hf")
    assert exported.pooling == load_hf_model(folder).pooling
    filled = load_quantized(out / "quantized", load_hf_model(folder))
    assert isinstance(filled, torch.nn.Module)
    with torch.no_grad():
        torch.testing.assert_close(exported(texts.inputs), filled(texts.inputs))
        fp32 = load_hf_model(folder)(texts.inputs)
    assert not torch.equal(exported(texts.inputs), fp32)  # quantized
    manifest = json.loads((out / "quantized" / "manifest.json").read_text())
    assert manifest["recovery"]["statistics_correction"] is False  # it hurt MiniLM
    assert (out / "report.md").is_file()
    # ONNX QDQ of the encoder, run in ONNX Runtime on the calibration texts.
    pytest.importorskip("onnxruntime")
    assert main(["-q", "onnx", str(out)]) == 0
    check = runfolder.read_json(out / "onnx.json", "onnx")
    assert check["images"] == 24 and check["max_abs_logit_difference"] < 1e-3


@pytest.mark.parametrize(
    ("kind", "num_layers", "head"),
    [("llama", 15, "model.lm_head"), ("gpt2", 9, "model.transformer.wte")],  # GPT-2: tied head
)
def test_analyze_allocate_export_on_a_causal_lm(
    tmp_path: Path, kind: str, num_layers: int, head: str
) -> None:
    folder = save_model_folder(tiny_model(kind), tmp_path / kind)
    calib = tmp_path / "calib.jsonl"
    lines = _texts(tmp_path / "lines.txt", 12).read_text().splitlines()
    calib.write_text("\n".join(json.dumps({"text": line}) for line in lines))
    out = tmp_path / "run"
    common = ["--model", f"hf:{folder}", "--calib", str(calib), "--out", str(out)]
    assert main(["-q", "analyze", *common, "--num-samples", "12", "--batch-size", "4"]) == 0
    names = [layer["name"] for layer in runfolder.read_json(out / "layers.json", "l")["layers"]]
    assert len(names) == num_layers and names[-1] == head  # the LM head last
    curvature = np.load(out / "curvature.npz", allow_pickle=False)
    assert json.loads(str(curvature["meta"]))["method"] == "fisher_sampled"
    assert curvature["sample_traces"].shape == (12, num_layers) and (curvature["trace"] > 0).all()
    assert main(["-q", "allocate", str(out), "--budget", "avg-bits=5"]) == 0
    assert main(["-q", "export", str(out)]) == 0
    exported = load_hf_model(out / "quantized" / "hf")
    filled = load_quantized(out / "quantized", load_hf_model(folder))
    assert isinstance(filled, torch.nn.Module)
    texts = load_text_data(calib, load_tokenizer(folder), seq_len=16)
    with torch.no_grad():
        torch.testing.assert_close(exported(texts.inputs), filled(texts.inputs))


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--hutchinson-probes", "40"], "--hutchinson-probes: not supported for transformers"),
        (
            ["--loss", "cross_entropy"],
            "--loss cross_entropy does not apply to encoder models: use mse",
        ),
    ],
)
def test_unsupported_text_options_fail_early(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], needle: str
) -> None:
    folder = save_model_folder(tiny_model("bert"), tmp_path / "bert")
    calib = _texts(tmp_path / "calib.txt", 8)
    argv = [
        "analyze",
        "--model",
        f"hf:{folder}",
        "--calib",
        str(calib),
        "--out",
        str(tmp_path / "r"),
    ]
    assert main([*argv, *extra]) != 0
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert needle in error


def test_minilm_smoke(minilm_dir: Path, tmp_path: Path) -> None:
    """The real all-MiniLM-L6-v2: 36 Linear layers (its pooler kept FP32), normalised mean
    pooling, positive traces from 8 short texts with the Rademacher factors of its 384 outputs."""
    texts = [
        "How do I sort a list in Python?",
        "The cat sat on the mat.",
        "Quantization maps weights to a few bits.",
        "Paris is the capital of France.",
        "A sentence encoder turns text into a vector.",
        "Rain is expected tomorrow afternoon.",
        "Gradient descent minimises a loss function.",
        "She plays the violin every evening.",
    ]
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    argv = ["-q", "analyze", "--model", f"hf:{minilm_dir}", "--calib", str(calib)]
    assert main([*argv, "--out", str(out), "--seq-len", "32", "--formats", "int4,int8"]) == 0
    layers = runfolder.read_json(out / "layers.json", "layers")
    assert len(layers["layers"]) == 36
    assert "model.pooler.dense.weight" in [kept["key"] for kept in layers["kept_fp32"]]
    model = load_hf_model(minilm_dir)
    assert model.pooling.mode == "mean" and model.pooling.normalize
    curvature = np.load(out / "curvature.npz", allow_pickle=False)
    assert json.loads(str(curvature["meta"]))["method"] == "gauss_newton_sampled"
    assert np.isfinite(curvature["trace"]).all() and (curvature["trace"] > 0).all()
