"""Allocation scorers (``--scorer``) on the shared checkpoints with GPTQ rounding → JSON.

Per checkpoint, ``analyze`` runs once (256 curvature images; GPTQ input second moments; the
candidate table holds every scorer's error measure). For each average-bit budget HiGHS allocates
under each scorer on the same table: ``hawq_v2`` (trace/n × ‖ΔW‖²), ``diagonal`` (curvature
diagonal × ΔW²) and ``output`` (trace/n × the error seen through the layer's input second
moments). Each allocation is quantized and corrected as export does (1024 images) and evaluated on
the same test images, paired against ``hawq_v2``. Scorers that choose the same formats share one
measurement.

    python scripts/scorer_study.py --shared ../shared --out results/scorer_study.json
"""

from __future__ import annotations

import time
from pathlib import Path

import _study

from lcpaq.allocation.budgets import parse_budget
from lcpaq.model.data import Dataset
from lcpaq.model.evaluate import Accuracy
from lcpaq.model.zoo import load_model
from lcpaq.stages import pipeline

BUDGETS = (2.0, 2.25, 2.5, 3.0)
SCORERS = ("hawq_v2", "diagonal", "output")


def study(
    shared: Path, model: str, budgets: list[float], work: Path, calib: Dataset, test: Dataset
) -> dict[str, object]:
    config = _study.base_config(shared, model)
    run_dir = work / model
    pipeline.analyze(config, run_dir, progress=False)
    fp_model = load_model(config.analysis.model, config.analysis.checkpoint)
    calib_inputs = calib.inputs[: config.recovery.num_samples]
    measured = _study.cached_accuracy(fp_model, run_dir, config, calib_inputs, test)
    entries = []
    for bits in budgets:
        rows: dict[str, dict[str, object]] = {}
        accuracy: dict[str, Accuracy] = {}
        for scorer in SCORERS:
            allocation = pipeline.allocate(
                run_dir, [parse_budget(f"avg-bits={bits:g}")], scorer=scorer
            )
            start = time.perf_counter()
            accuracy[scorer] = measured(allocation.formats)
            rows[scorer] = {
                "top1_pct": 100 * accuracy[scorer].top1,
                "average_bits": allocation.average_bits,
                "predicted_loss_increase": allocation.predicted_loss_increase,
                "formats": list(allocation.formats),
                "seconds": time.perf_counter() - start,
            }
        paired = {
            scorer: _study.paired(accuracy[scorer], accuracy["hawq_v2"]) for scorer in SCORERS[1:]
        }
        entries.append({"budget": f"avg-bits={bits:g}", "rows": rows, "paired_vs_hawq_v2": paired})
        print(
            f"{model} {bits:g} bits: "
            + ", ".join(f"{scorer} {rows[scorer]['top1_pct']:.2f}" for scorer in SCORERS)
            + " | "
            + ", ".join(
                f"{scorer} {value['difference_pct']:+.2f} ± {value['stderr_pct']:.2f}"
                for scorer, value in paired.items()
            ),
            flush=True,
        )
    return {"model": model, "budgets": entries, "test_images": len(test)}


def main() -> None:
    args = _study.parser(__doc__, "scorer_study", BUDGETS).parse_args()
    calib, test, result = _study.start(args)
    budgets = [float(text) for text in args.budgets.split(",")]
    for model in args.models.split(","):
        entry = study(args.shared, model, budgets, args.work, calib, test)
        _study.add_study(args.out, result, entry)


if __name__ == "__main__":
    main()
