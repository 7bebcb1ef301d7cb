"""Multi-process calibration with torch.distributed: each process takes a share of the batches.

``torchrun --nproc-per-node N -m lcpaq.cli analyze …`` (or the ``lcpaq`` entry point under torchrun)
initialises the group from torchrun's variables (`init_from_environment`); `lcpaq.stages.pipeline.analyze`
then computes every collective measurement (Gauss–Newton, Hutchinson, activation curvature) in all
processes and writes the artifacts from rank 0 only.

`gauss_newton_traces_distributed` runs `lcpaq.sensitivity.hessian.GaussNewtonState.add_batch` on batches
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
from tqdm.auto import tqdm

from lcpaq.model.graph import LayerInfo
from lcpaq.quant.activations import range_sample_size, range_statistics
from lcpaq.sensitivity.activation import ActivationSensitivity, ActivationState
from lcpaq.sensitivity.hessian import BatchShare, CurvatureEstimate, GaussNewtonState, LossName


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
    values: np.ndarray, op: dist.ReduceOp, group: dist.ProcessGroup | None
) -> np.ndarray:
    tensor = torch.as_tensor(np.ascontiguousarray(values, dtype=np.float64))
    tensor = tensor.to(_collective_device(group))
    dist.all_reduce(tensor, op=op, group=group)
    return tensor.cpu().numpy()


def batch_share(group: dist.ProcessGroup | None = None) -> BatchShare:
    """The `lcpaq.sensitivity.hessian.BatchShare` of this process: batches rank, rank + world, …, with
    per-probe sums all-reduced (float64). Without a process group: every batch, no reduction."""
    rank, world = rank_and_world(group)
    if world == 1:
        return BatchShare()
    return BatchShare(
        rank=rank,
        world=world,
        reduce_sum=lambda values: _all_reduce(values, dist.ReduceOp.SUM, group),
    )


def _in_batch_order(
    mine: list[int], rows: list[object], num_batches: int, group: dist.ProcessGroup | None
) -> list[object]:
    """Every process's per-batch rows, gathered to all processes, in the original batch order."""
    gathered: list[list[tuple[int, object]] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, list(zip(mine, rows)), group=group)
    by_index = dict(pair for part in gathered for pair in part or [])
    return [by_index[index] for index in range(num_batches)]


def gauss_newton_traces_distributed(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    batches: Sequence[torch.Tensor],
    *,
    loss: LossName = "cross_entropy",
    keep_diagonal: bool = True,
    seed: int = 0,
    group: dist.ProcessGroup | None = None,
    progress: bool = False,
) -> CurvatureEstimate:
    """`lcpaq.sensitivity.hessian.gauss_newton_traces` with the batches split across the process group.

    Every process passes the same ``batches`` (only its share is computed) and gets the full
    result. Without an initialised process group this is the single-process function.
    """
    batches = list(batches)
    rank, world = rank_and_world(group)
    state = GaussNewtonState.start(model, layers, keep_diagonal=keep_diagonal, seed=seed + rank)
    mine = list(range(rank, len(batches), world))
    for index in tqdm(mine, desc="Gauss-Newton traces", disable=not progress, unit="batch"):
        state.add_batch(model, batches[index], loss)
    if world == 1:
        return state.finish()
    state.rows = _in_batch_order(mine, state.rows, len(batches), group)  # type: ignore[assignment]
    state.sampled = bool(_all_reduce(np.array([float(state.sampled)]), dist.ReduceOp.SUM, group)[0])
    if keep_diagonal:
        for name, values in state.diagonal.items():
            total = values.double().to(_collective_device(group))
            dist.all_reduce(total, group=group)
            state.diagonal[name] = total.to(values.device, values.dtype)
    return state.finish()


def activation_sensitivity_distributed(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    batches: Sequence[torch.Tensor],
    format_names: Sequence[str],
    *,
    loss: LossName = "cross_entropy",
    clipping: str = "minmax",
    symmetric: bool = False,
    seed: int = 0,
    group: dist.ProcessGroup | None = None,
    progress: bool = False,
) -> ActivationSensitivity:
    """`lcpaq.sensitivity.activation.activation_sensitivity` with the batches split across the process group.

    The activation ranges are min/max-reduced (exact), the range samples (``mse`` clipping) and
    the per-sample rows gathered in batch order,
    so the result equals the single-process one (the sampled Fisher past 64 classes: in
    distribution only, as for `gauss_newton_traces_distributed`).
    """
    batches = list(batches)
    if not batches:
        raise ValueError("no calibration samples were given")
    rank, world = rank_and_world(group)
    mine = list(range(rank, len(batches), world))
    indexed = [(index, batches[index]) for index in mine]
    keep = range_sample_size(clipping)
    low, high, samples = range_statistics(model, layers, indexed, keep=keep, seed=seed)
    if world > 1:
        low = _all_reduce(low, dist.ReduceOp.MIN, group)
        high = _all_reduce(high, dist.ReduceOp.MAX, group)
        samples = _in_batch_order(mine, samples, len(batches), group)  # type: ignore[assignment]
    state = ActivationState.start(
        model,
        layers,
        format_names,
        low,
        high,
        samples=samples,
        clipping=clipping,
        symmetric=symmetric,
        seed=seed + rank,
    )
    for index in tqdm(mine, desc="activation curvature", disable=not progress, unit="batch"):
        state.add_batch(model, batches[index], loss)
    if world == 1:
        return state.finish()
    gathered = _in_batch_order(
        mine, [(state.num_elements, row) for row in state.rows], len(batches), group
    )
    state.num_elements = gathered[0][0]  # type: ignore[index]
    state.rows = [row for _, row in gathered]  # type: ignore[misc]
    flags = _all_reduce(np.array([float(state.sampled)]), dist.ReduceOp.SUM, group)
    state.sampled = bool(flags[0])
    return state.finish()
