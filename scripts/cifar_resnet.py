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
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path

import _study
import numpy as np
import torch
from _provenance import git_sha
from torch import nn

from lcpaq.allocation.budgets import Budget
from lcpaq.config import RecoveryConfig, RunConfig
from lcpaq.model.data import Dataset, load_dataset
from lcpaq.model.evaluate import Accuracy, evaluate_accuracy, paired_difference
from lcpaq.model.graph import LayerInfo
from lcpaq.model.zoo import load_model
from lcpaq.quant.formats import QuantScheme
from lcpaq.stages import pipeline

REFERENCE_SCHEME = QuantScheme(symmetric=True, granularity="channel", clipping="minmax")
MIXED_BUDGETS = (4.0, 3.5, 3.0, 2.5)
UNIFORM_FORMATS = ("int8", "int6", "int5", "int4", "int3", "int2")
#: average bits → (top-1, allocation.json's allocation) of lcpaq's default at that budget
Mixed = dict[float, tuple[Accuracy, dict[str, object]]]


def _row(
    name: str, accuracy: Accuracy, reference: Accuracy | None, **extra: object
) -> dict[str, object]:
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


@dataclass(frozen=True)
class Measure:
    """Top-1 of the checkpoint quantized to an assignment under a configuration, corrected on the
    same calibration images and evaluated on the same test images (GPTQ input second moments
    from the main run folder)."""

    model: nn.Module
    layers: tuple[LayerInfo, ...]
    calib: Dataset
    test: Dataset
    run_dir: Path

    def __call__(self, assignment: dict[str, str], run_config: RunConfig) -> Accuracy:
        return _study.quantized_accuracy(
            self.model,
            self.layers,
            assignment,
            run_config,
            self.calib.inputs,
            self.test,
            input_hessians=pipeline.read_input_hessians(self.run_dir, run_config),
        )


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _study.add_input_paths(parser)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--correction-samples", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def _mixed(run_dir: Path, measure: Measure, config: RunConfig) -> Mixed:
    """lcpaq's default (allocation and quantizer) at every mixed budget."""
    mixed: Mixed = {}
    for bits in MIXED_BUDGETS:
        allocation = pipeline.allocate(run_dir, [Budget("avg-bits", bits)])
        assignment = dict(zip(allocation.layer_names, allocation.formats))
        mixed[bits] = (measure(assignment, config), allocation.to_dict())
    return mixed


def _uniform_rows(
    measure: Measure, config: RunConfig, reference_config: RunConfig, anchor: Accuracy
) -> list[dict[str, object]]:
    """Every uniform format with the reference quantizer and with lcpaq's."""
    rows = []
    for format_name in UNIFORM_FORMATS:
        assignment = {layer.name: format_name for layer in measure.layers}
        rows.append(
            _row(
                f"uniform {format_name}, reference quantizer",
                measure(assignment, reference_config),
                anchor,
            )
        )
        rows.append(
            _row(
                f"uniform {format_name}, lcpaq quantizer + correction",
                measure(assignment, config),
                anchor,
            )
        )
    return rows


def _reference_rows(
    reference_dir: Path,
    measure: Measure,
    config: RunConfig,
    reference_config: RunConfig,
    anchor: Accuracy,
) -> list[dict[str, object]]:
    """The reference ILP rows: same exact traces and HiGHS, but symmetric min-max, with and
    without the statistics correction."""
    pipeline.analyze(reference_config, reference_dir, progress=False)
    reference_corrected = replace(reference_config, recovery=config.recovery)
    rows = []
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
                    measure(assignment, run_config),
                    anchor,
                    average_bits=allocation.average_bits,
                )
            )
    return rows


def _lcpaq_rows(
    mixed: Mixed, measure: Measure, config: RunConfig, anchor: Accuracy
) -> list[dict[str, object]]:
    """lcpaq's allocations without the statistics correction, then lcpaq's default."""
    no_correction = replace(config, recovery=RecoveryConfig(enabled=False))
    rows = []
    for bits, (_, allocation) in mixed.items():
        assignment = allocation["assignment"]
        assert isinstance(assignment, dict)
        rows.append(
            _row(
                f"mixed {bits:g} bits, lcpaq quantizer, no correction",
                measure(assignment, no_correction),
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
    return rows


def _finish_run_folder(run_dir: Path, eval_path: str) -> None:
    """Leave the run folder at the 3-bit allocation, exported, evaluated, swept and plotted."""
    pipeline.allocate(run_dir, [Budget("avg-bits", 3.0)])
    pipeline.export(run_dir)
    pipeline.evaluate(run_dir, eval_path)
    pipeline.sweep(run_dir, eval_path, num_points=12, progress=False)
    pipeline.plot(run_dir)
    pipeline.report(run_dir)


def _print_rows(rows: list[dict[str, object]]) -> None:
    width = max(len(str(row["name"])) for row in rows)
    for row in rows:
        paired = row.get("paired_vs_lcpaq_3bit_pct", np.nan)
        print(f"{row['name']:<{width}}  {row['top1_pct']:6.2f} %   (vs lcpaq 3-bit: {paired:+.2f})")


def main() -> None:
    args = _parse_args()
    _study.set_up(args.threads, verbose=True)
    run_dir = args.out / "run"
    config = replace(
        _study.default_config(args.checkpoint, args.calib).with_analysis(
            num_samples=args.num_samples
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
    measure = Measure(model, layers, calib, test, run_dir)
    reference_config = replace(
        config.with_analysis(scheme=REFERENCE_SCHEME), recovery=RecoveryConfig(enabled=False)
    )
    fp32 = evaluate_accuracy(model, test)
    mixed = _mixed(run_dir, measure, config)
    anchor = mixed[3.0][0]
    rows = [_row("FP32", fp32, anchor)]
    rows += _uniform_rows(measure, config, reference_config, anchor)
    reference_dir = args.out / "reference-run"
    rows += _reference_rows(reference_dir, measure, config, reference_config, anchor)
    rows += _lcpaq_rows(mixed, measure, config, anchor)
    _finish_run_folder(run_dir, args.eval)
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
    _study.write_json(args.out / "results.json", result)
    _print_rows(rows)


if __name__ == "__main__":
    main()
