"""Round-to-nearest vs GPTQ rounding (``--rounding``) on the shared checkpoints → JSON.

For each checkpoint and average-bit budget, the ordinary stages run twice on the same calibration
images, once per rounding (analyze: curvature, input second moments for GPTQ, candidate errors;
allocate: HiGHS on the HAWQ-V2 score; export's quantization with statistics correction on 1024
images), and a third model puts GPTQ codes on the *nearest* run's allocation, which separates
the effect of the rounding from that of the allocation it leads to. All are evaluated on the same
test images, paired against round-to-nearest.

    python scripts/rounding_study.py --shared ../shared --out results/rounding_study.json
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import TypedDict

import _study

from lcpaq.allocation.budgets import parse_budget
from lcpaq.model.data import Dataset
from lcpaq.model.evaluate import Accuracy
from lcpaq.stages import pipeline

BUDGETS = (2.0, 2.5, 3.0, 4.0)


class Entry(TypedDict):
    """One checkpoint at one budget: a row per model, paired against round-to-nearest."""

    model: str
    budget: str
    rows: dict[str, dict[str, object]]
    paired_vs_nearest: dict[str, _study.Paired]
    test_images: int


def study(
    shared: Path, model: str, bits: float, work: Path, calib: Dataset, test: Dataset
) -> Entry:
    base = _study.base_config(shared, model)
    rows: dict[str, dict[str, object]] = {}
    accuracy: dict[str, Accuracy] = {}
    allocations: dict[str, list[str]] = {}
    for rounding in ("nearest", "gptq"):
        scheme = replace(base.analysis.scheme, rounding=rounding)
        config = base.with_analysis(scheme=scheme)
        run_dir = work / f"{model}-{bits:g}-{rounding}"
        start = time.perf_counter()
        pipeline.analyze(config, run_dir, progress=False)
        analyze_s = time.perf_counter() - start
        allocation = pipeline.allocate(run_dir, [parse_budget(f"avg-bits={bits:g}")])
        allocations[rounding] = list(allocation.formats)
        accuracy[rounding], quantize_s = _study.run_accuracy(
            run_dir, config, allocation.formats, calib, test
        )
        layers_json = json.loads((run_dir / "layers.json").read_text())
        rows[rounding] = {
            "top1_pct": 100 * accuracy[rounding].top1,
            "average_bits": allocation.average_bits,
            "size_bytes": allocation.size_bytes,
            "formats": list(allocation.formats),
            "analyze_s": analyze_s,
            "input_hessians_s": layers_json.get("input_hessians_seconds"),
            "quantize_and_correct_s": quantize_s,
        }
    gptq_dir = work / f"{model}-{bits:g}-gptq"
    gptq_config = pipeline.read_config(gptq_dir)
    accuracy["gptq_on_nearest_allocation"], _ = _study.run_accuracy(
        gptq_dir, gptq_config, allocations["nearest"], calib, test
    )
    rows["gptq_on_nearest_allocation"] = {
        "top1_pct": 100 * accuracy["gptq_on_nearest_allocation"].top1
    }
    return {
        "model": model,
        "budget": f"avg-bits={bits:g}",
        "rows": rows,
        "paired_vs_nearest": {
            name: _study.paired(accuracy[name], accuracy["nearest"])
            for name in ("gptq", "gptq_on_nearest_allocation")
        },
        "test_images": accuracy["nearest"].num_samples,
    }


def main() -> None:
    args = _study.parser(__doc__, "rounding_study", BUDGETS).parse_args()
    calib, test, result = _study.start(args)
    for model in args.models.split(","):
        for bits in (float(text) for text in args.budgets.split(",")):
            entry = study(args.shared, model, bits, args.work, calib, test)
            _study.add_study(args.out, result, entry)
            paired = entry["paired_vs_nearest"]
            print(
                f"{model} {bits:g} bits: nearest {entry['rows']['nearest']['top1_pct']:.2f} %, "
                f"gptq {entry['rows']['gptq']['top1_pct']:.2f} % "
                f"({paired['gptq']['difference_pct']:+.2f} ± {paired['gptq']['stderr_pct']:.2f}), "
                f"gptq on nearest's allocation "
                f"{paired['gptq_on_nearest_allocation']['difference_pct']:+.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
