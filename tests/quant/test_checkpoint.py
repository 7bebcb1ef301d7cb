"""Quantized checkpoints in `lcpaq.quant.checkpoint`: exact round trip, grid sizes, manifest, atomic writes."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from conftest import TinyConvNet, conv_inputs, make_tiny_conv_net, write_digits_files
from safetensors.torch import load_file, save_file

import lcpaq
from lcpaq.errors import InputError
from lcpaq.model.graph import discover_layers
from lcpaq.quant import checkpoint
from lcpaq.quant.activations import activation_quantizers, attach_activation_quantizers
from lcpaq.quant.checkpoint import (
    CHECKPOINT_FORMAT,
    load_quantized,
    quantize_model,
    read_manifest,
    write_quantized_checkpoint,
)
from lcpaq.quant.formats import QuantScheme, code_range, get_format
from lcpaq.sensitivity.activation import activation_sensitivity

pytestmark = pytest.mark.usefixtures("single_thread")

ASSIGNMENT = {"conv1": "int2", "conv2": "int3", "fc": "int5"}
EXTRA = {"budget": "avg-bits=3", "source_sha256": "0" * 64, "average_bits": 3.7}
SCHEMES = [
    QuantScheme(),  # the default, whatever it is
    QuantScheme(symmetric=True, granularity="channel", clipping="mse"),
    QuantScheme(symmetric=False, granularity="channel", clipping="minmax"),
    QuantScheme(symmetric=True, granularity="tensor", clipping="mse"),
    QuantScheme(symmetric=False, granularity="tensor", clipping="mse"),
]


def _scheme_id(scheme: QuantScheme) -> str:
    return f"{'sym' if scheme.symmetric else 'asym'}-{scheme.granularity}-{scheme.clipping}"


def _export(
    folder: Path,
    scheme: QuantScheme,
    assignment: dict[str, str] = ASSIGNMENT,
    model: TinyConvNet | None = None,
):
    model = model if model is not None else make_tiny_conv_net()
    layers = discover_layers(model, conv_inputs(2))
    quantized, codes = quantize_model(model, layers, assignment, scheme)
    path = write_quantized_checkpoint(folder, quantized.state_dict(), layers, codes, EXTRA, scheme)
    return model, quantized, codes, layers, path


@pytest.mark.parametrize("scheme", SCHEMES, ids=_scheme_id)
def test_round_trip_is_exact(tmp_path: Path, scheme: QuantScheme) -> None:
    model, quantized, _, _, path = _export(tmp_path / "ckpt", scheme)
    assert path == tmp_path / "ckpt"
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.safetensors"]
    loaded = load_quantized(path)
    original = model.state_dict()
    assert isinstance(loaded, dict)
    assert set(loaded) == set(original)
    expected = quantized.state_dict()
    for key, tensor in loaded.items():
        assert tensor.dtype == original[key].dtype, key
        assert torch.equal(tensor, expected[key]), key
        if key.removesuffix(".weight") in ASSIGNMENT and key.endswith(".weight"):
            assert not torch.equal(tensor, original[key]), key  # really quantized
        else:
            assert torch.equal(tensor, original[key]), key  # everything else unchanged


@pytest.mark.parametrize("scheme", SCHEMES, ids=_scheme_id)
def test_exported_codes_use_at_most_two_to_the_bits_values(
    tmp_path: Path, scheme: QuantScheme
) -> None:
    _, _, _, layers, path = _export(tmp_path / "ckpt", scheme)
    tensors = load_file(str(path / "model.safetensors"))
    _, weights, _ = checkpoint.read_checkpoint(path)
    loaded = load_quantized(path)
    by_name = {layer.name: layer for layer in layers}
    for name, format_name in ASSIGNMENT.items():
        key = by_name[name].weight_key
        assert key not in tensors  # the float weight is not stored, only its codes
        fmt = get_format(format_name)
        # Packed at the format's width: ceil(n·bits / 8) bytes.
        packed = tensors[key + ".qcodes"]
        assert packed.dtype == torch.uint8
        assert packed.numel() == -(-by_name[name].num_params * fmt.bits // 8)
        codes = weights[key].codes
        scale = tensors[key + ".qscale"]
        qmin, qmax = code_range(fmt, scheme.symmetric)
        assert codes.dtype == (torch.int8 if scheme.symmetric else torch.uint8)
        assert codes.shape == by_name[name].weight_shape
        assert int(codes.int().min()) >= qmin and int(codes.int().max()) <= qmax
        assert scale.dtype == torch.float32
        groups = codes.shape[0] if scheme.granularity == "channel" else 1
        assert scale.shape == (groups,)
        if scheme.symmetric:
            assert key + ".qzero" not in tensors
        else:
            assert tensors[key + ".qzero"].dtype == torch.int16
        for row in loaded[key].reshape(codes.shape[0], -1):
            assert len(torch.unique(row)) <= 2**fmt.bits
        for row in codes.reshape(groups, -1):
            assert len(torch.unique(row)) <= 2**fmt.bits


def test_manifest_contents(tmp_path: Path) -> None:
    scheme = QuantScheme(symmetric=False, clipping="minmax")
    _, _, _, layers, path = _export(tmp_path / "ckpt", scheme)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest == read_manifest(path)
    assert manifest["format"] == CHECKPOINT_FORMAT
    assert manifest["lcpaq_version"] == lcpaq.__version__
    for key, value in EXTRA.items():
        assert manifest[key] == value
    by_name = {layer.name: layer for layer in layers}
    entries = {entry["name"]: entry for entry in manifest["layers"]}
    assert set(entries) == set(ASSIGNMENT)
    for name, format_name in ASSIGNMENT.items():
        entry = entries[name]
        assert entry["format"] == format_name
        assert entry["bits"] == get_format(format_name).bits
        assert entry["granularity"] == "channel"
        assert entry["symmetric"] is False
        assert entry["clipping"] == "minmax"
        assert entry["weight_key"] == f"{name}.weight"
        assert entry["num_params"] == by_name[name].num_params
        assert entry["shape"] == list(by_name[name].weight_shape)
        assert entry["activation_quantizer"] is None  # weights only: activations stay FP32


def test_partial_assignment_keeps_other_weights_in_float(tmp_path: Path) -> None:
    model, _, codes, _, path = _export(tmp_path / "ckpt", QuantScheme(), {"conv2": "int4"})
    assert set(codes) == {"conv2"}
    tensors = load_file(str(path / "model.safetensors"))
    assert torch.equal(tensors["conv1.weight"], model.conv1.weight.detach())
    assert torch.equal(tensors["fc.weight"], model.fc.weight.detach())
    assert "conv2.weight" not in tensors and "conv2.weight.qcodes" in tensors


def test_failed_write_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "ckpt"
    _export(target, QuantScheme())
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken_save_file(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", broken_save_file)
    with pytest.raises(RuntimeError, match="disk full"):
        _export(target, QuantScheme(symmetric=False), {"conv1": "int8"})
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folders


def test_overwrite_replaces_the_checkpoint_without_leftovers(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    _export(target, QuantScheme())
    _, quantized, _, _, _ = _export(target, QuantScheme(), {"fc": "int8"})
    assert [entry["name"] for entry in read_manifest(target)["layers"]] == ["fc"]
    loaded = load_quantized(target)
    assert torch.equal(loaded["fc.weight"], quantized.fc.weight.detach())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_load_into_a_model_returns_it_in_eval_mode(tmp_path: Path) -> None:
    _, quantized, _, _, path = _export(tmp_path / "ckpt", QuantScheme())
    fresh = TinyConvNet().train()
    loaded = load_quantized(path, fresh)
    assert loaded is fresh
    assert not loaded.training
    assert all(not module.training for module in loaded.modules())
    inputs = conv_inputs(4)
    with torch.no_grad():
        assert torch.equal(loaded(inputs), quantized(inputs))
    # The package exports the loader at top level.
    assert lcpaq.load_quantized is load_quantized


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="manifest.json is missing"):
        load_quantized(tmp_path)
    _, _, _, _, path = _export(tmp_path / "ckpt", QuantScheme())
    with pytest.raises(InputError, match="does not fit the model"):
        load_quantized(path, torch.nn.Sequential(torch.nn.Linear(2, 2)))
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(InputError, match="file model.safetensors is damaged"):
        load_quantized(path)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "format": "other/9"}))
    with pytest.raises(InputError, match="unknown checkpoint format 'other/9'"):
        load_quantized(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match="manifest.json is damaged .not valid JSON"):
        load_quantized(path)


def test_activation_quantizers_travel_with_the_checkpoint(tmp_path: Path) -> None:
    """The manifest keeps each layer's input quantizer; the loaded model applies it, so it gives
    the in-memory W+A quantized model's outputs bit for bit; a bad entry names file and layer."""
    model = make_tiny_conv_net()
    inputs = conv_inputs(6)
    layers = discover_layers(model, inputs)
    sensitivity = activation_sensitivity(model, layers, [inputs], ("int4", "fp8_e4m3"))
    formats = {"conv1": "fp8_e4m3", "conv2": "int4", "fc": "fp32"}
    quantizers = activation_quantizers(sensitivity, formats)
    scheme = QuantScheme()
    quantized, codes = quantize_model(model, layers, ASSIGNMENT, scheme)
    with torch.no_grad():
        weights_only = quantized(inputs)
    attach_activation_quantizers(quantized, quantizers)
    path = write_quantized_checkpoint(
        tmp_path / "ckpt", quantized.state_dict(), layers, codes, EXTRA, scheme, formats, quantizers
    )
    entries = {entry["name"]: entry for entry in read_manifest(path)["layers"]}
    assert entries["conv2"]["activation_quantizer"] == quantizers["conv2"].to_dict()
    assert entries["fc"]["activation_format"] == "fp32"
    assert entries["fc"]["activation_quantizer"] is None
    loaded = load_quantized(path, TinyConvNet())
    with torch.no_grad():
        expected, got = quantized(inputs), loaded(inputs)
    assert torch.equal(got, expected)
    assert not torch.equal(got, weights_only)  # the activations were quantized
    # The hooks travel with the module: a pickled and reloaded model quantizes its inputs too.
    with torch.no_grad():
        assert torch.equal(pickle.loads(pickle.dumps(loaded))(inputs), expected)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["layers"][1]["activation_quantizer"]["high"] = "wide"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"manifest.json, layer 'conv2': bad activation quantizer"):
        load_quantized(path, TinyConvNet())


