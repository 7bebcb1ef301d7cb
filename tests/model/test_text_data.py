"""`lcpaq.model.text_data`: plain text, JSONL texts, labels and query/document pairs, pre-tokenized
arrays, truncation and padding to ``--seq-len``, and every bad input as a one-line error naming the
file and the line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hf_models import save_model_folder, tiny_model

from lcpaq.errors import InputError
from lcpaq.model.data import Dataset
from lcpaq.model.hf import load_tokenizer
from lcpaq.model.text_data import RetrievalPairs, load_text_data


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("bert")
    return load_tokenizer(save_model_folder(tiny_model("bert"), folder))


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def test_plain_text_one_document_per_line(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "calib.txt"
    path.write_text("w1 w2 w3\n\n   \nw4\nw5 w6 w7 w8 w9 w10\n", encoding="utf-8")
    data = load_text_data(path, tokenizer, seq_len=4)
    assert isinstance(data, Dataset) and len(data) == 3 and not data.has_labels
    assert data.inputs.dtype == torch.int64 and tuple(data.inputs.shape) == (3, 2, 4)
    assert data.inputs[:, 1].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert data.inputs[0, 0, :3].tolist() == _ids(tokenizer, "w1 w2 w3")
    assert data.inputs[2, 0].tolist() == _ids(tokenizer, "w5 w6 w7 w8")  # truncated
    assert data.inputs[1, 0, 1:].tolist() == [tokenizer.pad_token_id] * 3
    # Padded to the longest text when it is shorter than --seq-len; --num-samples: the first ones.
    assert tuple(load_text_data(path, tokenizer, seq_len=64).inputs.shape) == (3, 2, 6)
    assert len(load_text_data(path, tokenizer, seq_len=64, num_samples=2)) == 2
    # A --seq-len the model cannot take is cut to what it can.
    assert load_text_data(path, tokenizer, seq_len=64, model_max=5).inputs.shape[-1] == 5


def test_jsonl_texts_labels_and_pairs(tmp_path: Path, tokenizer: Any) -> None:
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text(
        "\n".join(json.dumps({"text": f"w{i} w{i + 1}", "label": i % 2}) for i in range(4))
    )
    data = load_text_data(labelled, tokenizer, seq_len=8)
    assert isinstance(data, Dataset) and data.has_labels and data.labels.tolist() == [0, 1, 0, 1]
    pairs_path = tmp_path / "pairs.jsonl"
    rows = [{"query": f"w{i}", "document": f"w{i} w{i + 1} w{i + 2}"} for i in range(5)]
    pairs_path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    pairs = load_text_data(pairs_path, tokenizer, seq_len=8, pairs=True)
    assert isinstance(pairs, RetrievalPairs) and len(pairs) == 5
    assert pairs.queries.inputs[3, 0, :1].tolist() == _ids(tokenizer, "w3")
    assert pairs.documents.inputs[3, 0].tolist() == _ids(tokenizer, "w3 w4 w5")
    # As calibration text, a pair file gives its queries and documents, interleaved.
    texts = load_text_data(pairs_path, tokenizer, seq_len=8, num_samples=4)
    assert isinstance(texts, Dataset) and len(texts) == 4
    assert texts.inputs[1, 0].tolist() == _ids(tokenizer, "w0 w1 w2")


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_pre_tokenized_arrays(tmp_path: Path, tokenizer: Any, suffix: str) -> None:
    ids = np.array([[5, 6, 7, 0], [8, 9, 10, 11]], dtype=np.int64)
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=np.int64)
    path = tmp_path / f"tokens{suffix}"
    if suffix == ".npz":
        np.savez(path, input_ids=ids, attention_mask=mask)
    else:
        from safetensors.numpy import save_file

        save_file({"input_ids": ids, "attention_mask": mask}, str(path))
    data = load_text_data(path, tokenizer, seq_len=3, vocab_size=64)
    assert isinstance(data, Dataset) and tuple(data.inputs.shape) == (2, 2, 3)
    assert data.inputs[:, 0].tolist() == ids[:, :3].tolist()
    assert data.inputs[:, 1].tolist() == mask[:, :3].tolist()


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    cases: dict[str, tuple[bytes, str, str]] = {
        "empty": (b"", "calib.txt", r"calib\.txt: the file holds no text"),
        "blank": (b"\n  \n\n", "calib.txt", "holds no text"),
        "latin-1": (b"w1 w2\ncaf\xe9 w3\n", "calib.txt", r"calib\.txt:2: not UTF-8 text \(byte 0xe9\)"),
        "bad-json": (b'{"text": "w1"}\n{"text": w2}\n', "d.jsonl", r"d\.jsonl:2: not valid JSON"),
        "no-field": (
            b'{"text": "w1"}\n\n{"txt": "w2"}\n',
            "d.jsonl",
            r"d\.jsonl:3: row has no non-empty string field 'text' \(fields: txt\)",
        ),
        "no-document": (
            b'{"query": "w1", "document": "w2"}\n{"query": "w3"}\n',
            "p.jsonl",
            r"p\.jsonl:2: row has no non-empty string field 'document'",
        ),
        "not-object": (b'["w1"]\n', "d.jsonl", r"d\.jsonl:1: expected a JSON object, got list"),
        "bad-label": (b'{"text": "w1", "label": "x"}\n', "d.jsonl", r"d\.jsonl:1: label must be"),
    }  # fmt: skip
    files = {}
    for name, (content, filename, needle) in cases.items():
        path = tmp_path / name / filename
        path.parent.mkdir(parents=True)
        path.write_bytes(content)
        files[name] = (path, needle)
    return files


def test_bad_text_files_are_one_line_errors(tmp_path: Path, tokenizer: Any) -> None:
    for name, (path, needle) in _bad_files(tmp_path).items():
        with pytest.raises(InputError, match=needle) as error:
            load_text_data(path, tokenizer, seq_len=8, pairs=True)
        assert "\n" not in str(error.value), name
    with pytest.raises(InputError, match="does not exist"):
        load_text_data(tmp_path / "missing.txt", tokenizer, seq_len=8)
    with pytest.raises(InputError, match="--seq-len must be at least 2"):
        load_text_data(tmp_path / "latin-1" / "calib.txt", tokenizer, seq_len=1)


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ({"ids": np.zeros((2, 3), np.int64)}, "missing array 'input_ids'"),
        ({"input_ids": np.zeros((2, 3), np.float32)}, "must be a 2-d integer array"),
        ({"input_ids": np.zeros((2, 3), np.int64), "attention_mask": np.zeros((2, 3), np.int64)}, "a real token in every row"),
        ({"input_ids": np.full((2, 3), 99, np.int64)}, "token id 99 is outside the vocabulary"),
        ({"input_ids": np.zeros((0, 3), np.int64)}, "non-empty shape"),
    ],
)  # fmt: skip
def test_bad_pre_tokenized_arrays(
    tmp_path: Path, tokenizer: Any, arrays: dict[str, np.ndarray], needle: str
) -> None:
    path = tmp_path / "tokens.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    with pytest.raises(InputError, match=needle):
        load_text_data(path, tokenizer, seq_len=8, vocab_size=64)
    path.write_bytes(b"not a zip")
    with pytest.raises(InputError, match=r"tokens\.npz: not a readable \.npz file"):
        load_text_data(path, tokenizer, seq_len=8)
