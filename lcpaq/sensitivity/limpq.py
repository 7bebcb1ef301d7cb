"""Learned quantizer step sizes as a layer-importance indicator (LIMPQ, Tang et al. ECCV'22;
METHOD §9), post-training.

LIMPQ trains one LSQ step size s_l^b per layer l and candidate bit width b, all bit widths of all
layers jointly in one run, and uses the learned step sizes as the importance of (layer, bits): the
ILP minimises Σ_l s_l^{b_l} under the budget. Here the network's weights and BatchNorm statistics
stay fixed and only the step sizes learn, on the calibration images, against the KL divergence of
the quantized network's outputs from the FP32 ones (label-free). One step draws a batch and runs,
as LIMPQ's joint scheme does, every uniform policy (all layers at b, for each candidate b) and one
random mixed policy (each layer at a random candidate), accumulating their gradients: a step costs
(B + 1) forward+backward passes and one FP32 forward pass for the targets.

Design choices [D] (docs/formats.md, "Learned step sizes"):
- one step size per output channel (the pipeline's quantizers are per channel, so the learned steps
  can also quantize, ``--learn-scales``); the layer's indicator is their mean, the per-layer
  reduction of LIMPQ's per-tensor step size;
- signed codes [−2^(b−1), 2^(b−1) − 1], LSQ's weight grid and the asymmetric scheme's codes with
  the zero point at mid-range (±(2^(b−1) − 1) under ``--symmetric``); the step starts at
  LSQ's 2·mean|w_c|/√(2^(b−1) − 1) and is learned as log s with Adam under a cosine-decaying
  rate (LSQ's gradient scaling 1/√(n·Q_P) only rescales the gradient, which Adam normalises
  away);
- round half away from zero in the forward pass, the straight-through estimator in the backward
  pass (d round(x)/dx = 1), so d ŵ/d s = round(w/s) − w/s inside the grid and the clamp bound
  outside it, LSQ's gradient.

Only integer formats have a step size; other candidates get no indicator (NaN).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lcpaq import runfolder
from lcpaq.errors import InputError
from lcpaq.model.graph import LayerInfo
from lcpaq.quant.formats import code_range, get_format

#: Adam's learning rate on log s: a step moves a step size by about this fraction.
LOG_STEP_LEARNING_RATE = 1e-2
#: A learned step that is smaller at b bits than at a wider candidate is an artefact of the joint
#: training; LIMPQ forbids that (layer, bits) with a huge indicator. We use this multiple of the
#: largest indicator of the table, which keeps the ILP's coefficients within HiGHS's range.
NON_MONOTONE_PENALTY = 1e3


@dataclass(frozen=True)
class LearnedStepSizes:
    """Step sizes learned for ``format_names`` (integer formats) of every layer.

    ``step_sizes[l]``: [F, C_out] float32, layer l's step per candidate and output channel.
    ``objective_before`` / ``objective_after``: [F] mean KL(FP32 ‖ quantized) per uniform policy on
    the calibration images, before and after learning. ``passes``: forward+backward passes spent
    learning; ``forward_passes``: forward-only passes (targets and the before/after objective).
    """

    layer_names: tuple[str, ...]
    format_names: tuple[str, ...]
    step_sizes: tuple[np.ndarray, ...]
    objective_before: np.ndarray
    objective_after: np.ndarray
    steps: int
    batch_size: int
    passes: int
    forward_passes: int
    seconds: float

    def indicator(self) -> np.ndarray:
        """[L, F] mean step size per layer and format: LIMPQ's importance of (layer, bits)."""
        return np.stack([steps.mean(axis=1) for steps in self.step_sizes]).astype(float)


def code_bounds(format_name: str, symmetric: bool = False) -> tuple[int, int]:
    """The signed grid of an integer format: LSQ's [−2^(b−1), 2^(b−1) − 1] (the asymmetric
    scheme's codes [0, 2^b − 1] with zero point 2^(b−1)), or the symmetric scheme's restricted
    ±(2^(b−1) − 1), so that learned steps are scales the pipeline's checkpoint can store."""
    fmt = get_format(format_name)
    if fmt.kind != "int":
        raise InputError(f"learned step sizes need integer formats; {format_name!r} is not one")
    low, high = code_range(fmt, symmetric)
    return (low, high) if symmetric else (low - 2 ** (fmt.bits - 1), high - 2 ** (fmt.bits - 1))


