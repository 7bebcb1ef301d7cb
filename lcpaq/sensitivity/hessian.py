"""Stage 1: per-layer curvature of the loss, with standard errors (METHOD §1a, §1a').

Input: an eval-mode model, its `LayerInfo` list and calibration batches. Output: a `CurvatureEstimate`
(trace of each layer's diagonal Hessian block, its standard error, flags, and for the Gauss–Newton path
the per-element diagonal), saved as ``curvature.npz`` in the run folder.

Three estimators (all for the losses of `LossName`: cross-entropy, MSE, KL to the FP32 outputs):

* ``gauss_newton`` (default): the exact per-layer trace of the Gauss–Newton matrix
  G = (1/N) Σ_n J_nᵀ H_out,n J_n. With H_out = Σ_c u_c u_cᵀ (cross-entropy: u_c = √p_c (e_c − p)),
  tr(G_ll) = (1/N) Σ_n Σ_c ‖∂(u_ncᵀ z_n)/∂W_l‖². One backward pass per factor c gives the gradients
  with respect to every layer's output at once; per-sample weight gradients are formed from the
  layer inputs and output gradients (unfold for convolutions), so there is no probe noise and the
  standard error is the one over calibration samples. Memory does not grow with the number of batches:
  only running sums are kept. For ``kl`` at the FP32 point it equals the exact Hessian.
* ``hutchinson``: E[vᵀHv] with Rademacher v drawn jointly over all layers and read per layer
  (unbiased for tr(H_ll)); the cross-check, stopped at a relative-error tolerance or a probe cap.
* ``hutchinson_single_layer``: Rademacher v that is zero outside one layer l, so v_lᵀH_ll v_l carries
  no cross-block noise; probe budgets follow each layer's measured variance, and the exact
  Gauss–Newton trace can serve as control variate (each probe then reads only v(H − G)v, which
  vanishes for ReLU networks and for ``kl``). The pipeline's ``estimator="hutchinson"`` uses this.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lcpaq.errors import InputError
from lcpaq.model.graph import LayerInfo, get_module

logger = logging.getLogger(__name__)

#: Losses on the logits z: ``cross_entropy`` (true labels), ``mse`` (mean over outputs of (z − y)²,
#: y one-hot for integer labels) and ``kl`` = KL(p_FP ‖ softmax(z)) to the FP32 model's own outputs
#: (label-free). At the FP32 point KL's gradient p − p_FP is zero, so its Hessian has no residual
#: term: it *is* the Gauss–Newton matrix with H_out = diag(p) − ppᵀ (tests check both).
LossName = Literal["cross_entropy", "mse", "kl"]
LOSSES: tuple[str, ...] = ("cross_entropy", "mse", "kl")

#: Past this many classes the exact factorisation costs too many backward passes; the Monte-Carlo
#: Fisher (labels drawn from the model, one backward per draw) is used instead (METHOD §1a').
EXACT_FACTOR_MAX_CLASSES = 64

#: Output gradients of all layers are kept for at most this many float elements at once: the
#: C backward passes of a batch run in chunks of factors that fit (at least one factor per chunk).
FACTOR_GRADS_ELEMENTS_LIMIT = 1 << 26

#: Per-sample gradients are formed in micro-batches of at most this many float32 elements.
PER_SAMPLE_ELEMENTS_LIMIT = 1 << 25


@dataclass(frozen=True)
class CurvatureEstimate:
    """Per-layer trace of the Hessian (or Gauss–Newton) block of the mean calibration loss.

    ``trace[l]`` and ``trace_stderr[l]`` refer to ``layer_names[l]``. ``diagonal`` maps a layer name to
    the per-element diagonal (weight-shaped, float32) when the estimator provides it.
    ``flags[l]`` is ``""``, ``"negative"`` (estimate ≤ 0, clamped when scoring) or
    ``"insignificant"`` (|estimate| < 2 standard errors).
    """

    layer_names: tuple[str, ...]
    trace: np.ndarray
    trace_stderr: np.ndarray
    num_samples: int
    method: str
    num_probes: int
    flags: tuple[str, ...]
    diagonal: dict[str, np.ndarray] = field(default_factory=dict)
    #: Per-sample trace contributions [N, L] (exact estimators only): ranking stability, bootstrap.
    sample_traces: np.ndarray | None = None
    #: Probes spent on each layer (single-layer Hutchinson only).
    probes_per_layer: np.ndarray | None = None

    def clamped_trace(self) -> np.ndarray:
        """Traces with non-positive values replaced by 1e-12 × the largest (METHOD §1a)."""
        floor = 1e-12 * max(float(self.trace.max()), 1e-30)
        return np.maximum(self.trace, floor)


def flag_estimates(trace: np.ndarray, stderr: np.ndarray) -> tuple[str, ...]:
    flags = []
    for value, error in zip(trace, stderr):
        if value <= 0:
            flags.append("negative")
        elif abs(value) < 2 * error:
            flags.append("insignificant")
        else:
            flags.append("")
    return tuple(flags)


# ---------------------------------------------------------------------------------------------
# Per-sample gradients from layer inputs and output gradients.


def layer_input_columns(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The layer input arranged so that per-sample weight gradients are one contraction away.

    Linear: [N, T, in] (T = 1 without a sequence axis). Convolution: the unfolded, padded input
    [N, groups, in/groups x kernel, positions].
    """
    count = inputs.shape[0]
    if isinstance(module, nn.Linear):
        return inputs.reshape(count, -1, inputs.shape[-1])
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if isinstance(module, nn.Conv1d):  # view a 1-d convolution as a 2-d one of height 1
            inputs = inputs.unsqueeze(2)
            kernel, stride, dilation = (
                (1, *module.kernel_size),
                (1, *module.stride),
                (1, *module.dilation),
            )
            padding = (*module._reversed_padding_repeated_twice, 0, 0)
        else:
            kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
            padding = tuple(module._reversed_padding_repeated_twice)
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        if any(padding):
            inputs = F.pad(inputs, padding, mode=mode)
        columns = F.unfold(inputs, kernel, dilation=dilation, stride=stride)  # [N, Cin*k, P]
        return columns.reshape(count, module.groups, -1, columns.shape[-1])
    raise TypeError(f"per-sample gradients are not implemented for {type(module).__name__}")


