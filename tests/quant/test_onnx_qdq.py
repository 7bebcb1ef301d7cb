"""ONNX QDQ export in `lcpaq.quant.onnx_qdq`: a mixed checkpoint runs in ONNX Runtime as it does in
PyTorch, and what cannot be exported is refused with a reason."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch
from conftest import TinyConvNet, conv_inputs, make_tiny_conv_net, write_digits_files

from lcpaq.errors import InputError
from lcpaq.model.graph import discover_layers
from lcpaq.quant.activations import (
    ActivationQuantizer,
    activation_quantizers,
    attach_activation_quantizers,
    batch_ranges,
)
from lcpaq.quant.checkpoint import load_quantized, quantize_model, write_quantized_checkpoint
from lcpaq.quant.formats import QuantScheme
from lcpaq.quant.onnx_qdq import check_onnx, export_onnx
from lcpaq.sensitivity.activation import activation_sensitivity

pytestmark = pytest.mark.usefixtures("single_thread")


def _checkpoint(
    folder: Path,
    scheme: QuantScheme,
    assignment: dict[str, str],
    input_formats: dict[str, str] | None = None,
) -> tuple[TinyConvNet, Path]:
    """A quantized checkpoint of the tiny conv net, with input quantizers calibrated on its own
    inputs; returns the PyTorch model it describes (weights and input quantizers)."""
    model = make_tiny_conv_net()
    inputs = conv_inputs(64)
    layers = discover_layers(model, inputs[:2])
    quantized, codes = quantize_model(model, layers, assignment, scheme)
    quantizers = {}
    if input_formats:
        formats = tuple(sorted(set(input_formats.values())))
        sensitivity = activation_sensitivity(model, layers, [inputs], formats)
        quantizers = activation_quantizers(sensitivity, input_formats)
    attach_activation_quantizers(quantized, quantizers)
    extra = {"budget": "avg-bits=4", "source_sha256": "0" * 64}
    path = write_quantized_checkpoint(
        folder, quantized.state_dict(), layers, codes, extra, scheme, input_formats, quantizers
    )
    return quantized, path


@pytest.mark.parametrize(
    "scheme",
    [
        QuantScheme(),
        QuantScheme(symmetric=True, granularity="group", group_size=32),
    ],
    ids=["default", "sym-group32"],  # MX decodes through the same blocked DequantizeLinear
)
def test_exported_model_runs_like_pytorch(tmp_path: Path, scheme: QuantScheme) -> None:
    """Mixed INT/FP weights, one layer left in FP32, INT4 and FP8 inputs: ONNX Runtime's
    logits are PyTorch's (the quantized checkpoint loaded back) to float rounding."""
    assignment = {"conv1": "int3", "conv2": "fp4_e2m1"}  # fc stays FP32
    inputs_formats = {"conv1": "int4", "conv2": "fp8_e4m3"}
    _, path = _checkpoint(tmp_path / "ckpt", scheme, assignment, inputs_formats)
    out = export_onnx(TinyConvNet(), path, tmp_path / "model.onnx", conv_inputs(2))
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    operators = [node.op_type for node in proto.graph.node]
    assert operators.count("QuantizeLinear") == 1  # the INT4 input (FP8 is a Cast round trip)
    assert operators.count("DequantizeLinear") == 1 + 2  # and the two weights
    assert "BatchNormalization" in operators  # the corrected statistics stay a node
    names = {tensor.name for tensor in proto.graph.initializer}
    assert "fc.weight" in names and "conv1.weight" not in names
    assert not any(node.metadata_props for node in proto.graph.node)
    torch_model = load_quantized(path, TinyConvNet())
    labels = torch.arange(40) % 3
    check = check_onnx(out, torch_model, conv_inputs(40, seed=5), labels, batch_size=16)
    assert check.images == 40 and check.top1_agreement == 1.0
    assert check.max_abs_logit_difference < 1e-4
    assert check.onnx_top1 == check.torch_top1
    # Any batch size: the batch dimension is dynamic.
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    single = session.run(None, {session.get_inputs()[0].name: conv_inputs(1).numpy()})[0]
    assert single.shape == (1, 3)


