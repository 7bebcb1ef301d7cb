"""scripts/text_corpus.py: the offline docstring corpus is deterministic, its calibration and
evaluation parts are disjoint, and every row has its fields."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "text_corpus.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("text_corpus", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, Path, Path]:
    script = _script()
    first, second = tmp_path_factory.mktemp("first"), tmp_path_factory.mktemp("second")
    script.build(first)
    script.main(["--out", str(second)])
    return script, first, second


def test_deterministic(corpus: tuple[ModuleType, Path, Path]) -> None:
    _, first, second = corpus
    for name in ("retrieval.jsonl", "calib.txt", "manifest.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_rows_have_their_fields(corpus: tuple[ModuleType, Path, Path]) -> None:
    script, folder, _ = corpus
    rows = [json.loads(line) for line in (folder / "retrieval.jsonl").read_text().splitlines()]
    assert len(rows) == 1000
    for row in rows:
        assert set(row) == {"query", "document", "name", "module"}
        assert len(row["query"]) >= script.MIN_QUERY_CHARS
        assert row["document"].startswith(row["name"] + ": ")
        assert len(row["document"]) >= len(row["name"]) + 2 + script.MIN_REST_CHARS
        assert row["query"] not in row["document"]  # the first sentence is left out
        assert row["name"].startswith(row["module"] + ".")
        assert max(len(row["query"]), len(row["document"])) <= script.MAX_CHARS
    assert len({row["query"].casefold() for row in rows}) == 1000
    assert len({row["document"].casefold() for row in rows}) == 1000
    lines = (folder / "calib.txt").read_text().splitlines()
    assert len(lines) == 512 and len(set(lines)) == 512
    assert all(script.MIN_CALIB_CHARS <= len(line) <= script.MAX_CHARS for line in lines)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["retrieval"]["pairs"] == 1000 and manifest["calibration"]["documents"] == 512


def test_calibration_and_evaluation_are_disjoint(corpus: tuple[ModuleType, Path, Path]) -> None:
    script, folder, _ = corpus
    assert not set(script.EVAL_MODULES) & set(script.CALIB_MODULES)
    rows = [json.loads(line) for line in (folder / "retrieval.jsonl").read_text().splitlines()]
    assert {row["module"] for row in rows} <= set(script.EVAL_MODULES)
    calib = set((folder / "calib.txt").read_text().casefold().splitlines())
    for row in rows:
        rest = row["document"].split(": ", 1)[1].casefold()
        assert row["query"].casefold() not in calib and rest not in calib
    # No calibration line is any evaluation module's docstring.
    eval_docs = {script.clip(script.collapse(doc)).casefold() for _, _, doc in
                 script.docstrings(script.EVAL_MODULES)[0]}  # fmt: skip
    assert not calib & eval_docs


def test_first_sentence_split() -> None:
    script = _script()
    assert script.split_first_sentence("Return x, e.g. the best. More text here.") == (
        "Return x, e.g. the best.",
        "More text here.",
    )
    assert script.split_first_sentence("One sentence only.") is None
    assert script.clip("a bb ccc dddd", 8) == "a bb"


def test_too_many_pairs_asked(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="distinct retrieval pairs"):
        _script().build(tmp_path, pairs=100_000)
