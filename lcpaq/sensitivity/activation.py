"""Activation sensitivity: curvature with respect to each quantized layer's input activation, times
the quantization noise of a candidate activation format (METHOD §1a, activation analogue).

For layer l with input activation a_n (sample n, n_a elements) the loss is perturbed through layer l
only when that layer quantizes its input. To second order, with the output Hessian factors of
`lcpaq.sensitivity.losses` (H_out = Σ_c u_c u_cᵀ),

    H_n = J_nᵀ H_out,n J_n,   J_n = ∂z_n/∂a_n through layer l only,
    tr(H_n) = Σ_c ‖∂(u_ncᵀ z_n)/∂a_n‖²          (exact, one backward pass per factor c),

and quantizing a_n with error e_n = Q(a_n) − a_n raises the mean loss by ≈ ½·mean_n e_nᵀ H_n e_n.
Two scores per (layer, activation format), both predicted loss increases like the weight scores:

* ``trace`` (HAWQ analogue): ½ · T_l · σ²_l(f), with T_l = mean_n tr(H_n) and σ²_l(f) the mean
  squared quantization error per element, E‖Q(a)−a‖²/n_a, measured on the calibration activations;
  it assumes the noise is white and independent of the curvature;
* ``diagonal``: ½ · mean_n Σ_k (H_n)_kk (e_nk)², which keeps where the noise and curvature fall.

Activations use one per-tensor scale from calibration statistics (min/max of each layer's input over
the calibration set, `lcpaq.quant.activations`). The measurement streams over batches:
a forward-only pass for the ranges, then per batch one forward and C backward passes (in
memory-bounded chunks of factors) to the layer inputs; only per-sample rows are kept.

For ``kl`` (and cross-entropy's label-free Hessian) at the FP32 point H_n is the exact Hessian of
KL(p_FP ‖ p) with respect to the activation (its residual term vanishes there; tests check it
against `torch.autograd.functional.hessian`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lcpaq.errors import InputError
from lcpaq.model.graph import LayerInfo, get_module, model_device
from lcpaq.quant.activations import (
    check_activation_formats,
    clipped_ranges,
    quantize_activation,
    range_sample_size,
    range_statistics,
)
from lcpaq.sensitivity.activation_result import (
    ACTIVATION_SCORERS,
    ActivationSensitivity,
    activation_scores,
)
from lcpaq.sensitivity.batch_share import SINGLE_PROCESS, BatchShare
from lcpaq.sensitivity.losses import (
    LossName,
    factor_chunk,
    output_grads_in_chunks,
    output_hessian_factors,
)
from lcpaq.state_file import (
    NO_STATE,
    Snapshot,
    StateFile,
    generator_state,
    split_rows,
    stream_batches,
)

__all__ = [
    "ACTIVATION_SCORERS",
    "ActivationSensitivity",
    "ActivationState",
    "activation_scores",
    "activation_sensitivity",
]


# ---------------------------------------------------------------------------------------------
# Pass 2: curvature with respect to the layer inputs, and the noise of each format.


class _InputTaps:
    """Forward pre-hooks that hand each layer a view of its input, so the gradient with respect
    to that view is the one through this layer only (a tensor shared by two layers, e.g. a residual
    block's input feeding conv1 and the shortcut, gets one view per layer)."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.taps: dict[str, list[torch.Tensor]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> _InputTaps:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *_exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def _hook(self, name: str):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            value = args[0]
            # Nothing upstream needs a gradient (e.g. the model input): a fresh leaf is the same.
            tap = value.view_as(value) if value.requires_grad else value.detach().requires_grad_()
            self.taps.setdefault(name, []).append(tap)
            return (tap, *args[1:])

        return hook


@dataclass
class ActivationState:
    """Running state of `activation_sensitivity`: per-batch per-sample rows (float64, batch order),
    so that `lcpaq.sensitivity.distributed` can compute batches in several processes and replay the
    single-process accumulation exactly."""

    names: tuple[str, ...]
    modules: dict[str, nn.Module]
    format_names: tuple[str, ...]
    low: np.ndarray
    high: np.ndarray
    clip_low: np.ndarray
    clip_high: np.ndarray
    clipping: str
    symmetric: bool
    generator: torch.Generator
    rows: list[dict[str, np.ndarray]]
    num_elements: np.ndarray | None = None
    sampled: bool = False

    @classmethod
    def start(
        cls,
        model: nn.Module,
        layers: Sequence[LayerInfo],
        format_names: Sequence[str],
        low: np.ndarray,
        high: np.ndarray,
        *,
        samples: Sequence[Sequence[np.ndarray]] = (),
        clipping: str = "minmax",
        symmetric: bool = False,
        seed: int = 0,
        clipped: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> ActivationState:
        """``low``/``high`` [L]: observed ranges; ``samples``: `range_statistics`' value samples,
        from which ``clipping`` calibrates the [L, F] range of every format (`clipped_ranges`),
        unless ``clipped`` gives those ranges (a resumed run's)."""
        model.eval()
        modules = {layer.name: get_module(model, layer.name) for layer in layers}
        format_names = check_activation_formats(format_names)
        low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
        clip_low, clip_high = clipped or clipped_ranges(
            low, high, samples, format_names, clipping, symmetric=symmetric
        )
        return cls(
            names=tuple(modules),
            modules=modules,
            format_names=format_names,
            low=low,
            high=high,
            clip_low=clip_low,
            clip_high=clip_high,
            clipping=clipping,
            symmetric=symmetric,
            generator=torch.Generator(device=model_device(model)).manual_seed(seed),
            rows=[],
        )

    def add_batch(self, model: nn.Module, inputs: torch.Tensor, loss: LossName) -> None:
        inputs = inputs.to(model_device(model))
        count, num_layers, num_formats = inputs.shape[0], len(self.names), len(self.format_names)
        with _InputTaps(self.modules) as recorder:
            logits = model(inputs)
        if logits.dim() != 2:
            raise InputError(
                f"the model's output has shape {tuple(logits.shape)}; activation curvature needs "
                "logits of shape [batch, classes]"
            )
        missing = [name for name in self.names if name not in recorder.taps]
        if missing:
            raise ValueError(f"layer {missing[0]!r} did not run in the forward pass")
        factors, is_sampled = output_hessian_factors(logits, loss, self.generator)
        self.sampled = self.sampled or is_sampled
        taps = [tap for name in self.names for tap in recorder.taps[name]]
        # Σ_c (∂(u_cᵀz)/∂a)² per element: the diagonal of every sample's activation block.
        diagonals = [torch.zeros_like(tap, dtype=torch.float64) for tap in taps]
        chunk = factor_chunk(len(factors), sum(tap.numel() for tap in taps))
        for grads in output_grads_in_chunks(logits, taps, factors, chunk):
            for diagonal, grad in zip(diagonals, grads):
                diagonal += grad.double().pow(2).sum(0)
            del grads
        del logits
        trace = np.zeros((count, num_layers))
        noise = np.zeros((count, num_layers, num_formats))
        weighted = np.zeros((count, num_layers, num_formats))
        elements = np.zeros(num_layers, dtype=np.int64)
        cursor = 0
        for index, name in enumerate(self.names):
            for tap in recorder.taps[name]:
                diagonal = diagonals[cursor]
                cursor += 1
                values = tap.detach()
                elements[index] += values[0].numel()
                trace[:, index] += diagonal.flatten(1).sum(1).cpu().numpy()
                for column, format_name in enumerate(self.format_names):
                    error = (
                        quantize_activation(
                            values,
                            format_name,
                            float(self.clip_low[index, column]),
                            float(self.clip_high[index, column]),
                            symmetric=self.symmetric,
                        ).double()
                        - values.double()
                    ).pow(2)
                    noise[:, index, column] += error.flatten(1).sum(1).cpu().numpy()
                    weighted[:, index, column] += (diagonal * error).flatten(1).sum(1).cpu().numpy()
        if self.num_elements is None:
            self.num_elements = elements
        self.rows.append({"trace": trace, "noise": noise, "weighted": weighted})

    def snapshot(self) -> Snapshot:
        """The ranges, the per-batch rows and the generator (`lcpaq.state_file`)."""
        arrays: dict[str, np.ndarray | torch.Tensor] = {
            "low": self.low,
            "high": self.high,
            "clip_low": self.clip_low,
            "clip_high": self.clip_high,
            "generator": generator_state(self.generator),
            "sampled": np.array(self.sampled),
            "row_counts": np.array([len(row["trace"]) for row in self.rows], np.int64),
        }
        if self.num_elements is not None:
            arrays["num_elements"] = self.num_elements
        per_format = (len(self.names), len(self.format_names))
        widths = {"trace": per_format[:1], "noise": per_format, "weighted": per_format}
        for key, width in widths.items():
            blocks = [row[key] for row in self.rows]
            arrays[key] = np.concatenate(blocks) if blocks else np.zeros((0, *width))
        return arrays

    def restore(self, snapshot: dict[str, torch.Tensor]) -> int:
        """Continue after the batches ``snapshot`` holds; returns their number."""
        counts = snapshot["row_counts"]
        parts = {key: split_rows(snapshot[key], counts) for key in ("trace", "noise", "weighted")}
        self.rows = [{key: parts[key][index] for key in parts} for index in range(len(counts))]
        if "num_elements" in snapshot:
            self.num_elements = snapshot["num_elements"].numpy()
        self.generator.set_state(snapshot["generator"])
        self.sampled = bool(snapshot["sampled"])
        return len(self.rows)

    def finish(self) -> ActivationSensitivity:
        if not self.rows or self.num_elements is None:
            raise ValueError("no calibration samples were given")
        trace = np.concatenate([row["trace"] for row in self.rows])  # [N, L]
        noise = np.concatenate([row["noise"] for row in self.rows])  # [N, L, F]
        weighted = np.concatenate([row["weighted"] for row in self.rows])
        count = len(trace)
        return ActivationSensitivity(
            layer_names=self.names,
            format_names=self.format_names,
            trace=trace.mean(0),
            trace_stderr=_stderr(trace),
            num_elements=self.num_elements,
            noise=noise.sum(0) / (count * self.num_elements[:, None]),
            weighted=weighted.mean(0),
            weighted_stderr=_stderr(weighted),
            low=self.low,
            high=self.high,
            num_samples=count,
            method="fisher_sampled" if self.sampled else "gauss_newton",
            symmetric=self.symmetric,
            sample_traces=trace.astype(np.float32),
            clipping=self.clipping,
            clip_low=self.clip_low,
            clip_high=self.clip_high,
        )


def _stderr(values: np.ndarray) -> np.ndarray:
    if len(values) < 2:
        return np.full(values.shape[1:], np.nan)
    return values.std(0, ddof=1) / np.sqrt(len(values))


def _started(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    batches: Sequence[torch.Tensor],
    format_names: Sequence[str],
    mine: Sequence[int],
    share: BatchShare,
    clipping: str,
    symmetric: bool,
    seed: int,
) -> ActivationState:
    """Pass 1 (the ranges of every layer's input over this process's batches, reduced over the
    processes) and the state of pass 2 it starts."""
    low, high, samples = range_statistics(
        model,
        layers,
        [(index, batches[index]) for index in mine],
        keep=range_sample_size(clipping),
        seed=seed,
    )
    if share.world > 1:
        low, high = share.smallest(low), share.largest(high)
        samples = share.in_batch_order(samples, len(batches))
    return ActivationState.start(
        model,
        layers,
        format_names,
        low,
        high,
        samples=samples,
        clipping=clipping,
        symmetric=symmetric,
        seed=seed + share.rank,
    )


def activation_sensitivity(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    batches: Sequence[torch.Tensor],
    format_names: Sequence[str],
    *,
    loss: LossName = "cross_entropy",
    clipping: str = "minmax",
    symmetric: bool = False,
    seed: int = 0,
    share: BatchShare = SINGLE_PROCESS,
    progress: bool = False,
    state_file: StateFile = NO_STATE,
) -> ActivationSensitivity:
    """Per-layer activation curvature (exact Gauss–Newton trace w.r.t. the layer input, SE over
    samples) and the noise of each activation format, streamed over calibration batches.

    Args:
        model: the FP32 model (put in eval mode); batches: input tensors [B, ...], labels not needed.
        format_names: activation formats (`lcpaq.quant.formats` names, or fp32/fp16/bf16).
        loss: as `lcpaq.sensitivity.gauss_newton.gauss_newton_traces` (cross_entropy, mse, kl).
        clipping: how each format's range is calibrated (`clipped_ranges`: minmax or mse).
        symmetric: symmetric INT activation codes (default asymmetric, METHOD §0).
        share: this process's batches under torchrun (`lcpaq.sensitivity.distributed.batch_share`):
            ranges are min/max-reduced (exact), the range samples (``mse`` clipping) and the
            per-sample rows gathered in batch order, so the result equals the single-process one
            (the sampled Fisher past 64 classes: in distribution only, as for Gauss–Newton).
        state_file: where the ranges and the rows are saved after batches (`lcpaq.state_file`);
            a snapshot found there is continued from its next batch, to the same result.
    Returns:
        an `ActivationSensitivity`; `activation_scores` turns it into [L, A] scores.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("no calibration samples were given")
    mine = share.indices(len(batches))
    snapshot = state_file.load()
    if snapshot is None:
        state = _started(
            model, layers, batches, format_names, mine, share, clipping, symmetric, seed
        )
        state_file.save(state.snapshot, last=True)  # the ranges: a resumed run skips their pass
    else:
        state = ActivationState.start(
            model,
            layers,
            format_names,
            snapshot["low"].numpy(),
            snapshot["high"].numpy(),
            clipping=clipping,
            symmetric=symmetric,
            seed=seed + share.rank,
            clipped=(snapshot["clip_low"].numpy(), snapshot["clip_high"].numpy()),
        )
    done = state.restore(snapshot) if snapshot is not None else 0
    stream_batches(
        lambda batch: state.add_batch(model, batch, loss),
        state.snapshot,
        [batches[index] for index in mine],
        done,
        state_file,
        desc="activation curvature",
        progress=progress,
    )
    if share.world > 1:
        gathered = share.in_batch_order(
            [(state.num_elements, row) for row in state.rows], len(batches)
        )
        state.num_elements = gathered[0][0]
        state.rows = [row for _, row in gathered]
        state.sampled = bool(share.add_up(np.array([float(state.sampled)]))[0])
    return state.finish()
