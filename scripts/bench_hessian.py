"""Benchmark lcpaq's curvature estimators against PyHessian and Hutchinson, and their scaling.

In one process, on the same model and the same calibration images (the first ``--num-samples``
of ``--calib``), for each checkpoint:

* lcpaq's default: exact per-layer Gauss–Newton traces (`gauss_newton_traces`), SE over samples;
* PyHessian's ``hessian(...).trace()`` on the quantized layers' weights only (other parameters are
  frozen so its one number is Σ_l tr(H_ll), the sum lcpaq reports per layer);
* two references for the exact Hessian traces tr(H_ll) of the mean cross-entropy (true labels):
  - the long single-layer Hutchinson run (`single_layer_hutchinson_traces`): probes zero outside one
    layer, budgets by per-layer variance, stopped at ``--rel-tol`` or the probe caps
    (``--hutchinson-probes-per-layer`` × layers in all, ``--hutchinson-max-per-layer`` per layer);
    its achieved relative errors are reported per layer, and the probes it would need for 5 %
    are extrapolated from its measured variance;
  - the same estimator with the exact Gauss–Newton trace as control variate (each probe reads
    v(H − G)v only): unbiased for tr(H_ll) whatever G is, and precise when H_ll ≈ G_ll.
  Spearman of the Gauss–Newton traces against both, plus the Spearman one would expect against the
  long reference if its only difference from the Gauss–Newton traces were its own probe noise
  (parametric bootstrap): this says whether a Spearman below 1 is the reference's noise.

Times are also given in HVP-equivalents: one Hessian-vector product of the whole-weight Hessian on
the same batch, timed in the same run (median of ``--hvp-repeats``; the gradient graph is built
once, as PyHessian does, and its build time is reported separately). This machine's speed swings
several-fold between runs, so only ratios within one run are meaningful.

Scaling: Gauss–Newton time and peak memory vs calibration samples (ResNet20 checkpoint) and vs
depth (CIFAR ResNets 20/32/44/56 with random weights; there also one whole-weight HVP on the same
images, so the time is given in HVP-equivalents), each configuration in a fresh child process.
Peak memory is the child's peak resident set size (Linux VmHWM, reset through /proc/self/clear_refs
after the model and data are loaded, so it measures the estimator; ``resource.getrusage`` maxrss
deltas where that reset is unavailable — the JSON says which), plus CUDA's max_memory_allocated
on a GPU.

    nice python scripts/bench_hessian.py --out results/bench_hessian.json     # ~1-2 h, 2 CPU cores
    python scripts/bench_hessian.py --models resnet20 --skip-scaling --hutchinson-probes-per-layer 5
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _provenance import git_sha
from scipy.stats import spearmanr
from torch import nn

from lcpaq.model.data import load_dataset
from lcpaq.model.graph import discover_layers, get_module
from lcpaq.model.zoo import build_model, load_model
from lcpaq.quant.activations import quantize_activation
from lcpaq.sensitivity.activation import activation_scores, activation_sensitivity
from lcpaq.sensitivity.hessian import (
    gauss_newton_traces,
    probes_for_tolerance,
    pyhessian_check,
    single_layer_hutchinson_traces,
)

logger = logging.getLogger("bench_hessian")
REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LCPAQ_SHARED", REPO.parent / "shared"))
CHECKPOINTS = {
    "resnet20": "checkpoints/resnet20-12fca82f.th",
    "resnet32": "checkpoints/resnet32-d509ac18.th",
}


def _machine(device: torch.device) -> dict[str, object]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_hvp(
    model: nn.Module, weights: list[torch.Tensor], inputs, labels, repeats: int, seed: int
) -> dict[str, float]:
    """Median time of one whole-weight HVP on a retained graph, and the graph's build time."""
    device = inputs.device
    generator = torch.Generator(device=device).manual_seed(seed)
    _sync(device)
    start = time.perf_counter()
    loss = F.cross_entropy(model(inputs), labels)
    grads = torch.autograd.grad(loss, weights, create_graph=True)
    _sync(device)
    graph_seconds = time.perf_counter() - start
    times, cpu_times = [], []
    for _ in range(repeats):
        probe = [
            (torch.randint(0, 2, w.shape, generator=generator, device=device) * 2 - 1).to(w.dtype)
            for w in weights
        ]
        start, cpu_start = time.perf_counter(), time.process_time()
        torch.autograd.grad(grads, weights, grad_outputs=probe, retain_graph=True)
        _sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {
        "hvp_seconds": float(np.median(times)),
        "hvp_cpu_seconds": float(np.median(cpu_times)),
        "graph_seconds": graph_seconds,
        "all": times,
    }


