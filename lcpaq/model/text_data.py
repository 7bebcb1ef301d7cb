"""Text calibration and evaluation data for `lcpaq.model.text.TextModel` (contract §3).

Sources: plain text (one document per line, blank lines skipped), JSONL (``text`` per row, with an
integer ``label`` for classifiers; or ``query``/``document`` pairs for retrieval) and pre-tokenized
``.npz``/``.safetensors`` (``input_ids``, optional ``attention_mask`` and ``labels``). Texts are
tokenized with the model's own tokenizer, truncated to ``seq_len`` tokens and padded on the right
to the longest text (at most ``seq_len``). A batch is one int64 tensor [N, 2, T]: ids and the
attention mask (1 real, 0 padding); padding is masked out of every statistic downstream.
Unlabeled texts get label -1 (`lcpaq.model.data.Dataset.has_labels`). Every problem (empty file,
not UTF-8, bad JSON, a row without the field, a sequence length the model cannot take) is an
`InputError` naming the file and, where there is one, the line.
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lcpaq.errors import InputError
from lcpaq.model.data import Dataset

logger = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".json")
TOKENIZED_SUFFIXES = (".npz", ".safetensors")
UNLABELED = -1


@dataclass(frozen=True)
class RetrievalPairs:
    """Query/document pairs: row i of ``queries`` matches row i of ``documents``."""

    queries: Dataset
    documents: Dataset
    source: str

    def __len__(self) -> int:
        return len(self.queries)


@dataclass(frozen=True)
class TextRows:
    """What a text file holds before tokenization: texts with labels (-1: none), or pairs."""

    texts: list[str]
    labels: list[int]
    documents: list[str] | None = None  # query/document pairs: texts are the queries


def _lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped line) of the non-blank lines of a UTF-8 file."""
    if not path.is_file():
        raise InputError(f"data file {path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise InputError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[error.start]:02x}); save it as UTF-8"
        ) from None
    rows = [(index + 1, line.strip()) for index, line in enumerate(text.splitlines())]
    rows = [(number, line) for number, line in rows if line]
    if not rows:
        raise InputError(f"{path}: the file holds no text (empty or only blank lines)")
    return rows


def _field(row: dict[str, Any], name: str, path: Path, line: int) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        found = ", ".join(sorted(row)) or "none"
        raise InputError(
            f"{path}:{line}: row has no non-empty string field {name!r} (fields: {found})"
        )
    return value


def _label(row: dict[str, Any], path: Path, line: int) -> int:
    value = row.get("label", UNLABELED)
    if isinstance(value, bool) or not isinstance(value, int) or value < UNLABELED:
        raise InputError(f"{path}:{line}: label must be a non-negative integer, got {value!r}")
    return value


def read_jsonl(path: Path) -> TextRows:
    """Rows of ``text`` (optional ``label``) or, when the first row has ``query`` and ``document``,
    retrieval pairs; every row must have the fields of the first."""
    rows: list[tuple[int, dict[str, Any]]] = []
    for line, content in _lines(path):
        try:
            row = json.loads(content)
        except json.JSONDecodeError as error:
            raise InputError(f"{path}:{line}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}:{line}: expected a JSON object, got {type(row).__name__}")
        rows.append((line, row))
    if "query" in rows[0][1] and "document" in rows[0][1]:
        queries = [_field(row, "query", path, line) for line, row in rows]
        documents = [_field(row, "document", path, line) for line, row in rows]
        return TextRows(queries, [UNLABELED] * len(rows), documents)
    texts = [_field(row, "text", path, line) for line, row in rows]
    return TextRows(texts, [_label(row, path, line) for line, row in rows])


def read_text_rows(path: str | Path) -> TextRows:
    """The texts of a plain-text (one document per line) or JSONL file."""
    path = Path(path)
    if path.suffix in JSONL_SUFFIXES:
        return read_jsonl(path)
    texts = [line for _, line in _lines(path)]
    return TextRows(texts, [UNLABELED] * len(texts))


def max_length_of(tokenizer: Any, model_max: int | None) -> int | None:
    """The longest sequence the model takes: its position embeddings, else the tokenizer's limit
    (tokenizers without one report a huge sentinel)."""
    limit = getattr(tokenizer, "model_max_length", None)
    candidates = [value for value in (model_max, limit) if value and value < 1_000_000]
    return min(candidates) if candidates else None


def effective_seq_len(seq_len: int, model_max: int | None, source: str) -> int:
    """``--seq-len``, cut to the longest sequence the model takes (texts longer than that are
    truncated, never passed whole to a model that cannot take them)."""
    if seq_len < 2:
        raise InputError(f"--seq-len must be at least 2 tokens, got {seq_len}")
    if model_max is not None and seq_len > model_max:
        logger.info(
            "%s: --seq-len %d is longer than the model allows; using %d", source, seq_len, model_max
        )
        return model_max
    return seq_len


