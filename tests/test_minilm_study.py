"""scripts/minilm_study.py end to end on a tiny random BERT folder (the real all-MiniLM-L6-v2 run
takes tens of minutes): one analysis, FP32, six uniform baselines and three lcpaq budgets on the
same pairs, every row with recall@1/@10, cosine to FP32 and its paired difference to FP32."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("lcpaq.model.text", reason="needs hf:DIR models (lcpaq.model.text)")
from hf_models import VOCAB, save_model_folder, tiny_model  # noqa: E402

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
pytestmark = pytest.mark.usefixtures("single_thread")


def _script() -> ModuleType:
    sys.path.insert(0, str(SCRIPTS))  # the script imports its sibling text_corpus
    try:
        spec = importlib.util.spec_from_file_location("minilm_study", SCRIPTS / "minilm_study.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPTS))


def _text_folder(folder: Path, pairs: int = 12) -> Path:
    """A corpus in the tiny tokenizer's words, laid out as scripts/text_corpus.py writes one."""
    rng = random.Random(0)
    words = VOCAB[5:]

    def sentence(length: int) -> str:
        return " ".join(rng.choice(words) for _ in range(length))

    folder.mkdir()
    calib = [sentence(rng.randint(4, 12)) for _ in range(24)]
    (folder / "calib.txt").write_text("".join(line + "\n" for line in calib))
    rows = []
    for _ in range(pairs):
        query = sentence(5)
        rows.append({"query": query, "document": query.split()[0] + " " + sentence(8)})
    (folder / "retrieval.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    manifest = {
        "what": "random words of the tiny vocabulary",
        "python": sys.version.split()[0],
        "calibration": {"documents": len(calib)},
        "retrieval": {"pairs": pairs},
    }
    for key, name in (("calibration", "calib.txt"), ("retrieval", "retrieval.jsonl")):
        manifest[key]["sha256"] = hashlib.sha256((folder / name).read_bytes()).hexdigest()  # type: ignore[index]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_study_on_a_tiny_bert(tmp_path: Path) -> None:
    model_dir = save_model_folder(tiny_model("bert"), tmp_path / "bert")
    text = _text_folder(tmp_path / "text")
    out = tmp_path / "study.json"
    arguments = ["--model-dir", str(model_dir), "--text", str(text), "--out", str(out)]
    arguments += ["--work", str(tmp_path / "run"), "--seq-len", "16", "--calib-samples", "16"]
    arguments += ["--pairs", "12", "--threads", "1", "--batch-size", "8"]
    result = _script().main(arguments)
    assert json.loads(out.read_text())["rows"] == result["rows"]
    names = [row["name"] for row in result["rows"]]
    assert names == [
        "fp32",
        "rtn int8",
        "rtn int4",
        "rtn int3",
        "gptq int4",
        "gptq int3",
        "gptq int2",
        "lcpaq avg-bits=4",
        "lcpaq avg-bits=3",
        "lcpaq avg-bits=2.5",
    ]
    fp32 = result["rows"][0]
    assert fp32["cosine_to_fp32"] == pytest.approx(1.0)
    assert fp32["vs_fp32"]["recall@1_difference"] == 0.0
    assert result["corpus"]["retrieval_pairs"] == 12 and result["layers"] == 12
    for row in result["rows"]:
        assert row["num_samples"] == 12
        assert 0.0 <= row["recall@1"] <= row["recall@10"] <= 1.0
        assert -1.0 <= row["cosine_to_fp32"] <= 1.0 + 1e-6
        assert set(row["vs_fp32"]) == {
            "recall@1_difference",
            "recall@1_difference_stderr",
            "cosine_difference",
            "cosine_difference_stderr",
        }
    for row in result["rows"][7:]:
        budget = float(row["name"].split("=")[1])
        assert row["average_bits"] <= budget + 1e-9
    # INT8 barely moves the embeddings; INT2 moves them more.
    by_name = {row["name"]: row for row in result["rows"]}
    assert by_name["rtn int8"]["cosine_to_fp32"] > 0.99
    assert by_name["gptq int2"]["cosine_to_fp32"] < by_name["rtn int8"]["cosine_to_fp32"]
    assert set(result["lcpaq_vs_uniform_gptq"]) == {
        "lcpaq avg-bits=4 vs gptq int4",
        "lcpaq avg-bits=3 vs gptq int3",
        "lcpaq avg-bits=2.5 vs gptq int2",
        "lcpaq avg-bits=2.5 vs gptq int3",
    }
    assert set(result["floors"]) == {"avg-bits=3", "avg-bits=2.5"}
    assert (tmp_path / "run" / "quantized_avg3" / "manifest.json").is_file()
