"""Every torchvision classification model under a parameter limit through analyze → allocate →
export → evaluate, with random weights and random images: does lcpaq work on it, and how much of
it does it quantize?

Each model runs in its own process (``--one NAME``), so a crash, a timeout or the peak memory of
one model does not touch the others. Per model the JSON holds: status (``ok``, ``input-error``
with lcpaq's one-line message, ``crash`` with the exception, ``timeout``), the share of weight
parameters quantized, the weights kept in FP32 with their reasons, seconds per stage and peak RSS.

    OMP_NUM_THREADS=1 python scripts/zoo_check.py --out zoo.json            # every model
    OMP_NUM_THREADS=1 python scripts/zoo_check.py --models resnet18,vit_b_16 --out zoo.json

Random weights: the figures say whether the pipeline runs and what it quantizes, not accuracy.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

#: Models whose input size is fixed by their architecture (others get --image-size).
INPUT_SIZES = {"inception_v3": 299, "googlenet": 224, "alexnet": 64}
#: Models that need their full size (ViT position embeddings, MaxViT/Swin window grids).
FULL_SIZE_PREFIXES = ("vit_", "maxvit", "swin")


def classification_models(max_params: float) -> list[str]:
    """torchvision's classification model names with fewer than ``max_params`` parameters
    (counted from a model built without weights)."""
    import torch
    from torchvision import models

    names = []
    for name in sorted(models.list_models(module=models)):
        try:  # on the meta device: no memory, no initialisation time
            with torch.device("meta"):
                model = models.get_model(name, weights=None)
        except NotImplementedError:  # builders that compute with tensors (RegNet's widths)
            model = models.get_model(name, weights=None)
        if sum(parameter.numel() for parameter in model.parameters()) < max_params:
            names.append(name)
    return names


def image_size(name: str, default: int) -> int:
    if name in INPUT_SIZES:
        return INPUT_SIZES[name]
    return 224 if name.startswith(FULL_SIZE_PREFIXES) else default


def peak_rss_mb() -> float:
    """This process's peak resident memory. /proc's VmHWM belongs to the address space, which
    exec replaces; getrusage's ru_maxrss survives exec and would report the parent's peak (the
    parent builds every model to count parameters)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def check_one(name: str, args: argparse.Namespace) -> dict[str, object]:
    """analyze → allocate → export → evaluate on one model (in this process)."""
    import torch
    from torchvision import models

    import lcpaq
    from lcpaq.errors import InputError
    from lcpaq.model.graph import survey_weights
    from lcpaq.quant.formats import QuantScheme

    torch.manual_seed(0)
    size = image_size(name, args.image_size)
    record: dict[str, object] = {"model": name, "image_size": size}
    timings: dict[str, float] = {}
    record["seconds"] = timings
    try:
        model = models.get_model(name, weights=None, num_classes=10).eval()
        images = torch.randn(args.images, 3, size, size, generator=torch.Generator().manual_seed(1))
        labels = torch.arange(args.images) % 10
        data = (images, labels)
        record["num_params"] = sum(parameter.numel() for parameter in model.parameters())
        start = time.perf_counter()
        survey = survey_weights(model, images)
        record["quantized_share"] = round(survey.quantized_share(), 4)
        record["quantized_share_at_inference"] = round(survey.quantized_share_at_inference(), 4)
        record["num_layers"] = len(survey.layers)
        record["kept_fp32"] = [kept.to_dict() for kept in survey.kept]
        analysis = lcpaq.analyze(
            model,
            data,
            num_samples=args.images,
            batch_size=args.images,
            formats=("int4", "int8"),
            scheme=QuantScheme(rounding=args.rounding, clipping=args.clipping),
        )
        timings["analyze"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        allocation = lcpaq.allocate(analysis, "avg-bits=6")
        timings["allocate"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        quantized = lcpaq.export(model, analysis, allocation, data)
        timings["export"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        lcpaq.evaluate(model, quantized.model, data)
        timings["evaluate"] = round(time.perf_counter() - start, 2)
        record["status"] = "ok"
    except InputError as error:
        record["status"] = "input-error"
        record["message"] = str(error)
    except Exception as error:  # noqa: BLE001 - the check reports every failure, by model
        record["status"] = "crash"
        record["message"] = f"{type(error).__name__}: {error}"[:500]
    record["peak_rss_mb"] = peak_rss_mb()
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("zoo_check.json"))
    parser.add_argument("--models", help="comma-separated names (default: every model)")
    parser.add_argument("--max-params", type=float, default=100e6)
    parser.add_argument("--images", type=int, default=2, help="calibration = evaluation images")
    parser.add_argument("--image-size", type=int, default=32, help="for convolutional models")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per model")
    parser.add_argument(
        "--rounding",
        default="nearest",
        help="nearest (default: GPTQ's Cholesky of 4608-wide inputs dominates a 2-core run) or gptq",
    )
    parser.add_argument("--clipping", default="minmax", help="weight range clipping (minmax, mse)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(check_one(args.one, args)))
        return
    names = args.models.split(",") if args.models else classification_models(args.max_params)
    results = []
    for name in names:
        command = [sys.executable, __file__, "--one", name, "--images", str(args.images)]
        command += ["--image-size", str(args.image_size), "--rounding", args.rounding]
        command += ["--clipping", args.clipping]
        start = time.perf_counter()
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=args.timeout, check=False
            )
            lines = done.stdout.strip().splitlines()
            record = json.loads(lines[-1]) if lines else {}
            if not record:
                record = {"model": name, "status": "crash", "message": done.stderr[-500:]}
        except subprocess.TimeoutExpired:
            record = {"model": name, "status": "timeout"}
        record["wall_seconds"] = round(time.perf_counter() - start, 1)
        results.append(record)
        print(
            f"{name:28s} {record['status']:12s} share={record.get('quantized_share')} "
            f"{record['wall_seconds']:7.1f}s {record.get('message', '')[:120]}",
            flush=True,
        )
        args.out.write_text(json.dumps({"models": results}, indent=1))


if __name__ == "__main__":
    main()