def lsq_quantize(weight: torch.Tensor, step: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """Fake-quantize ``weight`` with per-output-channel ``step`` [C_out]; straight-through round."""
    scale = step.reshape(-1, *([1] * (weight.dim() - 1)))
    scaled = torch.clamp(weight / scale, low, high)
    rounded = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)
    return (scaled + (rounded - scaled).detach()) * scale


def initial_steps(weight: torch.Tensor, bounds: Sequence[tuple[int, int]]) -> torch.Tensor:
    """[F, C_out] LSQ's start 2·mean|w_c| / √Q_P per grid (code ``bounds``) and output channel."""
    mean_abs = weight.detach().abs().reshape(weight.shape[0], -1).mean(dim=1).clamp_min(1e-8)
    return torch.stack([2 * mean_abs / math.sqrt(max(high, 1)) for _, high in bounds])


def kl_to_reference(logits: torch.Tensor, reference_log_probs: torch.Tensor) -> torch.Tensor:
    """Mean over samples of KL(reference ‖ softmax(logits))."""
    log_probs = F.log_softmax(logits.flatten(1), dim=1)
    return F.kl_div(log_probs, reference_log_probs, log_target=True, reduction="batchmean")


class _Policies:
    """The quantized weights of a policy (one format index per layer) under the current steps."""

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[LayerInfo],
        format_names: Sequence[str],
        symmetric: bool,
    ) -> None:
        params = dict(model.named_parameters())
        self.keys = [layer.weight_key for layer in layers]
        self.weights = [params[key].detach() for key in self.keys]
        self.bounds = [code_bounds(name, symmetric) for name in format_names]
        self.log_steps = [
            nn.Parameter(initial_steps(weight, self.bounds).log()) for weight in self.weights
        ]

    def weights_of(self, policy: Sequence[int]) -> dict[str, torch.Tensor]:
        return {
            key: lsq_quantize(weight, log_step[column].exp(), *self.bounds[column])
            for key, weight, log_step, column in zip(
                self.keys, self.weights, self.log_steps, policy
            )
        }


def _objective(
    model: nn.Module, policies: _Policies, inputs: torch.Tensor, batch_size: int
) -> np.ndarray:
    """[F] mean KL of every uniform policy over ``inputs`` (forward passes only)."""
    count = len(policies.bounds)
    totals = np.zeros(count)
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            batch = inputs[start : start + batch_size]
            reference = F.log_softmax(model(batch).flatten(1), dim=1)
            for column in range(count):
                weights = policies.weights_of([column] * len(policies.keys))
                logits = functional_call(model, weights, (batch,))
                totals[column] += kl_to_reference(logits, reference).item() * len(batch)
    return totals / len(inputs)


def learn_step_sizes(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    inputs: torch.Tensor,
    format_names: Sequence[str],
    *,
    steps: int,
    batch_size: int,
    symmetric: bool = False,
    seed: int = 0,
) -> LearnedStepSizes:
    """Learn every layer's step size for every format of ``format_names`` (integer formats) jointly.

    ``model`` stays as it is (eval mode, weights unchanged); ``inputs`` are calibration inputs on
    the model's device. ``symmetric``: the grid of the symmetric scheme (`code_bounds`).
    Deterministic for a given ``seed`` on one device.
    """
    if steps < 1:
        raise InputError(f"limpq-steps must be at least 1 to learn step sizes, got {steps}")
    if not format_names:
        raise InputError("learned step sizes need at least one integer candidate format")
    start_s = time.perf_counter()
    was_training = model.training
    model.eval()
    policies = _Policies(model, layers, format_names, symmetric)
    before = _objective(model, policies, inputs, batch_size)
    optimizer = torch.optim.Adam(policies.log_steps, lr=LOG_STEP_LEARNING_RATE)
    # Cosine decay to zero, as LSQ trains: the last steps refine instead of jittering.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator().manual_seed(seed)
    count, num_layers = len(format_names), len(layers)
    for _ in range(steps):
        picked = torch.randperm(len(inputs), generator=generator)[:batch_size]
        batch = inputs[picked.to(inputs.device)]
        with torch.no_grad():
            reference = F.log_softmax(model(batch).flatten(1), dim=1)
        mixed = torch.randint(count, (num_layers,), generator=generator).tolist()
        optimizer.zero_grad()
        for policy in [*([column] * num_layers for column in range(count)), mixed]:
            logits = functional_call(model, policies.weights_of(policy), (batch,))
            kl_to_reference(logits, reference).backward()
        optimizer.step()
        schedule.step()
    after = _objective(model, policies, inputs, batch_size)
    model.train(was_training)
    evaluation_batches = math.ceil(len(inputs) / batch_size)
    return LearnedStepSizes(
        layer_names=tuple(layer.name for layer in layers),
        format_names=tuple(format_names),
        step_sizes=tuple(
            p.detach().exp().cpu().numpy().astype(np.float32) for p in policies.log_steps
        ),
        objective_before=before,
        objective_after=after,
        steps=steps,
        batch_size=batch_size,
        passes=steps * (count + 1),
        forward_passes=steps + 2 * evaluation_batches * (count + 1),
        seconds=time.perf_counter() - start_s,
    )


