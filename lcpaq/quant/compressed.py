"""A quantized transformers model as a compressed-tensors folder: the checkpoint format vLLM serves
natively and transformers loads (``quantization_config`` in ``config.json``, packed codes beside
their scales in ``model.safetensors``).

What it can express, and how lcpaq's codes map onto it (`weight_args`):

* INT2 … INT8 with per-tensor, per-channel or per-group float scales, symmetric or asymmetric
  (``pack-quantized``: codes packed into int32; compressed-tensors counts codes from −2^(b−1),
  lcpaq's asymmetric codes from 0, so codes and zero points move down by 2^(b−1) together and
  decode to the same values); groups must tile the fan-in;
* FP8 E4M3 with per-tensor, per-channel or per-group float scales (``naive-quantized``, float8
  weights);
* FP4 E2M1 under MX scales (``mxfp4-pack-quantized``: E8M0 scales over blocks of 32).

Everything else (INT under MX, FP8 E5M2, FP6, FP4 with float scales, transformers Conv1D whose
weight is in×out, 1-d or conv weights, tied weights: one tensor serving two modules) is written
dequantized in float32 (``unsupported="dequantize"``), or stops the export (``"refuse"``); either
way the layers are named in one line. The library itself packs the codes (its compressors,
fed the checkpoint's decoded weights and scales), and every layer is decompressed again and
compared with lcpaq's decoded weight value for value before it is written compressed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lcpaq.errors import InputError
from lcpaq.quant.checkpoint import make_build_dir, read_checkpoint, replace_dir_atomically
from lcpaq.quant.formats import get_format
from lcpaq.quant.hf_folder import hf_model_of, save_hf_files
from lcpaq.quant.mixed import MixedWeight
from lcpaq.quant.state_keys import fit_wrapper_prefix, renamed
from lcpaq.quant.weights import QuantizedWeight, decoded_scale, dequantize_weight

Unsupported = Literal["dequantize", "refuse"]
UNSUPPORTED_CHOICES = ("dequantize", "refuse")
_MISSING = (
    "compressed-tensors export needs compressed-tensors and transformers: pip install 'lcpaq[hf]'"
)


@dataclass(frozen=True)
class CompressedExport:
    """What `write_compressed_tensors` wrote: module → compressed-tensors format of the layers
    stored compressed, module → why each other quantized layer is stored dequantized."""

    folder: str
    compressed: dict[str, str]
    dequantized: dict[str, str]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def weight_args(quantized: QuantizedWeight, transposed: bool = False) -> dict[str, Any] | str:
    """The compressed-tensors ``QuantizationArgs`` fields that decode ``quantized`` to lcpaq's
    values, or why there are none (see the module docstring). ``transposed``: the module stores
    the weight in×out (the manifest's ``transposed``, transformers Conv1D)."""
    fmt = get_format(quantized.format_name)
    shape = tuple(quantized.codes.shape)
    if transposed:
        return "transformers Conv1D stores its weight in×out; compressed-tensors scales rows"
    if len(shape) != 2:
        return f"{len(shape)}-d weight; compressed-tensors compresses 2-d weights"
    group = quantized.group_size if quantized.granularity in ("group", "mx") else None
    if group is not None and shape[1] % group:
        return f"fan-in {shape[1]} is not a multiple of the group size {group}"
    if quantized.granularity == "mx":
        if fmt.name == "fp4_e2m1":
            return {
                "num_bits": 4,
                "type": "float",
                "strategy": "group",
                "group_size": group,
                "scale_dtype": torch.uint8,
            }
        return f"{fmt.name} under MX scales has no compressed-tensors form (fp4_e2m1 has)"
    common = {"strategy": quantized.granularity, "group_size": group}
    if fmt.kind == "int":
        return {
            "num_bits": fmt.bits,
            "type": "int",
            "symmetric": quantized.zero_point is None,
            **common,
        }
    if fmt.name == "fp8_e4m3":
        return {"num_bits": 8, "type": "float", **common}
    return f"{fmt.name} with float scales has no compressed-tensors form (INT and fp8_e4m3 have)"


def module_state(quantized: QuantizedWeight) -> dict[str, torch.Tensor]:
    """What a compressed-tensors compressor takes for one module: the decoded weight, its scales
    in compressed-tensors' shapes (channel: [C_out, 1]) and, for asymmetric INT, the zero points
    moved to its signed code range."""
    scale = decoded_scale(quantized)
    if quantized.granularity == "channel":
        scale = scale.reshape(-1, 1)
    state = {"weight": dequantize_weight(quantized), "weight_scale": scale}
    if quantized.zero_point is not None:
        offset = 2 ** (get_format(quantized.format_name).bits - 1)
        zero = quantized.zero_point.to(torch.int16) - offset
        state["weight_zero_point"] = zero.to(torch.int8).reshape(scale.shape)
    return state


def _library() -> Any:
    try:
        import compressed_tensors
        import transformers  # noqa: F401 - its ModelCompressor imports it
    except ImportError as error:
        raise InputError(f"{_MISSING} ({error})") from None
    return compressed_tensors


def _plan(
    checkpoint_dir: Path, hf_keys: set[str]
) -> tuple[dict[str, tuple[dict[str, Any], QuantizedWeight]], dict[str, str]]:
    """Module (Hugging Face name) → (its weight args, its codes) for the layers compressed-tensors
    can express; module → why not for the others."""
    manifest, codes, _ = read_checkpoint(checkpoint_dir)
    change = fit_wrapper_prefix(codes, hf_keys)
    if change is None:
        raise InputError(f"quantized checkpoint {checkpoint_dir} does not fit the model's weights")
    entries = {entry["weight_key"]: entry for entry in manifest["layers"]}
    tied = {**manifest.get("tied", {})}
    tied_keys = set(tied) | set(tied.values())
    plans, reasons = {}, {}
    for key, quantized in codes.items():
        module = renamed(key, change).removesuffix(".weight")
        if isinstance(quantized, MixedWeight):
            reasons[module] = "its channel groups have different formats"
            continue
        args = weight_args(quantized, bool(entries[key].get("transposed")))
        if key in tied_keys:
            args = "its weight is tied to another module's (one tensor, two modules)"
        if isinstance(args, str):
            reasons[module] = args
        else:
            plans[module] = (args, quantized)
    return plans, reasons


def _refused(reasons: Mapping[str, str]) -> InputError:
    listed = "; ".join(f"{name}: {why}" for name, why in reasons.items())
    return InputError(
        f"compressed-tensors cannot express {len(reasons)} quantized layer(s) ({listed}); "
        "choose --compressed-tensors dequantize to write them dequantized"
    )


def write_compressed_tensors(
    model: nn.Module,
    checkpoint_dir: Path,
    out_dir: Path,
    source_dir: Path | None = None,
    unsupported: Unsupported = "dequantize",
) -> CompressedExport:
    """The quantized checkpoint ``checkpoint_dir`` of ``model`` (holding its decoded weights,
    e.g. from `lcpaq.load_quantized`) as a compressed-tensors folder at ``out_dir`` with the
    side files of ``source_dir``, written atomically."""
    _library()
    hf_model = hf_model_of(model)
    plans, reasons = _plan(checkpoint_dir, set(hf_model.state_dict()))
    if reasons and unsupported == "refuse":
        raise _refused(reasons)
    build_dir = make_build_dir(out_dir)
    try:
        save_hf_files(model, build_dir, source_dir)
        compressed = _compress_weights(build_dir, plans, reasons)
        if reasons and unsupported == "refuse":
            raise _refused(reasons)
        build_dir.chmod(0o755)
        replace_dir_atomically(build_dir, out_dir)
    except BaseException:
        shutil.rmtree(build_dir, ignore_errors=True)
        raise
    return CompressedExport(str(out_dir), compressed, reasons)


def _compress_weights(
    folder: Path,
    plans: Mapping[str, tuple[dict[str, Any], QuantizedWeight]],
    reasons: dict[str, str],
) -> dict[str, str]:
    """Replace the planned modules' float weights in ``folder/model.safetensors`` by the
    library's compressed tensors and write ``quantization_config`` into ``config.json``; a layer
    the library does not decode to lcpaq's values is added to ``reasons`` and stays float."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from safetensors.torch import load_file, save_file

    weights_path = folder / "model.safetensors"
    if not weights_path.is_file():
        raise InputError("compressed-tensors export: transformers wrote a sharded checkpoint")
    tensors = load_file(str(weights_path))
    groups: dict[str, tuple[dict[str, Any], str, list[str]]] = {}
    formats = {}
    for module, (args, quantized) in plans.items():
        key = f"{module}.weight"
        if key not in tensors:
            reasons[module] = "transformers stores no weight under its name (tied)"
            continue
        state = module_state(quantized)
        if not torch.equal(tensors[key], state["weight"]):
            raise InputError(f"the model's {key} is not the quantized checkpoint's decoded weight")
        scheme = QuantizationScheme(targets=[module], weights=QuantizationArgs(**args))
        fmt = infer_module_format(nn.Linear, scheme).value
        compressor = BaseCompressor.get_value_from_registry(fmt)
        packed = compressor.compress(state, scheme)
        decoded = compressor.decompress(packed, scheme)["weight"]
        if not torch.equal(decoded.float(), state["weight"]):
            difference = float((decoded.float() - state["weight"]).abs().max())
            reasons[module] = (
                f"compressed-tensors decodes it differently (max |Δ| {difference:.3g})"
            )
            continue
        del tensors[key]
        tensors.update({f"{module}.{name}": value.contiguous() for name, value in packed.items()})
        group_key = json.dumps({**args, "format": fmt}, sort_keys=True, default=str)
        groups.setdefault(group_key, (args, fmt, []))[2].append(module)
        formats[module] = fmt
    save_file(tensors, str(weights_path), metadata={"format": "pt"})
    _write_quantization_config(folder, groups.values())
    return formats


def _write_quantization_config(
    folder: Path, groups: Iterable[tuple[dict[str, Any], str, list[str]]]
) -> None:
    """``quantization_config`` in ``config.json``: one config group per distinct weight
    arguments and format, its targets the modules' exact names (written by the library)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )

    groups = list(groups)
    schemes = {
        f"group_{index}": QuantizationScheme(
            targets=sorted(modules), weights=QuantizationArgs(**args), format=fmt
        )
        for index, (args, fmt, modules) in enumerate(groups)
    }
    formats = sorted({fmt for _, fmt, _ in groups}) or ["dense"]
    config = QuantizationConfig(
        config_groups=schemes,
        format=formats[0] if len(formats) == 1 else "mixed-precision",
        quantization_status="compressed",
    )
    ModelCompressor(quantization_config=config).update_config(str(folder))
