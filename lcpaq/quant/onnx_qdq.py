"""A quantized checkpoint as an ONNX QDQ model, checked with ONNX Runtime (the ``onnx`` step after
the export stage).

Deployment runtimes read ONNX, not lcpaq's safetensors layout. `export_onnx` exports the
architecture with `torch.onnx.export` (the dynamo exporter, without its graph optimiser, so every
weight keeps its state-dict name and BatchNorm stays a node whose statistics are the corrected
ones), then rewrites the graph into the QDQ form (`lcpaq.quant.qdq_graph.quantize_graph`: the
checkpoint's own codes behind DequantizeLinear, QuantizeLinear → DequantizeLinear on quantized
layer inputs).

`check_onnx` runs the file in ONNX Runtime next to the PyTorch model `load_quantized` builds from
the same checkpoint and reports how far their outputs are apart.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lcpaq import runfolder
from lcpaq.errors import InputError
from lcpaq.quant.checkpoint import (
    decoded_state_dict,
    manifest_activation_quantizers,
    read_checkpoint,
)
from lcpaq.quant.qdq_graph import ONNX_OPSET, quantize_graph

#: What ``pip install`` needs for this stage (an extra: most users never export to ONNX).
_MISSING = "ONNX export needs onnx, onnxruntime and onnxscript: pip install 'lcpaq[onnx]'"


def _onnx() -> Any:
    try:
        import onnx
        import onnxscript  # noqa: F401 - torch.onnx's dynamo exporter imports it
    except ImportError as error:
        raise InputError(f"{_MISSING} ({error})") from None
    return onnx


def export_onnx(
    model: nn.Module, checkpoint_dir: Path, out_path: Path, example: torch.Tensor
) -> Path:
    """Write ``checkpoint_dir`` (an lcpaq quantized checkpoint of ``model``'s architecture) as an
    ONNX QDQ model at ``out_path`` (atomically); ``example`` is one input batch (any batch size:
    the batch dimension stays dynamic, and so does the token axis of a token model's int64
    [N, 2, T] input). ``model`` is left holding the checkpoint's decoded weights, without its
    input quantizers (they are graph nodes here, hooks in PyTorch). Layers whose weight the
    exported graph does not hold (their output is unused, as BERT's pooler under mean pooling)
    are left out."""
    onnx = _onnx()
    manifest, codes, others = read_checkpoint(checkpoint_dir)
    layer_of = {entry["weight_key"]: entry["name"] for entry in manifest["layers"]}
    weights = {layer_of[key]: (key, quantized) for key, quantized in codes.items()}
    quantizers = manifest_activation_quantizers(manifest, checkpoint_dir / "manifest.json")
    from lcpaq.model.zoo import load_state_dict_strict

    load_state_dict_strict(
        model, decoded_state_dict(codes, others, manifest), f"quantized checkpoint {checkpoint_dir}"
    )
    model = model.eval()
    dynamic_axes = {0: torch.export.Dim("batch", min=1)}
    if not example.is_floating_point() and example.dim() == 3:
        dynamic_axes[2] = torch.export.Dim("tokens", min=2)
    try:
        exported = torch.onnx.export(
            model,
            (example[:2] if len(example) > 1 else example,),
            dynamo=True,
            optimize=False,  # the optimiser folds BatchNorm into the weights we replace
            opset_version=ONNX_OPSET,
            dynamic_shapes=(dynamic_axes,),
            input_names=["input"],
            output_names=["logits"],
            verbose=False,
        )
    except Exception as error:  # noqa: BLE001 - the exporter raises many types for models it cannot trace
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(
            f"torch.onnx cannot export {type(model).__name__} for {checkpoint_dir}: {reason}"
        ) from None
    assert exported is not None  # the dynamo exporter always returns a program
    in_graph = {tensor.name for tensor in exported.model_proto.graph.initializer}
    unused = [layer for layer, (key, _) in weights.items() if key not in in_graph]
    if weights and len(unused) == len(weights):
        raise InputError(
            f"the exported graph of {checkpoint_dir} holds none of the checkpoint's weights "
            f"(first: {next(iter(weights.values()))[0]!r})"
        )
    weights = {layer: weight for layer, weight in weights.items() if layer not in unused}
    quantizers = {
        layer: quantizer for layer, quantizer in quantizers.items() if layer not in unused
    }
    proto = quantize_graph(exported.model_proto, weights, quantizers)
    for node in proto.graph.node:  # the exporter's debug records (stack traces): half the file
        del node.metadata_props[:]
    proto.doc_string = (
        f"lcpaq quantized checkpoint {checkpoint_dir.name}: QDQ weights of "
        f"{len(weights)} layers, quantized inputs of {len(quantizers)}"
        + (f"; {len(unused)} layers unused by the graph left out" if unused else "")
    )
    onnx.checker.check_model(proto)
    with runfolder.atomic_path(out_path) as temp:
        onnx.save(proto, str(temp))
    return out_path


# ---------------------------------------------------------------------------------------------
# The check.


@dataclass(frozen=True)
class OnnxCheck:
    """ONNX Runtime's outputs next to PyTorch's on the same images."""

    images: int
    #: Largest and mean |logit difference| over all images and classes (with quantized inputs,
    #: a different summation order can move a value across a rounding boundary: one code step).
    max_abs_logit_difference: float
    mean_abs_logit_difference: float
    #: Fraction of images whose top-1 class agrees.
    top1_agreement: float
    onnx_top1: float | None
    torch_top1: float | None
    onnx_seconds: float
    torch_seconds: float
    provider: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def check_onnx(
    path: Path,
    torch_model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    batch_size: int = 256,
) -> OnnxCheck:
    """Run ``path`` in ONNX Runtime (CPU) and ``torch_model`` on ``inputs``, batch by batch."""
    _onnx()
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    onnx_logits, torch_logits = [], []
    onnx_seconds = torch_seconds = 0.0
    torch_model = torch_model.eval()
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start : start + batch_size]
        began = time.perf_counter()
        # Token models take their int64 ids and mask as they are.
        feed = batch.float() if batch.is_floating_point() else batch
        onnx_logits.append(session.run(None, {input_name: feed.numpy()})[0])
        onnx_seconds += time.perf_counter() - began
        began = time.perf_counter()
        with torch.no_grad():
            torch_logits.append(torch_model(batch).float().numpy())
        torch_seconds += time.perf_counter() - began
    ours, theirs = np.concatenate(torch_logits), np.concatenate(onnx_logits)
    if ours.shape != theirs.shape:
        raise InputError(f"{path}: ONNX outputs {theirs.shape}, PyTorch {ours.shape}")

    def top1(logits: np.ndarray) -> float | None:
        if labels is None:
            return None
        return float((logits.argmax(1) == labels.numpy()).mean())

    return OnnxCheck(
        images=len(inputs),
        max_abs_logit_difference=float(np.abs(ours - theirs).max()) if len(ours) else 0.0,
        mean_abs_logit_difference=float(np.abs(ours - theirs).mean()) if len(ours) else 0.0,
        top1_agreement=float((ours.argmax(1) == theirs.argmax(1)).mean()) if len(ours) else 1.0,
        onnx_top1=top1(theirs),
        torch_top1=top1(ours),
        onnx_seconds=onnx_seconds,
        torch_seconds=torch_seconds,
        provider="CPUExecutionProvider",
    )
