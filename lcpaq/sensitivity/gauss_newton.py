"""Exact per-layer Gauss–Newton traces of the calibration loss, with standard errors (METHOD §1a).

The analyze stage's default curvature (``estimator="gauss-newton"``) and the control variate of the
single-layer Hutchinson estimator. Input: an eval-mode model, its `LayerInfo` list and calibration
input batches (labels are not needed). Output: a `CurvatureEstimate` with the trace of each layer's
Gauss–Newton block G_ll, its standard error over samples, the per-sample traces and the
per-element diagonal.

G = (1/N) Σ_n J_nᵀ H_out,n J_n. With H_out = Σ_c u_c u_cᵀ (cross-entropy: u_c = √p_c (e_c − p),
`lcpaq.sensitivity.losses.output_hessian_factors`), tr(G_ll) = (1/N) Σ_n Σ_c ‖∂(u_ncᵀ z_n)/∂W_l‖².
One backward pass per factor c gives the gradients with respect to every layer's output at once;
per-sample weight gradients are formed from the layer inputs and output gradients
(`lcpaq.sensitivity.per_sample`), so there is no probe noise and the standard error is the one over
calibration samples. Memory does not grow with the number of batches: only per-sample trace rows
and running sums are kept. For ``kl`` at the FP32 point it equals the exact Hessian. Past 64
classes the Monte-Carlo Fisher is used (method ``fisher_sampled``).

`gauss_newton_traces` is the one implementation, single-process or split over a process group
through a `BatchShare` (`lcpaq.sensitivity.distributed.batch_share`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lcpaq.errors import InputError
from lcpaq.model.graph import LayerInfo, get_module
from lcpaq.sensitivity.batch_share import SINGLE_PROCESS, BatchShare
from lcpaq.sensitivity.curvature import CurvatureEstimate, flag_estimates
from lcpaq.sensitivity.losses import (
    LossName,
    factor_chunk,
    output_grads_in_chunks,
    output_hessian_factors,
)
from lcpaq.sensitivity.per_sample import (
    LayerRecorder,
    layer_input_columns,
    micro_batches,
    module_weight,
    per_sample_grads_from_columns,
)


def gauss_newton_traces(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    batches: Iterable[torch.Tensor],
    *,
    loss: LossName = "cross_entropy",
    keep_diagonal: bool = True,
    seed: int = 0,
    share: BatchShare = SINGLE_PROCESS,
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
        share: the batches this process computes (`lcpaq.sensitivity.distributed.batch_share`);
            every process passes the same ``batches`` and gets the full result. For the exact path
            (≤ 64 classes, or ``mse``) traces, standard errors and ``sample_traces`` are bitwise the
            single-process ones (the per-batch rows are replayed in batch order); the diagonal is
            summed in another order (equal to float rounding). The sampled Fisher draws its labels
            from a per-rank generator (seed + rank), so it is equal in distribution only.
    Returns:
        traces of the mean-loss Gauss–Newton blocks with standard errors over samples.
    """
    batches = list(batches)
    state = GaussNewtonState.start(
        model, layers, keep_diagonal=keep_diagonal, seed=seed + share.rank
    )
    mine = share.indices(len(batches))
    for index in tqdm(mine, desc="Gauss-Newton traces", disable=not progress, unit="batch"):
        state.add_batch(model, batches[index], loss)
    if share.world > 1:
        state.combine(share, len(batches))
    return state.finish()


def _per_sample_grads_over_calls(
    module: nn.Module,
    inputs: Sequence[torch.Tensor],
    output_grads: Sequence[torch.Tensor],
    part: slice,
) -> torch.Tensor:
    """Per-sample weight gradients [K, n, *weight.shape] of samples ``part``, summed over the
    layer's calls: a layer called several times (shared weights) gets the sum over its calls."""
    total: torch.Tensor | None = None
    for call_inputs, grad in zip(inputs, output_grads):
        columns = layer_input_columns(module, call_inputs[part])
        grads = per_sample_grads_from_columns(module, columns, grad[:, part])
        total = grads if total is None else total + grads
    assert total is not None, "a recorded layer ran at least once"
    return total


@dataclass
class GaussNewtonState:
    """Running state of `gauss_newton_traces`: per-batch, per-sample trace rows (float64, in batch
    order), the summed per-element diagonal and the Fisher-sampling generator.

    Each process runs `add_batch` on its share of the batches, `combine` gathers the rows of all
    processes, and `finish` on them gives the single-process result.
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
                name: torch.zeros_like(
                    module_weight(module), dtype=torch.float64, requires_grad=False
                )
                for name, module in modules.items()
            },
            keep_diagonal=keep_diagonal,
            max_elements=max(module_weight(module).numel() for module in modules.values()),
        )

    def add_batch(self, model: nn.Module, inputs: torch.Tensor, loss: LossName) -> None:
        names, modules = self.names, self.modules
        device = next(model.parameters()).device
        inputs = inputs.to(device).detach().requires_grad_(True)  # not the caller's tensor
        count = inputs.shape[0]
        per_sample = torch.zeros(count, len(names), dtype=torch.float64, device=device)
        with LayerRecorder(modules) as recorder:
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
                for part in micro_batches(count, self.max_elements * grads[0].shape[0]):
                    weight_grad = _per_sample_grads_over_calls(
                        module, recorder.inputs[name], layer_grads, part
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

    def combine(self, share: BatchShare, num_batches: int) -> None:
        """Every process's rows in batch order, the sampled flag and the diagonal summed over them."""
        self.rows = share.in_batch_order(self.rows, num_batches)
        self.sampled = bool(share.add_up(np.array([float(self.sampled)]))[0])
        if self.keep_diagonal:
            for name, values in self.diagonal.items():
                self.diagonal[name] = share.add_up_tensor(values)

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
