"""Below two bits on the shared CIFAR ResNets: ternary, binary and pruned candidates → JSON.

Per checkpoint, ``analyze`` runs once with every candidate (INT2 … INT8 of lcpaq's default set
plus ternary, binary and pruned; lcpaq's defaults otherwise: Gauss–Newton traces on 256
calibration images, GPTQ rounding). For each average-bit budget the same run folder is allocated
(HiGHS) under two scorers (lcpaq's default HAWQ-V2, and ``output``: HAWQ-V2 with the weight error
seen through each layer's input second moments) over four candidate sets: the INT defaults, INT +
ternary, INT + ternary + binary, INT + ternary + binary + pruned (columns of the one candidate
table, so the sets differ in nothing else). Each allocation is quantized and corrected as export
does (GPTQ, BN statistics correction on 1024 calibration images) and evaluated on the same test
images, paired against uniform INT2 and uniform ternary with the same recovery (and reported next
to ternary with the first and last layers at INT8). Budgets no assignment of a candidate set
meets are recorded as infeasible.

    OMP_NUM_THREADS=1 python scripts/subtwo_study.py --shared ../shared --models resnet20 \
        --threads 1 --out results/subtwo_resnet20.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time
from pathlib import Path

import _study
import numpy as np

from lcpaq.allocation.budgets import parse_budget
from lcpaq.errors import InputError
from lcpaq.model.data import Dataset
from lcpaq.model.evaluate import evaluate_accuracy
from lcpaq.model.zoo import load_model
from lcpaq.quant.formats import get_format, parse_format_list
from lcpaq.stages import pipeline
from lcpaq.stages.allocate import optimum, problem_of, read_problem_data

BUDGETS = (2.5, 2.0, 1.75, 1.5)
INT_FORMATS = "int2,int3,int4,int5,int6,int8"
CANDIDATE_SETS = {
    "int": INT_FORMATS,
    "int+ternary": INT_FORMATS + ",ternary",
    "int+ternary+binary": INT_FORMATS + ",ternary,binary",
    "int+ternary+binary+pruned": INT_FORMATS + ",ternary,binary,pruned",
}
#: lcpaq's default scorer, and the one that weighs each weight error by the layer's input second
#: moments (what GPTQ minimises).
SCORERS = ("hawq_v2", "output")


def allocate_subset(
    run_dir: Path, formats: tuple[str, ...], bits: float, scorer: str
) -> dict[str, object]:
    """The HiGHS optimum at ``bits`` average bits over the candidate columns ``formats`` of the
    run folder's table; ``formats`` None and the reason where no assignment fits."""
    data = read_problem_data(run_dir)
    table = data.table.select(data.table.columns_of(formats))
    problem, _, _ = problem_of(dataclasses.replace(data, table=table), scorer=scorer)
    try:
        allocation = optimum(problem, [parse_budget(f"avg-bits={bits:g}")])
    except InputError as error:
        return {"formats": None, "infeasible": str(error)}
    counts = {name: allocation.formats.count(name) for name in sorted(set(allocation.formats))}
    return {
        "formats": list(allocation.formats),
        "average_bits": allocation.average_bits,
        "predicted_loss_increase": allocation.predicted_loss_increase,
        "solve_time_s": allocation.solve_time_s,
        "layers_per_format": counts,
    }


def uniform_assignments(count: int) -> dict[str, tuple[str, ...]]:
    return {
        "uniform int2": ("int2",) * count,
        "uniform ternary": ("ternary",) * count,
        "ternary, first and last int8": ("int8",) + ("ternary",) * (count - 2) + ("int8",),
    }


def study(
    args: argparse.Namespace, model_name: str, budgets: list[float], calib: Dataset, test: Dataset
) -> dict[str, object]:
    config = _study.base_config(args.shared, model_name).with_analysis(
        formats=parse_format_list(CANDIDATE_SETS["int+ternary+binary+pruned"])
    )
    run_dir = args.work / model_name
    start = time.perf_counter()
    pipeline.analyze(config, run_dir, progress=False)
    analyze_seconds = time.perf_counter() - start
    model = load_model(config.analysis.model, config.analysis.checkpoint)
    layers = list(pipeline.read_layers(run_dir)[0])
    correction = calib.inputs[: config.recovery.num_samples]
    measured = _study.cached_accuracy(model, run_dir, config, correction, test)
    uniform = uniform_assignments(len(layers))
    baselines = {}
    for label, formats in uniform.items():
        accuracy = measured(formats)
        bits = np.average(
            [get_format(name).budget_bits for name in formats],
            weights=[layer.num_params for layer in layers],
        )
        baselines[label] = {"top1_pct": 100 * accuracy.top1, "average_bits": float(bits)}
        print(f"{model_name} {label}: {100 * accuracy.top1:.2f}", flush=True)
    entries = []
    for bits in budgets:
        rows: dict[str, dict[str, object]] = {}
        for scorer, (set_name, text) in itertools.product(SCORERS, CANDIDATE_SETS.items()):
            row = allocate_subset(run_dir, parse_format_list(text), bits, scorer)
            if row["formats"] is not None:
                accuracy = measured(row["formats"])  # type: ignore[arg-type]
                row["top1_pct"] = 100 * accuracy.top1
                row["minus_uniform_int2"] = _study.paired(
                    accuracy, measured(uniform["uniform int2"])
                )
                row["minus_uniform_ternary"] = _study.paired(
                    accuracy, measured(uniform["uniform ternary"])
                )
            rows[f"{scorer}/{set_name}"] = row
            print(
                f"{model_name} {bits:g} bits {scorer}/{set_name}: "
                f"{row.get('top1_pct', float('nan')):.2f}",
                flush=True,
            )
        entries.append({"budget": f"avg-bits={bits:g}", "rows": rows})
    fp32 = evaluate_accuracy(model, test)
    return {
        "model": model_name,
        "test_images": len(test),
        "fp32_top1_pct": 100 * fp32.top1,
        "analyze_seconds": analyze_seconds,
        "evaluations": len(measured),
        "candidate_sets": CANDIDATE_SETS,
        "uniform": baselines,
        "budgets": entries,
    }


def main() -> None:
    parser = _study.parser(__doc__, "subtwo_study", BUDGETS)
    _study.run_per_model(parser.parse_args(), study)


if __name__ == "__main__":
    main()