def test_quantize_model_leaves_the_original_alone() -> None:
    model = make_tiny_conv_net()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    layers = discover_layers(model, conv_inputs(2))
    quantized, codes = quantize_model(model, layers, ASSIGNMENT, QuantScheme())
    assert quantized is not model
    assert not quantized.training
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())
    assert set(codes) == set(ASSIGNMENT)
    for name, fmt in ASSIGNMENT.items():
        assert codes[name].format_name == fmt


def test_failed_rename_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last step (moving the finished folder into place) fails: the old checkpoint must still
    be at its path and no temporary or backup folder may be left behind."""
    target = tmp_path / "ckpt"
    _export(target, QuantScheme())
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    real_replace = checkpoint.os.replace

    def failing_replace(source: object, destination: object) -> None:
        if Path(str(source)).name.startswith(".ckpt.tmp-"):
            raise OSError(28, "No space left on device")
        real_replace(source, destination)

    monkeypatch.setattr(checkpoint.os, "replace", failing_replace)
    with pytest.raises(InputError, match="cannot write .*ckpt: No space left on device"):
        _export(target, QuantScheme(), {"fc": "int8"})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


# ---------------------------------------------------------------------------------------------
# Floating-point formats, per-group scales and MX blocks.

FP_ASSIGNMENT = {"conv1": "fp4_e2m1", "conv2": "fp8_e4m3", "fc": "int3"}
FP_SCHEMES = [
    QuantScheme(),
    QuantScheme(granularity="tensor", clipping="minmax"),
    QuantScheme(granularity="group", group_size=32),
    QuantScheme(symmetric=True, granularity="group", group_size=64),
    QuantScheme(granularity="mx"),
]


def _fp_scheme_id(scheme: QuantScheme) -> str:
    return f"{_scheme_id(scheme)}-{scheme.group_size}"


def _loads_back_exactly(path: Path, quantized: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`load_quantized` of the checkpoint at ``path``: the exported model's state dict, every
    tensor bit for bit (returned)."""
    loaded = load_quantized(path)
    assert isinstance(loaded, dict)
    expected = quantized.state_dict()
    assert set(loaded) == set(expected)
    for key, tensor in loaded.items():
        assert torch.equal(tensor, expected[key]), key
    return loaded


