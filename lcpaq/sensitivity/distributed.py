"""Multi-process calibration with torch.distributed: each process takes a share of the batches.

``torchrun --nproc-per-node N -m lcpaq.cli analyze …`` (or the ``lcpaq`` entry point under torchrun)
initialises the group from torchrun's variables (`init_from_environment`); the analyze stage
(`lcpaq.stages.measure.measure_sensitivity`) then computes every collective measurement
(Gauss–Newton, Hutchinson, activation curvature) in all processes and writes the artifacts from
rank 0 only.

`batch_share` is this process's `lcpaq.sensitivity.batch_share.BatchShare`: batches
``rank, rank + world, …`` and the collectives that combine the partial results. The estimators take
it as an argument (`lcpaq.sensitivity.gauss_newton.gauss_newton_traces`, the Hutchinson estimators),
so each has one implementation for one and for many processes. The Gauss–Newton traces gather every
batch's per-sample trace rows (float64, N × L numbers in all) to every process and replay the
single-process accumulation in the original batch order: for the exact path (≤ 64 classes, or
``mse``) traces, standard errors and ``sample_traces`` are bitwise the single-process ones; the
per-element diagonal is all-reduced (summed in another order, equal to float rounding). The sampled
Fisher (> 64 classes) draws its labels from a per-rank generator, so it is equal in distribution only.

Works with any backend the process group was created with: gloo on CPU, NCCL on GPU (the model's
device is used; NCCL needs each rank's model on its own GPU). Under ``torchrun`` call
`init_from_environment` first:

    torchrun --nproc-per-node 2 my_calibration.py   # my_calibration.py: init, then the call below
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist

from lcpaq.sensitivity.batch_share import BatchShare, IndexedRows


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


def rank_and_world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def is_main_process() -> bool:
    """True in rank 0 (and without a process group): the process that writes artifacts."""
    return rank_and_world()[0] == 0


def default_device() -> torch.device:
    """Where analysis runs: this process's GPU (``LOCAL_RANK`` under torchrun) when CUDA is
    available, the CPU otherwise."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def shutdown() -> None:
    """Destroy the default process group if one was initialised (end of a torchrun command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(
    values: np.ndarray, op: dist.ReduceOp.RedOpType, group: dist.ProcessGroup | None
) -> np.ndarray:
    tensor = torch.as_tensor(np.ascontiguousarray(values, dtype=np.float64))
    tensor = tensor.to(_collective_device(group))
    dist.all_reduce(tensor, op=op, group=group)
    return tensor.cpu().numpy()


def _all_reduce_tensor(values: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The sum over processes in float64, back on ``values``' device and dtype."""
    total = values.double().to(_collective_device(group))
    dist.all_reduce(total, group=group)
    return total.to(values.device, values.dtype)


def _all_gather(rows: IndexedRows, group: dist.ProcessGroup | None) -> list[IndexedRows]:
    """Every process's (batch index, row) pairs, in every process."""
    gathered: list[IndexedRows | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, rows, group=group)
    return [part or [] for part in gathered]


def batch_share(group: dist.ProcessGroup | None = None) -> BatchShare:
    """The `lcpaq.sensitivity.batch_share.BatchShare` of this process: batches rank, rank + world,
    …, with sums all-reduced (float64) and rows all-gathered. Without a process group: every batch,
    no collectives."""
    rank, world = rank_and_world(group)
    if world == 1:
        return BatchShare()
    return BatchShare(
        rank=rank,
        world=world,
        reduce_sum=lambda values: _all_reduce(values, dist.ReduceOp.SUM, group),
        reduce_min=lambda values: _all_reduce(values, dist.ReduceOp.MIN, group),
        reduce_max=lambda values: _all_reduce(values, dist.ReduceOp.MAX, group),
        reduce_tensor_sum=lambda values: _all_reduce_tensor(values, group),
        gather=lambda rows: _all_gather(rows, group),
    )
