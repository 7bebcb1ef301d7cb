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

import _study
import numpy as np

from lcpaq.allocation.budgets import Budget, parse_budget
from lcpaq.config import RunConfig
from lcpaq.model.evaluate import Accuracy, evaluate_accuracy
from lcpaq.model.zoo import load_model
from lcpaq.quant.activations import activation_quantizers
from lcpaq.runfolder import load_candidates
from lcpaq.sensitivity.activation import load_activation_sensitivity
from lcpaq.stages import pipeline

ACTIVATION_FORMATS = ("int4", "int6", "int8", "fp8_e4m3")
CLIPPINGS = ("mse", "minmax")


def _quantized_accuracy(
    run_dir: Path,
    config: RunConfig,
    candidates: list[str],
    activations: dict[str, str],
    calib,
    test,
) -> tuple[Accuracy, float]:
    """Weights to the weight halves of ``candidates``, layer inputs to ``activations`` (layer →
    format) with this run's ranges, corrected as export does; top-1 and seconds."""
    start = time.perf_counter()
    model = load_model(config.analysis.model, config.analysis.checkpoint)
    layers, _ = pipeline.read_layers(run_dir)
    names = [layer.name for layer in layers]
    sensitivity = load_activation_sensitivity(run_dir / "activations.npz")
    quantized, _ = pipeline.quantize_and_recover(
        model,
        layers,
        pipeline.weight_assignment(names, candidates),
        config,
        calib.inputs[: config.recovery.num_samples],
        input_hessians=pipeline.read_input_hessians(run_dir, config),
        activation_quantizers=activation_quantizers(sensitivity, activations),
    )
    seconds = time.perf_counter() - start
    return evaluate_accuracy(quantized, test), seconds


def study(shared: Path, model: str, work: Path, calib, test) -> dict[str, object]:
    base = _study.base_config(shared, model, act_formats=ACTIVATION_FORMATS)
    runs: dict[str, Path] = {}
    analyze_s: dict[str, float] = {}
    for clipping in CLIPPINGS:
        runs[clipping] = work / f"{model}-{clipping}"
        start = time.perf_counter()
        pipeline.analyze(base.with_analysis(act_clipping=clipping), runs[clipping])
        analyze_s[clipping] = time.perf_counter() - start
    mse_dir = runs["mse"]
    config = pipeline.read_config(mse_dir)
    names = [layer.name for layer in pipeline.read_layers(mse_dir)[0]]

    # 1. Mixed 3-bit weights, one activation format for every layer input.
    allocation = pipeline.allocate(mse_dir, [parse_budget("avg-bits=3")])
    weights = [pipeline.weight_assignment(names, allocation.formats)[name] for name in names]
    accuracy: dict[str, Accuracy] = {}
    rows: dict[str, dict[str, object]] = {}
    accuracy["fp32_activations"], seconds = _quantized_accuracy(
        mse_dir, config, weights, {}, calib, test
    )
    rows["fp32_activations"] = {"top1_pct": 100 * accuracy["fp32_activations"].top1}
    for clipping, run_dir in runs.items():
        run_config = pipeline.read_config(run_dir)
        for activation in ACTIVATION_FORMATS:
            name = f"{activation}-{clipping}"
            accuracy[name], seconds = _quantized_accuracy(
                run_dir, run_config, weights, dict.fromkeys(names, activation), calib, test
            )
            rows[name] = {"top1_pct": 100 * accuracy[name].top1, "seconds": seconds}
    fixed = {
        "budget": "avg-bits=3",
        "weight_formats": weights,
        "rows": rows,
        "paired_vs_fp32_activations": {
            name: _study.paired(accuracy[name], accuracy["fp32_activations"])
            for name in accuracy
            if name != "fp32_activations"
        },
    }

    # 2. BitOps: mixed (weight, activation) pairs at uniform W4A4's BitOps.
    table = load_candidates(mse_dir / "candidates.npz")
    costs = pipeline.candidate_costs(mse_dir, table)
    uniform: dict[str, Accuracy] = {}
    uniform_rows: dict[str, dict[str, object]] = {}
    for candidate in ("int4/int4", "int8/int8"):
        column = table.format_index(candidate)
        uniform_rows[candidate] = {"costs": costs.values(np.full(len(names), column))}
        uniform[candidate], _ = _quantized_accuracy(
            mse_dir,
            config,
            [candidate] * len(names),
            dict.fromkeys(names, candidate.split("/")[1]),
            calib,
            test,
        )
        uniform_rows[candidate]["top1_pct"] = 100 * uniform[candidate].top1
    limit = uniform_rows["int4/int4"]["costs"]["bitops-g"]  # type: ignore[index]
    mixed = pipeline.allocate(mse_dir, [Budget("bitops-g", limit)])
    mixed_activations = pipeline.paired_activation_formats(mixed.layer_names, mixed.formats)
    mixed_accuracy, _ = _quantized_accuracy(
        mse_dir, config, list(mixed.formats), mixed_activations, calib, test
    )
    bitops = {
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
    return {
        "model": model,
        "analyze_s": analyze_s,
        "fixed_weights": fixed,
        "bitops": bitops,
        "test_images": accuracy["fp32_activations"].num_samples,
    }


def main() -> None:
    args = _study.parser(__doc__, "activation_study").parse_args()
    calib, test, result = _study.start(args)
    for model in args.models.split(","):
        entry = study(args.shared, model, args.work, calib, test)
        _study.add_study(args.out, result, entry)
        rows = entry["fixed_weights"]["rows"]  # type: ignore[index]
        line = ", ".join(f"{name} {row['top1_pct']:.2f}" for name, row in rows.items())
        bitops = entry["bitops"]  # type: ignore[index]
        print(
            f"{model} W3 mixed: {line}; BitOps at W4A4: mixed {bitops['mixed']['top1_pct']:.2f} "
            f"vs uniform {bitops['uniform']['int4/int4']['top1_pct']:.2f} "
            f"({bitops['mixed_vs_uniform_w4a4']['difference_pct']:+.2f} ± "
            f"{bitops['mixed_vs_uniform_w4a4']['stderr_pct']:.2f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
