"""Quantized activations on the shared checkpoints → JSON: what each activation format costs on
top of mixed-precision weights, MSE vs min-max activation ranges, and mixed (weight, activation)
allocation under a BitOps budget against uniform W4A4 at the same BitOps.

For each checkpoint, ``analyze`` runs once per activation clipping with the activation formats
INT4, INT6, INT8 and FP8 E4M3 (curvature, input second moments for GPTQ, activation sensitivity
and ranges on the same 256 calibration images). Then, all evaluated on the same test images and
paired against the weights-only model:

* the HiGHS allocation at 3.0 average weight bits, with every layer input left in FP32 or
  quantized to one format (static per-tensor ranges), corrected on 1024 images as export does;
* under a BitOps budget equal to uniform W4A4's, the ILP's mixed (weight, activation) choice
  (the candidates pair INT2-8 weights with the four activation formats), next to uniform W4A4
  and W8A8 of the same run.

    python scripts/activation_study.py --shared ../shared --out results/activation_study.json
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TypedDict

import _study
import numpy as np

from lcpaq.allocation.budgets import Budget, parse_budget
from lcpaq.model.data import Dataset
from lcpaq.model.evaluate import Accuracy
from lcpaq.runfolder import load_candidates
from lcpaq.stages import pipeline

ACTIVATION_FORMATS = ("int4", "int6", "int8", "fp8_e4m3")
CLIPPINGS = ("mse", "minmax")


class FixedWeights(TypedDict):
    """Mixed 3-bit weights with every layer input in FP32 or in one activation format."""

    budget: str
    weight_formats: list[str]
    rows: dict[str, dict[str, object]]
    paired_vs_fp32_activations: dict[str, _study.Paired]


class BitOps(TypedDict):
    """The ILP's mixed (weight, activation) choice at uniform W4A4's BitOps, and the uniform ones."""

    budget: str
    mixed: dict[str, object]
    uniform: dict[str, dict[str, object]]
    mixed_vs_uniform_w4a4: _study.Paired


class Entry(TypedDict):
    model: str
    analyze_s: dict[str, float]
    fixed_weights: FixedWeights
    bitops: BitOps
    test_images: int


def _analyze(shared: Path, model: str, work: Path) -> tuple[dict[str, Path], dict[str, float]]:
    """One run folder per activation clipping (run folder, analysis seconds)."""
    base = _study.base_config(shared, model).with_analysis(act_formats=ACTIVATION_FORMATS)
    runs: dict[str, Path] = {}
    analyze_s: dict[str, float] = {}
    for clipping in CLIPPINGS:
        runs[clipping] = work / f"{model}-{clipping}"
        start = time.perf_counter()
        pipeline.analyze(base.with_analysis(act_clipping=clipping), runs[clipping])
        analyze_s[clipping] = time.perf_counter() - start
    return runs, analyze_s


def _fixed_weights(
    runs: dict[str, Path], calib: Dataset, test: Dataset
) -> tuple[FixedWeights, Accuracy]:
    """Mixed 3-bit weights, one activation format for every layer input (and the FP32 inputs)."""
    mse_dir = runs["mse"]
    config = pipeline.read_config(mse_dir)
    names = [layer.name for layer in pipeline.read_layers(mse_dir)[0]]
    allocation = pipeline.allocate(mse_dir, [parse_budget("avg-bits=3")])
    weights = [pipeline.weight_assignment(names, allocation.formats)[name] for name in names]
    accuracy: dict[str, Accuracy] = {}
    rows: dict[str, dict[str, object]] = {}
    accuracy["fp32_activations"], seconds = _study.run_accuracy(
        mse_dir, config, weights, calib, test, {}
    )
    rows["fp32_activations"] = {"top1_pct": 100 * accuracy["fp32_activations"].top1}
    for clipping, run_dir in runs.items():
        run_config = pipeline.read_config(run_dir)
        for activation in ACTIVATION_FORMATS:
            name = f"{activation}-{clipping}"
            accuracy[name], seconds = _study.run_accuracy(
                run_dir, run_config, weights, calib, test, dict.fromkeys(names, activation)
            )
            rows[name] = {"top1_pct": 100 * accuracy[name].top1, "seconds": seconds}
    fixed: FixedWeights = {
        "budget": "avg-bits=3",
        "weight_formats": weights,
        "rows": rows,
        "paired_vs_fp32_activations": {
            name: _study.paired(accuracy[name], accuracy["fp32_activations"])
            for name in accuracy
            if name != "fp32_activations"
        },
    }
    return fixed, accuracy["fp32_activations"]


def _bitops(mse_dir: Path, calib: Dataset, test: Dataset) -> BitOps:
    """Mixed (weight, activation) pairs at uniform W4A4's BitOps, against uniform W4A4 and W8A8."""
    config = pipeline.read_config(mse_dir)
    names = [layer.name for layer in pipeline.read_layers(mse_dir)[0]]
    table = load_candidates(mse_dir / "candidates.npz")
    costs = pipeline.candidate_costs(mse_dir, table)
    uniform: dict[str, Accuracy] = {}
    uniform_rows: dict[str, dict[str, object]] = {}
    uniform_costs: dict[str, dict[str, float]] = {}
    for candidate in ("int4/int4", "int8/int8"):
        column = table.format_index(candidate)
        uniform_costs[candidate] = costs.values(np.full(len(names), column))
        uniform_rows[candidate] = {"costs": uniform_costs[candidate]}
        uniform[candidate], _ = _study.run_accuracy(
            mse_dir,
            config,
            [candidate] * len(names),
            calib,
            test,
            dict.fromkeys(names, candidate.split("/")[1]),
        )
        uniform_rows[candidate]["top1_pct"] = 100 * uniform[candidate].top1
    limit = uniform_costs["int4/int4"]["bitops-g"]
    mixed = pipeline.allocate(mse_dir, [Budget("bitops-g", limit)])
    mixed_activations = pipeline.paired_activation_formats(mixed.layer_names, mixed.formats)
    mixed_accuracy, _ = _study.run_accuracy(
        mse_dir, config, mixed.formats, calib, test, mixed_activations
    )
    return {
        "budget": f"bitops-g={limit:.6g} (uniform W4A4)",
        "mixed": {
            "formats": list(mixed.formats),
            "costs": mixed.costs,
            "average_bits": mixed.average_bits,
            "top1_pct": 100 * mixed_accuracy.top1,
        },
        "uniform": uniform_rows,
        "mixed_vs_uniform_w4a4": _study.paired(mixed_accuracy, uniform["int4/int4"]),
    }


