"""The scaling section of scripts/bench_hessian.py: Gauss–Newton time and peak memory against the
number of calibration samples (ResNet20 checkpoint) and against depth (CIFAR ResNets with random
weights, there also one whole-weight HVP on the same images), each configuration in a fresh child
process so that its peak memory is its own."""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import resource
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from _hessian_bench_common import CHECKPOINTS, SHARED, sync, time_hvp

from lcpaq.model.data import load_dataset
from lcpaq.model.graph import discover_layers, get_module
from lcpaq.model.zoo import build_model, load_model
from lcpaq.sensitivity.gauss_newton import gauss_newton_traces
from lcpaq.sensitivity.per_sample import module_weight

logger = logging.getLogger("bench_hessian")


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_memory_reset() -> str:
    """Reset the peak resident set size where Linux allows; the method the peak is then read with."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS), Linux >= 4.0
        return "VmHWM reset after loading (peak RSS during the estimator)"
    except OSError:
        return "getrusage maxrss delta (lower bound)"


def _hvp_per_batch(
    model: torch.nn.Module,
    layers: list[Any],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    batch: int,
) -> dict[str, float]:
    """One whole-weight HVP per batch, so the graph's memory is the one of a batch, as for GN."""
    weights = [module_weight(get_module(model, layer.name)) for layer in layers]
    timings = [
        time_hvp(model, weights, inputs[i : i + batch], labels[i : i + batch], 1, i)
        for i in range(0, len(inputs), batch)
    ]
    return {
        key: sum(cast(float, t[key]) for t in timings)
        for key in ("hvp_seconds", "hvp_cpu_seconds", "graph_seconds")
    }


def _scaling_child(spec: dict[str, Any], queue: multiprocessing.Queue) -> None:
    torch.set_num_threads(int(spec["threads"]))
    device = torch.device(str(spec["device"]))
    if spec["checkpoint"]:
        model = load_model("cifar-resnet", str(spec["checkpoint"]))
    else:
        torch.manual_seed(int(spec["seed"]))
        model = build_model(f"cifar-resnet{spec['depth']}", None).eval()
    model = model.to(device)
    calib = load_dataset(str(spec["calib"]), num_classes=10).subset(0, int(spec["num_samples"]))
    inputs = calib.inputs.to(device)
    layers = discover_layers(model, inputs)
    batch = int(spec["batch_size"])
    batches = [inputs[i : i + batch] for i in range(0, len(inputs), batch)]
    rss_before = _rss_kib("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    method = _peak_memory_reset()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    gauss_newton_traces(model, layers, batches, seed=int(spec["seed"]))
    sync(device)
    seconds = time.perf_counter() - start
    # CPU seconds of this process (all threads): on a machine shared with other jobs wall time
    # swings several-fold, CPU time much less, so the growth is judged on it.
    cpu_seconds = time.process_time() - cpu_start
    if method.startswith("VmHWM"):
        peak = _rss_kib("VmHWM") or 0
        peak_delta = peak - (rss_before or 0)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_delta = peak - maxrss_before
    cuda_peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    hvp = None
    if spec.get("hvp"):  # one whole-weight HVP on the same images, after the memory was read
        hvp = _hvp_per_batch(model, list(layers), inputs, calib.labels.to(device), batch)
    queue.put(
        {
            **{key: spec[key] for key in ("depth", "num_samples", "batch_size")},
            "num_layers": len(layers),
            "num_params": sum(layer.num_params for layer in layers),
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "rss_before_mib": (rss_before or 0) / 1024,
            "peak_rss_mib": peak / 1024,
            "peak_over_before_mib": peak_delta / 1024,
            "memory_method": method,
            "cuda_peak_mib": cuda_peak,
            "hvp_seconds": hvp["hvp_seconds"] if hvp else None,
            "hvp_graph_seconds": hvp["graph_seconds"] if hvp else None,
            "hvp_equivalents": seconds / hvp["hvp_seconds"] if hvp else None,
            "hvp_cpu_seconds": hvp["hvp_cpu_seconds"] if hvp else None,
            "hvp_equivalents_cpu": cpu_seconds / hvp["hvp_cpu_seconds"] if hvp else None,
        }
    )


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration in a fresh (spawned) process: its result row."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_scaling_child, args=(spec, queue))
    process.start()
    result = queue.get()
    process.join()
    logger.info("scaling %s", {k: result[k] for k in ("depth", "num_samples", "seconds")})
    return result


def _fit_slope(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Log-log slope (1 = linear growth) of y against x."""
    slope = np.polyfit(np.log(xs), np.log(ys), 1)[0]
    return {"loglog_slope": float(slope)}


def scaling(args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    """The section: rows against samples and against depth, and their log-log growth slopes."""
    base = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "seed": args.seed,
        "calib": str(args.calib),
        "batch_size": args.batch_size,
    }
    by_samples = [
        run_child(
            {
                **base,
                "checkpoint": str(SHARED / CHECKPOINTS["resnet20"]),
                "depth": 20,
                "num_samples": count,
            }
        )
        for count in args.scaling_samples
    ]
    by_depth = [
        run_child(
            {
                **base,
                "checkpoint": None,
                "depth": depth,
                "num_samples": args.depth_samples,
                "hvp": True,
            }
        )
        for depth in args.scaling_depths
    ]
    return {
        "estimator": "gauss_newton_traces (lcpaq default)",
        "vs_samples": by_samples,
        "vs_samples_time": _fit_slope(
            [r["num_samples"] for r in by_samples], [r["seconds"] for r in by_samples]
        ),
        "vs_depth": by_depth,
        "vs_depth_time": _fit_slope(
            [r["num_layers"] for r in by_depth], [r["seconds"] for r in by_depth]
        ),
        "vs_depth_cpu_time": _fit_slope(
            [r["num_layers"] for r in by_depth], [r["cpu_seconds"] for r in by_depth]
        ),
        "vs_samples_cpu_time": _fit_slope(
            [r["num_samples"] for r in by_samples], [r["cpu_seconds"] for r in by_samples]
        ),
        "vs_depth_peak_memory": _fit_slope(
            [r["num_layers"] for r in by_depth], [r["peak_over_before_mib"] for r in by_depth]
        ),
        "vs_samples_peak_memory": _fit_slope(
            [r["num_samples"] for r in by_samples], [r["peak_over_before_mib"] for r in by_samples]
        ),
    }
