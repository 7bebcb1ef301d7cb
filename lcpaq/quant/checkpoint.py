"""Quantize a model to an allocation and write or read the quantized checkpoint: the core of the
export stage, the only stage that changes a model (input: the model, its layers and the allocation's
layer → format assignment; output: the checkpoint folder below).

Output folder (written to a temporary folder, then renamed into place, so an interrupted export never
leaves a partial checkpoint):

* ``model.safetensors``: for each quantized layer ``<weight_key>.qcodes`` (weight-shaped: int8
  symmetric INT, uint8 asymmetric INT, uint8 bit patterns for FP formats, int8 −1/0/1 ternary in 2
  bits, ±1 binary in 1 bit, nothing for pruned), ``<weight_key>.qscale`` (float32 [1] per tensor,
  [C_out] per channel, [C_out, groups] per group; uint8 E8M0 exponents [C_out, blocks] for MX;
  empty for pruned: its manifest entry's shape is all that is stored) and, for asymmetric INT, ``<weight_key>.qzero`` (int16, the scale's shape);
  every other tensor of the state dict as it is (including BatchNorm statistics after correction).
  A tensor held under several keys (a tied embedding and LM head) is stored once
  (`lcpaq.quant.state_keys.tied_aliases`): one tensor, one format.
* ``manifest.json``: every quantized layer with its state-dict name, weight format, activation
  format (the activation half of its candidate, what the cost models counted), activation
  quantizer (format and calibration range of the layer's input, or null where activations stay
  FP32: runs without ``--act-formats``, whose cost models assume 8 bits, and fp32 candidates), kind
  (int/fp/ternary/binary/pruned), bits, granularity and group size, and ``transposed: true`` where the module stores the
  weight in×out (transformers ``Conv1D``: codes are out×in); ``tied`` (alias key → stored key)
  where tensors are tied; totals (average bits, size in bytes), the budget, the
  source checkpoint's sha256, the lcpaq version. `lcpaq.quant.weights.dequantize_weight` decodes every
  weight; `load_quantized` puts the activation quantizers back as forward pre-hooks.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lcpaq import __version__
from lcpaq.errors import InputError
from lcpaq.model.graph import LayerInfo, failing_layer, weight_of
from lcpaq.quant.activations import ActivationQuantizer
from lcpaq.quant.checkpoint_read import (
    CHECKPOINT_FORMAT,
    CODES_SUFFIX,
    READABLE_FORMATS,
    SCALE_SUFFIX,
    ZERO_SUFFIX,
    LayerCodes,
    decoded_state_dict,
    group_prefix,
    load_quantized,
    manifest_activation_quantizers,
    read_checkpoint,
    read_manifest,
)
from lcpaq.quant.formats import QuantScheme, get_format
from lcpaq.quant.mixed import MixedWeight, Span, dequantize_mixed, quantize_mixed
from lcpaq.quant.state_keys import stores_transposed, tied_aliases
from lcpaq.quant.weights import (
    QuantizedWeight,
    code_offset,
    code_step,
    dequantize_weight,
    pack_codes,
    quantize_weight,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "READABLE_FORMATS",
    "LayerCodes",
    "decoded_state_dict",
    "load_quantized",
    "manifest_activation_quantizers",
    "quantize_model",
    "quantize_model_groups",
    "read_checkpoint",
    "read_manifest",
    "write_quantized_checkpoint",
]


def quantize_model(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    assignment: Mapping[str, str],
    scheme: QuantScheme,
    input_hessians: Mapping[str, torch.Tensor] | None = None,
) -> tuple[nn.Module, dict[str, QuantizedWeight]]:
    """A copy of ``model`` whose assigned layers hold dequantized weights, and the codes of each
    (``input_hessians``: per-layer input second moments, for ``scheme.rounding == "gptq"``)."""
    quantized_model = copy.deepcopy(model).eval()
    codes: dict[str, QuantizedWeight] = {}
    with torch.no_grad():
        for layer in layers:
            if layer.name not in assignment:
                continue
            weight = weight_of(quantized_model, layer)
            hessian = input_hessians.get(layer.name) if input_hessians else None
            with failing_layer(layer.name, layer.kind, "quantizing"):
                fmt = get_format(assignment[layer.name])
                quantized = quantize_weight(weight, fmt, scheme, hessian)
            weight.copy_(dequantize_weight(quantized, weight.dtype))
            codes[layer.name] = quantized
    return quantized_model, codes


def quantize_model_groups(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    groups: Mapping[str, Sequence[Span]],
    scheme: QuantScheme,
    input_hessians: Mapping[str, torch.Tensor] | None = None,
) -> tuple[nn.Module, dict[str, LayerCodes]]:
    """`quantize_model` with a format per span of output channels (``groups[layer]``: (c0, c1,
    format) spans tiling the layer's channels; one span is a plain one-format layer)."""
    quantized_model = copy.deepcopy(model).eval()
    codes: dict[str, LayerCodes] = {}
    with torch.no_grad():
        for layer in layers:
            if layer.name not in groups:
                continue
            if stores_transposed(layer.kind):
                raise InputError(f"layer {layer.name!r}: channel groups of in×out weights")
            weight = weight_of(quantized_model, layer)
            hessian = input_hessians.get(layer.name) if input_hessians else None
            spans = list(groups[layer.name])
            with failing_layer(layer.name, layer.kind, "quantizing"):
                mixed = quantize_mixed(weight, spans, scheme, hessian)
            if len(spans) == 1:
                codes[layer.name] = mixed.parts[0]
                weight.copy_(dequantize_weight(mixed.parts[0], weight.dtype))
            else:
                codes[layer.name] = mixed
                weight.copy_(dequantize_mixed(mixed, weight.dtype))
    return quantized_model, codes


def replace_dir_atomically(build_dir: Path, target: Path) -> None:
    """Move a finished folder into place; an old folder at ``target`` is removed only afterwards."""
    backup = None
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, backup)
    try:
        os.replace(build_dir, target)
    except BaseException:
        if backup is not None:
            os.replace(backup, target)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def write_quantized_checkpoint(
    out_dir: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    layers: Sequence[LayerInfo],
    codes: Mapping[str, LayerCodes],
    manifest_extra: Mapping[str, object],
    scheme: QuantScheme,
    activation_formats: Mapping[str, str] | None = None,
    activation_quantizers: Mapping[str, ActivationQuantizer] | None = None,
) -> Path:
    """Write ``model.safetensors`` and ``manifest.json`` into ``out_dir`` atomically.

    ``activation_formats`` names each layer's activation format (the activation half of its
    candidate, what the allocation's BitOps/EBOPs/latency counted); ``activation_quantizers``
    holds the layers whose inputs are quantized at inference, with their calibration ranges.
    """
    out_dir = Path(out_dir)
    build_dir = make_build_dir(out_dir)
    try:
        by_name = {layer.name: layer for layer in layers}
        tied = tied_aliases(state_dict, {by_name[name].weight_key for name in codes})
        tensors = _checkpoint_tensors(state_dict, by_name, codes, tied)
        entries = [
            _layer_entry(
                by_name[name],
                quantized,
                scheme,
                (activation_formats or {}).get(name),
                (activation_quantizers or {}).get(name),
            )
            for name, quantized in codes.items()
        ]
        save_file(tensors, str(build_dir / "model.safetensors"))
        file_bytes = (build_dir / "model.safetensors").stat().st_size
        manifest = {
            "format": CHECKPOINT_FORMAT,
            "lcpaq_version": __version__,
            **manifest_extra,
            # Codes are packed at their bit width; scales are float32 as the budgets count them,
            # so this is close to totals.size_bytes (plus safetensors' header and key names).
            "file_bytes": file_bytes,
            # Every format the layers use, with what a decoder needs (bit layout, bias, max).
            "formats": {
                name: asdict(get_format(name))
                for name in sorted({name for layer in codes.values() for name in _formats(layer)})
            },
            "layers": entries,
            # Written only where tensors are tied, so other checkpoints keep their bytes.
            **({"tied": tied} if tied else {}),
        }
        (build_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        # mkdtemp creates the folder owner-only; give the checkpoint the ordinary modes.
        build_dir.chmod(0o755)
        for path in build_dir.iterdir():
            path.chmod(0o644)
        replace_dir_atomically(build_dir, out_dir)
    except OSError as error:  # disk full, a folder in the way: nothing half-written is left
        shutil.rmtree(build_dir, ignore_errors=True)
        raise InputError(f"cannot write {out_dir}: {error.strerror or error}") from None
    except BaseException:
        shutil.rmtree(build_dir, ignore_errors=True)
        raise
    return out_dir


def make_build_dir(out_dir: Path) -> Path:
    """A fresh hidden folder next to ``out_dir`` (same file system, so the final rename is atomic)."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as error:
        raise InputError(
            f"output folder {out_dir.parent} is not writable: {error.strerror}"
        ) from None


def _formats(codes: LayerCodes) -> list[str]:
    if isinstance(codes, MixedWeight):
        return [part.format_name for part in codes.parts]
    return [codes.format_name]


def _stored_tensors(prefix: str, quantized: QuantizedWeight) -> dict[str, torch.Tensor]:
    """Packed codes, scales (float32, or uint8 E8M0 exponents for MX: as they are) and zero
    points of one quantized weight or channel group."""
    tensors = {
        prefix + CODES_SUFFIX: pack_codes(quantized),
        prefix + SCALE_SUFFIX: quantized.scale.contiguous().cpu(),
    }
    if quantized.zero_point is not None:
        tensors[prefix + ZERO_SUFFIX] = quantized.zero_point.contiguous().cpu()
    return tensors


def _checkpoint_tensors(
    state_dict: Mapping[str, torch.Tensor],
    by_name: Mapping[str, LayerInfo],
    codes: Mapping[str, LayerCodes],
    tied: Mapping[str, str],
) -> dict[str, torch.Tensor]:
    """What ``model.safetensors`` holds: packed codes, scales and zero points of every quantized
    weight (of each channel group, under ``<key>.g<i>``, for a mixed layer), then every other
    tensor of the state dict as it is; keys in ``tied`` (aliases of a stored key) are left out."""
    tensors: dict[str, torch.Tensor] = {}
    for name, quantized in codes.items():
        key = by_name[name].weight_key
        if key in tied:
            continue
        if isinstance(quantized, MixedWeight):
            for index, part in enumerate(quantized.parts):
                tensors.update(_stored_tensors(group_prefix(key, index), part))
        else:
            tensors.update(_stored_tensors(key, quantized))
    quantized_keys = {by_name[name].weight_key for name in codes}
    for key, tensor in state_dict.items():
        if key not in quantized_keys and key not in tied:
            tensors[key] = tensor.detach().contiguous().cpu()
    return tensors


def _code_layout(quantized: QuantizedWeight) -> dict[str, object]:
    """How `.qcodes` unpacks (`lcpaq.quant.weights.unpack_codes`); ``code_step`` only for
    binary (codes −1, 1 stored as bits 0, 1), so other checkpoints keep their bytes."""
    fmt = get_format(quantized.format_name)
    step = code_step(quantized)
    return {
        "code_bits": fmt.bits,
        "code_offset": code_offset(quantized),
        **({"code_step": step} if step != 1 else {}),
        "code_dtype": str(quantized.codes.dtype).removeprefix("torch."),
    }


def _layer_entry(
    layer: LayerInfo,
    quantized: LayerCodes,
    scheme: QuantScheme,
    activation_format: str | None,
    activation_quantizer: ActivationQuantizer | None,
) -> dict[str, object]:
    """One layer's record in ``manifest.json`` (the keys and their order are the file format).
    A mixed layer has format and kind ``mixed`` and a ``groups`` list: each group's channels
    [c0, c1], format, kind, bits and code layout."""
    # Only where it holds, so checkpoints of other models keep their bytes.
    layout = {"transposed": True} if stores_transposed(layer.kind) else {}
    if isinstance(quantized, MixedWeight):
        first = quantized.parts[0]
        described: dict[str, object] = {"format": "mixed", "kind": "mixed"}
        groups = [
            {
                "channels": [start, stop],
                "format": part.format_name,
                "kind": get_format(part.format_name).kind,
                "bits": get_format(part.format_name).bits,
                **_code_layout(part),
                "symmetric": part.zero_point is None,
            }
            for (start, stop, _), part in zip(quantized.spans, quantized.parts)
        ]
        symmetric = all(part.zero_point is None for part in quantized.parts)
    else:
        first = quantized
        fmt = get_format(quantized.format_name)
        described = {"format": fmt.name}
        groups = []
        symmetric = quantized.zero_point is None
    entry: dict[str, object] = {
        "name": layer.name,
        "weight_key": layer.weight_key,
        "format": described["format"],
        "activation_format": activation_format,
        "activation_quantizer": (
            activation_quantizer.to_dict() if activation_quantizer is not None else None
        ),
    }
    if groups:
        entry.update({"kind": "mixed", "groups": groups})
    else:
        fmt = get_format(first.format_name)
        entry.update({"kind": fmt.kind, "bits": fmt.bits, **_code_layout(first)})
    entry.update(
        {
            "granularity": first.granularity,
            "group_size": first.group_size,
            "symmetric": symmetric,
            "clipping": scheme.clipping,
            "num_params": layer.num_params,
            "shape": list(layer.weight_shape),
            **layout,
        }
    )
    return entry
