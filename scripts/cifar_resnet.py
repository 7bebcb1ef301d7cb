"""Reproduce the reference table of shared/README.md for a CIFAR ResNet checkpoint, and lcpaq's figures.

All rows are measured in this one process on the same calibration and test images:

* FP32;
* uniform INT8…INT2 with the reference quantizer (per-channel symmetric min-max, no correction) and with
  lcpaq's default quantizer (asymmetric, MSE clipping, GPTQ rounding since git 0c7aca4, BN
  statistics / bias correction);
* lcpaq mixed precision at 4 / 3.5 / 3 / 2.5 average bits (HiGHS on the HAWQ-V2 score with exact
  Gauss–Newton traces), and the same allocation procedure with the reference quantizer and no
  correction, as the HAWQ-V2-style baseline;

then writes JSON (accuracy, paired differences vs lcpaq, timings) and the run folder's plots.

    python scripts/cifar_resnet.py --checkpoint ../shared/checkpoints/resnet20-12fca82f.th \
        --calib ../shared/data/cifar10_train_subset.npz --eval ../shared/data/cifar10_test.npz \
        --out results/resnet20
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from _provenance import git_sha

from lcpaq.allocation.budgets import Budget
from lcpaq.config import AnalysisConfig, RecoveryConfig, RunConfig
from lcpaq.model.data import load_dataset
from lcpaq.model.evaluate import Accuracy, evaluate_accuracy, paired_difference
from lcpaq.model.zoo import load_model
from lcpaq.quant.formats import QuantScheme
from lcpaq.stages import pipeline

REFERENCE_SCHEME = QuantScheme(symmetric=True, granularity="channel", clipping="minmax")
MIXED_BUDGETS = (4.0, 3.5, 3.0, 2.5)
UNIFORM_FORMATS = ("int8", "int6", "int5", "int4", "int3", "int2")


def _row(name: str, accuracy: Accuracy, reference: Accuracy | None, **extra: object) -> dict:
    row = {
        "name": name,
        "top1_pct": 100 * accuracy.top1,
        "stderr_pct": 100 * accuracy.stderr,
        **extra,
    }
    if reference is not None:
        difference, difference_se = paired_difference(accuracy, reference)
        row["paired_vs_lcpaq_3bit_pct"] = 100 * difference
        row["paired_vs_lcpaq_3bit_se_pct"] = 100 * difference_se
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--calib", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--correction-samples", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    run_dir = args.out / "run"
    config = RunConfig(
        analysis=AnalysisConfig(
            model="cifar-resnet",
            checkpoint=args.checkpoint,
            calib=args.calib,
            num_samples=args.num_samples,
        ),
        recovery=RecoveryConfig(num_samples=args.correction_samples),
    )
    started = time.perf_counter()
    pipeline.analyze(config, run_dir, progress=False)
    analyze_s = time.perf_counter() - started

    model = load_model("cifar-resnet", args.checkpoint)
    layers, _ = pipeline.read_layers(run_dir)
    calib = load_dataset(args.calib, num_classes=10).subset(0, args.correction_samples)
    test = load_dataset(args.eval, num_classes=10)
    reference_config = replace(
        config.with_analysis(scheme=REFERENCE_SCHEME), recovery=RecoveryConfig(enabled=False)
    )

    def accuracy_of(assignment: dict[str, str], run_config: RunConfig) -> Accuracy:
        quantized, _ = pipeline.quantize_and_recover(
            model,
            layers,
            assignment,
            run_config,
            calib.inputs,
            input_hessians=pipeline.read_input_hessians(run_dir, run_config),
        )
        return evaluate_accuracy(quantized, test)

    fp32 = evaluate_accuracy(model, test)
    mixed: dict[float, tuple[Accuracy, dict]] = {}
    for bits in MIXED_BUDGETS:
        allocation = pipeline.allocate(run_dir, [Budget("avg-bits", bits)])
        assignment = dict(zip(allocation.layer_names, allocation.formats))
        mixed[bits] = (accuracy_of(assignment, config), allocation.to_dict())
    anchor = mixed[3.0][0]
    rows = [_row("FP32", fp32, anchor)]
    for format_name in UNIFORM_FORMATS:
        assignment = {layer.name: format_name for layer in layers}
        rows.append(
            _row(
                f"uniform {format_name}, reference quantizer",
                accuracy_of(assignment, reference_config),
                anchor,
            )
        )
        rows.append(
            _row(
                f"uniform {format_name}, lcpaq quantizer + correction",
                accuracy_of(assignment, config),
                anchor,
            )
        )

    # The reference ILP row: same exact traces and HiGHS, but symmetric min-max and no correction.
    reference_dir = args.out / "reference-run"
    pipeline.analyze(reference_config, reference_dir, progress=False)
    # What helps: each quantizer with and without the statistics correction.
    no_correction = replace(config, recovery=RecoveryConfig(enabled=False))
    reference_corrected = replace(reference_config, recovery=config.recovery)
    for bits in MIXED_BUDGETS:
        allocation = pipeline.allocate(reference_dir, [Budget("avg-bits", bits)])
        assignment = dict(zip(allocation.layer_names, allocation.formats))
        for label, run_config in (
            ("reference quantizer, no correction", reference_config),
            ("reference quantizer + correction", reference_corrected),
        ):
            rows.append(
                _row(
                    f"mixed {bits:g} bits, HAWQ-V2 score, {label}",
                    accuracy_of(assignment, run_config),
                    anchor,
                    average_bits=allocation.average_bits,
                )
            )
    for bits, (_, allocation) in mixed.items():
        rows.append(
            _row(
                f"mixed {bits:g} bits, lcpaq quantizer, no correction",
                accuracy_of(allocation["assignment"], no_correction),
                anchor,
                average_bits=allocation["average_bits"],
            )
        )
    for bits, (accuracy, allocation) in mixed.items():
        rows.append(
            _row(
                f"mixed {bits:g} bits, lcpaq default",
                accuracy,
                anchor,
                average_bits=allocation["average_bits"],
                size_bytes=allocation["size_bytes"],
                assignment=allocation["assignment"],
            )
        )

    # Leave the run folder at the 3-bit allocation, exported, evaluated, swept and plotted.
    pipeline.allocate(run_dir, [Budget("avg-bits", 3.0)])
    pipeline.export(run_dir)
    pipeline.evaluate(run_dir, args.eval)
    pipeline.sweep(run_dir, args.eval, num_points=12, progress=False)
    pipeline.plot(run_dir)
    pipeline.report(run_dir)
    result = {
        "checkpoint": args.checkpoint,
        "eval": args.eval,
        "num_eval_samples": len(test),
        "git_sha": git_sha(),
        "machine": f"{platform.machine()} {platform.processor()} torch {torch.__version__}, {args.threads} threads",
        "device": "cpu",
        "analyze_s": analyze_s,
        "total_s": time.perf_counter() - started,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    width = max(len(row["name"]) for row in rows)
    for row in rows:
        paired = row.get("paired_vs_lcpaq_3bit_pct", np.nan)
        print(f"{row['name']:<{width}}  {row['top1_pct']:6.2f} %   (vs lcpaq 3-bit: {paired:+.2f})")


if __name__ == "__main__":
    main()
