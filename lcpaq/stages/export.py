"""The ``export`` stage: the model quantized to an allocation, its batch-norm statistics corrected,
written as a quantized checkpoint.

`export_model` works in memory (FP32 model + `Allocation` → `QuantizedModel`: the quantized model,
its codes and its layer-input quantizers); `export` is the run-folder wrapper that reads
``run_config.json``, ``layers.json``, ``allocation.json``, ``activations.npz`` and
``input_hessians.safetensors`` and writes ``quantized/model.safetensors`` and
``quantized/manifest.json`` (for a transformers model also the Hugging Face and compressed-tensors
folders of `lcpaq.stages.hf_export`). The next stage is ``evaluate``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lcpaq.allocation.budgets import Budget
from lcpaq.allocation.result import Allocation
from lcpaq.allocation.table import PAIR_SEPARATOR, activation_format_of, weight_format_of
from lcpaq.config import ExportSettings, RunConfig
from lcpaq.model.graph import LayerInfo
from lcpaq.model.recovery import ReferenceStats, correct_statistics, corrects_statistics
from lcpaq.quant.activations import (
    ActivationQuantizer,
    activation_quantizers,
    attach_activation_quantizers,
)
from lcpaq.quant.checkpoint import quantize_model, write_quantized_checkpoint
from lcpaq.quant.formats import QuantScheme, get_format
from lcpaq.quant.learned_steps import quantize_at_steps
from lcpaq.quant.weights import QuantizedWeight, dequantize_weight
from lcpaq.sensitivity.activation import ActivationSensitivity
from lcpaq.sensitivity.activation_file import load_activation_sensitivity
from lcpaq.sensitivity.limpq import LearnedStepSizes, load_step_sizes
from lcpaq.stages.folder import (
    load_model_and_data,
    read_allocation,
    read_config,
    read_input_hessians,
    read_layers,
    read_layers_file,
    timed,
)
from lcpaq.stages.hf_export import export_hf

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizedModel:
    """A model quantized to an allocation: the model (dequantized weights, input quantizers
    attached, statistics corrected), the integer codes of each layer and its input quantizers."""

    model: nn.Module
    codes: dict[str, QuantizedWeight]
    input_quantizers: dict[str, ActivationQuantizer]


def weight_assignment(layer_names: Sequence[str], candidates: Sequence[str]) -> dict[str, str]:
    """Layer → weight format of its chosen candidate (``int4/fp8_e4m3`` → ``int4``)."""
    return {name: weight_format_of(candidate) for name, candidate in zip(layer_names, candidates)}


def paired_activation_formats(
    layer_names: Sequence[str], candidates: Sequence[str]
) -> dict[str, str]:
    """Layer → activation format quantized at inference: the activation half of each paired
    candidate other than fp32. Unpaired candidates (no ``--act-formats``) keep FP32 activations."""
    formats = {
        name: activation_format_of(candidate)
        for name, candidate in zip(layer_names, candidates)
        if PAIR_SEPARATOR in candidate
    }
    return {name: format_name for name, format_name in formats.items() if format_name != "fp32"}


def activation_quantizers_of(
    run_dir: Path,
    layer_names: Sequence[str],
    candidates: Sequence[str],
    sensitivity: ActivationSensitivity | None = None,
) -> dict[str, ActivationQuantizer]:
    """The input quantizer of every layer `paired_activation_formats` names, with the range
    ``analyze --act-formats`` calibrated (``activations.npz``, unless ``sensitivity`` is that
    file already read)."""
    formats = paired_activation_formats(layer_names, candidates)
    if not formats:
        return {}
    if sensitivity is None:
        sensitivity = load_activation_sensitivity(run_dir / "activations.npz")
    return activation_quantizers(sensitivity, formats)


def quantize_and_recover(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    assignment: dict[str, str],
    config: RunConfig,
    correction_inputs: torch.Tensor | None,
    reference: ReferenceStats | None = None,
    input_hessians: Mapping[str, torch.Tensor] | None = None,
    activation_quantizers: Mapping[str, ActivationQuantizer] | None = None,
    learned_steps: LearnedStepSizes | None = None,
) -> tuple[nn.Module, dict[str, QuantizedWeight]]:
    """The quantized model (weights to ``assignment``, inputs through ``activation_quantizers``)
    with its BN statistics corrected on ``correction_inputs``: the correction sees the
    quantized activations, so it also removes the mean shift their rounding causes.
    ``learned_steps`` (``--learn-scales``): layers whose format has a learned step are quantized
    at it instead of the scheme's clipping (`apply_learned_steps`)."""
    quantized_model, codes = quantize_model(
        model, layers, assignment, config.analysis.scheme, input_hessians
    )
    if learned_steps is not None:
        apply_learned_steps(
            model, quantized_model, layers, assignment, codes, learned_steps, config, input_hessians
        )
    recover_quantized(
        model,
        quantized_model,
        list(assignment),
        config,
        correction_inputs,
        reference,
        activation_quantizers,
    )
    return quantized_model, codes


def learned_codes(
    weight: torch.Tensor,
    layer_name: str,
    format_name: str,
    learned: LearnedStepSizes,
    scheme: QuantScheme,
    input_hessian: torch.Tensor | None = None,
) -> QuantizedWeight | None:
    """The FP32 ``weight`` quantized to ``format_name`` at the step sizes learned for it
    (`lcpaq.quant.learned_steps.quantize_at_steps`, rounded as the scheme says); None when no
    step was learned for this layer and format (the scheme's quantizer applies)."""
    if format_name not in learned.format_names or layer_name not in learned.layer_names:
        return None
    row = learned.layer_names.index(layer_name)
    steps = learned.step_sizes[row][learned.format_names.index(format_name)]
    return quantize_at_steps(
        weight, get_format(format_name), scheme, torch.from_numpy(steps), input_hessian
    )


def apply_learned_steps(
    model: nn.Module,
    quantized_model: nn.Module,
    layers: Sequence[LayerInfo],
    assignment: Mapping[str, str],
    codes: dict[str, QuantizedWeight],
    learned: LearnedStepSizes,
    config: RunConfig,
    input_hessians: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Requantize, in place, every assigned layer whose format has a learned step size: the FP32
    weight of ``model`` (not the already rounded one) at those steps; the others keep the
    scheme's quantizer."""
    fp_parameters = dict(model.named_parameters())
    parameters = dict(quantized_model.named_parameters())
    with torch.no_grad():
        for layer in layers:
            name = assignment.get(layer.name)
            if name is None:
                continue
            hessian = input_hessians.get(layer.name) if input_hessians else None
            quantized = learned_codes(
                fp_parameters[layer.weight_key].detach(),
                layer.name,
                name,
                learned,
                config.analysis.scheme,
                hessian,
            )
            if quantized is None:
                continue
            weight = parameters[layer.weight_key]
            weight.copy_(dequantize_weight(quantized, weight.dtype))
            codes[layer.name] = quantized


def read_learned_steps(run_dir: Path, config: RunConfig) -> LearnedStepSizes | None:
    """The run's learned step sizes when ``--learn-scales`` asks for them (``step_sizes.npz``,
    written by ``analyze --limpq-steps``), else None."""
    if not config.recovery.learn_scales:
        return None
    return load_step_sizes(run_dir / "step_sizes.npz")


def recover_quantized(
    model: nn.Module,
    quantized_model: nn.Module,
    layer_names: Sequence[str],
    config: RunConfig,
    correction_inputs: torch.Tensor | None,
    reference: ReferenceStats | None = None,
    activation_quantizers: Mapping[str, ActivationQuantizer] | None = None,
) -> None:
    """What `quantize_and_recover` does after the weights are quantized, in place: inputs
    through ``activation_quantizers``, then BN statistics corrected on ``correction_inputs``
    (the search calls it on models built from its cached quantized weights)."""
    attach_activation_quantizers(quantized_model, activation_quantizers or {})
    if config.recovery.enabled and correction_inputs is not None:
        correct_statistics(
            model, quantized_model, correction_inputs, list(layer_names), reference=reference
        )


def export_model(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    allocation: Allocation,
    config: RunConfig,
    correction_inputs: torch.Tensor | None,
    *,
    input_hessians: Mapping[str, torch.Tensor] | None = None,
    activations: ActivationSensitivity | None = None,
    learned_steps: LearnedStepSizes | None = None,
) -> QuantizedModel:
    """``model`` quantized to ``allocation`` (weights and, for paired candidates, layer inputs
    with the ranges of ``activations``; at ``learned_steps`` when given), statistics corrected on
    ``correction_inputs``."""
    input_quantizers = {}
    formats = paired_activation_formats(allocation.layer_names, allocation.formats)
    if formats:
        assert activations is not None, "paired candidates need the activation sensitivity"
        input_quantizers = activation_quantizers(activations, formats)
    quantized_model, codes = quantize_and_recover(
        model,
        layers,
        weight_assignment(allocation.layer_names, allocation.formats),
        config,
        correction_inputs,
        input_hessians=input_hessians,
        activation_quantizers=input_quantizers,
        learned_steps=learned_steps,
    )
    return QuantizedModel(quantized_model, codes, input_quantizers)


def write_checkpoint(
    out_dir: Path,
    quantized: QuantizedModel,
    layers: Sequence[LayerInfo],
    allocation: Allocation,
    config: RunConfig,
    manifest_extra: Mapping[str, object],
) -> Path:
    """``model.safetensors`` and ``manifest.json`` of ``quantized`` in ``out_dir``."""
    return write_quantized_checkpoint(
        out_dir,
        quantized.model.state_dict(),
        layers,
        quantized.codes,
        manifest_extra,
        config.analysis.scheme,
        activation_formats={
            name: activation_format_of(candidate)
            for name, candidate in zip(allocation.layer_names, allocation.formats)
        },
        activation_quantizers=quantized.input_quantizers,
    )


def manifest_extra(
    config: RunConfig,
    layers: Sequence[LayerInfo],
    allocation: Allocation,
    *,
    first_last: object,
    source_sha256: object,
    fp32_size_bits: float,
    correction_samples: int,
    corrected: bool = True,
) -> dict[str, object]:
    """What the manifest records about the run beside the layers: source, budget, totals.
    ``corrected``: whether the correction applies to the model (`corrects_statistics`)."""
    return {
        "model": config.analysis.model,
        "source_checkpoint": config.analysis.checkpoint,
        "source_sha256": source_sha256,
        "budget": [str(Budget(use.metric, use.limit)) for use in allocation.budgets],
        "first_last": first_last,
        "scheme": config.analysis.scheme.to_dict(),
        "recovery": {
            "statistics_correction": config.recovery.enabled and corrected,
            "num_samples": correction_samples,
            "learned_scales": config.recovery.learn_scales,
        },
        "totals": {
            "average_bits": allocation.average_bits,
            "size_bytes": allocation.size_bytes,
            "fp32_size_bytes": fp32_size_bits / 8,
            "quantized_params": int(sum(layer.num_params for layer in layers)),
        },
    }


def export(
    run_dir: Path, *, out_dir: Path | None = None, settings: ExportSettings | None = None
) -> Path:
    """Quantize to the allocation, correct statistics, write the quantized checkpoint (and, for a
    transformers model, the folders ``settings`` asks for: `lcpaq.stages.hf_export`)."""
    config = read_config(run_dir)
    layers, _ = read_layers(run_dir)
    allocation, allocation_data = read_allocation(run_dir)
    out_dir = out_dir or run_dir / "quantized"
    with timed(run_dir, "export"):
        model, calib = load_model_and_data(config, config.recovery.num_samples)
        input_quantizers = activation_quantizers_of(
            run_dir, allocation.layer_names, allocation.formats
        )
        quantized_model, codes = quantize_and_recover(
            model,
            layers,
            weight_assignment(allocation.layer_names, allocation.formats),
            config,
            calib.inputs,
            input_hessians=read_input_hessians(run_dir, config),
            activation_quantizers=input_quantizers,
            learned_steps=read_learned_steps(run_dir, config),
        )
        quantized = QuantizedModel(quantized_model, codes, input_quantizers)
        layer_data = read_layers_file(run_dir, "layer list")
        extra = manifest_extra(
            config,
            layers,
            allocation,
            first_last=allocation_data["first_last"],
            source_sha256=layer_data["checkpoint_sha256"],
            fp32_size_bits=float(layer_data["fp32_size_bits"]),
            correction_samples=min(config.recovery.num_samples, len(calib)),
            corrected=corrects_statistics(model),
        )
        path = write_checkpoint(out_dir, quantized, layers, allocation, config, extra)
        export_hf(quantized_model, path, config.analysis.model, settings)
    logger.info("wrote quantized checkpoint %s", path)
    return path
