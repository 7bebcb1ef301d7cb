"""Quantize a model to an allocation and write or read the quantized checkpoint: the core of the
export stage, the only stage that changes a model (input: the model, its layers and the allocation's
layer → format assignment; output: the checkpoint folder below).

Output folder (written to a temporary folder, then renamed into place, so an interrupted export never
leaves a partial checkpoint):

* ``model.safetensors``: for each quantized layer ``<weight_key>.qcodes`` (weight-shaped: int8
  symmetric INT, uint8 asymmetric INT, uint8 bit patterns for FP formats), ``<weight_key>.qscale``
  (float32 [1] per tensor, [C_out] per channel, [C_out, groups] per group; uint8 E8M0 exponents
  [C_out, blocks] for MX) and, for asymmetric INT, ``<weight_key>.qzero`` (int16, the scale's shape);
  every other tensor of the state dict as it is (including BatchNorm statistics after correction).
  A tensor held under several keys (a tied embedding and LM head) is stored once
  (`lcpaq.quant.state_keys.tied_aliases`): one tensor, one format.
* ``manifest.json``: every quantized layer with its state-dict name, weight format, activation
  format (the activation half of its candidate, what the cost models counted), activation
  quantizer (format and calibration range of the layer's input, or null where activations stay
  FP32: runs without ``--act-formats``, whose cost models assume 8 bits, and fp32 candidates), kind
  (int/fp), bits, granularity and group size, and ``transposed: true`` where the module stores the
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
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lcpaq import __version__
from lcpaq.errors import InputError
from lcpaq.model.graph import LayerInfo, failing_layer, weight_of
from lcpaq.quant.activations import ActivationQuantizer, attach_activation_quantizers
from lcpaq.quant.formats import QuantScheme, get_format
from lcpaq.quant.state_keys import fit_wrapper_prefix, renamed, stores_transposed, tied_aliases
from lcpaq.quant.weights import (
    QuantizedWeight,
    code_offset,
    dequantize_weight,
    pack_codes,
    quantize_weight,
    unpack_codes,
)

CHECKPOINT_FORMAT = "lcpaq-quantized/2"
#: Formats `read_checkpoint` reads: /1 stored one code per byte, /2 packs them at their bit width.
READABLE_FORMATS = ("lcpaq-quantized/1", CHECKPOINT_FORMAT)
_CODE_DTYPES = {"int8": torch.int8, "uint8": torch.uint8}
CODES_SUFFIX, SCALE_SUFFIX, ZERO_SUFFIX = ".qcodes", ".qscale", ".qzero"


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
    codes: Mapping[str, QuantizedWeight],
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
                for name in sorted({quantized.format_name for quantized in codes.values()})
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
    """A fresh hidden folder next to ``out_dir`` (same file system, so the final rename is atomic).
    A file at ``out_dir`` is refused: replacing it would lose it."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(
            f"cannot write {out_dir}: a file is in the way (the checkpoint is a folder)"
        )
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as error:
        raise InputError(
            f"output folder {out_dir.parent} is not writable: {error.strerror}"
        ) from None


def _checkpoint_tensors(
    state_dict: Mapping[str, torch.Tensor],
    by_name: Mapping[str, LayerInfo],
    codes: Mapping[str, QuantizedWeight],
    tied: Mapping[str, str],
) -> dict[str, torch.Tensor]:
    """What ``model.safetensors`` holds: packed codes, scales and zero points of every quantized
    weight, then every other tensor of the state dict as it is; keys in ``tied`` (aliases of a
    stored key) are left out."""
    tensors: dict[str, torch.Tensor] = {}
    for name, quantized in codes.items():
        key = by_name[name].weight_key
        if key in tied:
            continue
        tensors[key + CODES_SUFFIX] = pack_codes(quantized)
        # float32, or uint8 E8M0 exponents for MX: stored as they are.
        tensors[key + SCALE_SUFFIX] = quantized.scale.contiguous().cpu()
        if quantized.zero_point is not None:
            tensors[key + ZERO_SUFFIX] = quantized.zero_point.contiguous().cpu()
    quantized_keys = {by_name[name].weight_key for name in codes}
    for key, tensor in state_dict.items():
        if key not in quantized_keys and key not in tied:
            tensors[key] = tensor.detach().contiguous().cpu()
    return tensors


