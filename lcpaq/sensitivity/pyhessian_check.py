"""The PyHessian cross-check of the analyze stage (``--pyhessian-iters``, ``pyhessian.json``).

Input: the FP32 model, its `LayerInfo` list and labelled calibration batches. Output: a
`PyHessianCheck` — PyHessian's whole-model Hutchinson trace over the quantized layers' weights
(which should match the sum of lcpaq's per-layer traces within its standard error) and its top
Hessian eigenvalues. PyHessian is an optional dependency, imported on demand.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from lcpaq.errors import InputError
from lcpaq.model.graph import LayerInfo, layer_parameter


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
    weights = [layer_parameter(model, layer) for layer in layers]
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
