"""QDQ nodes in `lcpaq.quant.qdq_graph`: every weight format decodes bit for bit in ONNX Runtime,
and input quantizers round as lcpaq's do."""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper

from lcpaq.errors import InputError
from lcpaq.quant.activations import (
    ActivationQuantizer,
)
from lcpaq.quant.formats import QuantScheme, get_format
from lcpaq.quant.qdq_graph import ONNX_OPSET, input_quantizer, weight_dequantizer
from lcpaq.quant.weights import dequantize_weight, quantize_weight

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
