"""Read a quantized checkpoint folder (`lcpaq.quant.checkpoint` writes it): the manifest, the
packed codes of every layer (one format, or a format per channel group: `lcpaq.quant.mixed`),
decoding to a float state dict, and `load_quantized`, which puts it into a model with its
activation quantizers."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from lcpaq.errors import InputError
from lcpaq.quant.activations import ActivationQuantizer, attach_activation_quantizers
from lcpaq.quant.mixed import MixedWeight, check_spans, dequantize_mixed
from lcpaq.quant.state_keys import fit_wrapper_prefix, renamed
from lcpaq.quant.weights import QuantizedWeight, dequantize_weight, unpack_codes

CHECKPOINT_FORMAT = "lcpaq-quantized/2"
#: Formats `read_checkpoint` reads: /1 stored one code per byte, /2 packs them at their bit width.
READABLE_FORMATS = ("lcpaq-quantized/1", CHECKPOINT_FORMAT)
_CODE_DTYPES = {"int8": torch.int8, "uint8": torch.uint8}
CODES_SUFFIX, SCALE_SUFFIX, ZERO_SUFFIX = ".qcodes", ".qscale", ".qzero"
#: A layer's stored codes: one format, or a format per span of output channels.
LayerCodes = QuantizedWeight | MixedWeight


def group_prefix(key: str, index: int) -> str:
    """Where channel group ``index`` of a mixed layer keeps its tensors: ``<key>.g<index>``."""
    return f"{key}.g{index}"


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The parsed ``manifest.json`` of a checkpoint folder (JSON: values untyped until used)."""
    manifest_path = Path(path) / "manifest.json"
    if not manifest_path.is_file():
        raise InputError(f"{path} is not an lcpaq quantized checkpoint: {manifest_path} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{manifest_path} is not valid JSON: {error}") from None
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
) -> tuple[dict[str, Any], dict[str, LayerCodes], dict[str, torch.Tensor]]:
    """The manifest, the codes of every quantized weight (by state-dict key; a `MixedWeight`
    where the entry has channel ``groups``) and every other tensor of a quantized checkpoint
    folder."""
    path = Path(path)
    manifest = read_manifest(path)
    try:
        tensors = load_file(str(path / "model.safetensors"))
    except Exception as error:  # noqa: BLE001 - safetensors raises several types for bad files
        raise InputError(f"{path / 'model.safetensors'} is not readable: {error}") from None
    weights: dict[str, LayerCodes] = {}
    tied = manifest.get("tied", {})
    for entry in manifest["layers"]:
        key = entry["weight_key"]
        if key in tied:  # the codes of the key it is tied to decode it
            continue
        try:
            if "groups" in entry:
                weights[key] = _mixed_codes(tensors, key, entry, path)
            else:
                weights[key] = _layer_codes(tensors, key, entry, entry, path)
        except KeyError as error:
            raise InputError(
                f"{path / 'model.safetensors'} lacks {error} of layer {entry['name']!r}"
            ) from None
    return manifest, weights, tensors


def _layer_codes(
    tensors: dict[str, torch.Tensor],
    prefix: str,
    entry: Mapping[str, Any],
    layer: Mapping[str, Any],
    path: Path,
) -> QuantizedWeight:
    """The codes stored under ``prefix`` as described by ``entry`` (a layer's, or one of its
    channel groups'; ``layer``: the layer's entry, for its granularity)."""
    return QuantizedWeight(
        codes=_stored_codes(tensors.pop(prefix + CODES_SUFFIX), entry, path),
        scale=tensors.pop(prefix + SCALE_SUFFIX),
        zero_point=tensors.pop(prefix + ZERO_SUFFIX, None),
        format_name=entry["format"],
        granularity=layer["granularity"],
        group_size=layer.get("group_size"),
    )


def _mixed_codes(
    tensors: dict[str, torch.Tensor], key: str, entry: Mapping[str, Any], path: Path
) -> MixedWeight:
    """A layer with a format per channel group: each group's codes under ``<key>.g<i>``."""
    shape = [int(size) for size in entry["shape"]]
    spans, parts = [], []
    for index, group in enumerate(entry["groups"]):
        start, stop = (int(value) for value in group["channels"])
        described = {**group, "name": entry["name"], "shape": [stop - start, *shape[1:]]}
        parts.append(_layer_codes(tensors, group_prefix(key, index), described, entry, path))
        spans.append((start, stop, str(group["format"])))
    check_spans(spans, shape[0], f"{path / 'manifest.json'}, layer {entry['name']!r}")
    return MixedWeight(tuple(spans), tuple(parts))


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
            int(entry.get("code_step", 1)),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(
            f"{path / 'model.safetensors'}: the codes of layer {entry['name']!r} do not unpack "
            f"({error})"
        ) from None


def decoded_state_dict(
    weights: Mapping[str, LayerCodes],
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
        decoded = (
            dequantize_mixed(quantized)
            if isinstance(quantized, MixedWeight)
            else dequantize_weight(quantized)
        )
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