def _layer_entry(
    layer: LayerInfo,
    quantized: QuantizedWeight,
    scheme: QuantScheme,
    activation_format: str | None,
    activation_quantizer: ActivationQuantizer | None,
) -> dict[str, object]:
    """One layer's record in ``manifest.json`` (the keys and their order are the file format)."""
    fmt = get_format(quantized.format_name)
    # Only where it holds, so checkpoints of other models keep their bytes.
    layout = {"transposed": True} if stores_transposed(layer.kind) else {}
    return {
        "name": layer.name,
        "weight_key": layer.weight_key,
        "format": fmt.name,
        "activation_format": activation_format,
        "activation_quantizer": (
            activation_quantizer.to_dict() if activation_quantizer is not None else None
        ),
        "kind": fmt.kind,
        "bits": fmt.bits,
        # How `.qcodes` unpacks (`lcpaq.quant.weights.unpack_codes`).
        "code_bits": fmt.bits,
        "code_offset": code_offset(quantized),
        "code_dtype": str(quantized.codes.dtype).removeprefix("torch."),
        "granularity": quantized.granularity,
        "group_size": quantized.group_size,
        "symmetric": quantized.zero_point is None,
        "clipping": scheme.clipping,
        "num_params": layer.num_params,
        "shape": list(layer.weight_shape),
        **layout,
    }


#: What every layer entry of a manifest has (the readers index them without checking).
_ENTRY_KEYS = ("name", "weight_key", "format", "granularity")


