"""How well the second-order scores predict all-MiniLM-L6-v2's loss when one layer is quantized
(issue 15): for every Linear layer and each of INT2/INT3/INT4, the measured increase of the
curvature's own loss (mean over the 384 outputs of the squared error of the normalised embedding
against FP32's, averaged over texts) with only that layer quantized (GPTQ, as the candidates are),
against the scores of the analysis (hawq_v2, diagonal, output). Reports, per format, the median
ratio measured/predicted by layer kind and the Spearman rank correlation over layers.

Needs an analysed run folder (scripts/minilm_analyze_cost.py writes runs/minilm_analyze/run):

    PYTHONPATH=. python scripts/minilm_prediction_check.py --run runs/minilm_analyze/run
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from _provenance import git_sha

FORMATS = ("int2", "int3", "int4")
KINDS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")


def kind_of(name: str) -> str:
    if name.endswith("attention.output.dense"):
        return "attention.output.dense"
    return next(kind for kind in KINDS if name.endswith(kind))


def spearman(first: np.ndarray, second: np.ndarray) -> float:
    ranks = [np.argsort(np.argsort(values)) for values in (first, second)]
    return float(np.corrcoef(*ranks)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/minilm_analyze/run"))
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("results/minilm_prediction_check.json"))
    args = parser.parse_args()
    from lcpaq import runfolder
    from lcpaq.allocation.frontier import diagonal_score, hawq_v2_score, output_score
    from lcpaq.quant.checkpoint import quantize_model
    from lcpaq.stages.folder import (
        load_model_and_data,
        read_config,
        read_input_hessians,
        read_layers,
    )

    config = read_config(args.run)
    layers, _ = read_layers(args.run)
    model, calib = load_model_and_data(config, args.texts)
    hessians = read_input_hessians(args.run, config)
    table = runfolder.load_candidates(args.run / "candidates.npz")
    trace = runfolder.load_curvature(args.run / "curvature.npz").trace
    scores = {
        "hawq_v2": hawq_v2_score(table, trace),
        "diagonal": diagonal_score(table, trace),
        "output": output_score(table, trace),
    }
    with torch.no_grad():
        reference = model(calib.inputs)
        measured = np.zeros((len(layers), len(FORMATS)))
        for row, layer in enumerate(layers):
            for column, name in enumerate(FORMATS):
                quantized, _ = quantize_model(
                    model, layers, {layer.name: name}, config.analysis.scheme, hessians
                )
                change = quantized(calib.inputs) - reference
                measured[row, column] = float(change.pow(2).mean(-1).mean())
            print(layer.name, measured[row])
    names = [layer.name for layer in layers]
    result: dict[str, object] = {
        "commit": git_sha(),
        "run": str(args.run),
        "texts": len(calib),
        "measured": {name: dict(zip(FORMATS, row.tolist())) for name, row in zip(names, measured)},
    }
    for scorer, values in scores.items():
        summary = {}
        for column, name in enumerate(FORMATS):
            predicted = values[:, table.format_names.index(name)]
            ratio = measured[:, column] / predicted
            summary[name] = {
                "spearman_over_layers": spearman(measured[:, column], predicted),
                "median_ratio_measured_over_predicted": {
                    kind: float(np.median([r for n, r in zip(names, ratio) if kind_of(n) == kind]))
                    for kind in KINDS
                },
            }
        result[scorer] = summary
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({key: result[key] for key in scores}, indent=2))


if __name__ == "__main__":
    main()
