"""compressed-tensors export (`lcpaq.quant.compressed`): decompressed by the compressed-tensors
package itself, every weight equals `load_quantized`'s value for value; what it cannot express is
named and left dequantized, or refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_models import Wrapped, linear_layers, quantize_in_place, save_model_folder, tiny_model

from lcpaq.errors import InputError
from lcpaq.quant.checkpoint import load_quantized, write_quantized_checkpoint
from lcpaq.quant.compressed import write_compressed_tensors
from lcpaq.quant.formats import QuantScheme

pytestmark = pytest.mark.usefixtures("single_thread")
pytest.importorskip("compressed_tensors", reason="needs lcpaq[hf] (compressed-tensors)")

#: Formats by layer position, cycled: INT of several widths, FP8 E4M3, and FP8 E5M2, which
#: compressed-tensors cannot express.
FORMATS = ["int2", "int3", "int4", "int8", "fp8_e4m3", "int6", "fp8_e5m2"]
SCHEMES = {
    "asym-channel": QuantScheme(),
    "sym-group32": QuantScheme(symmetric=True, granularity="group", group_size=32),
    "asym-group32": QuantScheme(granularity="group", group_size=32, clipping="minmax"),
    "asym-tensor": QuantScheme(granularity="tensor"),
    "mx": QuantScheme(granularity="mx"),
}


def _export(
    folder: Path, scheme: QuantScheme, formats: list[str], kind: str = "bert"
) -> tuple[Wrapped, dict[str, str]]:
    """A wrapped tiny model quantized with ``formats`` cycled over its layers, as a checkpoint in
    ``folder/ckpt``, loaded back into a fresh model; its HF source folder in ``folder/source``."""
    save_model_folder(tiny_model(kind), folder / "source")
    wrapper = Wrapped(tiny_model(kind))
    layers = linear_layers(wrapper)
    assignment = {layer.name: formats[i % len(formats)] for i, layer in enumerate(layers)}
    codes = quantize_in_place(wrapper, layers, assignment, scheme)
    write_quantized_checkpoint(folder / "ckpt", wrapper.state_dict(), layers, codes, {}, scheme)
    loaded = load_quantized(folder / "ckpt", Wrapped(tiny_model(kind, seed=4)))
    assert isinstance(loaded, Wrapped)
    return loaded, assignment


def _decompressed(folder: Path) -> dict[str, torch.Tensor]:
    """The folder's weights as compressed-tensors itself decompresses them (float32)."""
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import (
        CompressedTensorsDequantizer,
    )
    from safetensors.torch import load_file

    dequantizer = CompressedTensorsDequantizer(folder, dtype=torch.float32)
    return dequantizer.process(load_file(str(folder / "model.safetensors")))


@pytest.mark.parametrize("name", list(SCHEMES))
def test_compressed_tensors_decompress_to_load_quantized_values(tmp_path: Path, name: str) -> None:
    scheme = SCHEMES[name]
    formats = ["fp4_e2m1", "int4"] if name == "mx" else FORMATS
    model, assignment = _export(tmp_path, scheme, formats)
    result = write_compressed_tensors(
        model, tmp_path / "ckpt", tmp_path / "ct", tmp_path / "source"
    )
    expected = load_quantized(tmp_path / "ckpt")
    assert isinstance(expected, dict)
    decompressed = _decompressed(tmp_path / "ct")
    assert set(decompressed) == {key.removeprefix("model.") for key in expected}
    for key, tensor in expected.items():
        assert torch.equal(decompressed[key.removeprefix("model.")], tensor), key
    unsupported = {"fp8_e5m2", "int4"} if name == "mx" else {"fp8_e5m2"}
    names = {layer.removeprefix("model.") for layer, fmt in assignment.items()}
    expected_plain = {
        layer.removeprefix("model.") for layer, fmt in assignment.items() if fmt in unsupported
    }
    assert set(result.dequantized) == expected_plain
    assert set(result.compressed) == names - expected_plain
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    targets = [t for group in config["config_groups"].values() for t in group["targets"]]
    assert sorted(targets) == sorted(result.compressed)
    assert (tmp_path / "ct" / "tokenizer.json").is_file()


def test_refuse_names_the_layers_and_writes_nothing(tmp_path: Path) -> None:
    model, _ = _export(tmp_path, QuantScheme(), ["int4", "fp8_e5m2"])
    with pytest.raises(InputError, match=r"cannot express \d+ quantized layer.*fp8_e5m2") as error:
        write_compressed_tensors(
            model, tmp_path / "ckpt", tmp_path / "ct", tmp_path / "source", "refuse"
        )
    assert "\n" not in str(error.value)
    assert not (tmp_path / "ct").exists()


def test_gpt2_conv1d_and_tied_head_stay_dequantized(tmp_path: Path) -> None:
    """Conv1D (in×out) and the tied LM head have no compressed-tensors form; the rest of the
    file still decompresses to the checkpoint's values."""
    model, _ = _export(tmp_path, QuantScheme(), ["int4"], kind="gpt2")
    result = write_compressed_tensors(model, tmp_path / "ckpt", tmp_path / "ct")
    assert result.compressed == {}
    assert "Conv1D" in result.dequantized["transformer.h.0.attn.c_attn"]
    assert "tied" in result.dequantized["lm_head"]
    expected = load_quantized(tmp_path / "ckpt")
    assert isinstance(expected, dict)
    decompressed = _decompressed(tmp_path / "ct")
    for key, tensor in decompressed.items():
        assert torch.equal(tensor, expected["model." + key]), key


def test_transformers_loads_the_folder_with_the_quantized_outputs(tmp_path: Path) -> None:
    """transformers' own compressed-tensors loader reads the folder (quantization_config, packed
    INT and FP8 weights) and the model gives the quantized model's outputs exactly."""
    import transformers
    from hf_models import token_ids

    scheme = QuantScheme(symmetric=True, granularity="group", group_size=32)
    model, _ = _export(tmp_path, scheme, ["int4", "int8", "fp8_e4m3"])
    result = write_compressed_tensors(
        model, tmp_path / "ckpt", tmp_path / "ct", tmp_path / "source"
    )
    assert set(result.compressed.values()) == {"pack-quantized", "naive-quantized"}
    loaded = transformers.AutoModel.from_pretrained(tmp_path / "ct", local_files_only=True).eval()
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], model.model(ids)[0])