@pytest.mark.parametrize("scheme", FP_SCHEMES, ids=_fp_scheme_id)
def test_fp_group_and_mx_round_trip_is_exact(tmp_path: Path, scheme: QuantScheme) -> None:
    model, quantized, codes, layers, path = _export(tmp_path / "ckpt", scheme, FP_ASSIGNMENT)
    _loads_back_exactly(path, quantized)
    tensors = load_file(str(path / "model.safetensors"))
    manifest, weights, _ = checkpoint.read_checkpoint(path)
    entries = {entry["name"]: entry for entry in manifest["layers"]}
    by_name = {layer.name: layer for layer in layers}
    for name, format_name in FP_ASSIGNMENT.items():
        fmt = get_format(format_name)
        key = by_name[name].weight_key
        entry = entries[name]
        assert (entry["format"], entry["kind"], entry["bits"]) == (format_name, fmt.kind, fmt.bits)
        assert entry["granularity"] == scheme.granularity
        assert entry["group_size"] == scheme.block_size
        stored = weights[key].codes
        assert torch.equal(stored, codes[name].codes)
        assert torch.equal(tensors[key + ".qscale"], codes[name].scale)
        if fmt.kind == "fp":  # bit patterns, decoded by the table of the format
            assert stored.dtype == torch.uint8
            assert key + ".qzero" not in tensors
            assert entry["symmetric"] is True  # no zero point
        if scheme.granularity == "mx":
            assert tensors[key + ".qscale"].dtype == torch.uint8  # E8M0 exponents
        if scheme.block_size is not None:
            fan_in = by_name[name].num_params // by_name[name].weight_shape[0]
            groups = -(-fan_in // scheme.block_size)
            assert tensors[key + ".qscale"].shape == (by_name[name].weight_shape[0], groups)
    assert set(manifest["formats"]) == set(FP_ASSIGNMENT.values())
    assert manifest["formats"]["fp8_e4m3"]["max_value"] == 448.0
    assert manifest["formats"]["fp4_e2m1"]["exponent_bits"] == 2


def test_fp8_codes_in_the_checkpoint_are_torch_float8_bit_patterns(tmp_path: Path) -> None:
    """Per-tensor FP8: stored codes viewed as torch.float8_e4m3fn, times the scale, are the weight."""
    scheme = QuantScheme(granularity="tensor", clipping="minmax")
    _, _, _, _, path = _export(tmp_path / "ckpt", scheme, {"conv2": "fp8_e4m3"})
    _, weights, _ = checkpoint.read_checkpoint(path)
    as_float8 = weights["conv2.weight"].codes.view(torch.float8_e4m3fn).float()
    restored = as_float8 * weights["conv2.weight"].scale
    assert torch.equal(restored, load_quantized(path)["conv2.weight"])


def test_cli_run_with_fp_formats_and_group_scales(tmp_path: Path) -> None:
    """Smoke run of the whole pipeline with an FP candidate set and per-group scales of 32."""
    from lcpaq.cli import main

    checkpoint, data = write_digits_files(tmp_path)
    out = tmp_path / "run"
    args = ["-q", "run", "--model", "demo-digits", "--checkpoint", str(checkpoint)]
    args += ["--calib", str(data), "--eval", str(data), "--normalize", "none"]
    args += ["--num-samples", "32", "--correction-samples", "32", "--sweep-points", "0"]
    args += ["--formats", "int2,int4,fp8_e4m3,fp4_e2m1", "--granularity", "group"]
    # 8 average bits: the 8-bit candidate (fp8_e4m3) has the smallest error in every layer.
    args += ["--group-size", "32", "--budget", "avg-bits=8", "--out", str(out)]
    assert main(args) == 0
    config = json.loads((out / "run_config.json").read_text())
    assert config["analysis"]["formats"] == ["int2", "fp4_e2m1", "int4", "fp8_e4m3"]
    assert config["analysis"]["scheme"]["granularity"] == "group"
    assert config["analysis"]["scheme"]["group_size"] == 32
    manifest = read_manifest(out / "quantized")
    formats = [entry["format"] for entry in manifest["layers"]]
    assert "fp8_e4m3" in formats and set(formats) == set(manifest["formats"])
    for entry in manifest["layers"]:
        assert entry["kind"] == get_format(entry["format"]).kind and entry["group_size"] == 32
    assert manifest["formats"]["fp8_e4m3"]["kind"] == "fp"
    state = load_quantized(out / "quantized")
    assert all(torch.isfinite(tensor).all() for tensor in state.values())
    # Re-allocating to 4 bits reaches the 4-bit candidates (int4 or fp4_e2m1) without re-analysis.
    assert main(["-q", "allocate", str(out), "--budget", "avg-bits=4"]) == 0
    assert main(["-q", "export", str(out)]) == 0
    formats = {entry["format"] for entry in read_manifest(out / "quantized")["layers"]}
    assert formats <= {"int2", "fp4_e2m1", "int4", "fp8_e4m3"} and formats & {"int4", "fp4_e2m1"}


def test_checkpoints_with_unpacked_codes_still_load(tmp_path: Path) -> None:
    """Format lcpaq-quantized/1 stored one code per byte and no code_* fields: read as stored."""
    _, quantized, codes, layers, path = _export(tmp_path / "ckpt", QuantScheme())
    tensors = load_file(str(path / "model.safetensors"))
    manifest = read_manifest(path)
    for entry in manifest["layers"]:
        tensors[entry["weight_key"] + ".qcodes"] = codes[entry["name"]].codes
        for field in ("code_bits", "code_offset", "code_dtype"):
            del entry[field]
    save_file(tensors, str(path / "model.safetensors"))
    (path / "manifest.json").write_text(json.dumps({**manifest, "format": "lcpaq-quantized/1"}))
    loaded = load_quantized(path, TinyConvNet())
    inputs = conv_inputs(4)
    with torch.no_grad():
        assert torch.equal(loaded(inputs), quantized(inputs))


def test_codes_that_do_not_unpack_name_the_layer(tmp_path: Path) -> None:
    _, _, _, _, path = _export(tmp_path / "ckpt", QuantScheme())
    manifest = read_manifest(path)
    manifest["layers"][0]["code_dtype"] = "load"  # untrusted: only int8/uint8 are dtypes here
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="the codes of layer 'conv1' do not unpack"):
        load_quantized(path)
    manifest["layers"][0]["code_dtype"] = "uint8"
    (path / "manifest.json").write_text(json.dumps(manifest))
    tensors = load_file(str(path / "model.safetensors"))
    tensors["conv2.weight.qcodes"] = tensors["conv2.weight.qcodes"][:3]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(InputError, match="the codes of layer 'conv2' do not unpack"):
        load_quantized(path)