def run_pyhessian(
    model: nn.Module, layers: list, inputs, labels, iters: int, seed: int
) -> dict[str, object]:
    """PyHessian's whole-model trace over the measured weights only (lcpaq's reference backend,
    `pyhessian_check`, without the eigenvalues so only ``trace()`` is timed)."""
    check = pyhessian_check(
        model, layers, [(inputs, labels)], max_iter=iters, tol=1e-3, top_n=0, seed=seed
    )
    variance = check.trace_stderr**2 * check.num_probes
    return {
        "trace": check.trace,
        "stderr": check.trace_stderr,
        "num_probes": check.num_probes,
        "stopping_rule": f"maxIter={iters}, tol=1e-3 (PyHessian's running-mean rule)",
        "probes_for_5pct": float(
            probes_for_tolerance(np.array(check.trace), np.array(variance), 0.05)
        ),
        "seconds": check.seconds,
    }


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    model = load_model("cifar-resnet", SHARED / CHECKPOINTS[name]).to(device)
    calib = load_dataset(args.calib, num_classes=10).subset(0, args.num_samples)
    inputs, labels = calib.inputs.to(device), calib.labels.to(device)
    layers = discover_layers(model, inputs)
    names = [layer.name for layer in layers]
    weights = [get_module(model, layer).weight for layer in names]
    logger.info("%s: %d layers, %d samples", name, len(layers), len(inputs))

    hvp = time_hvp(model, weights, inputs, labels, args.hvp_repeats, args.seed)
    unit = hvp["hvp_seconds"]
    logger.info("%s: one HVP %.2f s (graph %.2f s)", name, unit, hvp["graph_seconds"])

    batches = [inputs[i : i + args.batch_size] for i in range(0, len(inputs), args.batch_size)]
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    gn = gauss_newton_traces(model, layers, batches, seed=args.seed)
    _sync(device)
    gn_seconds = time.perf_counter() - start
    gn_cpu_seconds = time.process_time() - cpu_start
    logger.info("%s: Gauss-Newton %.1f s = %.1f HVP", name, gn_seconds, gn_seconds / unit)

    pyh = run_pyhessian(model, layers, inputs, labels, args.pyhessian_iters, args.seed)
    logger.info("%s: PyHessian %.1f s, %d probes", name, pyh["seconds"], pyh["num_probes"])

    labelled = [
        (inputs[i : i + args.batch_size], labels[i : i + args.batch_size])
        for i in range(0, len(inputs), args.batch_size)
    ]
    start = time.perf_counter()
    controlled = single_layer_hutchinson_traces(
        model,
        layers,
        labelled,
        rel_tol=args.rel_tol,
        min_probes=args.control_min_probes,
        max_probes_per_layer=args.control_max_per_layer,
        gauss_newton=gn,
        seed=args.seed,
    )
    _sync(device)
    controlled_seconds = time.perf_counter() - start
    logger.info(
        "%s: Hutchinson with GN control variate %.1f s, %d probes",
        name,
        controlled_seconds,
        controlled.num_probes,
    )

    # The long plain reference may run on the first --reference-samples images only (its cost is
    # linear in them); the Spearman then compares with Gauss-Newton traces of those same images.
    count = min(args.reference_samples or len(inputs), len(inputs))
    gn_ref = gn if count == len(inputs) else gauss_newton_traces(model, layers, [inputs[:count]])
    start = time.perf_counter()
    hutch = single_layer_hutchinson_traces(
        model,
        layers,
        [
            (inputs[i : i + args.batch_size], labels[i : i + args.batch_size])
            for i in range(0, count, args.batch_size)
        ],
        rel_tol=args.rel_tol,
        min_probes=args.hutchinson_min_probes,
        max_probes_per_layer=args.hutchinson_max_per_layer,
        max_total_probes=args.hutchinson_probes_per_layer * len(layers),
        seed=args.seed + 1,  # other probes than the control-variate run
    )
    _sync(device)
    hutch_seconds = time.perf_counter() - start
    logger.info(
        "%s: single-layer Hutchinson %.1f s, %d probes", name, hutch_seconds, hutch.num_probes
    )

    taken = hutch.probes_per_layer
    variance = hutch.trace_stderr**2 * taken
    needed = probes_for_tolerance(hutch.trace, variance, 0.05)
    # Per probe on all --num-samples images: cost is linear in the images.
    seconds_per_probe = hutch_seconds / hutch.num_probes * len(inputs) / count
    gn_rel = gn.trace_stderr / np.abs(gn.trace)
    hutch_rel = hutch.trace_stderr / np.abs(hutch.trace)
    residual = controlled.trace - gn.trace
    hutch_total_se = float(np.sqrt((hutch.trace_stderr**2).sum()))
    hutch_5pct_hvp = float(needed.sum() * seconds_per_probe / unit)
    return {
        "model": name,
        "checkpoint": str(CHECKPOINTS[name]),
        "num_layers": len(layers),
        "num_samples": len(inputs),
        "hvp": hvp,
        "layers": [
            {
                "name": layer,
                "num_params": info.num_params,
                "gauss_newton": float(gn.trace[i]),
                "gauss_newton_stderr": float(gn.trace_stderr[i]),
                "gauss_newton_on_reference_samples": float(gn_ref.trace[i]),
                "hutchinson": float(hutch.trace[i]),
                "hutchinson_stderr": float(hutch.trace_stderr[i]),
                "hutchinson_relative_stderr": float(hutch_rel[i]),
                "hutchinson_probes": int(taken[i]),
                "hutchinson_probes_for_5pct": float(needed[i]),
                "hessian_gn_control": float(controlled.trace[i]),
                "hessian_gn_control_stderr": float(controlled.trace_stderr[i]),
            }
            for i, (layer, info) in enumerate(zip(names, layers))
        ],
        "gauss_newton": {
            "seconds": gn_seconds,
            "hvp_equivalents": gn_seconds / unit,
            "cpu_seconds": gn_cpu_seconds,
            "hvp_equivalents_cpu": gn_cpu_seconds / hvp["hvp_cpu_seconds"],
            "sum": float(gn.trace.sum()),
            "sum_stderr": float(np.std(gn.sample_traces.sum(1), ddof=1) / np.sqrt(len(inputs))),
            "probe_noise": "none (exact per sample); stderr is over calibration samples",
            "max_relative_stderr_over_samples": float(gn_rel.max()),
            "median_relative_stderr_over_samples": float(np.median(gn_rel)),
        },
        "pyhessian": {**pyh, "hvp_equivalents": pyh["seconds"] / unit},
        "single_layer_hutchinson": {
            "seconds": hutch_seconds,
            "hvp_equivalents": hutch_seconds / unit,
            "num_probes": hutch.num_probes,
            "probe_caps": {
                "total": args.hutchinson_probes_per_layer * len(layers),
                "per_layer": args.hutchinson_max_per_layer,
                "rel_tol": args.rel_tol,
            },
            "sum": float(hutch.trace.sum()),
            "sum_stderr": hutch_total_se,
            "relative_stderr_median": float(np.median(hutch_rel)),
            "relative_stderr_max": float(hutch_rel.max()),
            "layers_at_5pct": int((hutch_rel <= 0.05).sum()),
            "median_probes_for_5pct": float(np.median(needed)),
            "max_probes_for_5pct": float(needed.max()),
            "total_probes_for_5pct": float(needed.sum()),
            "hvp_equivalents_for_5pct": hutch_5pct_hvp,
            "num_samples": count,
            "note": "on the first num_samples images; probes for 5% extrapolated from the measured "
            "per-layer variance; HVP-equivalents for 5% use this run's mean seconds per "
            "single-layer probe, scaled linearly to all the model's images",
        },
        "hutchinson_gn_control_variate": {
            "seconds": controlled_seconds,
            "hvp_equivalents": controlled_seconds / unit,
            "num_probes": controlled.num_probes,
            "relative_stderr_max": float(
                np.max(controlled.trace_stderr / np.abs(controlled.trace))
            ),
            "max_relative_residual_trace": float(np.max(np.abs(residual) / np.abs(gn.trace))),
            "note": "tr(H_ll) = tr(G_ll) (exact) + mean of v(H_ll - G_ll)v over single-layer probes",
        },
        "comparison": {
            "spearman_gauss_newton_vs_hutchinson": float(
                spearmanr(gn_ref.trace, hutch.trace).statistic
            ),
            "spearman_expected_from_reference_noise": spearman_under_noise(
                gn_ref.trace, hutch.trace_stderr, args.seed
            ),
            "reference_samples": count,
            "spearman_gauss_newton_vs_gn_controlled_hessian": float(
                spearmanr(gn.trace, controlled.trace).statistic
            ),
            "hutchinson_5pct_over_gauss_newton_cost": hutch_5pct_hvp / (gn_seconds / unit),
            "pyhessian_5pct_over_gauss_newton_cost": pyh["probes_for_5pct"] / (gn_seconds / unit),
            "pyhessian_run_over_gauss_newton_cost": pyh["seconds"] / gn_seconds,
        },
    }


