"""Multi-process calibration with torch.distributed: each process takes a share of the batches.

`gauss_newton_traces_distributed` runs `lcpaq.hessian.GaussNewtonState.add_batch` on batches
``rank, rank + world, …``, gathers every batch's per-sample trace rows (float64, N × L numbers in all)
to every process, replays the single-process accumulation in the original batch order and
all-reduces the per-element diagonal. For the exact Gauss–Newton path (≤ 64 classes, or ``mse``)
the traces, standard errors and ``sample_traces`` are bitwise equal to the single-process result;
the diagonal is summed in a different order (equal to float rounding). The sampled Fisher (> 64
classes) draws its labels from a per-rank generator, so it is equal in distribution only.

Works with any backend the process group was created with: gloo on CPU, NCCL on GPU (the model's
device is used; NCCL needs each rank's model on its own GPU). Under ``torchrun`` call
`init_from_environment` first:

    torchrun --nproc-per-node 2 my_calibration.py   # my_calibration.py: init, then the call below
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lcpaq.graph import LayerInfo
from lcpaq.hessian import CurvatureEstimate, GaussNewtonState, LossName


def init_from_environment(backend: str | None = None) -> bool:
    """Initialise the default process group from torchrun's variables; False when not under it.

    The backend defaults to NCCL when CUDA is available and gloo otherwise.
    """
    if dist.is_initialized():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def gauss_newton_traces_distributed(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    batches: Sequence[torch.Tensor],
    *,
    loss: LossName = "cross_entropy",
    keep_diagonal: bool = True,
    seed: int = 0,
    group: dist.ProcessGroup | None = None,
) -> CurvatureEstimate:
    """`lcpaq.hessian.gauss_newton_traces` with the batches split across the process group.

    Every process passes the same ``batches`` (only its share is computed) and gets the full
    result. Without an initialised process group this is the single-process function.
    """
    batches = list(batches)
    if not (dist.is_available() and dist.is_initialized()):
        rank, world = 0, 1
    else:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
    state = GaussNewtonState.start(model, layers, keep_diagonal=keep_diagonal, seed=seed + rank)
    mine = list(range(rank, len(batches), world))
    for index in mine:
        state.add_batch(model, batches[index], loss)
    if world == 1:
        return state.finish()
    gathered: list[list[tuple[int, np.ndarray]] | None] = [None] * world
    dist.all_gather_object(gathered, list(zip(mine, state.rows)), group=group)
    rows = dict(pair for part in gathered for pair in part or [])
    state.rows = [rows[index] for index in range(len(batches))]
    flags = torch.tensor([float(state.sampled)], device=_device(model))
    dist.all_reduce(flags, group=group)
    state.sampled = bool(flags.item())
    if keep_diagonal:
        for name, values in state.diagonal.items():
            total = values.double()
            dist.all_reduce(total, group=group)
            state.diagonal[name] = total.to(values.dtype)
    return state.finish()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