def tokenize(
    texts: Sequence[str], labels: Sequence[int], tokenizer: Any, seq_len: int, source: str
) -> Dataset:
    """Texts → `Dataset` of [N, 2, T] int64 (T: the longest text, at most ``seq_len``)."""
    encoded = tokenizer(
        list(texts),
        truncation=True,
        max_length=seq_len,
        padding="longest",
        return_tensors="pt",
    )
    ids, mask = encoded["input_ids"].long(), encoded["attention_mask"].long()
    # Lengths before truncation (verbose=False: no warning for texts past the model's limit).
    lengths = tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]
    truncated = sum(len(ids_) > seq_len for ids_ in lengths)
    if truncated:
        logger.info(
            "%s: %d of %d texts truncated to %d tokens", source, truncated, len(texts), seq_len
        )
    empty = (mask.sum(1) == 0).nonzero()
    if len(empty):
        raise InputError(f"{source}: text {int(empty[0])} has no tokens")
    return Dataset(
        torch.stack([ids, mask], 1), torch.tensor(list(labels), dtype=torch.long), source
    )


def _tokenized_arrays(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise InputError(f"data file {path} does not exist")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return {key: archive[key] for key in archive.files}
        from safetensors.numpy import load_file

        return dict(load_file(str(path)))
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise InputError(f"{path}: not a readable {path.suffix} file ({error})") from None


def load_tokenized(path: str | Path, seq_len: int, vocab_size: int | None) -> Dataset:
    """Pre-tokenized ``input_ids`` [N, T] (optional ``attention_mask``, ``labels``), cut to
    ``seq_len`` tokens."""
    path = Path(path)
    arrays = _tokenized_arrays(path)
    if "input_ids" not in arrays:
        raise InputError(f"{path}: missing array 'input_ids' (found {sorted(arrays)})")
    ids = arrays["input_ids"]
    mask = arrays.get("attention_mask", np.ones_like(ids))
    for name, array in (("input_ids", ids), ("attention_mask", mask)):
        if array.dtype.kind not in "iu" or array.ndim != 2:
            raise InputError(
                f"{path}: {name!r} must be a 2-d integer array [N, T], got {array.dtype} "
                f"of shape {array.shape}"
            )
    if ids.shape != mask.shape or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise InputError(
            f"{path}: input_ids {ids.shape} and attention_mask {mask.shape} must be the same "
            "non-empty shape"
        )
    if not np.isin(mask, (0, 1)).all() or (mask.sum(1) == 0).any():
        raise InputError(f"{path}: attention_mask must be 0/1 with a real token in every row")
    if int(ids.min()) < 0 or (vocab_size is not None and int(ids.max()) >= vocab_size):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise InputError(f"{path}: token id {bad} is outside the vocabulary (0..{vocab_size})")
    labels = arrays.get("labels", np.full(ids.shape[0], UNLABELED))
    if labels.shape != (ids.shape[0],) or labels.dtype.kind not in "iu":
        raise InputError(f"{path}: 'labels' must be one integer per row, got shape {labels.shape}")
    inputs = torch.stack([torch.as_tensor(ids), torch.as_tensor(mask)], 1).long()[..., :seq_len]
    return Dataset(inputs.contiguous(), torch.as_tensor(labels).long(), str(path))


def load_text_data(
    path: str | Path,
    tokenizer: Any,
    *,
    seq_len: int,
    num_samples: int | None = None,
    model_max: int | None = None,
    vocab_size: int | None = None,
    pairs: bool = False,
) -> Dataset | RetrievalPairs:
    """The first ``num_samples`` texts (or pairs) of ``path``. ``pairs``: query/document files
    give `RetrievalPairs`; otherwise their queries and documents, interleaved, are the texts."""
    path = Path(path)
    seq_len = effective_seq_len(seq_len, max_length_of(tokenizer, model_max), str(path))
    if path.suffix in TOKENIZED_SUFFIXES:
        data = load_tokenized(path, seq_len, vocab_size)
        return data if num_samples is None else data.subset(0, min(num_samples, len(data)))
    rows = read_text_rows(path)
    count = num_samples or len(rows.texts)
    if rows.documents is not None and pairs:
        queries = tokenize(
            rows.texts[:count],
            [UNLABELED] * min(count, len(rows.texts)),
            tokenizer,
            seq_len,
            f"{path} (queries)",
        )
        documents = tokenize(
            rows.documents[:count],
            [UNLABELED] * len(queries),
            tokenizer,
            seq_len,
            f"{path} (documents)",
        )
        return RetrievalPairs(queries, documents, str(path))
    texts, labels = rows.texts, rows.labels
    if rows.documents is not None:
        texts = [text for pair in zip(rows.texts, rows.documents) for text in pair]
        labels = [UNLABELED] * len(texts)
    return tokenize(texts[:count], labels[:count], tokenizer, seq_len, str(path))
