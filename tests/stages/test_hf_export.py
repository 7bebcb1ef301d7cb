"""The export stage's transformers folders (`lcpaq.stages.hf_export`): written inside the checkpoint
folder as the flags ask, summarised in exports.json, and nothing for other models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_tiny_conv_net
from hf_models import Wrapped, linear_layers, quantize_in_place, save_model_folder, tiny_model

from lcpaq.cli import build_parser
from lcpaq.config import ExportSettings
from lcpaq.config.options import build
from lcpaq.quant.checkpoint import write_quantized_checkpoint
from lcpaq.quant.formats import QuantScheme
from lcpaq.stages.hf_export import export_hf, source_folder

pytestmark = pytest.mark.usefixtures("single_thread")


def _checkpoint(folder: Path) -> Wrapped:
    save_model_folder(tiny_model("bert"), folder / "source")
    wrapper = Wrapped(tiny_model("bert"))
    layers = linear_layers(wrapper)
    formats = {layer.name: ("int4" if i % 2 else "fp8_e5m2") for i, layer in enumerate(layers)}
    codes = quantize_in_place(wrapper, layers, formats, QuantScheme())
    write_quantized_checkpoint(
        folder / "quantized", wrapper.state_dict(), layers, codes, {}, QuantScheme()
    )
    return wrapper


def test_folders_and_summary_inside_the_checkpoint(tmp_path: Path) -> None:
    model = _checkpoint(tmp_path)
    checkpoint = tmp_path / "quantized"
    summary = export_hf(model, checkpoint, f"hf:{tmp_path / 'source'}")
    assert (checkpoint / "hf" / "model.safetensors").is_file()
    assert (checkpoint / "hf" / "tokenizer.json").is_file()
    assert (checkpoint / "compressed-tensors" / "config.json").is_file()
    written = json.loads((checkpoint / "exports.json").read_text())
    assert written["hf_folder"] == summary["hf_folder"] == str(checkpoint / "hf")
    dequantized = written["compressed_tensors"]["dequantized"]
    assert dequantized and all("fp8_e5m2" in why for why in dequantized.values())
    settings = ExportSettings(hf_folder=False, compressed_tensors="off")
    assert export_hf(model, tmp_path / "other", "hf:x", settings) == {
        "hf_folder": None,
        "compressed_tensors": None,
    }
    assert sorted(path.name for path in (tmp_path / "other").iterdir()) == ["exports.json"]


def test_other_models_get_nothing(tmp_path: Path) -> None:
    assert export_hf(make_tiny_conv_net(), tmp_path, "cifar-resnet20") == {}
    assert list(tmp_path.iterdir()) == []
    assert source_folder("cifar-resnet20") is None
    assert source_folder("hf:/models/x") == Path("/models/x")


def test_export_flags_on_the_command_line() -> None:
    args = build_parser().parse_args(
        ["export", "run", "--no-hf-folder", "--compressed-tensors", "refuse"]
    )
    assert build(ExportSettings, args) == ExportSettings(
        hf_folder=False, compressed_tensors="refuse"
    )
    defaults = build_parser().parse_args(["export", "run"])
    assert build(ExportSettings, defaults) == ExportSettings()
    run = build_parser().parse_args(["run", "--out", "r", "--compressed-tensors", "off"])
    assert build(ExportSettings, run).compressed_tensors == "off"