def spearman_under_noise(traces: np.ndarray, stderr: np.ndarray, seed: int) -> dict[str, float]:
    """Spearman between ``traces`` and ``traces`` + N(0, stderr²) noise, over 2000 draws: what a
    reference with these standard errors gives even if it measures exactly ``traces``."""
    rng = np.random.default_rng(seed)
    values = [spearmanr(traces, traces + rng.normal(0.0, stderr)).statistic for _ in range(2000)]
    return {
        "median": float(np.median(values)),
        "p05": float(np.percentile(values, 5)),
        "p95": float(np.percentile(values, 95)),
    }


# -- scaling: one child process per configuration -------------------------------------------------


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _scaling_child(spec: dict[str, object], queue: multiprocessing.Queue) -> None:
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
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS), Linux >= 4.0
        method = "VmHWM reset after loading (peak RSS during the estimator)"
    except OSError:
        method = "getrusage maxrss delta (lower bound)"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    gauss_newton_traces(model, layers, batches, seed=int(spec["seed"]))
    _sync(device)
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
        labels = calib.labels.to(device)
        weights = [get_module(model, layer.name).weight for layer in layers]
        timings = [  # per batch, so the graph's memory is the one of a batch, as for GN
            time_hvp(model, weights, inputs[i : i + batch], labels[i : i + batch], 1, i)
            for i in range(0, len(inputs), batch)
        ]
        hvp = {
            "hvp_seconds": sum(t["hvp_seconds"] for t in timings),
            "hvp_cpu_seconds": sum(t["hvp_cpu_seconds"] for t in timings),
            "graph_seconds": sum(t["graph_seconds"] for t in timings),
        }
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


