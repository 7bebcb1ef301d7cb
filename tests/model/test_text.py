"""`lcpaq.model.text`: the [N, 2, T] interface, pooling from the sentence-transformers files, and
padding that changes no output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_models import tiny_model, token_ids

from lcpaq.errors import InputError
from lcpaq.model.graph import token_mask
from lcpaq.model.text import Pooling, TextModel, pool, read_pooling

pytestmark = pytest.mark.usefixtures("single_thread")


def _padded(ids: torch.Tensor, lengths: list[int], pad_id: int = 0) -> torch.Tensor:
    """[N, 2, T]: row n keeps its first lengths[n] tokens, then padding."""
    mask = (torch.arange(ids.shape[1])[None] < torch.tensor(lengths)[:, None]).long()
    return torch.stack([ids.masked_fill(mask == 0, pad_id), mask], 1)


def _write_pooling(folder: Path, normalize: bool, **modes: bool) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]  # fmt: skip
    if normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )  # fmt: skip
    (folder / "1_Pooling").mkdir(parents=True)
    (folder / "modules.json").write_text(json.dumps(modules))
    config = {f"pooling_mode_{name}": value for name, value in modes.items()}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("modes", "normalize", "expected"),
    [
        ({"mean_tokens": True}, True, Pooling("mean", True)),
        ({"cls_token": True, "mean_tokens": False}, False, Pooling("cls", False)),
        ({"max_tokens": True}, True, Pooling("max", True)),
    ],
)
def test_pooling_from_the_sentence_transformers_files(
    tmp_path: Path, modes: dict[str, bool], normalize: bool, expected: Pooling
) -> None:
    _write_pooling(tmp_path, normalize, **modes)
    assert read_pooling(tmp_path) == expected


def test_pooling_defaults_and_bad_configs(tmp_path: Path) -> None:
    assert read_pooling(tmp_path) == Pooling("mean", False)
    _write_pooling(tmp_path, False, mean_tokens=True, cls_token=True)
    with pytest.raises(InputError, match="exactly one of mean, CLS or max.*got mean, cls"):
        read_pooling(tmp_path)
    (tmp_path / "1_Pooling" / "config.json").write_text("[1")
    with pytest.raises(InputError, match="not readable JSON"):
        read_pooling(tmp_path)


@pytest.mark.parametrize("mode", ["mean", "cls", "max"])
def test_pooling_ignores_padding(mode: str) -> None:
    states = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    pooled = pool(states, mask, Pooling(mode, normalize=True))  # type: ignore[arg-type]
    alone = pool(states[:1, :3], mask[:1, :3], Pooling(mode, normalize=True))  # type: ignore[arg-type]
    torch.testing.assert_close(pooled[:1], alone)
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(2))
    changed = states.clone()
    changed[0, 3:] = 1e3  # padding states never reach the embedding
    torch.testing.assert_close(
        pool(changed, mask, Pooling(mode)), pool(states, mask, Pooling(mode))
    )  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_padding_changes_no_real_output(kind: str) -> None:
    task = "encoder" if kind == "bert" else "causal-lm"
    model = TextModel(tiny_model(kind), task)
    ids = token_ids(count=2, length=8)
    batch = _padded(ids, [5, 8])
    mask = token_mask(model, batch)
    assert mask is not None and mask.tolist() == batch[:, 1].bool().tolist()
    with torch.no_grad():
        padded = model(batch)
        alone = model(_padded(ids[:1, :5], [5]))
    if task == "encoder":
        torch.testing.assert_close(padded[:1], alone, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(padded[:1, :5], alone, atol=1e-5, rtol=1e-5)


def test_bad_batches_and_tasks() -> None:
    model = TextModel(tiny_model("bert"), "encoder")
    with pytest.raises(InputError, match=r"\[N, 2, T\].*got shape \(3, 8\)"):
        model(token_ids())
    with pytest.raises(InputError, match="task must be one of"):
        TextModel(tiny_model("bert"), "vision")  # type: ignore[arg-type]