def indicator_columns(
    learned: LearnedStepSizes, layer_names: Sequence[str], weight_formats: Sequence[str]
) -> np.ndarray:
    """[L, C] LIMPQ indicator of a candidate table's columns (by their weight format; NaN for
    formats without a learned step). Where a narrower format learned a smaller step than a wider
    one of the same layer, the narrower candidate is forbidden with `NON_MONOTONE_PENALTY`, as
    LIMPQ does."""
    if tuple(layer_names) != learned.layer_names:
        raise InputError("the learned step sizes list other layers than the candidate table")
    indicator = learned.indicator()
    bits = np.array([get_format(name).bits for name in learned.format_names])
    penalty = NON_MONOTONE_PENALTY * float(np.max(indicator))
    forbidden = np.zeros(indicator.shape, dtype=bool)
    for column, width in enumerate(bits):
        wider = bits > width
        if wider.any():
            forbidden[:, column] = (indicator[:, wider] > indicator[:, [column]]).any(axis=1)
    indicator = np.where(forbidden, penalty, indicator)
    by_format = {name: indicator[:, k] for k, name in enumerate(learned.format_names)}
    nan = np.full(len(layer_names), np.nan)
    return np.column_stack([by_format.get(name, nan) for name in weight_formats])


def save_step_sizes(path: Path, learned: LearnedStepSizes) -> Path:
    """Write ``step_sizes.npz`` (atomically): the indicator, per-channel steps and the cost."""
    meta = {
        "steps": learned.steps,
        "batch_size": learned.batch_size,
        "passes": learned.passes,
        "forward_passes": learned.forward_passes,
        "seconds": learned.seconds,
    }
    arrays: dict[str, np.ndarray] = {
        "layer_names": np.array(learned.layer_names),
        "format_names": np.array(learned.format_names),
        "indicator": learned.indicator(),
        "objective_before": learned.objective_before,
        "objective_after": learned.objective_after,
        "meta": np.array(json.dumps(meta)),
    }
    for name, steps in zip(learned.layer_names, learned.step_sizes):
        arrays[f"steps/{name}"] = steps
    return runfolder.write_npz(path, arrays)


def load_step_sizes(path: Path) -> LearnedStepSizes:
    """Read ``step_sizes.npz``."""
    arrays = runfolder.read_npz(path, "learned step sizes (lcpaq analyze --limpq-steps)")
    meta = json.loads(str(arrays["meta"]))
    layer_names = tuple(str(name) for name in arrays["layer_names"])
    return LearnedStepSizes(
        layer_names=layer_names,
        format_names=tuple(str(name) for name in arrays["format_names"]),
        step_sizes=tuple(arrays[f"steps/{name}"] for name in layer_names),
        objective_before=arrays["objective_before"],
        objective_after=arrays["objective_after"],
        steps=int(meta["steps"]),
        batch_size=int(meta["batch_size"]),
        passes=int(meta["passes"]),
        forward_passes=int(meta["forward_passes"]),
        seconds=float(meta["seconds"]),
    )