def test_export_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, path = _checkpoint(tmp_path / "ckpt", QuantScheme(), {"conv1": "int4"})
    with pytest.raises(InputError, match="does not fit the model"):
        export_onnx(
            torch.nn.Sequential(torch.nn.Linear(2, 2)), path, tmp_path / "m.onnx", conv_inputs(2)
        )
    assert not (tmp_path / "m.onnx").exists()

    class DataDependent(TinyConvNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # control flow on values: torch.export refuses it
                return super().forward(x)
            return -super().forward(x)

    with pytest.raises(InputError, match="torch.onnx cannot export DataDependent"):
        export_onnx(DataDependent(), path, tmp_path / "m.onnx", conv_inputs(2))
    assert not (tmp_path / "m.onnx").exists()
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if it were not installed
    with pytest.raises(InputError, match=r"pip install 'lcpaq\[onnx\]'"):
        export_onnx(TinyConvNet(), path, tmp_path / "m.onnx", conv_inputs(2))
    with pytest.raises(InputError, match="manifest.json is missing"):
        monkeypatch.delitem(sys.modules, "onnxscript")
        export_onnx(TinyConvNet(), tmp_path, tmp_path / "m.onnx", conv_inputs(2))


def test_cli_onnx_on_a_run_folder(tmp_path: Path) -> None:
    """``lcpaq onnx RUN --eval`` after ``lcpaq run``: the file beside the checkpoint, the check in
    onnx.json, top-1 equal to PyTorch's and to evaluation.json's."""
    from lcpaq.cli import main

    checkpoint, data = write_digits_files(tmp_path)
    out = tmp_path / "run"
    args = ["-q", "run", "--model", "demo-digits", "--checkpoint", str(checkpoint)]
    args += ["--calib", str(data), "--eval", str(data), "--normalize", "none"]
    args += ["--num-samples", "32", "--correction-samples", "32", "--sweep-points", "0"]
    args += ["--act-formats", "int4,int8", "--budget", "avg-bits=4", "--out", str(out)]
    assert main(args) == 0
    assert main(["-q", "onnx", str(out), "--eval", str(data), "--images", "48"]) == 0
    result = json.loads((out / "onnx.json").read_text())
    assert Path(result["onnx"]) == out / "quantized" / "model.onnx"
    assert result["images"] == 48 and result["top1_agreement"] == 1.0
    assert result["onnx_top1"] == result["torch_top1"]
    report = (out / "report.md").read_text()
    assert "## ONNX" in report and "top-1 agreement 100.00 %" in report
    assert main(["-q", "onnx", str(out), "--images", "0"]) == 2


@pytest.mark.slow  # ~25 s: the only export of a real checkpoint (padded shortcuts, corrected BN)
def test_resnet20_runs_like_pytorch(shared_dir: Path, tmp_path: Path) -> None:
    """The real ResNet20 (parameter-free padded shortcuts, corrected BatchNorm): INT4 weights and
    INT8 inputs on every layer export, and ONNX Runtime classifies 128 test images as PyTorch
    does."""
    from conftest import RESNET20_CHECKPOINT

    from lcpaq.model.data import load_dataset
    from lcpaq.model.zoo import build_model, load_model

    model = load_model("cifar-resnet", shared_dir / RESNET20_CHECKPOINT)
    calib = load_dataset(shared_dir / "data/cifar10_train_subset.npz", num_classes=10)
    test = load_dataset(shared_dir / "data/cifar10_test.npz", num_classes=10).subset(0, 128)
    layers = discover_layers(model, calib.inputs[:2])
    assignment = {layer.name: "int4" for layer in layers}
    quantized, codes = quantize_model(model, layers, assignment, QuantScheme())
    # Min-max input ranges, as `analyze --act-formats int8` calibrates them (without its curvature
    # passes, which cost ~20 s here and do not change the ranges).
    low, high, _ = batch_ranges(model, layers, calib.inputs[:64])
    quantizers = {
        layer.name: ActivationQuantizer("int8", float(low[row]), float(high[row]))
        for row, layer in enumerate(layers)
    }
    extra = {"budget": "avg-bits=4", "source_sha256": "0" * 64}
    path = write_quantized_checkpoint(
        tmp_path / "ckpt",
        quantized.state_dict(),
        layers,
        codes,
        extra,
        QuantScheme(),
        dict.fromkeys(assignment, "int8"),
        quantizers,
    )
    skeleton = build_model("cifar-resnet", model.state_dict())
    out = export_onnx(skeleton, path, tmp_path / "r20.onnx", test.inputs[:2])
    check = check_onnx(out, load_quantized(path, skeleton), test.inputs, test.labels)
    assert check.top1_agreement == 1.0 and check.onnx_top1 == check.torch_top1
    assert check.torch_top1 > 0.8


def test_encoder_with_token_inputs_runs_like_pytorch(tmp_path: Path) -> None:
    """A BERT encoder behind lcpaq's wrapper (one int64 [N, 2, T] input: ids and mask): INT4
    weights and one INT8 layer input as QDQ nodes; ONNX Runtime gives PyTorch's hidden states on
    padded batches of another length (batch and token axes are dynamic). BERT's pooler, whose
    output the wrapper does not use, is not in the graph and is left out."""
    from hf_models import Wrapped, linear_layers, quantize_in_place, tiny_model, token_ids

    wrapper = Wrapped(tiny_model("bert"))
    layers = linear_layers(wrapper)
    scheme = QuantScheme()
    codes = quantize_in_place(wrapper, layers, {layer.name: "int4" for layer in layers}, scheme)
    query = "model.encoder.layer.0.attention.self.query"
    quantizers = {query: ActivationQuantizer("int8", -4.0, 4.0)}
    path = write_quantized_checkpoint(
        tmp_path / "ckpt",
        wrapper.state_dict(),
        layers,
        codes,
        {},
        scheme,
        activation_quantizers=quantizers,
    )

    def tokens(count: int, length: int, seed: int) -> torch.Tensor:
        ids = token_ids(count, length, seed)
        mask = torch.ones_like(ids)
        mask[0, length // 2 :] = 0  # a padded sequence
        return torch.stack([ids, mask], 1)

    out = export_onnx(
        Wrapped(tiny_model("bert", seed=2)), path, tmp_path / "m.onnx", tokens(2, 8, 1)
    )
    proto = onnx.load(str(out))
    operators = [node.op_type for node in proto.graph.node]
    assert operators.count("DequantizeLinear") == len(layers) - 1 + 1  # weights but the pooler's
    assert operators.count("QuantizeLinear") == 1
    assert proto.doc_string.endswith("; 1 layers unused by the graph left out")
    torch_model = load_quantized(path, Wrapped(tiny_model("bert", seed=3)))
    check = check_onnx(out, torch_model, tokens(5, 12, 4))
    assert check.images == 5
    assert check.max_abs_logit_difference < 1e-2  # float rounding, at most one INT8 input step
    assert check.mean_abs_logit_difference < 1e-3


def test_ternary_binary_pruned_weights_run_like_pytorch(tmp_path: Path) -> None:
    """Ternary and binary codes travel as int8 codes of DequantizeLinear, a pruned weight as int8
    zeros; ONNX Runtime's logits are those of the checkpoint loaded back in PyTorch."""
    assignment = {"conv1": "ternary", "conv2": "binary", "fc": "pruned"}
    scheme = QuantScheme(granularity="group", group_size=32)
    _, path = _checkpoint(tmp_path / "ckpt", scheme, assignment, {"conv2": "int8"})
    out = export_onnx(TinyConvNet(), path, tmp_path / "model.onnx", conv_inputs(2))
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    assert [node.op_type for node in proto.graph.node].count("DequantizeLinear") == 1 + 3
    codes = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert set(codes["conv1.weight_quantized_codes"].ravel().tolist()) <= {-1, 0, 1}
    assert set(codes["conv2.weight_quantized_codes"].ravel().tolist()) == {-1, 1}
    assert not codes["fc.weight_quantized_codes"].any()
    assert codes["conv1.weight_quantized_codes"].dtype.name == "int8"
    torch_model = load_quantized(path, TinyConvNet())
    check = check_onnx(out, torch_model, conv_inputs(40, seed=5), torch.arange(40) % 3)
    assert check.top1_agreement == 1.0 and check.max_abs_logit_difference < 1e-4


def test_mixed_channel_groups_run_like_pytorch(tmp_path: Path) -> None:
    """One DequantizeLinear per channel group, concatenated: ONNX Runtime's logits are those of
    the checkpoint loaded back in PyTorch."""
    from lcpaq.quant.checkpoint import quantize_model_groups

    model = make_tiny_conv_net()
    layers = discover_layers(model, conv_inputs(2))
    rows = {layer.name: layer.weight_shape[0] for layer in layers}
    groups = {
        "conv1": [(0, 2, "int8"), (2, rows["conv1"], "ternary")],
        "conv2": [(0, 3, "binary"), (3, 5, "pruned"), (5, rows["conv2"], "int4")],
    }
    scheme = QuantScheme(granularity="group", group_size=32)
    quantized, codes = quantize_model_groups(model, layers, groups, scheme)
    extra = {"budget": "avg-bits=2", "source_sha256": "0" * 64}
    path = write_quantized_checkpoint(
        tmp_path / "ckpt", quantized.state_dict(), layers, codes, extra, scheme
    )
    out = export_onnx(TinyConvNet(), path, tmp_path / "model.onnx", conv_inputs(2))
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    operators = [node.op_type for node in proto.graph.node]
    assert operators.count("DequantizeLinear") == 5 and operators.count("Concat") >= 2
    torch_model = load_quantized(path, TinyConvNet())
    check = check_onnx(out, torch_model, conv_inputs(40, seed=5), torch.arange(40) % 3)
    assert check.top1_agreement == 1.0 and check.max_abs_logit_difference < 1e-4
