"""A format per group of G output channels vs one per layer on the shared CIFAR ResNets → JSON.

Per checkpoint, ``analyze`` runs once with every candidate (INT2 … INT8, ternary, binary, pruned;
lcpaq's defaults otherwise: exact Gauss–Newton diagonal on 256 calibration images, GPTQ rounding),
which records the per-channel errors. For each average-bit budget the same run folder is
allocated per layer and per channel group (G = 16 and G = 1, HGQ's per-channel limit; units scored
with their own share of the Gauss–Newton diagonal) over the candidate sets INT + ternary + binary
and INT + ternary + binary + pruned, under the ``output`` scorer (HAWQ-V2 with the error seen
through each layer's input second moments: the better scorer below 2 bits in
results/subtwo_resnet20.json). Each allocation is quantized (a channel group's rows are its
format's GPTQ rows of the layer), corrected as export does (BN statistics on 1024 calibration
images) and evaluated on the same test images, paired against the per-layer allocation of the
same set; solve times of the exact solver, channels per format and pruned channels are recorded,
and a per-layer bar plot of the channel counts is drawn for the G = 16 allocations.

    OMP_NUM_THREADS=1 python scripts/channel_group_study.py --shared ../shared --models resnet20 \
        --threads 1 --out results/channel_groups_resnet20.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _study
import torch

from lcpaq.allocation.budgets import parse_budget
from lcpaq.config import RunConfig
from lcpaq.errors import InputError
from lcpaq.model.data import Dataset
from lcpaq.model.evaluate import Accuracy, evaluate_accuracy
from lcpaq.model.graph import LayerInfo
from lcpaq.model.zoo import load_model
from lcpaq.quant.checkpoint import quantize_model_groups
from lcpaq.quant.formats import parse_format_list
from lcpaq.quant.mixed import Span
from lcpaq.stages import pipeline
from lcpaq.stages.export import recover_quantized
from lcpaq.stages.group_allocate import allocate_groups
from lcpaq.stages.group_figures import plot_channel_formats

BUDGETS = (2.0, 1.75, 1.5)
INT_FORMATS = "int2,int3,int4,int5,int6,int8"
CANDIDATE_SETS = {
    "int+ternary+binary": INT_FORMATS + ",ternary,binary",
    "int+ternary+binary+pruned": INT_FORMATS + ",ternary,binary,pruned",
}
#: None: one format per layer (each layer one unit of all its channels).
GROUP_SIZES: tuple[int | None, ...] = (None, 16, 1)
SCORER = "output"


def grouped_accuracy(
    model: torch.nn.Module,
    layers: list[LayerInfo],
    groups: dict[str, list[Span]],
    config: RunConfig,
    run_dir: Path,
    correction: torch.Tensor,
    test: Dataset,
) -> Accuracy:
    quantized, _ = quantize_model_groups(
        model,
        layers,
        groups,
        config.analysis.scheme,
        pipeline.read_input_hessians(run_dir, config),
    )
    recover_quantized(model, quantized, [layer.name for layer in layers], config, correction)
    return evaluate_accuracy(quantized, test)


def study(
    args: argparse.Namespace, model_name: str, budgets: list[float], calib: Dataset, test: Dataset
) -> dict[str, object]:
    config = _study.base_config(args.shared, model_name).with_analysis(
        formats=parse_format_list(CANDIDATE_SETS["int+ternary+binary+pruned"])
    )
    run_dir = args.work / model_name
    start = time.perf_counter()
    reused = args.reuse_analysis and (run_dir / "channel_errors.npz").is_file()
    if not reused:  # --reuse-analysis: a finished analysis of this script in --work
        pipeline.analyze(config, run_dir, progress=False)
    analyze_seconds = None if reused else time.perf_counter() - start
    model = load_model(config.analysis.model, config.analysis.checkpoint)
    layers = list(pipeline.read_layers(run_dir)[0])
    correction = calib.inputs[: config.recovery.num_samples]
    cache: dict[str, Accuracy] = {}
    entries = []
    for bits in budgets:
        budget = parse_budget(f"avg-bits={bits:g}")
        rows: dict[str, dict[str, object]] = {}
        for set_name, text in CANDIDATE_SETS.items():
            formats = parse_format_list(text)
            per_layer: Accuracy | None = None
            for group in GROUP_SIZES:
                label = f"{set_name}/{'layer' if group is None else f'G={group}'}"
                size = max(layer.weight_shape[0] for layer in layers) if group is None else group
                try:
                    result = allocate_groups(
                        run_dir, [budget], size, scorer=SCORER, formats=formats
                    )
                except InputError as error:
                    rows[label] = {"infeasible": str(error)}
                    continue
                key = repr(sorted(result.groups.items()))
                if key not in cache:
                    cache[key] = grouped_accuracy(
                        model, layers, result.groups, config, run_dir, correction, test
                    )
                accuracy = cache[key]
                counts = result.channel_counts
                row: dict[str, object] = {
                    "top1_pct": 100 * accuracy.top1,
                    "average_bits": result.allocation.average_bits,
                    "predicted_loss_increase": result.allocation.predicted_loss_increase,
                    "units": len(result.allocation.layer_names),
                    "solver": result.allocation.solver,
                    "solve_seconds": result.solve_seconds,
                    "build_seconds": result.build_seconds,
                    "channels_per_format": {
                        name: sum(layer.get(name, 0) for layer in counts.values())
                        for name in formats
                    },
                    "pruned_channels": sum(layer.get("pruned", 0) for layer in counts.values()),
                    "channel_counts": counts,
                }
                if group is None:
                    per_layer = accuracy
                elif per_layer is not None:
                    row["minus_per_layer"] = _study.paired(accuracy, per_layer)
                if group == 16:
                    figure = args.work / f"{model_name}_{set_name}_{bits:g}bits_G16.png"
                    plot_channel_formats(
                        figure,
                        counts=counts,
                        format_names=formats,
                        title=f"{model_name}, {bits:g} average bits, a format per 16 channels",
                    )
                    row["figure"] = str(figure)
                rows[label] = row
                print(
                    f"{model_name} {bits:g} bits {label}: {100 * accuracy.top1:.2f} "
                    f"({row['units']} units, {row['solver']} {result.solve_seconds:.2f} s, "
                    f"{row['pruned_channels']} channels pruned)",
                    flush=True,
                )
        entries.append({"budget": str(budget), "rows": rows})
    return {
        "model": model_name,
        "test_images": len(test),
        "fp32_top1_pct": 100 * evaluate_accuracy(model, test).top1,
        "scorer": SCORER,
        "analyze_seconds": analyze_seconds,
        "candidate_sets": CANDIDATE_SETS,
        "budgets": entries,
    }


def main() -> None:
    parser = _study.parser(__doc__, "channel_group_study", BUDGETS)
    parser.add_argument("--reuse-analysis", action="store_true")
    _study.run_per_model(parser.parse_args(), study)


if __name__ == "__main__":
    main()