def study(shared: Path, model: str, work: Path, calib: Dataset, test: Dataset) -> Entry:
    runs, analyze_s = _analyze(shared, model, work)
    fixed, fp32_activations = _fixed_weights(runs, calib, test)
    return {
        "model": model,
        "analyze_s": analyze_s,
        "fixed_weights": fixed,
        "bitops": _bitops(runs["mse"], calib, test),
        "test_images": fp32_activations.num_samples,
    }


def main() -> None:
    args = _study.parser(__doc__, "activation_study").parse_args()
    calib, test, result = _study.start(args)
    for model in args.models.split(","):
        entry = study(args.shared, model, args.work, calib, test)
        _study.add_study(args.out, result, entry)
        rows = entry["fixed_weights"]["rows"]
        line = ", ".join(f"{name} {row['top1_pct']:.2f}" for name, row in rows.items())
        bitops = entry["bitops"]
        print(
            f"{model} W3 mixed: {line}; BitOps at W4A4: mixed {bitops['mixed']['top1_pct']:.2f} "
            f"vs uniform {bitops['uniform']['int4/int4']['top1_pct']:.2f} "
            f"({bitops['mixed_vs_uniform_w4a4']['difference_pct']:+.2f} ± "
            f"{bitops['mixed_vs_uniform_w4a4']['stderr_pct']:.2f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
