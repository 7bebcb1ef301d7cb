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
classes the Monte-Carlo Fisher is used (method ``fisher_sampled``), and for mse past 64 outputs
Rademacher factors (``gauss_newton_sampled``); both unbiased (`lcpaq.sensitivity.losses`).

Text models (`lcpaq.model.text.TextModel`, contract §4): a sample is a sequence. An encoder's
pooled embedding [N, D] is a 2-d output like logits (loss mse to FP32's embedding, label-free); a
causal LM's logits [N, T, V] get one Monte-Carlo Fisher factor per position at the positions its
next-token loss counts (`loss_positions`), so each sequence's trace sums its tokens' terms.
Padding enters nothing: its factors are zero and attention masks it, so its output gradients are
zero too (tests/sensitivity/test_text_curvature.py checks both against brute-force oracles).

`gauss_newton_traces` is the one implementation, single-process or split over a process group
through a `BatchShare` (`lcpaq.sensitivity.distributed.batch_share`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from lcpaq.errors import InputError
from lcpaq.model.graph import LayerInfo, failing_layer, layer_parameter, token_mask, weight_of
from lcpaq.model.op_capture import OpCall, OpCapture
from lcpaq.sensitivity.batch_share import SINGLE_PROCESS, BatchShare
from lcpaq.sensitivity.curvature import CurvatureEstimate, flag_estimates
from lcpaq.sensitivity.losses import (
    LossName,
    factor_chunk,
    next_token_positions,
    output_grads_in_chunks,
    output_hessian_factors,
)
from lcpaq.sensitivity.per_sample import (
    LINEAR_OPS,
    gram_is_cheaper,
    gram_squared_norms,
    input_columns,
    micro_batches,
    output_grads,
    per_sample_grads_from_columns,
    samples_first,
)
from lcpaq.state_file import (
    NO_STATE,
    Snapshot,
    StateFile,
    generator_state,
    joined_rows,
    split_rows,
    stream_batches,
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
    state_file: StateFile = NO_STATE,
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
        state_file: where the running state is saved after batches (`lcpaq.state_file`); a
            snapshot found there is continued from its next batch, to the same result.
    Returns:
        traces of the mean-loss Gauss–Newton blocks with standard errors over samples.
    """
    batches = list(batches)
    state = GaussNewtonState.start(
        model, layers, keep_diagonal=keep_diagonal, seed=seed + share.rank
    )
    state.loss = loss  # names the method of sampled traces, also when a resume adds no batch
    mine = share.indices(len(batches))
    done = state.restore(state_file.load())
    stream_batches(
        lambda batch: state.add_batch(model, batch, loss),
        state.snapshot,
        [batches[index] for index in mine],
        done,
        state_file,
        desc="Gauss-Newton traces",
        progress=progress,
    )
    if share.world > 1:
        state.combine(share, len(batches))
    return state.finish()


def loss_positions(
    model: nn.Module, inputs: torch.Tensor, logits: torch.Tensor
) -> torch.Tensor | None:
    """The [N, T] positions of sequence logits [N, T, V] that the loss counts (a causal LM's
    next-token predictions over real tokens, `next_token_positions`); None for logits [N, C].
    Padding then never enters a trace: its factors are zero, so its output gradients are too."""
    if logits.dim() == 2:
        return None
    mask = token_mask(model, inputs)
    if logits.dim() != 3 or mask is None or tuple(mask.shape) != tuple(logits.shape[:2]):
        raise InputError(
            f"the model's output has shape {tuple(logits.shape)}; curvature needs logits "
            "of shape [batch, classes] (or [batch, tokens, vocabulary] from a text model)"
        )
    return next_token_positions(mask)


def sampled_method(loss: LossName) -> str:
    """The method name of sampled traces: the Monte-Carlo Fisher (cross-entropy, KL; past 64
    classes and on sequence logits) or Rademacher factors of mse's (2/D)·I past 64 outputs."""
    return "gauss_newton_sampled" if loss == "mse" else "fisher_sampled"


def _call_part(call: OpCall, part: slice, count: int) -> OpCall:
    """The call restricted to samples ``part`` (samples first)."""
    if call.op in LINEAR_OPS:
        rows = samples_first(call.input, call, count)[part]
        return OpCall("linear", rows, call.output, sample_axis=0)
    return OpCall(
        call.op,
        call.input[part],
        call.output,
        call.stride,
        call.padding,
        call.dilation,
        call.groups,
    )


def _squared_norms_over_calls(
    calls: Sequence[OpCall],
    output_grad_list: Sequence[torch.Tensor],
    part: slice,
    count: int,
    weight_shape: tuple[int, ...],
    diagonal: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Σ_k ‖per-sample ∂/∂W‖² [n] of samples ``part``, summed over the layer's calls (shared
    weights), and with ``diagonal`` the per-element Σ_{k,n} (∂/∂W)² (weight-shaped).

    Linear layers without the diagonal use the token Gram form when it is cheaper: the calls are
    concatenated along the token axis (Σ over calls and tokens of g xᵀ is one sum)."""
    if any(call.op == "embedding" for call in calls):
        return _tied_squared_norms(calls, output_grad_list, part, count, weight_shape, diagonal)
    parts = [_call_part(call, part, count) for call in calls]
    grads = [
        output_grads(call, grad, count)[:, part] for call, grad in zip(calls, output_grad_list)
    ]
    kernel = weight_shape[2:]
    if not diagonal and calls[0].op in LINEAR_OPS:
        columns = torch.cat([input_columns(call, kernel, len(call.input)) for call in parts], dim=1)
        rows = torch.cat(grads, dim=2)
        if gram_is_cheaper(columns.shape[1], weight_shape[1], weight_shape[0]):
            return gram_squared_norms(columns, rows), None
    total: torch.Tensor | None = None
    for call, grad in zip(parts, grads):
        columns = input_columns(call, kernel, grad.shape[1])
        per_sample = per_sample_grads_from_columns(call, columns, grad, weight_shape)
        total = per_sample if total is None else total + per_sample
    assert total is not None, "a recorded layer ran at least once"
    squared = total.pow(2).sum(0)  # [n, *weight.shape], over the factors
    return squared.flatten(1).sum(1), (squared.sum(0) if diagonal else None)


def _tied_squared_norms(
    calls: Sequence[OpCall],
    output_grad_list: Sequence[torch.Tensor],
    part: slice,
    count: int,
    weight_shape: tuple[int, ...],
    diagonal: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`_squared_norms_over_calls` for a table that is both an embedding lookup and a Linear
    weight (an LM head tied to the input embedding): each sample's gradient is its head part
    Σ_t g_t h_tᵀ plus its lookup part Σ_t e_{id_t} g'_tᵀ (the output gradients g' scattered onto
    the rows of the ids), materialised [K, n, V, D] (micro-batched by the caller)."""
    total: torch.Tensor | None = None
    for call, grad in zip(calls, output_grad_list):
        if call.op == "embedding":
            ids = call.input.reshape(count, -1)[part]  # [n, T]
            rows = grad.reshape(grad.shape[0], count, -1, grad.shape[-1])[:, part]  # [K, n, T, D]
            if total is None:
                total = rows.new_zeros((rows.shape[0], rows.shape[1], *weight_shape))
            index = ids.to(rows.device)[None, :, :, None].expand_as(rows)
            total = total.scatter_add(2, index, rows)
            continue
        call_part = _call_part(call, part, count)
        grads = output_grads(call, grad, count)[:, part]
        columns = input_columns(call_part, weight_shape[2:], grads.shape[1])
        per_sample = per_sample_grads_from_columns(call_part, columns, grads, weight_shape)
        total = per_sample if total is None else total + per_sample
    assert total is not None, "a recorded layer ran at least once"
    squared = total.pow(2).sum(0)
    return squared.flatten(1).sum(1), (squared.sum(0) if diagonal else None)


@dataclass
class GaussNewtonState:
    """Running state of `gauss_newton_traces`: per-batch, per-sample trace rows (float64, in batch
    order), the summed per-element diagonal and the Fisher-sampling generator.

    Each process runs `add_batch` on its share of the batches, `combine` gathers the rows of all
    processes, and `finish` on them gives the single-process result.
    """

    names: tuple[str, ...]
    weights: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    kinds: dict[str, str]
    generator: torch.Generator
    diagonal: dict[str, torch.Tensor]
    keep_diagonal: bool
    max_elements: int
    rows: list[np.ndarray] = field(default_factory=list)
    sampled: bool = False
    loss: LossName = "cross_entropy"

    @classmethod
    def start(
        cls, model: nn.Module, layers: Sequence[LayerInfo], *, keep_diagonal: bool, seed: int
    ) -> GaussNewtonState:
        model.eval()
        weights = {layer.name: layer_parameter(model, layer) for layer in layers}
        views = {layer.name: weight_of(model, layer) for layer in layers}
        device = next(model.parameters()).device
        return cls(
            names=tuple(weights),
            weights=weights,
            shapes={name: tuple(view.shape) for name, view in views.items()},
            kinds={layer.name: layer.kind for layer in layers},
            generator=torch.Generator(device=device).manual_seed(seed),
            # float64 sums: the multi-process reduction then matches the single-process sum.
            diagonal={
                name: torch.zeros_like(view, dtype=torch.float64, requires_grad=False)
                for name, view in views.items()
            },
            keep_diagonal=keep_diagonal,
            max_elements=max(view.numel() for view in views.values()),
        )

    def add_batch(self, model: nn.Module, inputs: torch.Tensor, loss: LossName) -> None:
        names = self.names
        device = next(model.parameters()).device
        inputs = inputs.to(device).detach()  # not the caller's tensor
        if inputs.is_floating_point():
            inputs.requires_grad_(True)
        count = inputs.shape[0]
        per_sample = torch.zeros(count, len(names), dtype=torch.float64, device=device)
        with OpCapture(self.weights, keep_graph=True, embeddings=True) as capture:
            logits = model(inputs)
        positions = loss_positions(model, inputs, logits)
        missing = [name for name in names if name not in capture.calls]
        if missing:
            raise ValueError(f"layer {missing[0]!r} did not run in the forward pass")
        factors, is_sampled = output_hessian_factors(logits, loss, self.generator, positions)
        self.sampled = self.sampled or is_sampled
        outputs = [call.output for name in names for call in capture.calls[name]]
        chunk = factor_chunk(len(factors), sum(out.numel() for out in outputs))
        for grads in output_grads_in_chunks(logits, outputs, factors, chunk):
            cursor = 0
            for layer_index, name in enumerate(names):
                calls = capture.calls[name]
                layer_grads = grads[cursor : cursor + len(calls)]
                cursor += len(calls)
                for part in micro_batches(count, self.max_elements * grads[0].shape[0]):
                    with failing_layer(name, self.kinds[name], "the curvature"):
                        norms, diagonal = _squared_norms_over_calls(
                            calls, layer_grads, part, count, self.shapes[name], self.keep_diagonal
                        )
                    per_sample[part, layer_index] += norms.double()
                    if diagonal is not None:
                        self.diagonal[name] += diagonal
                del layer_grads
            del grads
        del outputs, logits
        capture.clear()
        self.rows.append(per_sample.cpu().numpy())

    def snapshot(self) -> Snapshot:
        """Everything `finish` and the next `add_batch` depend on (`lcpaq.state_file`)."""
        diagonal = {f"diagonal/{name}": values for name, values in self.diagonal.items()}
        return {
            **joined_rows(self.rows, (len(self.names),)),
            **(diagonal if self.keep_diagonal else {}),
            "generator": generator_state(self.generator),
            "sampled": np.array(self.sampled),
        }

    def restore(self, snapshot: dict[str, torch.Tensor] | None) -> int:
        """Continue from ``snapshot`` (None: from the start); returns the batches it holds."""
        if snapshot is None:
            return 0
        self.rows = split_rows(snapshot["rows"], snapshot["row_counts"])
        if self.keep_diagonal:
            for name, values in self.diagonal.items():
                values.copy_(snapshot[f"diagonal/{name}"])
        self.generator.set_state(snapshot["generator"])
        self.sampled = bool(snapshot["sampled"])
        return len(self.rows)

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
            method=sampled_method(self.loss) if self.sampled else "gauss_newton",
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
