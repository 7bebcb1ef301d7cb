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
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _hessian_bench_activations import bench_activations
from _hessian_bench_common import CHECKPOINTS, SHARED, machine, sync, time_hvp
from _hessian_bench_scaling import scaling
from _hessian_bench_summary import (
    ModelRun,
    comparison,
    control_variate_summary,
    gauss_newton_summary,
    hutchinson_summary,
    layer_rows,
)
from _provenance import git_sha
from torch import nn

from lcpaq.model.data import load_dataset
from lcpaq.model.graph import LayerInfo, discover_layers, get_module
from lcpaq.model.zoo import load_model
from lcpaq.sensitivity.curvature import CurvatureEstimate
from lcpaq.sensitivity.gauss_newton import gauss_newton_traces
from lcpaq.sensitivity.hutchinson import probes_for_tolerance, single_layer_hutchinson_traces
from lcpaq.sensitivity.per_sample import module_weight
from lcpaq.sensitivity.pyhessian_check import pyhessian_check

logger = logging.getLogger("bench_hessian")


def run_pyhessian(
    model: nn.Module,
    layers: tuple[LayerInfo, ...],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    iters: int,
    seed: int,
) -> dict[str, Any]:
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


def _labelled(inputs: torch.Tensor, labels: torch.Tensor, size: int, count: int) -> list[Any]:
    return [(inputs[i : i + size], labels[i : i + size]) for i in range(0, count, size)]


def _timed_gauss_newton(
    model: nn.Module, layers: tuple[LayerInfo, ...], batches: list[torch.Tensor], seed: int
) -> tuple[CurvatureEstimate, float, float]:
    device = batches[0].device
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    gn = gauss_newton_traces(model, layers, batches, seed=seed)
    sync(device)
    return gn, time.perf_counter() - start, time.process_time() - cpu_start


def measure_model(name: str, args: argparse.Namespace, device: torch.device) -> ModelRun:
    """Run every estimator on checkpoint ``name`` (the models section), in a fixed order."""
    model = load_model("cifar-resnet", SHARED / CHECKPOINTS[name]).to(device)
    calib = load_dataset(args.calib, num_classes=10).subset(0, args.num_samples)
    inputs, labels = calib.inputs.to(device), calib.labels.to(device)
    layers = discover_layers(model, inputs)
    weights = [module_weight(get_module(model, layer.name)) for layer in layers]
    logger.info("%s: %d layers, %d samples", name, len(layers), len(inputs))
    hvp = time_hvp(model, weights, inputs, labels, args.hvp_repeats, args.seed)
    unit = float(hvp["hvp_seconds"])
    logger.info("%s: one HVP %.2f s (graph %.2f s)", name, unit, hvp["graph_seconds"])
    batches = [inputs[i : i + args.batch_size] for i in range(0, len(inputs), args.batch_size)]
    gn, gn_seconds, gn_cpu_seconds = _timed_gauss_newton(model, layers, batches, args.seed)
    logger.info("%s: Gauss-Newton %.1f s = %.1f HVP", name, gn_seconds, gn_seconds / unit)
    pyh = run_pyhessian(model, layers, inputs, labels, args.pyhessian_iters, args.seed)
    logger.info("%s: PyHessian %.1f s, %d probes", name, pyh["seconds"], pyh["num_probes"])
    start = time.perf_counter()
    controlled = single_layer_hutchinson_traces(
        model,
        layers,
        _labelled(inputs, labels, args.batch_size, len(inputs)),
        rel_tol=args.rel_tol,
        min_probes=args.control_min_probes,
        max_probes_per_layer=args.control_max_per_layer,
        gauss_newton=gn,
        seed=args.seed,
    )
    sync(device)
    controlled_seconds = time.perf_counter() - start
    logger.info(
        "%s: Hutchinson with GN control variate %.1f s, %d probes",
        *(name, controlled_seconds, controlled.num_probes),
    )
    # The long plain reference may run on the first --reference-samples images only (its cost is
    # linear in them); the Spearman then compares with Gauss-Newton traces of those same images.
    count = min(args.reference_samples or len(inputs), len(inputs))
    gn_ref = gn if count == len(inputs) else gauss_newton_traces(model, layers, [inputs[:count]])
    start = time.perf_counter()
    hutch = single_layer_hutchinson_traces(
        model,
        layers,
        _labelled(inputs, labels, args.batch_size, count),
        rel_tol=args.rel_tol,
        min_probes=args.hutchinson_min_probes,
        max_probes_per_layer=args.hutchinson_max_per_layer,
        max_total_probes=args.hutchinson_probes_per_layer * len(layers),
        seed=args.seed + 1,  # other probes than the control-variate run
    )
    sync(device)
    hutch_seconds = time.perf_counter() - start
    logger.info(
        "%s: single-layer Hutchinson %.1f s, %d probes", name, hutch_seconds, hutch.num_probes
    )
    return ModelRun(
        *(name, layers, len(inputs), hvp, gn, gn_seconds, gn_cpu_seconds, pyh),
        *(controlled, controlled_seconds, hutch, hutch_seconds, count, gn_ref),
    )


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    """The models section for one checkpoint: every estimator, then the JSON entry."""
    run = measure_model(name, args, device)
    return {
        "model": name,
        "checkpoint": str(CHECKPOINTS[name]),
        "num_layers": len(run.layers),
        "num_samples": run.num_samples,
        "hvp": run.hvp,
        "layers": layer_rows(run),
        "gauss_newton": gauss_newton_summary(run),
        "pyhessian": {**run.pyh, "hvp_equivalents": run.pyh["seconds"] / run.unit},
        "single_layer_hutchinson": hutchinson_summary(run, args),
        "hutchinson_gn_control_variate": control_variate_summary(run),
        "comparison": comparison(run, args),
    }


def _merge_by_model(
    earlier: list[dict[str, object]], new: list[dict[str, object]]
) -> list[dict[str, object]]:
    """Entries of an earlier run (``--merge``) for other models, then this run's."""
    names = {entry["model"] for entry in new}
    return [entry for entry in earlier if entry["model"] not in names] + new


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
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
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sections = {name for name in args.sections.split(",") if name}
    if args.skip_scaling:
        sections.discard("scaling")
    models = [name for name in args.models.split(",") if name]
    started = time.perf_counter()
    result: dict[str, Any] = (
        json.loads(args.out.read_text()) if args.merge and args.out.is_file() else {}
    )
    run = {
        "git_sha": git_sha(),
        "machine": machine(device),
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
    runs: list[dict[str, object]] = result.setdefault("runs", [])
    runs.append({**run, "sections": sorted(sections)})
    result.update({key: run[key] for key in ("git_sha", "machine", "seed", "args")})
    result["total_seconds"] = run["seconds"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    logger.info("wrote %s in %.0f s", args.out, result["total_seconds"])


if __name__ == "__main__":
    main()
