"""ONNX QDQ export in `lcpaq.quant.onnx_qdq`: every weight format decodes bit for bit in ONNX Runtime,
input quantizers round as lcpaq's do, and a mixed checkpoint runs as it does in PyTorch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import TinyConvNet, conv_inputs, make_tiny_conv_net, write_digits_files
from onnx import TensorProto, helper

from lcpaq.errors import InputError
from lcpaq.model.graph import discover_layers
from lcpaq.quant.activations import (
    ActivationQuantizer,
    activation_quantizers,
    attach_activation_quantizers,
)
from lcpaq.quant.checkpoint import load_quantized, quantize_model, write_quantized_checkpoint
from lcpaq.quant.formats import QuantScheme, get_format
from lcpaq.quant.onnx_qdq import (
    ONNX_OPSET,
    check_onnx,
    export_onnx,
    input_quantizer,
    weight_dequantizer,
)
from lcpaq.quant.weights import dequantize_weight, quantize_weight
from lcpaq.sensitivity.activation import activation_sensitivity

pytestmark = pytest.mark.usefixtures("single_thread")

WEIGHT_FORMATS = (
    "int2",
    "int4",
    "int8",
    "fp8_e4m3",
    "fp8_e5m2",
    "fp6_e3m2",
    "fp6_e2m3",
    "fp4_e2m1",
)
WEIGHT_SCHEMES = {
    "asym-tensor": QuantScheme(symmetric=False, granularity="tensor"),
    "sym-tensor": QuantScheme(symmetric=True, granularity="tensor"),
    "asym-channel": QuantScheme(symmetric=False, granularity="channel"),
    "sym-channel": QuantScheme(symmetric=True, granularity="channel"),
    "asym-group32": QuantScheme(symmetric=False, granularity="group", group_size=32),
    "sym-group32": QuantScheme(symmetric=True, granularity="group", group_size=32),
    "mx": QuantScheme(granularity="mx"),
}


def _run(
    initializers: list, nodes: list, output: str, inputs: dict[str, np.ndarray] | None = None
) -> np.ndarray:
    """Run a graph of ``nodes`` in ONNX Runtime and return ``output``."""
    inputs = inputs or {}
    graph = helper.make_graph(
        nodes,
        "test",
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, value.shape)
            for name, value in inputs.items()
        ],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run([output], inputs)[0]


@pytest.mark.parametrize("scheme_name", WEIGHT_SCHEMES)
@pytest.mark.parametrize("format_name", WEIGHT_FORMATS)
def test_weight_dequantizer_decodes_the_codes_exactly(format_name: str, scheme_name: str) -> None:
    """A conv weight whose fan-in (45) leaves a partial block of 32, and a Linear weight: ONNX
    Runtime's DequantizeLinear of the stored codes is `dequantize_weight`, bit for bit."""
    generator = torch.Generator().manual_seed(0)
    fmt, scheme = get_format(format_name), WEIGHT_SCHEMES[scheme_name]
    for shape in ((6, 5, 3, 3), (4, 40)):
        weight = torch.randn(shape, generator=generator) * torch.rand(
            shape[0], *[1] * (len(shape) - 1), generator=generator
        )
        quantized = quantize_weight(weight, fmt, scheme)
        initializers, nodes = weight_dequantizer("layer.weight", quantized)
        decoded = _run(initializers, nodes, "layer.weight")
        assert np.array_equal(decoded, dequantize_weight(quantized).numpy()), shape
        codes = next(tensor for tensor in initializers if tensor.name.endswith("_codes"))
        if fmt.kind == "int":
            expected = TensorProto.INT8 if quantized.zero_point is None else TensorProto.UINT8
        else:
            expected = (
                TensorProto.FLOAT8E5M2 if format_name == "fp8_e5m2" else TensorProto.FLOAT8E4M3FN
            )
        assert codes.data_type == expected
        assert list(codes.dims) == (
            [shape[0], int(np.prod(shape[1:]))]
            if scheme.granularity in ("group", "mx")
            else list(shape)
        )


def test_fp8_weights_keep_their_bit_patterns() -> None:
    weight = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    quantized = quantize_weight(weight, get_format("fp8_e4m3"), QuantScheme())
    initializers, _ = weight_dequantizer("w", quantized)
    codes = next(tensor for tensor in initializers if tensor.name.endswith("_codes"))
    assert codes.raw_data == quantized.codes.to(torch.uint8).numpy().tobytes()


INPUT_QUANTIZERS = [
    ActivationQuantizer("int2", -0.7, 2.1),
    ActivationQuantizer("int4", 0.0, 2.7),
    ActivationQuantizer("int4", -1.5, 1.5, symmetric=True),
    ActivationQuantizer("int6", -2.0, 3.0),
    ActivationQuantizer("int8", -1.3, 5.1),
    ActivationQuantizer("int8", -3.0, 3.0, symmetric=True),
    ActivationQuantizer("fp8_e4m3", -3.0, 7.0),
    ActivationQuantizer("fp8_e5m2", -0.01, 0.02),
    ActivationQuantizer("fp16", 0.0, 0.0),
    ActivationQuantizer("bf16", 0.0, 0.0),
]


@pytest.mark.parametrize(
    "quantizer",
    INPUT_QUANTIZERS,
    ids=lambda q: f"{q.format_name}-{'sym' if q.symmetric else 'asym'}",
)
def test_input_quantizer_rounds_as_lcpaq(quantizer: ActivationQuantizer) -> None:
    """QuantizeLinear → DequantizeLinear (after a Clip for narrow INT) gives the values
    `ActivationQuantizer` gives, bit for bit, in range, out of range and on the grid."""
    generator = torch.Generator().manual_seed(2)
    values = (
        torch.randn(50_000, generator=generator) * 4 * max(quantizer.high - quantizer.low, 1e-3)
    )
    values = torch.cat(
        [values, quantizer(values), torch.tensor([0.0, quantizer.low, quantizer.high])]
    )
    initializers, nodes, output = input_quantizer("x", quantizer, "layer")
    got = _run(initializers, nodes, output, {"x": values.numpy()})
    assert np.array_equal(got, quantizer(values).numpy())


def test_inputs_without_an_onnx_form_are_refused() -> None:
    with pytest.raises(InputError, match="layer 'conv2': fp6_e3m2 inputs have no ONNX form"):
        input_quantizer("x", ActivationQuantizer("fp6_e3m2", -1.0, 1.0), "conv2")


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
        QuantScheme(granularity="mx"),
    ],
    ids=["default", "sym-group32", "mx"],
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
    sensitivity = activation_sensitivity(model, layers, [calib.inputs[:64]], ("int8",))
    quantizers = activation_quantizers(sensitivity, dict.fromkeys(assignment, "int8"))
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