def _damaged(folder: str | Path, name: str, reason: object) -> InputError:
    """The one-line error for a file of a quantized checkpoint folder that cannot be used."""
    text = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
    return InputError(
        f"quantized checkpoint {folder}: file {name} is damaged ({text}); rerun `lcpaq export`"
    )


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The parsed ``manifest.json`` of a checkpoint folder (JSON: values untyped until used)."""
    manifest_path = Path(path) / "manifest.json"
    if not manifest_path.is_file():
        raise InputError(f"{path} is not an lcpaq quantized checkpoint: {manifest_path} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _damaged(path, "manifest.json", f"not valid JSON: {error}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("layers"), list):
        raise _damaged(path, "manifest.json", "no list of layers")
    for entry in manifest["layers"]:
        missing = [key for key in _ENTRY_KEYS if not isinstance(entry, dict) or key not in entry]
        if missing:
            raise _damaged(path, "manifest.json", f"a layer entry lacks {missing[0]!r}")
    if manifest.get("format") not in READABLE_FORMATS:
        raise InputError(f"{manifest_path}: unknown checkpoint format {manifest.get('format')!r}")
    return manifest


def manifest_activation_quantizers(
    manifest: Mapping[str, Any], where: str | Path
) -> dict[str, ActivationQuantizer]:
    """Layer → activation quantizer, for the layers whose manifest entry has one (checkpoints
    written before activations were quantized have none: their activations stay FP32)."""
    quantizers = {}
    for entry in manifest["layers"]:
        stored = entry.get("activation_quantizer")
        if stored is not None:
            quantizers[entry["name"]] = ActivationQuantizer.from_dict(
                stored, f"{where}, layer {entry['name']!r}"
            )
    return quantizers


def read_checkpoint(
    path: str | Path,
) -> tuple[dict[str, Any], dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    """The manifest, the codes of every quantized weight (by state-dict key) and every other
    tensor of a quantized checkpoint folder."""
    path = Path(path)
    manifest = read_manifest(path)
    try:
        tensors = load_file(str(path / "model.safetensors"))
    except Exception as error:  # noqa: BLE001 - safetensors raises several types for bad files
        raise _damaged(path, "model.safetensors", error) from None
    weights: dict[str, QuantizedWeight] = {}
    tied = manifest.get("tied", {})
    for entry in manifest["layers"]:
        key = entry["weight_key"]
        if key in tied:  # the codes of the key it is tied to decode it
            continue
        try:
            weights[key] = QuantizedWeight(
                codes=_stored_codes(tensors.pop(key + CODES_SUFFIX), entry, path),
                scale=tensors.pop(key + SCALE_SUFFIX),
                zero_point=tensors.pop(key + ZERO_SUFFIX, None),
                format_name=entry["format"],
                granularity=entry["granularity"],
                group_size=entry.get("group_size"),
            )
        except KeyError as error:
            raise InputError(
                f"{path / 'model.safetensors'} lacks {error} of layer {entry['name']!r}"
            ) from None
    return manifest, weights, tensors


def _stored_codes(stored: torch.Tensor, entry: Mapping[str, Any], path: Path) -> torch.Tensor:
    """The codes of a manifest entry: unpacked (``code_bits``, format /2) or as stored (/1)."""
    if "code_bits" not in entry:
        return stored
    try:
        return unpack_codes(
            stored,
            int(entry["code_bits"]),
            [int(size) for size in entry["shape"]],
            _CODE_DTYPES[str(entry["code_dtype"])],
            int(entry["code_offset"]),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(
            f"{path / 'model.safetensors'}: the codes of layer {entry['name']!r} do not unpack "
            f"({error})"
        ) from None


def decoded_state_dict(
    weights: Mapping[str, QuantizedWeight],
    others: Mapping[str, torch.Tensor],
    manifest: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """`read_checkpoint`'s weights decoded to float, with the other tensors: a state dict. With
    the ``manifest``, weights of transposed layers are put back in their module's layout and tied
    keys get the tensor of the key they alias (the same tensor object)."""
    manifest = manifest or {}
    transposed = {
        entry["weight_key"] for entry in manifest.get("layers", []) if entry.get("transposed")
    }
    state_dict = {**others}
    for key, quantized in weights.items():
        decoded = dequantize_weight(quantized)
        state_dict[key] = decoded.t().contiguous() if key in transposed else decoded
    for alias, kept in manifest.get("tied", {}).items():
        state_dict[alias] = state_dict[kept]
    return state_dict


def load_quantized(
    path: str | Path, model: nn.Module | None = None
) -> dict[str, torch.Tensor] | nn.Module:
    """Decode a quantized checkpoint folder.

    Returns the dequantized float state dict with the original key names, or, given ``model``, that
    model with the state dict loaded (strictly), the manifest's activation quantizers attached
    (`manifest_activation_quantizers`; a state dict cannot carry them) and in eval mode. A
    checkpoint of lcpaq's transformers wrapper (keys ``model.<HF key>``) loads into the bare
    Hugging Face model, and one of a bare model into the wrapper (`fit_wrapper_prefix`).
    """
    path = Path(path)
    manifest, weights, others = read_checkpoint(path)
    state_dict = decoded_state_dict(weights, others, manifest)
    if model is None:
        return state_dict
    from lcpaq.model.zoo import load_state_dict_strict

    quantizers = manifest_activation_quantizers(manifest, path / "manifest.json")
    change = fit_wrapper_prefix(state_dict, set(model.state_dict()))
    state_dict = {renamed(key, change): tensor for key, tensor in state_dict.items()}
    quantizers = {renamed(name, change): quantizer for name, quantizer in quantizers.items()}
    load_state_dict_strict(model, state_dict, f"quantized checkpoint {path}")
    attach_activation_quantizers(model, quantizers)
    return model.eval()
