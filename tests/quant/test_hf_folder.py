"""The ready-to-load Hugging Face folder (`lcpaq.quant.hf_folder`): transformers loads it on its
own and gives the quantized model's outputs exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hf_models import (
    Wrapped,
    linear_layers,
    quantize_in_place,
    save_model_folder,
    tiny_model,
    token_ids,
)

from lcpaq.errors import InputError
from lcpaq.quant.checkpoint import load_quantized, write_quantized_checkpoint
from lcpaq.quant.formats import QuantScheme
from lcpaq.quant.hf_folder import write_hf_folder

pytestmark = pytest.mark.usefixtures("single_thread")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_auto_model_loads_the_folder_and_matches_the_quantized_model(
    tmp_path: Path, kind: str
) -> None:
    source = save_model_folder(tiny_model(kind), tmp_path / "source")
    (source / "onnx").mkdir()
    (source / "onnx" / "model.onnx").write_bytes(b"fp32 weights")  # never copied
    (source / "1_Pooling").mkdir()
    (source / "1_Pooling" / "config.json").write_text("{}")
    wrapper = Wrapped(tiny_model(kind))
    layers = linear_layers(wrapper)
    scheme = QuantScheme()
    codes = quantize_in_place(wrapper, layers, {layer.name: "int3" for layer in layers}, scheme)
    write_quantized_checkpoint(tmp_path / "ckpt", wrapper.state_dict(), layers, codes, {}, scheme)
    loaded = load_quantized(tmp_path / "ckpt", Wrapped(tiny_model(kind, seed=9)))
    assert isinstance(loaded, Wrapped)
    folder = write_hf_folder(loaded, tmp_path / "hf", source)
    files = sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())
    assert "model.safetensors" in files and "tokenizer.json" in files
    assert "1_Pooling/config.json" in files and "onnx/model.onnx" not in files
    auto = transformers.AutoModelForCausalLM if kind == "gpt2" else transformers.AutoModel
    reloaded = auto.from_pretrained(folder, local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ids = tokenizer(["w1 w2 w3 w4", "w5 w6 w7 w8"], return_tensors="pt")["input_ids"]
    for batch in (ids, token_ids()):
        with torch.no_grad():
            assert torch.equal(reloaded(batch)[0], wrapper.model(batch)[0])


def test_a_model_without_save_pretrained_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a transformers model"):
        write_hf_folder(torch.nn.Linear(2, 2), tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []
