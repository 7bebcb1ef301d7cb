"""Accuracy recovery after weight quantization: correct the statistics shift quantization causes.

Quantized weights shift the mean and variance of every downstream activation. We run the FP32 and the
quantized model on the same calibration inputs and, in execution order:

* for each BatchNorm, move its running mean by (μ_q − μ_fp) and scale its running variance by
  σ²_q/σ²_fp, so it normalises the quantized model's activations the way it normalised the FP32 ones;
* for each quantized layer with a bias, add E[y_fp − y_q] per output channel (bias correction).

This corrects the *shift*; re-estimating BN statistics from scratch on calibration (training) images
instead drifts even INT8 ResNet20 by ~3 points (shared/README). Each correction sees the earlier ones
already applied. Statistics are per channel along the module's channel axis (axis 1 for
convolutions and BatchNorm, the last axis for Linear on inputs of any rank, e.g. [N, T, C] tokens or
channels-last images), and with a token mask ([N, T] bool, contract §2) over real tokens only.

When the calibration activations fit in memory the whole correction is one forward pass (each hook
corrects its module just before it runs). Otherwise the inputs are split into micro-batches that run
through the model in lockstep (`lcpaq.model.lockstep`): each micro-batch runs once, pausing at every
correction point until all have added their moments; linear in depth, memory independent of it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lcpaq.model.channel_stats import Moments, channel_axis
from lcpaq.model.graph import NORM_TYPES, get_module
from lcpaq.model.graph import token_mask as model_token_mask
from lcpaq.model.lockstep import Lockstep

logger = logging.getLogger(__name__)

#: Use the single-pass correction when its activations stay below this many bytes.
SINGLE_PASS_MAX_BYTES = 3 << 30


@dataclass(frozen=True)
class RecoveryReport:
    num_samples: int
    corrected_norms: int
    corrected_biases: int
    single_pass: bool


def corrects_statistics(model: nn.Module) -> bool:
    """Whether the correction applies to ``model``: not to text models (they define
    ``token_mask``). They have no BatchNorm, and bias correction of their Linear outputs was
    measured to hurt: on all-MiniLM-L6-v2 at 3.0 average bits it lowered the mean cosine of the
    embeddings to FP32's by 0.034 ± 0.001 (lcpaq's allocation) and 0.112 ± 0.002 (uniform INT3,
    GPTQ) on 400 held-out texts (results/minilm_cosine_check.json)."""
    return not callable(getattr(model, "token_mask", None))


def correction_points(model: nn.Module, quantized_names: Sequence[str]) -> list[tuple[str, str]]:
    """(module name, kind) for every BatchNorm (kind "norm") and biased quantized layer ("bias");
    none for a model the correction does not apply to (`corrects_statistics`)."""
    if not corrects_statistics(model):
        return []
    points = [
        (name, "norm") for name, module in model.named_modules() if isinstance(module, NORM_TYPES)
    ]
    points += [
        (name, "bias")
        for name in quantized_names
        if getattr(get_module(model, name), "bias", None) is not None
    ]
    return points


def _point_axis(module: nn.Module, kind: str) -> int:
    """The channel axis of a correction point: BatchNorm inputs on axis 1, layer outputs on the
    layer's `channel_axis`."""
    return 1 if kind == "norm" else channel_axis(module)


def _mask_of(token_mask: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    return None if token_mask is None else token_mask[start:stop]


def _collect_fp_stats(
    model: nn.Module,
    points: list[tuple[str, str]],
    inputs: torch.Tensor,
    batch_size: int,
    token_mask: torch.Tensor | None = None,
) -> dict[str, Moments]:
    """Reference moments of FP32 BN inputs and biased-layer outputs, plus their execution order."""
    moments = {name: Moments() for name, _ in points}
    order: list[str] = []
    handles = []
    current: list[torch.Tensor | None] = [None]  # the running micro-batch's token mask
    for name, kind in points:
        module = get_module(model, name)

        def hook(module, args, output, name=name, kind=kind):
            if name not in order:
                order.append(name)
            value = args[0] if kind == "norm" else output
            moments[name].add(value, _point_axis(module, kind), current[0])

        handles.append(module.register_forward_hook(hook))
    try:
        for start in range(0, len(inputs), batch_size):
            current[0] = _mask_of(token_mask, start, start + batch_size)
            model(inputs[start : start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
    # Keep only modules that actually ran, in the order they ran.
    return {name: moments[name] for name in order}


def _apply_norm(module: nn.Module, fp: Moments, quantized: Moments) -> None:
    """Set running stats so BN maps the quantized inputs' moments to FP32's output moments.

    With s = √(var+eps): s' = s·σ_q/σ_fp and rm' = μ_q − (σ_q/σ_fp)(μ_fp − rm) give
    (μ_q − rm')/s' = (μ_fp − rm)/s and σ_q/s' = σ_fp/s.
    """
    # `correction_points` picks BatchNorm layers only; they track running statistics.
    assert isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d))
    fp_mean, fp_var = fp.mean_var()
    q_mean, q_var = quantized.mean_var()
    eps = module.eps
    valid = fp_var > 1e-12
    ratio = torch.where(valid, q_var / fp_var.clamp_min(1e-12), torch.ones_like(fp_var))
    running_mean, running_var = module.running_mean, module.running_var
    assert running_mean is not None and running_var is not None
    shifted = q_mean - ratio.sqrt() * (fp_mean - running_mean.double())
    running_mean.copy_(shifted.to(running_mean.dtype))
    running_var.copy_(
        ((running_var.double() + eps) * ratio - eps).clamp_min(0.0).to(running_var.dtype)
    )


def _apply_bias(module: nn.Module, fp: Moments, quantized: Moments) -> torch.Tensor:
    bias = module.bias
    assert isinstance(bias, torch.Tensor), "bias correction is only planned for layers with a bias"
    delta = (fp.mean_var()[0] - quantized.mean_var()[0]).to(bias.dtype)
    bias.add_(delta)
    return delta


@dataclass(frozen=True)
class ReferenceStats:
    """FP32 moments at every correction point, in execution order; reusable across allocations
    of the same model that quantize the same set of layers."""

    points: dict[str, str]
    moments: dict[str, Moments]


@torch.no_grad()
def collect_reference_stats(
    fp_model: nn.Module,
    inputs: torch.Tensor,
    quantized_names: Sequence[str],
    *,
    batch_size: int = 256,
    token_mask: torch.Tensor | None = None,
) -> ReferenceStats:
    """``token_mask`` [N, T] bool: statistics over real tokens only (contract §2); by default the
    model's own (`lcpaq.model.graph.token_mask`, text models)."""
    fp_model.eval()
    if token_mask is None:
        token_mask = model_token_mask(fp_model, inputs)
    points = dict(correction_points(fp_model, quantized_names))
    return ReferenceStats(
        points,
        _collect_fp_stats(fp_model, list(points.items()), inputs, batch_size, token_mask),
    )


@torch.no_grad()
def correct_statistics(
    fp_model: nn.Module,
    quantized_model: nn.Module,
    inputs: torch.Tensor,
    quantized_names: Sequence[str],
    *,
    batch_size: int = 256,
    single_pass_max_bytes: int = SINGLE_PASS_MAX_BYTES,
    reference: ReferenceStats | None = None,
    token_mask: torch.Tensor | None = None,
) -> RecoveryReport:
    """Correct BN statistics and biases of ``quantized_model`` in place (see module docstring).

    ``reference`` (from `collect_reference_stats` on the same inputs) skips the FP32 pass.
    ``token_mask`` [N, T] bool: statistics over real tokens only (contract §2); by default the
    model's own (`lcpaq.model.graph.token_mask`, text models).
    """
    quantized_model.eval()
    if token_mask is None:
        token_mask = model_token_mask(fp_model, inputs)
    if not corrects_statistics(fp_model):
        return RecoveryReport(len(inputs), 0, 0, single_pass=True)
    if reference is None:
        reference = collect_reference_stats(
            fp_model, inputs, quantized_names, batch_size=batch_size, token_mask=token_mask
        )
    points, fp_moments = reference.points, reference.moments
    order = list(fp_moments)
    activation_bytes = _largest_activation_bytes(quantized_model, inputs[:1]) * len(inputs) * 3
    single_pass = activation_bytes <= single_pass_max_bytes
    step = len(inputs) if single_pass else batch_size
    bounds = [(start, min(start + step, len(inputs))) for start in range(0, len(inputs), step)]
    _correct_in_lockstep(quantized_model, inputs, bounds, points, fp_moments, token_mask)
    kinds = [points[name] for name in order]
    return RecoveryReport(
        num_samples=len(inputs),
        corrected_norms=kinds.count("norm"),
        corrected_biases=kinds.count("bias"),
        single_pass=single_pass,
    )


def _largest_activation_bytes(model: nn.Module, sample: torch.Tensor) -> int:
    largest = [sample.numel() * sample.element_size()]

    def hook(_m, _args, output):
        if isinstance(output, torch.Tensor):
            largest[0] = max(largest[0], output.numel() * output.element_size())

    handles = [module.register_forward_hook(hook) for module in model.modules()]
    try:
        model(sample)
    finally:
        for handle in handles:
            handle.remove()
    return largest[0]


def _correct_in_lockstep(
    model: nn.Module,
    inputs: torch.Tensor,
    bounds: list[tuple[int, int]],
    points: dict[str, str],
    fp_moments: dict[str, Moments],
    token_mask: torch.Tensor | None,
) -> None:
    """Every micro-batch ``inputs[start:stop]`` runs once; at each correction point (its first
    call in a micro-batch) all micro-batches add their moments, the last applies the correction
    (`Lockstep.meet`), and a biased layer's output gets the bias change it would have had."""
    lockstep = Lockstep(len(bounds))
    done: list[set[str]] = [set() for _ in bounds]
    masks = [_mask_of(token_mask, start, stop) for start, stop in bounds]

    def moments_of(tensor: torch.Tensor, axis: int) -> Moments:
        moments = Moments()
        moments.add(tensor, axis, masks[lockstep.index])
        return moments

    def first_call(name: str) -> bool:
        seen = done[lockstep.index]
        if name in seen:
            return False
        seen.add(name)
        return True

    def norm_hook(module, args, name):
        if first_call(name):
            fp = fp_moments[name]
            lockstep.meet(
                name,
                moments_of(args[0], 1),
                lambda parts: _apply_norm(module, fp, Moments.combined(parts)),
            )

    def bias_hook(module, _args, output, name):
        if not first_call(name):
            return None
        fp, axis = fp_moments[name], channel_axis(module)
        delta = lockstep.meet(
            name,
            moments_of(output, axis),
            lambda parts: _apply_bias(module, fp, Moments.combined(parts)),
        )
        shape = [1] * output.dim()
        shape[axis] = -1
        return output + delta.reshape(shape)

    handles = []
    for name in fp_moments:
        module = get_module(model, name)
        if points[name] == "norm":
            handles.append(
                module.register_forward_pre_hook(lambda m, a, name=name: norm_hook(m, a, name))
            )
        else:
            handles.append(
                module.register_forward_hook(lambda m, a, o, name=name: bias_hook(m, a, o, name))
            )
    try:
        lockstep.run(lambda index: model(inputs[bounds[index][0] : bounds[index][1]]))
    finally:
        for handle in handles:
            handle.remove()
