"""How ``analyze`` and ``export`` scale with depth and samples, and where ``lcpaq run`` spends its
time (issue 18) → JSON.

Phases (each stage runs as its own ``lcpaq`` process, so its wall time and peak RSS — the
process's ``ru_maxrss`` from ``wait4`` — are its own):

* ``depth``: torchvision ResNet18 and MobileNetV2 at 224 px, random weights, stacked deeper
  (`_scale_models`: k basic blocks per ResNet stage, MobileNetV2's stages repeated k times);
  analyze, allocate and export at ``--samples`` calibration images each. A least-squares line
  export CPU s = a + b·layers is fitted per family (and the same for wall seconds), with R² and the exponent p of export_s ∝ layers^p
  (log-log fit): p ≈ 1 is linear, p ≈ 2 the old prefix-pass recovery's quadratic growth.
* ``samples``: ``analyze`` of ResNet18 with one block per stage at growing calibration sample counts.
* ``run``: ``lcpaq run`` at one budget on ResNet20 (the shared checkpoint and data) and on a
  44-layer CIFAR ResNet (random weights), stage times from ``timings.json`` with the sweep's share
  of the total, for the default sweep (predicted points) and, with ``--measured-sweep``, the
  earlier default that measured every point on all evaluation images.

Every process runs on ``--threads`` threads (default 1: the machine is shared). The JSON is
rewritten after each measurement, so an interrupted benchmark keeps what it measured.

    python scripts/bench_scale.py --shared ../shared --phases depth,samples,run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _provenance import REPO, git_sha

SCRIPTS = Path(__file__).resolve().parent


def run_measured(args: list[str], threads: int, timeout_s: float) -> dict[str, Any]:
    """One ``lcpaq`` process: wall seconds, its own peak RSS in MiB (``os.wait4``), exit status."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(SCRIPTS)]),
        "OMP_NUM_THREADS": str(threads),
    }
    command = [sys.executable, "-m", "lcpaq.cli", "--threads", str(threads), "-q", *args]
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, env=env, stderr=err, stdout=subprocess.DEVNULL)
        deadline = start + timeout_s
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.05)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall_s = time.perf_counter() - start
        err.seek(0)
        lines = err.read().strip().splitlines()
    return {
        "wall_s": round(wall_s, 2),
        # CPU seconds of the process: what depth changes, far less sensitive than the wall time
        # to other processes on a shared machine.
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
        "exit": process.returncode,
        "error": lines[-1] if process.returncode and lines else None,
    }


def random_images(path: Path, count: int, size: int, classes: int) -> Path:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (count, 3, size, size), dtype=np.uint8)
    np.savez(path, x=x, y=rng.integers(0, classes, count))
    return path


def _layers(run_dir: Path) -> int:
    return len(json.loads((run_dir / "layers.json").read_text())["layers"])


def analyze_allocate_export(
    model: str, calib: Path, run_dir: Path, samples: int, options: argparse.Namespace
) -> dict[str, Any]:
    """The three stages of one model at ``samples`` images: times, peak RSS, layer count."""
    common = ["--formats", options.formats, "--batch-size", str(options.batch_size)]
    analyze = ["analyze", "--model", model, "--calib", str(calib), "--out", str(run_dir)]
    analyze += ["--num-samples", str(samples), "--correction-samples", str(samples), *common]
    row: dict[str, Any] = {"model": model, "samples": samples}
    row["analyze"] = run_measured(analyze, options.threads, options.timeout_s)
    if row["analyze"]["exit"] != 0:
        return row
    row["layers"] = _layers(run_dir)
    allocate = ["allocate", str(run_dir), "--budget", options.budget]
    row["allocate"] = run_measured(allocate, options.threads, options.timeout_s)
    if row["allocate"]["exit"] == 0:
        row["export"] = run_measured(["export", str(run_dir)], options.threads, options.timeout_s)
    return row


def fit_line(depths: list[int], seconds: list[float]) -> dict[str, float] | None:
    """export_s = a + b·layers (least squares, R²) and p of export_s ∝ layers^p (log-log)."""
    if len(depths) < 2:
        return None
    x, y = np.array(depths, float), np.array(seconds, float)
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    r2 = 1 - float((residual**2).sum()) / float(((y - y.mean()) ** 2).sum() or 1.0)
    exponent = float(np.polyfit(np.log(x), np.log(y), 1)[0])
    return {
        "intercept_s": float(intercept),
        "slope_s_per_layer": float(slope),
        "r2": r2,
        "loglog_exponent": exponent,
    }


