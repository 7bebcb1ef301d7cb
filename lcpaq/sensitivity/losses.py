"""Losses on a model's logits, the factors of their output Hessian, and one backward pass per factor.

The curvature estimators (`lcpaq.sensitivity.gauss_newton`, `lcpaq.sensitivity.hutchinson`) and the
activation curvature (`lcpaq.sensitivity.activation`) share these. Input: logits [N, C] (and labels
where the loss needs them). Output: the summed loss, factors U with H_out,n = Σ_k U[k, n] U[k, n]ᵀ,
the exact quadratic form dzᵀ H_out dz, and the gradients of Σ_n U[k, n]·z_n with respect to chosen
tensors, ``chunk`` factors at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from lcpaq.errors import InputError

#: Losses on the logits z: ``cross_entropy`` (true labels), ``mse`` (mean over outputs of (z − y)²,
#: y one-hot for integer labels) and ``kl`` = KL(p_FP ‖ softmax(z)) to the FP32 model's own outputs
#: (label-free). At the FP32 point KL's gradient p − p_FP is zero, so its Hessian has no residual
#: term: it *is* the Gauss–Newton matrix with H_out = diag(p) − ppᵀ (tests check both).
LossName = Literal["cross_entropy", "mse", "kl"]
LOSSES: tuple[str, ...] = ("cross_entropy", "mse", "kl")
#: Target of positions a sequence loss does not count (`next_token_targets`; F.cross_entropy's
#: ``ignore_index``).
IGNORE = -100

#: Past this many classes the exact factorisation costs too many backward passes; the Monte-Carlo
#: Fisher (labels drawn from the model, one backward per draw) is used instead (METHOD §1a').
EXACT_FACTOR_MAX_CLASSES = 64

#: Output gradients of all layers are kept for at most this many float elements at once: the
#: C backward passes of a batch run in chunks of factors that fit (at least one factor per chunk).
FACTOR_GRADS_ELEMENTS_LIMIT = 1 << 26


def default_loss(task: str | None, has_labels: bool) -> LossName:
    """``--loss auto``: cross-entropy for classifiers with labels (images, text classifiers), the
    squared error of the pooled embedding against FP32's for encoders (label-free; at the FP32
    point its Gauss–Newton matrix is the exact Hessian), KL to the FP32 next-token distributions
    for causal LMs (label-free; its curvature equals next-token cross-entropy's)."""
    if task == "encoder":
        return "mse"
    if task == "causal-lm" or not has_labels:
        return "kl"
    return "cross_entropy"


def check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise InputError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")


def next_token_positions(mask: torch.Tensor) -> torch.Tensor:
    """[N, T] bool: the positions of a causal LM's logits [N, T, V] that its loss counts, those
    whose next token is real (padding and the last real token predict nothing)."""
    mask = mask.bool()
    positions = torch.zeros_like(mask)
    positions[:, :-1] = mask[:, :-1] & mask[:, 1:]
    return positions


def next_token_targets(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N, T] int64: the next token at each `next_token_positions` position, ``IGNORE`` elsewhere."""
    targets = torch.full_like(ids, IGNORE)
    targets[:, :-1] = ids[:, 1:]
    return targets.masked_fill(~next_token_positions(mask), IGNORE)


def _rademacher(
    shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    bits = torch.randint(0, 2, shape, generator=generator, device=like.device)
    return (2 * bits - 1).to(like.dtype)


def _sequence_factors(
    logits: torch.Tensor,
    loss: LossName,
    generator: torch.Generator | None,
    positions: torch.Tensor | None,
) -> torch.Tensor:
    """One sampled factor [1, N, T, V] of a causal LM's summed next-token loss: the Monte-Carlo
    Fisher p_t − e_y (y ~ p_t, drawn independently per position) at the ``positions`` that count,
    zero elsewhere. Independent draws make the cross-position terms vanish in expectation, so
    E[u uᵀ] is the block-diagonal output Hessian Σ_t diag(p_t) − p_t p_tᵀ exactly (unbiased)."""
    if loss == "mse":
        raise InputError("loss 'mse' on sequence logits [N, T, V] is not supported; use kl")
    if positions is None:
        positions = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
    probs = torch.softmax(logits.detach().flatten(0, 1), dim=-1)
    drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    factors = probs.scatter_add(1, drawn[:, None], -torch.ones_like(probs[:, :1]))
    factors = factors.reshape(logits.shape) * positions.to(logits.device)[:, :, None]
    return factors[None].to(logits.dtype)


def output_hessian_factors(
    logits: torch.Tensor,
    loss: LossName,
    generator: torch.Generator | None,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, bool]:
    """Factors U [K, *logits.shape] with H_out,n = Σ_k U[k, n] U[k, n]ᵀ (in expectation when
    sampled); the flag says if they are sampled.

    Cross-entropy's output Hessian diag(p) − ppᵀ does not depend on the labels; ``kl`` (KL to the
    FP32 outputs, evaluated at the FP32 model) has the same output Hessian, so both use these factors.
    ``mse`` (mean over the D outputs of the squared error, e.g. an encoder's embedding against
    FP32's): H_out = (2/D)·I, exact up to 64 outputs, past that one Rademacher factor √(2/D)·r,
    r ∈ {±1}^D, with E[r rᵀ] = I (unbiased; its noise is part of the standard error over samples).
    Sequence logits [N, T, V] (causal LM): `_sequence_factors` at ``positions`` [N, T].
    """
    check_loss(loss)
    if logits.dim() == 3:
        return _sequence_factors(logits, loss, generator, positions), True
    num_classes = logits.shape[-1]
    if loss == "mse":  # mean over outputs of (z - y)^2: H_out = (2/C) I
        if num_classes > EXACT_FACTOR_MAX_CLASSES:
            signs = _rademacher((1, *logits.shape), logits, generator)
            return (2.0 / num_classes) ** 0.5 * signs, True
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


def gauss_newton_quadratic(logits: torch.Tensor, change: torch.Tensor, loss: LossName) -> float:
    """Σ_n dz_nᵀ H_out,n dz_n for logit changes dz = J v: vᵀ(Σ_n J_nᵀH_out,n J_n)v, exact.

    Cross-entropy and KL: dzᵀ(diag p − ppᵀ)dz = Σ_c p_c dz_c² − (pᵀdz)²; MSE: (2/C)·‖dz‖².
    """
    change = change.double()
    if loss == "mse":
        return float(2.0 / logits.shape[-1] * change.pow(2).sum())
    probs = torch.softmax(logits.detach().double(), dim=-1)
    return float(((probs * change.pow(2)).sum(-1) - (probs * change).sum(-1).pow(2)).sum())


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