def per_sample_grads_from_columns(
    module: nn.Module, columns: torch.Tensor, grad_outputs: torch.Tensor
) -> torch.Tensor:
    """Per-sample weight gradients [K, N, *weight.shape] for K stacked output gradients [K, N, ...]."""
    factors, count = grad_outputs.shape[:2]
    if isinstance(module, nn.Linear):
        grads = grad_outputs.reshape(factors, count, -1, grad_outputs.shape[-1])
        return torch.einsum("knto,nti->knoi", grads, columns)
    groups = module.groups
    grads = grad_outputs.reshape(factors, count, groups, module.out_channels // groups, -1)
    per_sample = torch.einsum("kngop,ngqp->kngoq", grads, columns)
    return per_sample.reshape(factors, count, *module.weight.shape)


def per_sample_weight_grads(
    module: nn.Module, inputs: torch.Tensor, grad_outputs: torch.Tensor
) -> torch.Tensor:
    """Per-sample ∂/∂W of Σ (grad_outputs · module(inputs)), shape [N, *weight.shape]."""
    columns = layer_input_columns(module, inputs)
    return per_sample_grads_from_columns(module, columns, grad_outputs[None])[0]


def check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise InputError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")


def output_hessian_factors(
    logits: torch.Tensor, loss: LossName, generator: torch.Generator | None
) -> tuple[torch.Tensor, bool]:
    """Factors U [K, N, C] with H_out,n = Σ_k U[k, n] U[k, n]ᵀ; the flag says if they are sampled.

    Cross-entropy's output Hessian diag(p) − ppᵀ does not depend on the labels; ``kl`` (KL to the
    FP32 outputs, evaluated at the FP32 model) has the same output Hessian, so both use these factors.
    """
    check_loss(loss)
    num_classes = logits.shape[-1]
    if loss == "mse":  # mean over outputs of (z - y)^2: H_out = (2/C) I
        eye = torch.eye(num_classes, dtype=logits.dtype, device=logits.device)
        factors = (2.0 / num_classes) ** 0.5 * eye[:, None, :].expand(-1, logits.shape[0], -1)
        return factors, False
    probs = torch.softmax(logits.detach(), dim=-1)
    if num_classes <= EXACT_FACTOR_MAX_CLASSES:
        eye = torch.eye(num_classes, dtype=probs.dtype, device=probs.device)
        # factors[c, n] = sqrt(p_nc) (e_c - p_n)
        factors = probs.T.sqrt()[:, :, None] * (eye[:, None, :] - probs[None])
        return factors.to(logits.dtype), False
    # Monte-Carlo Fisher: y ~ p gives E[(p - e_y)(p - e_y)^T] = diag(p) - pp^T.
    drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    factors = probs - F.one_hot(drawn, num_classes).to(probs.dtype)
    return factors[None].to(logits.dtype), True


def summed_loss(logits: torch.Tensor, labels: torch.Tensor | None, loss: LossName) -> torch.Tensor:
    """Σ_n ℓ(z_n) over a batch: the loss whose exact Hessian the Hutchinson estimators measure.

    ``mse`` takes float targets of the logits' shape, or integer labels (one-hot targets).
    ``kl`` ignores the labels: the reference distribution is the model's own (detached) output, so
    called on the FP32 model it measures KL(p_FP ‖ p) around p = p_FP.
    """
    check_loss(loss)
    if loss == "kl":
        reference = torch.log_softmax(logits.detach(), dim=-1)
        return F.kl_div(
            torch.log_softmax(logits, dim=-1), reference, reduction="sum", log_target=True
        )
    if labels is None:
        raise InputError(f"loss {loss!r} needs labels; use loss 'kl' for label-free calibration")
    if loss == "cross_entropy":
        return F.cross_entropy(logits, labels, reduction="sum")
    target = labels
    if not labels.is_floating_point():
        target = F.one_hot(labels, logits.shape[-1])
    if target.shape != logits.shape:
        raise InputError(
            f"mse targets have shape {tuple(target.shape)}, the logits {tuple(logits.shape)}"
        )
    return (logits - target.to(logits.dtype)).pow(2).mean(-1).sum()


class _LayerRecorder:
    """Forward hooks that keep each layer's inputs and outputs of one forward pass."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.outputs: dict[str, list[torch.Tensor]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> _LayerRecorder:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *_exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def _hook(self, name: str):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            self.inputs.setdefault(name, []).append(args[0].detach())
            self.outputs.setdefault(name, []).append(output)

        return hook

    def clear(self) -> None:
        self.inputs.clear()
        self.outputs.clear()


def output_grads_in_chunks(
    logits: torch.Tensor, targets: Sequence[torch.Tensor], factors: torch.Tensor, chunk: int
) -> Iterator[list[torch.Tensor]]:
    """Gradients of Σ_n factors[k, n]·logits[n] w.r.t. each target, ``chunk`` factors at a time:
    one [k, *target.shape] tensor per target.

    One backward pass per factor (a vmapped backward, ``is_grads_batched``, was measured 3x slower
    on ResNet20 on CPU); each factor's gradients are copied into preallocated buffers at once so
    that a chunk never exists twice (a list plus its stacked copy).
    """
    for start in range(0, len(factors), chunk):
        size = min(chunk, len(factors) - start)
        buffers: list[torch.Tensor] = []
        for k in range(size):
            grads = torch.autograd.grad(
                logits,
                list(targets),
                grad_outputs=factors[start + k],
                retain_graph=start + k + 1 < len(factors),
            )
            if not buffers:
                buffers = [grad.new_empty((size, *grad.shape)) for grad in grads]
            for buffer, grad in zip(buffers, grads):
                buffer[k] = grad
            del grads
        yield buffers
        del buffers


def factor_chunk(num_factors: int, elements_per_factor: int) -> int:
    """Factors per chunk: as many as fit in `FACTOR_GRADS_ELEMENTS_LIMIT` elements, at least one.

    Fewer factors per chunk lower the peak memory, but every chunk unfolds each convolution input
    again (im2col dominated the profile on ResNet20 at one factor per chunk: 1.3x the time).
    """
    return int(min(num_factors, max(1, FACTOR_GRADS_ELEMENTS_LIMIT // max(1, elements_per_factor))))


def _micro_batches(count: int, elements_per_sample: int) -> list[slice]:
    """Sample slices whose per-sample gradients stay under `PER_SAMPLE_ELEMENTS_LIMIT` elements."""
    size = max(1, PER_SAMPLE_ELEMENTS_LIMIT // max(1, elements_per_sample))
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


def gauss_newton_traces(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    batches: Iterable[torch.Tensor],
    *,
    loss: LossName = "cross_entropy",
    keep_diagonal: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> CurvatureEstimate:
    """Exact per-layer Gauss–Newton traces (sampled Fisher past 64 classes), streamed over batches.

    Args:
        model: the FP32 model; it is put in eval mode so samples are independent (BatchNorm uses its
            running statistics).
        layers: the layers to measure, from `lcpaq.model.graph.discover_layers`.
        batches: input tensors [B, ...] on any device; labels are not needed.
        loss: ``cross_entropy`` (also the Hessian of KL to the FP32 outputs) or ``mse``.
        keep_diagonal: also accumulate the per-element diagonal of G_ll (weight-shaped).
    Returns:
        traces of the mean-loss Gauss–Newton blocks with standard errors over samples.
    """
    state = GaussNewtonState.start(model, layers, keep_diagonal=keep_diagonal, seed=seed)
    for inputs in tqdm(
        list(batches), desc="Gauss-Newton traces", disable=not progress, unit="batch"
    ):
        state.add_batch(model, inputs, loss)
    return state.finish()


@dataclass
class GaussNewtonState:
    """Running state of `gauss_newton_traces`: per-batch, per-sample trace rows (float64, in batch
    order), the summed per-element diagonal and the Fisher-sampling generator.

    Split out so that `lcpaq.sensitivity.distributed` can run `add_batch` on a share of the batches in each
    process and `finish` on the gathered rows, giving the single-process result.
    """

    names: tuple[str, ...]
    modules: dict[str, nn.Module]
    generator: torch.Generator
    diagonal: dict[str, torch.Tensor]
    keep_diagonal: bool
    max_elements: int
    rows: list[np.ndarray] = field(default_factory=list)
    sampled: bool = False

    @classmethod
    def start(
        cls, model: nn.Module, layers: Sequence[LayerInfo], *, keep_diagonal: bool, seed: int
    ) -> GaussNewtonState:
        model.eval()
        modules = {layer.name: get_module(model, layer.name) for layer in layers}
        device = next(model.parameters()).device
        return cls(
            names=tuple(modules),
            modules=modules,
            generator=torch.Generator(device=device).manual_seed(seed),
            # float64 sums: the multi-process reduction then matches the single-process sum.
            diagonal={
                name: torch.zeros_like(module.weight, dtype=torch.float64, requires_grad=False)
                for name, module in modules.items()
            },
            keep_diagonal=keep_diagonal,
            max_elements=max(module.weight.numel() for module in modules.values()),
        )

    def add_batch(self, model: nn.Module, inputs: torch.Tensor, loss: LossName) -> None:
        names, modules = self.names, self.modules
        device = next(model.parameters()).device
        inputs = inputs.to(device).detach().requires_grad_(True)  # not the caller's tensor
        count = inputs.shape[0]
        per_sample = torch.zeros(count, len(names), dtype=torch.float64, device=device)
        with _LayerRecorder(modules) as recorder:
            logits = model(inputs)
        if logits.dim() != 2:
            raise InputError(
                f"the model's output has shape {tuple(logits.shape)}; curvature needs logits "
                "of shape [batch, classes]"
            )
        missing = [name for name in names if name not in recorder.outputs]
        if missing:
            raise ValueError(f"layer {missing[0]!r} did not run in the forward pass")
        factors, is_sampled = output_hessian_factors(logits, loss, self.generator)
        self.sampled = self.sampled or is_sampled
        outputs = [out for name in names for out in recorder.outputs[name]]
        chunk = factor_chunk(len(factors), sum(out.numel() for out in outputs))
        for grads in output_grads_in_chunks(logits, outputs, factors, chunk):
            cursor = 0
            for layer_index, name in enumerate(names):
                module = modules[name]
                calls = len(recorder.outputs[name])
                layer_grads = grads[cursor : cursor + calls]
                cursor += calls
                for part in _micro_batches(count, self.max_elements * grads[0].shape[0]):
                    # A layer called several times (shared weights) gets the sum over its calls.
                    weight_grad = sum(
                        per_sample_grads_from_columns(
                            module,
                            layer_input_columns(module, recorder.inputs[name][call][part]),
                            grad[:, part],
                        )
                        for call, grad in enumerate(layer_grads)
                    )
                    squared = weight_grad.pow(2).sum(0)  # [n, *weight.shape], over the chunk
                    per_sample[part, layer_index] += squared.flatten(1).sum(1).double()
                    if self.keep_diagonal:
                        self.diagonal[name] += squared.sum(0)
                del layer_grads
            del grads
        del outputs, logits
        recorder.clear()
        self.rows.append(per_sample.cpu().numpy())

    def finish(self) -> CurvatureEstimate:
        names = self.names
        sum_trace = np.zeros(len(names))
        sum_trace_sq = np.zeros(len(names))
        num_samples = 0
        for per_sample_np in self.rows:  # batch order: the same sums in every process layout
            sum_trace += per_sample_np.sum(0)
            sum_trace_sq += (per_sample_np**2).sum(0)
            num_samples += per_sample_np.shape[0]
        if num_samples == 0:
            raise ValueError("no calibration samples were given")
        trace = sum_trace / num_samples
        variance = np.maximum(sum_trace_sq / num_samples - trace**2, 0.0)
        stderr = np.sqrt(variance * num_samples / max(num_samples - 1, 1) / num_samples)
        return CurvatureEstimate(
            layer_names=names,
            trace=trace,
            trace_stderr=stderr,
            num_samples=num_samples,
            method="fisher_sampled" if self.sampled else "gauss_newton",
            num_probes=0,
            flags=flag_estimates(trace, stderr),
            diagonal=(
                {
                    name: (values / num_samples).float().cpu().numpy()
                    for name, values in self.diagonal.items()
                }
                if self.keep_diagonal
                else {}
            ),
            sample_traces=np.concatenate([rows.astype(np.float32) for rows in self.rows]),
        )


Batch = tuple[torch.Tensor, torch.Tensor | None]


@dataclass(frozen=True)
class BatchShare:
    """The calibration batches one process computes, and how per-batch sums are added over processes.

    The default is one process with every batch. `lcpaq.sensitivity.distributed` passes ``rank``/``world`` and an
    all-reduce, so the Hutchinson estimators split their batches across processes: every process
    draws the same probes from the same seed, sums its batches and all-reduces, so every process
    sees the same estimate and stops at the same round.
    """

    rank: int = 0
    world: int = 1
    reduce_sum: Callable[[np.ndarray], np.ndarray] | None = None

    def mine(self, batches: Sequence[Batch]) -> Sequence[Batch]:
        return batches[self.rank :: self.world]

    def add_up(self, values: np.ndarray) -> np.ndarray:
        return values if self.reduce_sum is None else self.reduce_sum(values)


def _probe_setup(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    batches: Sequence[Batch],
    seed: int,
    loss: LossName,
) -> tuple[tuple[str, ...], list[torch.Tensor], torch.Generator, int]:
    """Shared start of the Hutchinson estimators: eval mode, layer weights, seeded generator and
    the total number of calibration samples."""
    check_loss(loss)
    model.eval()
    modules = {layer.name: get_module(model, layer.name) for layer in layers}
    weights = [module.weight for module in modules.values()]
    generator = torch.Generator(device=weights[0].device).manual_seed(seed)
    total = sum(int(inputs.shape[0]) for inputs, _ in batches)
    if total == 0:
        raise ValueError("no calibration samples were given")
    return tuple(modules), weights, generator, total


def _batch_loss(
    model: nn.Module, batch: Batch, loss: LossName, total: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """This batch's share of the mean calibration loss (the sum over batches is the mean), and
    the logits it was computed from."""
    inputs, labels = batch
    logits = model(inputs.to(device))
    share = summed_loss(logits, None if labels is None else labels.to(device), loss) / total
    return share, logits


def gauss_newton_quadratic(logits: torch.Tensor, change: torch.Tensor, loss: LossName) -> float:
    """Σ_n dz_nᵀ H_out,n dz_n for logit changes dz = J v: vᵀ(Σ_n J_nᵀH_out,n J_n)v, exact.

    Cross-entropy and KL: dzᵀ(diag p − ppᵀ)dz = Σ_c p_c dz_c² − (pᵀdz)²; MSE: (2/C)·‖dz‖².
    """
    change = change.double()
    if loss == "mse":
        return float(2.0 / logits.shape[-1] * change.pow(2).sum())
    probs = torch.softmax(logits.detach().double(), dim=-1)
    return float(((probs * change.pow(2)).sum(-1) - (probs * change).sum(-1).pow(2)).sum())


def hutchinson_traces(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    batches: Sequence[Batch],
    *,
    max_probes: int = 64,
    min_probes: int = 8,
    rel_tol: float = 0.05,
    probes_per_round: int = 8,
    seed: int = 0,
    loss: LossName = "cross_entropy",
    share: BatchShare = BatchShare(),
    progress: bool = False,
) -> CurvatureEstimate:
    """Per-layer Hutchinson traces of the exact Hessian of the mean ``loss`` over all batches.

    Each probe v is Rademacher over all measured layers at once; layer l reads v_lᵀ(Hv)_l, which is
    unbiased for tr(H_ll). Probes run in rounds; per batch the gradient graph is built once per round
    and reused for every probe of the round. Stops when every layer's standard error is below
    ``rel_tol`` × |estimate| (after ``min_probes``) or at ``max_probes``.

    ``batches`` are (inputs, labels) pairs; labels may be None for ``loss="kl"`` (see `summed_loss`).
    ``share`` splits the batches across processes (`lcpaq.sensitivity.distributed`).
    """
    if max_probes < 2:
        raise ValueError(
            f"max_probes must be at least 2 to give a standard error, got {max_probes}"
        )
    names, weights, generator, total = _probe_setup(model, layers, batches, seed, loss)
    device = weights[0].device
    requires_grad = [weight.requires_grad for weight in weights]
    for weight in weights:
        weight.requires_grad_(True)
    estimates: list[np.ndarray] = []
    bar = tqdm(total=max_probes, desc="Hutchinson probes", disable=not progress, unit="probe")
    try:
        while len(estimates) < max_probes:
            round_size = min(probes_per_round, max_probes - len(estimates))
            probes = [
                [
                    (torch.randint(0, 2, w.shape, generator=generator, device=device) * 2 - 1).to(
                        w.dtype
                    )
                    for w in weights
                ]
                for _ in range(round_size)
            ]
            values = np.zeros((round_size, len(names)))
            for batch in share.mine(batches):
                batch_loss, _ = _batch_loss(model, batch, loss, total, device)
                grads = torch.autograd.grad(batch_loss, weights, create_graph=True)
                for probe_index, probe in enumerate(probes):
                    dot = sum((grad * v).sum() for grad, v in zip(grads, probe))
                    hvp = torch.autograd.grad(
                        dot, weights, retain_graph=probe_index + 1 < round_size
                    )
                    values[probe_index] += [float((h * v).sum()) for h, v in zip(hvp, probe)]
            estimates.extend(share.add_up(values))
            bar.update(round_size)
            stacked = np.array(estimates)
            stderr = stacked.std(0, ddof=1) / np.sqrt(len(stacked))
            if len(stacked) >= min_probes and np.all(stderr < rel_tol * np.abs(stacked.mean(0))):
                break
    finally:
        bar.close()
        for weight, flag in zip(weights, requires_grad):
            weight.requires_grad_(flag)
    stacked = np.array(estimates)
    trace = stacked.mean(0)
    stderr = stacked.std(0, ddof=1) / np.sqrt(len(stacked))
    logger.info("Hutchinson stopped after %d probes", len(stacked))
    return CurvatureEstimate(
        layer_names=names,
        trace=trace,
        trace_stderr=stderr,
        num_samples=total,
        method="hutchinson",
        num_probes=len(stacked),
        flags=flag_estimates(trace, stderr),
    )


def probes_for_tolerance(mean: np.ndarray, variance: np.ndarray, rel_tol: float) -> np.ndarray:
    """Probes m with √(variance/m) ≤ rel_tol·|mean|, per layer (inf where the mean is 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        needed = variance / (rel_tol * np.abs(mean)) ** 2
    return np.where(np.isfinite(needed), np.ceil(needed), np.inf)


def _allocate_round(deficit: np.ndarray, budget: int) -> np.ndarray:
    """Half of each layer's remaining need this round (so variances are re-estimated before the
    rest is spent), scaled down by largest remainders when that exceeds the budget."""
    wanted = np.ceil(deficit / 2.0)
    if wanted.sum() <= budget:
        return wanted.astype(int)
    share = wanted * budget / wanted.sum()
    counts = np.floor(share).astype(int)
    order = np.argsort(-(share - counts), kind="stable")
    counts[order[: budget - counts.sum()]] += 1
    return counts


def single_layer_hutchinson_traces(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    batches: Sequence[Batch],
    *,
    rel_tol: float = 0.05,
    min_probes: int = 4,
    max_probes_per_layer: int = 256,
    max_total_probes: int | None = None,
    seed: int = 0,
    loss: LossName = "cross_entropy",
    share: BatchShare = BatchShare(),
    gauss_newton: CurvatureEstimate | None = None,
    progress: bool = False,
) -> CurvatureEstimate:
    """Per-layer Hutchinson traces of the exact Hessian of the mean ``loss`` with single-layer
    probes (METHOD §1a (ii)), optionally with the exact Gauss–Newton trace as a control variate.

    Probe v is Rademacher on layer l and zero elsewhere, so v_lᵀ(Hv)_l = v_lᵀH_ll v_l: the variance
    is 2(‖H_ll‖²_F − Σ_k (H_ll)_kk²), without the cross-block terms that a joint probe adds. Each
    probe differentiates only to W_l, so a probe on a late layer costs a fraction of a full HVP.

    Budgets follow the measured variance: every layer first gets ``min_probes`` probes; then, in
    rounds, each layer that has not reached SE_l ≤ ``rel_tol``·|T̂_l| gets half of the probes its
    variance says it still needs, up to ``max_probes_per_layer`` per layer and ``max_total_probes``
    in all (default: no total cap). Per batch the gradient graph is built once per round.
    ``probes_per_layer`` of the result records what each layer got. ``batches``, ``loss`` and
    ``share`` as in `hutchinson_traces`.

    Why this variance reduction: on ResNet20 the joint probe needed a median ~1,900 probes per layer
    for 5 % (the Linear layer ~250,000) because every other layer's block adds variance; the
    single-layer probe removes that term, and allocating by measured variance spends probes where
    the relative error is worst instead of uniformly (METHOD §1a).

    Control variate (``gauss_newton``: `gauss_newton_traces` of the same loss on the same samples):
    H = G + R with G the Gauss–Newton matrix, whose per-layer trace is known exactly. Each probe
    then reads v_lᵀ(H_ll − G_ll)v_l, with G_ll v from one extra backward pass (J v by the double-vjp
    trick on the batch's graph, then dzᵀH_out dz), and the estimate is tr(G_ll) + the mean: still
    unbiased for tr(H_ll), with variance 2(‖R_ll‖²_F − Σ_k (R_ll)_kk²). R_ll is the residual term
    Σ_c ∂ℓ/∂z_c · ∂²z_c/∂W_l²; it vanishes when the logits are piecewise linear in W_l (ReLU
    networks with eval-mode BatchNorm, every last layer) and at the FP32 point of ``kl``, so there
    the estimate is exact after ``min_probes`` probes (measured on ResNet20: |vᵀRv| ~ 1e-6·vᵀHv,
    float32 rounding), while for smooth activations (tanh, GELU) Hutchinson estimates only R.
    """
    if min_probes < 2:
        raise ValueError(
            f"min_probes must be at least 2 to give a standard error, got {min_probes}"
        )
    if max_probes_per_layer < min_probes:
        raise ValueError(
            f"max_probes_per_layer ({max_probes_per_layer}) is below min_probes ({min_probes})"
        )
    names, weights, generator, total = _probe_setup(model, layers, batches, seed, loss)
    device = weights[0].device
    cap_total = max_total_probes if max_total_probes is not None else np.iinfo(np.int64).max
    if cap_total < min_probes * len(names):
        raise ValueError(
            f"max_total_probes ({max_total_probes}) is below min_probes x layers "
            f"({min_probes * len(names)})"
        )
    offset = np.zeros(len(names))
    if gauss_newton is not None:
        if gauss_newton.layer_names != names or gauss_newton.num_samples != total:
            raise ValueError(
                "the Gauss-Newton control variate must cover the same layers and samples "
                f"({len(names)} layers, {total} samples), got {len(gauss_newton.layer_names)} "
                f"layers, {gauss_newton.num_samples} samples"
            )
        offset = np.asarray(gauss_newton.trace, dtype=np.float64)
    requires_grad = [weight.requires_grad for weight in weights]
    for weight in weights:
        weight.requires_grad_(True)
    samples: list[list[float]] = [[] for _ in names]
    counts = np.full(len(names), min_probes)
    bar = tqdm(desc="single-layer Hutchinson", disable=not progress, unit="probe")
    try:
        while counts.sum() > 0:
            plan = [(index, int(count)) for index, count in enumerate(counts) if count > 0]
            probes = [
                (
                    index,
                    (
                        torch.randint(
                            0, 2, weights[index].shape, generator=generator, device=device
                        )
                        * 2
                        - 1
                    ).to(weights[index].dtype),
                )
                for index, count in plan
                for _ in range(count)
            ]
            values = np.zeros(len(probes))
            for batch in share.mine(batches):
                batch_loss, logits = _batch_loss(model, batch, loss, total, device)
                grads = torch.autograd.grad(batch_loss, weights, create_graph=True)
                if gauss_newton is not None:  # Jᵀu for every layer, linear in u: J v = ∂(Jᵀu·v)/∂u
                    dummy = torch.zeros_like(logits, requires_grad=True)
                    transposed = torch.autograd.grad(logits, weights, dummy, create_graph=True)
                for probe_index, (index, v) in enumerate(probes):
                    (hvp,) = torch.autograd.grad(
                        grads[index], weights[index], grad_outputs=v, retain_graph=True
                    )
                    values[probe_index] += float((hvp * v).sum())
                    if gauss_newton is not None:
                        (change,) = torch.autograd.grad(
                            transposed[index], dummy, grad_outputs=v, retain_graph=True
                        )
                        values[probe_index] -= gauss_newton_quadratic(logits, change, loss) / total
                del grads, batch_loss, logits
            values = share.add_up(values)
            for (index, _), value in zip(probes, values):
                samples[index].append(value)
            bar.update(len(probes))
            spent = sum(len(values) for values in samples)
            mean = np.array([np.mean(values) for values in samples])
            variance = np.array([np.var(values, ddof=1) for values in samples])
            taken = np.array([len(values) for values in samples])
            needed = np.minimum(
                probes_for_tolerance(offset + mean, variance, rel_tol), max_probes_per_layer
            )
            deficit = np.maximum(needed - taken, 0)
            counts = _allocate_round(deficit, int(min(cap_total - spent, deficit.sum())))
    finally:
        bar.close()
        for weight, flag in zip(weights, requires_grad):
            weight.requires_grad_(flag)
    taken = np.array([len(values) for values in samples])
    trace = offset + np.array([np.mean(values) for values in samples])
    stderr = np.array([np.std(values, ddof=1) for values in samples]) / np.sqrt(taken)
    logger.info("single-layer Hutchinson used %d probes", int(taken.sum()))
    return CurvatureEstimate(
        layer_names=names,
        trace=trace,
        trace_stderr=stderr,
        num_samples=total,
        method="hutchinson_single_layer" + ("_gn_control" if gauss_newton is not None else ""),
        num_probes=int(taken.sum()),
        flags=flag_estimates(trace, stderr),
        probes_per_layer=taken,
    )


# -- PyHessian reference backend -----------------------------------------------------------------


@dataclass(frozen=True)
class PyHessianCheck:
    """PyHessian's whole-model numbers over the quantized layers' weights: Hutchinson trace
    Σ_l tr(H_ll) (mean ± SE over its probes) and the top Hessian eigenvalues (power iteration)."""

    trace: float
    trace_stderr: float
    num_probes: int
    top_eigenvalues: tuple[float, ...]
    num_samples: int
    seconds: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def pyhessian_check(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    max_iter: int = 100,
    tol: float = 1e-3,
    top_n: int = 1,
    seed: int = 0,
) -> PyHessianCheck:
    """The PyHessian backend (cross-entropy, the only loss it takes here), kept as an independent
    check of lcpaq's estimators: its trace should match the sum of the per-layer traces within
    its standard error (``top_n`` 0 skips the eigenvalues). Only the layers' weights are
    differentiated (other parameters are frozen for the call), so the numbers refer to the same block-diagonal the layers' traces sum over.
    Batches of equal size give the mean loss over all samples; PyHessian draws probes from
    torch's global generator, forked here so the caller's random state is untouched."""
    from pyhessian import hessian as PyHessian  # the reference backend is imported on demand

    if max_iter < 2:
        raise InputError(f"--pyhessian-iters must be at least 2 (or 0 for off), got {max_iter}")
    weights = [get_module(model, layer.name).weight for layer in layers]
    frozen = [p for p in model.parameters() if all(p is not w for w in weights)]
    flags = [p.requires_grad for p in frozen]
    was_training = model.training
    device = weights[0].device
    start = time.perf_counter()
    try:
        for parameter in frozen:
            parameter.requires_grad_(False)
        with (
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            warnings.catch_warnings(),
        ):
            # PyHessian calls backward(create_graph=True); the cycle it warns of is broken below.
            warnings.filterwarnings("ignore", "Using backward", UserWarning)
            torch.manual_seed(seed)
            source = {"data": batches[0]} if len(batches) == 1 else {"dataloader": list(batches)}
            computer = PyHessian(model, nn.CrossEntropyLoss(), cuda=device.type == "cuda", **source)
            samples = np.array(computer.trace(maxIter=max_iter, tol=tol), dtype=np.float64)
            eigenvalues = (
                computer.eigenvalues(maxIter=max_iter, tol=tol, top_n=top_n)[0] if top_n else []
            )
    finally:
        for parameter, flag in zip(frozen, flags):
            parameter.requires_grad_(flag)
        for parameter in model.parameters():
            parameter.grad = None  # PyHessian leaves create_graph gradients behind
        model.train(was_training)
    stderr = float(samples.std(ddof=1) / np.sqrt(len(samples))) if len(samples) > 1 else np.nan
    return PyHessianCheck(
        trace=float(samples.mean()),
        trace_stderr=stderr,
        num_probes=len(samples),
        top_eigenvalues=tuple(float(v) for v in eigenvalues),
        num_samples=sum(len(labels) for _, labels in batches),
        seconds=time.perf_counter() - start,
    )
