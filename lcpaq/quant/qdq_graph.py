"""A quantized checkpoint's layers as ONNX QDQ nodes: the graph rewrite behind `export_onnx`.

`quantize_graph` rewrites an exported FP32 graph (`lcpaq.quant.onnx_qdq.export_onnx`) into the QDQ
form that ONNX Runtime and TensorRT turn into integer kernels:

* each quantized layer's float weight becomes the checkpoint's own codes (not re-rounded) feeding
  a DequantizeLinear (`weight_dequantizer`):
  - INT codes as int8 (symmetric, and INT under MX) or uint8 with a uint8 zero point
    (asymmetric); INT2 … INT8 all fit; ternary (−1, 0, 1) and binary (±1) codes as int8 with
    their scales; a pruned weight as int8 zeros under a scale of 1 (a constant zero weight that
    a graph optimiser can fold; the manifest says which layers to drop); a layer with a format
    per channel group (`lcpaq.quant.mixed`) as one DequantizeLinear per group and a Concat
    along the output channels;
  - FP8 codes as FLOAT8E4M3FN / FLOAT8E5M2, the same bit patterns;
  - FP6 / FP4 codes re-encoded as FLOAT8E4M3FN, which holds every FP6 and FP4 value exactly
    (ONNX has no FP6 type and ONNX Runtime no FLOAT4E2M1 DequantizeLinear kernel): the same
    values, stored in 8 bits;
  - scales: a scalar per tensor, axis 0 per channel, and per group or MX block a blocked
    DequantizeLinear (opset 21) along the flattened fan-in followed by a Reshape; MX exponents
    become their float32 powers of two (INT under MX folds its 2^-(bits-2) into them);
* each layer whose input the checkpoint quantizes gets QuantizeLinear → DequantizeLinear in front
  of it (`input_quantizer`), with the scale and zero point
  `lcpaq.quant.activations.fake_quantize_activation` uses: INT inputs to uint8 (int8 when
  symmetric), after a Clip where the format has fewer codes than the type (INT2 … INT7, and -128
  for symmetric INT8). FP8 inputs get the same arithmetic as a saturating Cast round trip instead
  (see `input_quantizer` for why), FP16/BF16 inputs a Cast round trip. FP6/FP4 inputs have no
  ONNX form and are refused, naming the layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lcpaq.errors import InputError
from lcpaq.quant.activations import (
    FLOAT_ACTIVATIONS,
    ActivationQuantizer,
    activation_scale_and_zero,
)
from lcpaq.quant.formats import code_range, get_format
from lcpaq.quant.grids import fp_decode
from lcpaq.quant.mixed import MixedWeight
from lcpaq.quant.weights import QuantizedWeight, decoded_scale

if TYPE_CHECKING:
    import onnx

#: Blocked DequantizeLinear (per-group scales) needs opset 21.
ONNX_OPSET = 21
#: Nodes whose first input is the data a layer's weight multiplies.
_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm")


def _fp8_type(name: str) -> int:
    from onnx import TensorProto

    return {"fp8_e4m3": TensorProto.FLOAT8E4M3FN, "fp8_e5m2": TensorProto.FLOAT8E5M2}[name]


# ---------------------------------------------------------------------------------------------
# Weights: codes + DequantizeLinear.


def _element_tensor(name: str, quantized: QuantizedWeight) -> onnx.TensorProto:
    """The codes as an ONNX tensor of their element type (see the module docstring)."""
    from onnx import helper, numpy_helper

    fmt = get_format(quantized.format_name)
    codes = quantized.codes.cpu()
    if fmt.kind != "fp":  # INT, ternary (−1, 0, 1), binary (±1), pruned (0)
        dtype = torch.int8 if quantized.zero_point is None else torch.uint8
        return numpy_helper.from_array(codes.to(dtype).numpy(), name)
    if fmt.name in ("fp8_e4m3", "fp8_e5m2"):
        patterns = codes.to(torch.uint8)
        element_type = _fp8_type(fmt.name)
    else:  # FP6/FP4: every value is an E4M3 value; re-encode exactly
        values = fp_decode(codes, fmt)
        patterns = values.to(torch.float8_e4m3fn).view(torch.uint8)
        if not torch.equal(patterns.view(torch.float8_e4m3fn).float(), values):
            raise AssertionError(f"{fmt.name} values are not all FP8 E4M3 values")
        element_type = _fp8_type("fp8_e4m3")
    return helper.make_tensor(
        name, element_type, list(codes.shape), patterns.numpy().tobytes(), raw=True
    )


def weight_dequantizer(
    weight_name: str, quantized: QuantizedWeight
) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """Initializers and nodes whose output, named ``weight_name``, is the decoded weight."""
    from onnx import helper, numpy_helper

    fmt = get_format(quantized.format_name)
    if fmt.kind == "pruned":  # zero codes under one scale: DequantizeLinear needs a scale
        quantized = replace(quantized, scale=torch.ones(1), granularity="tensor")
    shape = list(quantized.codes.shape)
    scale = decoded_scale(quantized).cpu()
    if fmt.kind == "int" and quantized.granularity == "mx":
        scale = scale * 2.0 ** -(fmt.bits - 2)  # a power of two: exact
    zero = quantized.zero_point
    attributes: dict[str, Any] = {}
    codes = quantized.codes
    blocked = quantized.granularity in ("group", "mx")
    if blocked:  # blocks run along each output channel's flattened fan-in
        codes = codes.reshape(shape[0], -1)
        attributes = {"axis": 1, "block_size": int(quantized.group_size or 0)}
    elif quantized.granularity == "channel":
        attributes = {"axis": 0}
    else:
        scale = scale.reshape(())
        zero = zero.reshape(()) if zero is not None else None
    prefix = f"{weight_name}_quantized"
    initializers = [
        _element_tensor(f"{prefix}_codes", replace(quantized, codes=codes)),
        numpy_helper.from_array(scale.float().numpy(), f"{prefix}_scale"),
    ]
    inputs = [f"{prefix}_codes", f"{prefix}_scale"]
    if zero is not None:
        if int(zero.min()) < 0 or int(zero.max()) > 255:
            raise InputError(f"{weight_name}: zero points outside uint8 cannot be exported")
        initializers.append(numpy_helper.from_array(zero.to(torch.uint8).numpy(), f"{prefix}_zero"))
        inputs.append(f"{prefix}_zero")
    decoded = f"{prefix}_decoded" if blocked and len(shape) != 2 else weight_name
    nodes = [helper.make_node("DequantizeLinear", inputs, [decoded], **attributes)]
    if decoded != weight_name:
        initializers.append(numpy_helper.from_array(np.array(shape, np.int64), f"{prefix}_shape"))
        nodes.append(helper.make_node("Reshape", [decoded, f"{prefix}_shape"], [weight_name]))
    return initializers, nodes


# ---------------------------------------------------------------------------------------------
# Layer inputs: QuantizeLinear → DequantizeLinear.


def input_quantizer(
    input_name: str, quantizer: ActivationQuantizer, layer: str
) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto], str]:
    """Initializers, nodes and the output name of ``quantizer`` applied to ``input_name``."""
    from onnx import TensorProto, helper, numpy_helper

    prefix = f"{layer}.input_quantized"
    name = quantizer.format_name
    if name in FLOAT_ACTIVATIONS:  # a float16 / bfloat16 round trip
        low_precision = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}[name]
        nodes = [
            helper.make_node("Cast", [input_name], [f"{prefix}_cast"], to=low_precision),
            helper.make_node("Cast", [f"{prefix}_cast"], [prefix], to=TensorProto.FLOAT),
        ]
        return [], nodes, prefix
    fmt = get_format(name)
    scale, zero = activation_scale_and_zero(
        fmt, quantizer.low, quantizer.high, symmetric=quantizer.symmetric
    )
    initializers = [numpy_helper.from_array(np.array(scale, np.float32), f"{prefix}_scale")]
    nodes = []
    source = input_name
    if fmt.kind == "fp":
        if name not in ("fp8_e4m3", "fp8_e5m2"):
            raise InputError(
                f"layer {layer!r}: {name} inputs have no ONNX form (FP8, INT and FP16/BF16 do)"
            )
        # x / s, a saturating Cast to FP8 and back, times s: QuantizeLinear's arithmetic, but
        # not its node: ONNX Runtime (1.32, default optimisation level) fuses a Relu into a
        # following FP8 QuantizeLinear as if FP8 saturated at zero, and negative inputs leak.
        nodes = [
            helper.make_node("Div", [input_name, f"{prefix}_scale"], [f"{prefix}_scaled"]),
            helper.make_node(
                "Cast", [f"{prefix}_scaled"], [f"{prefix}_codes"], to=_fp8_type(name), saturate=1
            ),
            helper.make_node("Cast", [f"{prefix}_codes"], [f"{prefix}_grid"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{prefix}_grid", f"{prefix}_scale"], [prefix]),
        ]
        return initializers, nodes, prefix
    qmin, qmax = code_range(fmt, quantizer.symmetric)
    dtype = np.int8 if quantizer.symmetric else np.uint8
    initializers.append(numpy_helper.from_array(np.array(zero, dtype), f"{prefix}_zero"))
    if (qmin, qmax) != (np.iinfo(dtype).min, np.iinfo(dtype).max):
        # Clipping to the codes' range first makes the type's saturation the format's.
        bounds = np.array([(qmin - zero) * scale, (qmax - zero) * scale], np.float32)
        initializers += [
            numpy_helper.from_array(bounds[0], f"{prefix}_low"),
            numpy_helper.from_array(bounds[1], f"{prefix}_high"),
        ]
        nodes.append(
            helper.make_node(
                "Clip", [input_name, f"{prefix}_low", f"{prefix}_high"], [f"{prefix}_clipped"]
            )
        )
        source = f"{prefix}_clipped"
    parameters = [f"{prefix}_scale", f"{prefix}_zero"]
    nodes += [
        helper.make_node("QuantizeLinear", [source, *parameters], [f"{prefix}_codes"]),
        helper.make_node("DequantizeLinear", [f"{prefix}_codes", *parameters], [prefix]),
    ]
    return initializers, nodes, prefix


def _data_input(graph: onnx.GraphProto, weight_name: str, layer: str) -> tuple[Any, int]:
    """The node that multiplies ``weight_name`` with the layer's input, and that input's index
    (through a Transpose of the weight, as a Linear may be exported)."""
    consumers = [node for node in graph.node if weight_name in node.input]
    for node in consumers:
        if node.op_type in _WEIGHTED_OPS and node.input[1] == weight_name:
            return node, 0
        if node.op_type == "MatMul":
            return node, 1 - list(node.input).index(weight_name)
        if node.op_type == "Transpose":
            return _data_input(graph, node.output[0], layer)
    raise InputError(
        f"layer {layer!r}: no Conv, Gemm or MatMul node of the exported graph uses {weight_name!r}"
    )


# ---------------------------------------------------------------------------------------------
# The whole model.


def mixed_dequantizer(
    weight_name: str, mixed: MixedWeight
) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """A layer with a format per channel group: each group's DequantizeLinear (its own codes,
    scales and zero points, `weight_dequantizer`), then a Concat along the output channels."""
    from onnx import helper

    initializers: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    outputs = []
    for index, part in enumerate(mixed.parts):
        name = f"{weight_name}_g{index}"
        part_initializers, part_nodes = weight_dequantizer(name, part)
        initializers += part_initializers
        nodes += part_nodes
        outputs.append(name)
    nodes.append(helper.make_node("Concat", outputs, [weight_name], axis=0))
    return initializers, nodes


def _codes_shape(quantized: QuantizedWeight | MixedWeight) -> list[int]:
    if isinstance(quantized, MixedWeight):
        shapes = [list(part.codes.shape) for part in quantized.parts]
        return [sum(shape[0] for shape in shapes), *shapes[0][1:]]
    return list(quantized.codes.shape)


def quantize_graph(
    model: onnx.ModelProto,
    weights: Mapping[str, tuple[str, QuantizedWeight | MixedWeight]],
    quantizers: Mapping[str, ActivationQuantizer],
) -> onnx.ModelProto:
    """Rewrite an exported FP32 graph in place: ``weights`` maps a layer to (its weight's
    initializer name, its codes); ``quantizers`` maps a layer to its input quantizer."""
    graph = model.graph
    by_name = {tensor.name: tensor for tensor in graph.initializer}
    new_nodes = []
    for layer, (weight_name, quantized) in weights.items():
        stored = by_name.get(weight_name)
        if stored is None:
            raise InputError(f"layer {layer!r}: the exported graph has no weight {weight_name!r}")
        if list(stored.dims) != _codes_shape(quantized):
            raise InputError(
                f"layer {layer!r}: exported weight shape {list(stored.dims)} != checkpoint codes "
                f"{_codes_shape(quantized)}"
            )
        if isinstance(quantized, MixedWeight):
            initializers, nodes = mixed_dequantizer(weight_name, quantized)
        else:
            initializers, nodes = weight_dequantizer(weight_name, quantized)
        graph.initializer.remove(stored)
        graph.initializer.extend(initializers)
        new_nodes += nodes
    for layer, quantizer in quantizers.items():
        weight_name = weights[layer][0] if layer in weights else f"{layer}.weight"
        node, index = _data_input(graph, weight_name, layer)
        initializers, nodes, output = input_quantizer(node.input[index], quantizer, layer)
        graph.initializer.extend(initializers)
        new_nodes += nodes
        node.input[index] = output
    # Dequantization first: every new node reads initializers or tensors made before its
    # consumer, and the checker wants the nodes in topological order.
    ordered = _topological(list(new_nodes) + list(graph.node), graph)
    del graph.node[:]
    graph.node.extend(ordered)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, ONNX_OPSET)
    return model


def _topological(nodes: list[Any], graph: Any) -> list[Any]:
    available = {tensor.name for tensor in graph.initializer} | {
        value.name for value in graph.input
    }
    available.add("")  # an omitted optional input
    ordered, pending = [], nodes
    while pending:
        ready = [node for node in pending if all(name in available for name in node.input)]
        if not ready:
            raise InputError(
                f"the exported graph has a cycle or a missing input at {pending[0].name!r}"
            )
        for node in ready:
            available.update(node.output)
        ordered += ready
        ready_ids = {id(node) for node in ready}
        pending = [node for node in pending if id(node) not in ready_ids]
    return ordered
