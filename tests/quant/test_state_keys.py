"""Quantized checkpoints of transformers models (`lcpaq.quant.state_keys` through
`lcpaq.quant.checkpoint`): tied embedding/LM head stored once, Conv1D weights in their own layout,
the wrapper's ``model.`` prefix either way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_models import Wrapped, linear_layers, quantize_in_place, tiny_model, token_ids
from safetensors.torch import load_file

from lcpaq.errors import InputError
from lcpaq.quant.checkpoint import load_quantized, write_quantized_checkpoint
from lcpaq.quant.formats import QuantScheme
from lcpaq.quant.state_keys import fit_wrapper_prefix, tied_aliases

pytestmark = pytest.mark.usefixtures("single_thread")


def _quantized_gpt2(folder: Path) -> torch.nn.Module:
    """GPT-2 with every Conv1D at INT4 and the tied LM head at INT8, written to ``folder``."""
    model = tiny_model("gpt2")
    layers = linear_layers(model)
    formats = {layer.name: "int4" for layer in layers} | {"lm_head": "int8"}
    scheme = QuantScheme(granularity="group", group_size=32)
    codes = quantize_in_place(model, layers, formats, scheme)
    write_quantized_checkpoint(folder, model.state_dict(), layers, codes, {}, scheme)
    return model


def test_tied_keys_and_preferred_key() -> None:
    shared = torch.ones(3, 2)
    state = {"a": shared, "b": torch.zeros(2), "c": shared, "d": shared.t()}
    assert tied_aliases(state) == {"c": "a"}
    assert tied_aliases(state, preferred={"c"}) == {"a": "c"}


def test_wrapper_prefix_either_way() -> None:
    assert fit_wrapper_prefix(["model.x", "model.y"], {"x", "y"}) == "strip"
    assert fit_wrapper_prefix(["x"], {"model.x"}) == "add"
    assert fit_wrapper_prefix(["x"], {"x"}) == "keep"
    assert fit_wrapper_prefix(["x", "z"], {"model.x"}) is None


def test_gpt2_checkpoint_loads_into_a_fresh_model(tmp_path: Path) -> None:
    """Conv1D codes are out×in, the module's weight in×out; the tied embedding/LM head is one
    stored tensor with one format, and the loaded model gives the quantized model's logits."""
    quantized = _quantized_gpt2(tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert manifest["tied"] == {"transformer.wte.weight": "lm_head.weight"}
    by_name = {entry["name"]: entry for entry in manifest["layers"]}
    attention = by_name["transformer.h.0.attn.c_attn"]
    assert attention["transposed"] is True and attention["shape"] == [96, 32]
    assert "transposed" not in by_name["lm_head"]
    stored = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert "transformer.wte.weight" not in stored and "lm_head.weight.qcodes" in stored
    fresh = load_quantized(tmp_path / "ckpt", tiny_model("gpt2", seed=5))
    assert isinstance(fresh, torch.nn.Module)
    assert fresh.transformer.wte.weight is fresh.lm_head.weight  # still tied
    for key, tensor in quantized.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], tensor), key
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, quantized(ids).logits)


@pytest.mark.parametrize(
    "wrapped_checkpoint", [True, False], ids=["wrapper-to-bare", "bare-to-wrapper"]
)
def test_wrapper_checkpoint_fits_the_bare_model_and_back(
    tmp_path: Path, wrapped_checkpoint: bool
) -> None:
    bert = tiny_model("bert")
    source: torch.nn.Module = Wrapped(bert) if wrapped_checkpoint else bert
    layers = linear_layers(source)
    scheme = QuantScheme(symmetric=True)
    codes = quantize_in_place(source, layers, {layer.name: "int3" for layer in layers}, scheme)
    write_quantized_checkpoint(tmp_path / "ckpt", source.state_dict(), layers, codes, {}, scheme)
    fresh_bert = tiny_model("bert", seed=3)
    target = fresh_bert if wrapped_checkpoint else Wrapped(fresh_bert)
    load_quantized(tmp_path / "ckpt", target)
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(fresh_bert(ids)[0], bert(ids)[0])
    with pytest.raises(InputError, match="does not fit the model"):
        load_quantized(tmp_path / "ckpt", tiny_model("gpt2"))