# ---------------------------------------------------------------------------------------------
# Formats below two bits.

LEVEL_ASSIGNMENT = {"conv1": "ternary", "conv2": "binary", "fc": "pruned"}


@pytest.mark.parametrize(
    "scheme",
    [
        QuantScheme(),
        QuantScheme(granularity="tensor"),
        QuantScheme(granularity="group", group_size=32),
    ],
    ids=["channel", "tensor", "group32"],
)
def test_ternary_binary_pruned_round_trip_is_exact(tmp_path: Path, scheme: QuantScheme) -> None:
    """load_quantized gives back the exported weights bit for bit; ternary codes take 2 bits,
    binary 1, pruned none (no scale either: the manifest's shape is the layout)."""
    _, quantized, codes, layers, path = _export(tmp_path / "ckpt", scheme, LEVEL_ASSIGNMENT)
    loaded = _loads_back_exactly(path, quantized)
    tensors = load_file(str(path / "model.safetensors"))
    manifest, weights, _ = checkpoint.read_checkpoint(path)
    entries = {entry["name"]: entry for entry in manifest["layers"]}
    by_name = {layer.name: layer for layer in layers}
    for name, format_name in LEVEL_ASSIGNMENT.items():
        key, count = by_name[name].weight_key, by_name[name].num_params
        stored_bits = {"ternary": 2, "binary": 1, "pruned": 0}[format_name]
        assert tensors[key + ".qcodes"].numel() == -(-count * stored_bits // 8)
        assert torch.equal(weights[key].codes, codes[name].codes)
        assert entries[name]["kind"] == format_name and key + ".qzero" not in tensors
    assert set(codes["conv1"].codes.unique().tolist()) <= {-1, 0, 1}
    assert set(codes["conv2"].codes.unique().tolist()) == {-1, 1}
    assert entries["conv2"]["code_step"] == 2 and "code_step" not in entries["conv1"]
    assert tensors["fc.weight.qscale"].numel() == 0
    assert torch.equal(loaded["fc.weight"], torch.zeros_like(loaded["fc.weight"]))


def test_mixed_channel_groups_round_trip_exactly(tmp_path: Path) -> None:
    """A layer with a format per channel group: the manifest lists the groups, each stored under
    <key>.g<i> at its own width, and load_quantized decodes the layer bit for bit."""
    model = make_tiny_conv_net()
    layers = discover_layers(model, conv_inputs(2))
    channels = {layer.name: layer.weight_shape[0] for layer in layers}
    split = channels["conv2"] // 2
    groups = {
        "conv1": [(0, channels["conv1"], "int4")],
        "conv2": [
            (0, split, "ternary"),
            (split, channels["conv2"] - 1, "int3"),
            (channels["conv2"] - 1, channels["conv2"], "pruned"),
        ],
    }
    scheme = QuantScheme()
    quantized, codes = checkpoint.quantize_model_groups(model, layers, groups, scheme)
    path = write_quantized_checkpoint(
        tmp_path / "ckpt", quantized.state_dict(), layers, codes, EXTRA, scheme
    )
    _loads_back_exactly(path, quantized)
    entries = {entry["name"]: entry for entry in read_manifest(path)["layers"]}
    assert entries["conv1"]["format"] == "int4" and "groups" not in entries["conv1"]
    mixed = entries["conv2"]
    assert (mixed["format"], mixed["kind"]) == ("mixed", "mixed")
    assert [group["format"] for group in mixed["groups"]] == ["ternary", "int3", "pruned"]
    assert [group["channels"] for group in mixed["groups"]][0] == [0, split]
    tensors = load_file(str(path / "model.safetensors"))
    fan_in = layers[1].num_params // channels["conv2"]
    assert tensors["conv2.weight.g0.qcodes"].numel() == -(-split * fan_in * 2 // 8)
    assert tensors["conv2.weight.g2.qcodes"].numel() == 0
    assert "conv2.weight.qcodes" not in tensors
