"""`lcpaq.model.hf`: local transformers folders as `TextModel`s, the task from the folder or
``--task``, and no code or pickle from an untrusted folder without the user's opt-in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_models import save_model_folder, tiny_model, token_ids

from lcpaq.errors import InputError
from lcpaq.model.hf import load_hf_model, load_tokenizer, task_of
from lcpaq.model.text import TextModel
from lcpaq.model.zoo import load_model

pytestmark = pytest.mark.usefixtures("single_thread")


def _batch(ids: torch.Tensor) -> torch.Tensor:
    return torch.stack([ids, torch.ones_like(ids)], 1)


@pytest.mark.parametrize(
    ("kind", "task", "shape"),
    [
        ("bert", "encoder", (3, 32)),
        ("gpt2", "causal-lm", (3, 8, 64)),
        ("llama", "causal-lm", (3, 8, 64)),
    ],
)
def test_folder_loads_as_its_task_with_the_same_outputs(
    tmp_path: Path, kind: str, task: str, shape: tuple[int, ...]
) -> None:
    reference = tiny_model(kind)
    folder = save_model_folder(reference, tmp_path / kind)
    model = load_model(f"hf:{folder}", None)
    assert isinstance(model, TextModel) and model.task == task and not model.training
    ids = token_ids()
    with torch.no_grad():
        outputs = model(_batch(ids))
        expected = reference(input_ids=ids)[0]
    assert tuple(outputs.shape) == shape
    if task == "causal-lm":  # logits unchanged: the same weights, loaded from the folder
        torch.testing.assert_close(outputs, expected)
    else:  # mean over the (all real) tokens
        torch.testing.assert_close(outputs, expected.mean(1))
    assert all(key.startswith("model.") for key in model.state_dict())


def test_task_from_architectures_and_override(tmp_path: Path) -> None:
    assert task_of({"architectures": ["LlamaForCausalLM"]}) == "causal-lm"
    assert task_of({"architectures": ["GPT2LMHeadModel"]}) == "causal-lm"
    assert (
        task_of({"architectures": ["BertForSequenceClassification"]}) == "sequence-classification"
    )
    assert task_of({"architectures": ["BertModel"]}) == task_of({}) == "encoder"
    folder = save_model_folder(tiny_model("gpt2"), tmp_path / "gpt2")
    encoder = load_hf_model(folder, task="encoder")  # GPT-2's hidden states, mean-pooled
    assert encoder.task == "encoder"
    assert tuple(encoder(_batch(token_ids())).shape) == (3, 32)
    with pytest.raises(InputError, match="--task must be one of"):
        load_hf_model(folder, task="translation")


def test_classifier_folder(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = save_model_folder(
        transformers.BertForSequenceClassification(config).eval(), tmp_path / "cls"
    )
    model = load_hf_model(folder)
    assert model.task == "sequence-classification"
    assert tuple(model(_batch(token_ids())).shape) == (3, 3)


def test_remote_code_is_refused_unless_trusted(tmp_path: Path) -> None:
    folder = save_model_folder(tiny_model("bert"), tmp_path / "bert")
    (folder / "modeling_evil.py").write_text("raise SystemExit('ran')\n")
    with pytest.raises(InputError, match=r"modeling_evil\.py.*--trust-remote-code"):
        load_hf_model(folder)
    with pytest.raises(InputError, match="--trust-remote-code"):
        load_tokenizer(folder)
    assert load_hf_model(folder, trust_remote_code=True).task == "encoder"
    (folder / "modeling_evil.py").unlink()
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="auto_map"):
        load_hf_model(folder)


def test_pickled_weights_need_the_opt_in(tmp_path: Path) -> None:
    reference = tiny_model("bert")
    folder = tmp_path / "pickled"
    reference.save_pretrained(folder)
    (folder / "model.safetensors").unlink()  # the same weights, pickled the old way
    torch.save(reference.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(InputError, match=r"pytorch_model\.bin are pickled.*--allow-unsafe-pickle"):
        load_hf_model(folder)
    model = load_hf_model(folder, allow_unsafe_pickle=True)
    torch.testing.assert_close(
        model.state_dict()["model.encoder.layer.0.attention.self.query.weight"],
        reference.state_dict()["encoder.layer.0.attention.self.query.weight"],
    )


@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        ("missing", "no such folder"),
        ("no-config", "no config.json"),
        ("bad-config", "not readable JSON"),
        ("no-weights", r"no weights \(\*\.safetensors\)"),
    ],
)
def test_bad_folders_are_one_line_errors(tmp_path: Path, setup: str, needle: str) -> None:
    folder = tmp_path / "model"
    if setup != "missing":
        folder.mkdir()
    if setup == "bad-config":
        (folder / "config.json").write_text("{not json")
    if setup == "no-weights":
        (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(InputError, match=needle) as error:
        load_model(f"hf:{folder}", None)
    assert "\n" not in str(error.value)


def test_tokenizer_pads_on_the_right_and_has_a_pad_token(tmp_path: Path) -> None:
    folder = save_model_folder(tiny_model("gpt2"), tmp_path / "gpt2")
    tokenizer = load_tokenizer(folder)
    assert tokenizer.pad_token_id is not None and tokenizer.padding_side == "right"