def run_child(spec: dict[str, object]) -> dict[str, object]:
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


# -- activation sensitivity: cost, and predicted vs measured loss increase ------------------------


def bench_activations(
    name: str, args: argparse.Namespace, device: torch.device
) -> dict[str, object]:
    """`activation_sensitivity` on a checkpoint: its time next to Gauss-Newton's (same batches), and
    how well ½·T_l·σ²_l(f) (and the diagonal form) predicts the measured KL(p_FP ‖ p_Q) when only
    layer l's input is quantized with format f (forward passes on the same images)."""
    model = load_model("cifar-resnet", SHARED / CHECKPOINTS[name]).to(device)
    calib = load_dataset(args.calib, num_classes=10).subset(0, args.num_samples)
    inputs = calib.inputs.to(device)
    layers = discover_layers(model, inputs)
    batches = [inputs[i : i + args.batch_size] for i in range(0, len(inputs), args.batch_size)]
    formats = tuple(args.activation_formats.split(","))
    _sync(device)
    start = time.perf_counter()
    gauss_newton_traces(model, layers, batches, keep_diagonal=False)
    _sync(device)
    gn_seconds = time.perf_counter() - start
    start = time.perf_counter()
    sensitivity = activation_sensitivity(model, layers, batches, formats, loss="kl")
    _sync(device)
    act_seconds = time.perf_counter() - start
    with torch.no_grad():
        reference = torch.cat([torch.log_softmax(model(batch), -1) for batch in batches])
    measured = np.zeros((len(layers), len(formats)))
    for row, layer in enumerate(layers):
        module = get_module(model, layer.name)
        for column, format_name in enumerate(formats):
            low, high = float(sensitivity.low[row]), float(sensitivity.high[row])
            handle = module.register_forward_pre_hook(
                lambda _m, a, f=format_name, lo=low, hi=high: (
                    quantize_activation(a[0], f, lo, hi),
                    *a[1:],
                )
            )
            try:
                with torch.no_grad():
                    log_q = torch.cat([torch.log_softmax(model(batch), -1) for batch in batches])
            finally:
                handle.remove()
            kl = (reference.exp() * (reference - log_q)).sum(-1).mean()
            measured[row, column] = float(kl)
    predicted = {scorer: activation_scores(sensitivity, scorer) for scorer in ("trace", "diagonal")}
    return {
        "model": name,
        "num_samples": len(inputs),
        "formats": list(formats),
        "layers": [layer.name for layer in layers],
        "gauss_newton_seconds": gn_seconds,
        "activation_seconds": act_seconds,
        "activation_over_gauss_newton_time": act_seconds / gn_seconds,
        "activation_trace": sensitivity.trace.tolist(),
        "activation_trace_relative_stderr": (sensitivity.trace_stderr / sensitivity.trace).tolist(),
        "noise_per_element": sensitivity.noise.tolist(),
        "measured_kl": measured.tolist(),
        **{f"predicted_{scorer}": values.tolist() for scorer, values in predicted.items()},
        "spearman_predicted_vs_measured": {
            scorer: {
                "all": float(spearmanr(values.ravel(), measured.ravel()).statistic),
                **{
                    fmt: float(spearmanr(values[:, i], measured[:, i]).statistic)
                    for i, fmt in enumerate(formats)
                },
            }
            for scorer, values in predicted.items()
        },
        "median_measured_over_predicted": {
            scorer: {
                fmt: float(np.median(measured[:, i] / values[:, i]))
                for i, fmt in enumerate(formats)
            }
            for scorer, values in predicted.items()
        },
    }


