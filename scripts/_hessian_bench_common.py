"""What every section of scripts/bench_hessian.py shares: where the checkpoints are, what the machine
is, and the unit its times are given in (one whole-weight Hessian-vector product)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LCPAQ_SHARED", REPO.parent / "shared"))
CHECKPOINTS = {
    "resnet20": "checkpoints/resnet20-12fca82f.th",
    "resnet32": "checkpoints/resnet32-d509ac18.th",
}


def machine(device: torch.device) -> dict[str, object]:
    """Platform, CPU, torch version and threads, and the GPU if the device is one."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def sync(device: torch.device) -> None:
    """Wait for the GPU's queued work, so wall times measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_hvp(
    model: nn.Module,
    weights: list[torch.Tensor],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    repeats: int,
    seed: int,
) -> dict[str, object]:
    """Median time of one whole-weight HVP on a retained graph, and the graph's build time."""
    device = inputs.device
    generator = torch.Generator(device=device).manual_seed(seed)
    sync(device)
    start = time.perf_counter()
    loss = F.cross_entropy(model(inputs), labels)
    grads = torch.autograd.grad(loss, weights, create_graph=True)
    sync(device)
    graph_seconds = time.perf_counter() - start
    times, cpu_times = [], []
    for _ in range(repeats):
        probe = [
            (torch.randint(0, 2, w.shape, generator=generator, device=device) * 2 - 1).to(w.dtype)
            for w in weights
        ]
        start, cpu_start = time.perf_counter(), time.process_time()
        torch.autograd.grad(grads, weights, grad_outputs=probe, retain_graph=True)
        sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {
        "hvp_seconds": float(np.median(times)),
        "hvp_cpu_seconds": float(np.median(cpu_times)),
        "graph_seconds": graph_seconds,
        "all": times,
    }