def depth_phase(options: argparse.Namespace, folder: Path, result: dict[str, Any]) -> None:
    calib = random_images(folder / "imagenet.npz", max(options.samples), 224, 1000)
    samples = options.samples[0]
    for family, factors in (
        ("resnet18", options.resnet_blocks),
        ("mobilenet_v2", options.mnv2_repeats),
    ):
        rows = result.setdefault("depth", {}).setdefault(family, [])
        for k in factors:
            model = f"_scale_models:{family}_x{k}"
            row = analyze_allocate_export(model, calib, folder / f"{family}_x{k}", samples, options)
            rows.append({"factor": k, **row})
            save(options.out, result)
        done = [row for row in rows if row.get("export", {}).get("exit") == 0]
        fits = result.setdefault("export_fit", {})
        layers = [r["layers"] for r in done]
        fits[family] = fit_line(layers, [r["export"]["cpu_s"] for r in done])
        fits[f"{family}_wall"] = fit_line(layers, [r["export"]["wall_s"] for r in done])
        save(options.out, result)


def samples_phase(options: argparse.Namespace, folder: Path, result: dict[str, Any]) -> None:
    calib = random_images(folder / "imagenet.npz", max(options.samples), 224, 1000)
    rows = result.setdefault("samples", [])
    for count in options.samples:
        run_dir = folder / f"samples_{count}"
        analyze = ["analyze", "--model", "_scale_models:resnet18_x1", "--calib", str(calib)]
        analyze += [
            "--out",
            str(run_dir),
            "--num-samples",
            str(count),
            "--formats",
            options.formats,
        ]
        analyze += ["--batch-size", str(options.batch_size)]
        rows.append(
            {"samples": count, "analyze": run_measured(analyze, options.threads, options.timeout_s)}
        )
        save(options.out, result)


def run_phase(options: argparse.Namespace, folder: Path, result: dict[str, Any]) -> None:
    data = options.shared / "data"
    cases = {
        "resnet20": [
            "--model",
            "cifar-resnet",
            "--checkpoint",
            str(options.shared / "checkpoints" / "resnet20-12fca82f.th"),
        ],
        "resnet44_random": ["--model", "cifar-resnet44"],
    }
    sweeps = {"default": []}
    if options.measured_sweep:
        sweeps["measured_all"] = ["--sweep-eval-samples", "all"]
    rows = result.setdefault("run", [])
    for name, model in cases.items():
        for sweep, flags in sweeps.items():
            run_dir = folder / f"run_{name}_{sweep}"
            args = ["run", *model, "--calib", str(data / "cifar10_train_subset.npz")]
            args += ["--eval", str(data / "cifar10_test.npz"), "--budget", options.budget]
            args += ["--num-samples", str(options.run_samples), "--out", str(run_dir), *flags]
            args += ["--correction-samples", str(options.run_samples)]
            measured = run_measured(args, options.threads, options.timeout_s)
            timings = {}
            if (run_dir / "timings.json").is_file():
                timings = json.loads((run_dir / "timings.json").read_text())
                timings.pop("schema_version", None)
            total = sum(timings.values())
            rows.append(
                {
                    "model": name,
                    "sweep": sweep,
                    **measured,
                    "stage_s": timings,
                    "stages_total_s": round(total, 2),
                    "sweep_share": round(timings.get("sweep", 0.0) / total, 3) if total else None,
                }
            )
            save(options.out, result)


def _ints(text: str) -> list[int]:
    """``"1,2,3"`` → [1, 2, 3]; ``""`` → [] (skip that family)."""
    return [int(value) for value in text.split(",") if value.strip()]


def save(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench_scale.json")
    parser.add_argument("--phases", default="depth,samples,run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=_ints, default=[8, 16, 32])
    parser.add_argument("--resnet-blocks", type=_ints, default=[1, 2, 3])
    parser.add_argument("--mnv2-repeats", type=_ints, default=[1, 2, 3])
    parser.add_argument("--formats", default="int4,int8")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--budget", default="avg-bits=6")
    parser.add_argument("--run-samples", type=int, default=128)
    parser.add_argument("--measured-sweep", action="store_true")
    parser.add_argument("--timeout-s", type=float, default=900)
    options = parser.parse_args()
    result: dict[str, Any] = {
        "git_sha": git_sha(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(options).items()},
    }
    if options.out.is_file():  # phases run separately add up in one file
        previous = json.loads(options.out.read_text())
        result = {**previous, **result}
    phases = {"depth": depth_phase, "samples": samples_phase, "run": run_phase}
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as folder:
        for phase in options.phases.split(","):
            result.pop(phase, None)
            phases[phase](options, Path(folder), result)
    save(options.out, result)
    print(json.dumps({k: result.get(k) for k in ("export_fit", "run")}, indent=2))


if __name__ == "__main__":
    main()