def _merge_by_model(
    earlier: list[dict[str, object]], new: list[dict[str, object]]
) -> list[dict[str, object]]:
    """Entries of an earlier run (``--merge``) for other models, then this run's."""
    names = {entry["model"] for entry in new}
    return [entry for entry in earlier if entry["model"] not in names] + new


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet20,resnet32")
    parser.add_argument("--calib", type=Path, default=SHARED / "data/cifar10_train_subset.npz")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hvp-repeats", type=int, default=3)
    parser.add_argument("--pyhessian-iters", type=int, default=20, help="PyHessian maxIter")
    parser.add_argument("--rel-tol", type=float, default=0.05)
    parser.add_argument("--hutchinson-min-probes", type=int, default=4)
    parser.add_argument(
        "--hutchinson-probes-per-layer",
        type=int,
        default=30,
        help="long reference: total single-layer probe cap = this x layers",
    )
    parser.add_argument("--hutchinson-max-per-layer", type=int, default=120)
    parser.add_argument(
        "--reference-samples",
        type=int,
        default=64,
        help="images of the long plain Hutchinson reference (0: all --num-samples)",
    )
    parser.add_argument("--control-min-probes", type=int, default=2)
    parser.add_argument("--control-max-per-layer", type=int, default=20)
    parser.add_argument("--scaling-samples", default="256,512,1024,2048")
    parser.add_argument("--scaling-depths", default="20,32,44,56")
    parser.add_argument("--depth-samples", type=int, default=256)
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument(
        "--sections",
        default="models,scaling,activations",
        help="what to run: models (estimators), scaling, activations (activation sensitivity)",
    )
    parser.add_argument("--activation-formats", default="int8,int6,int4,fp8_e4m3")
    parser.add_argument(
        "--merge", action="store_true", help="keep the other sections of an existing --out file"
    )
    parser.add_argument("--out", type=Path, default=Path("results/bench_hessian.json"))
    args = parser.parse_args(argv)
    args.scaling_samples = [int(v) for v in args.scaling_samples.split(",") if v]
    args.scaling_depths = [int(v) for v in args.scaling_depths.split(",") if v]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sections = {name for name in args.sections.split(",") if name}
    if args.skip_scaling:
        sections.discard("scaling")
    models = [name for name in args.models.split(",") if name]
    started = time.perf_counter()
    result: dict[str, object] = (
        json.loads(args.out.read_text()) if args.merge and args.out.is_file() else {}
    )
    run = {
        "git_sha": git_sha(),
        "machine": _machine(device),
        "seed": args.seed,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    if "models" in sections:
        result["models"] = _merge_by_model(
            result.get("models", []), [bench_model(name, args, device) for name in models]
        )
    if "scaling" in sections:
        result["scaling"] = scaling(args, device)
    if "activations" in sections:
        result["activations"] = _merge_by_model(
            result.get("activations", []),
            [bench_activations(name, args, device) for name in models],
        )
    run["seconds"] = time.perf_counter() - started
    result.setdefault("runs", []).append({**run, "sections": sorted(sections)})  # type: ignore[union-attr]
    result.update({key: run[key] for key in ("git_sha", "machine", "seed", "args")})
    result["total_seconds"] = run["seconds"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    logger.info("wrote %s in %.0f s", args.out, result["total_seconds"])


if __name__ == "__main__":
    main()
