"""ONNX QDQ export on the shared checkpoints → JSON: the same quantized checkpoint in ONNX Runtime
and in PyTorch (top-1 agreement, logit differences, top-1, inference time), next to the FP32 model
in both runtimes.

For each checkpoint, two runs of the ordinary stages (analyze, allocate, export) with lcpaq's
defaults otherwise:

* weights only at 3.0 average bits (activations FP32);
* mixed weights and inputs (``--act-formats int4,int6,int8``) under uniform W4A4's BitOps;

then ``lcpaq onnx`` checks each on the 1017 test images. The FP32 model is exported with
torch.onnx's optimiser (BatchNorm folded, as a deployment would) and run in both runtimes too, so
the table says what the QDQ graph costs at inference on this CPU. Times are one pass over the
images in batches of 256, on ``--threads`` threads in both runtimes.

    python scripts/bench_onnx.py --shared ../shared
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import _study
import numpy as np
import torch

from lcpaq.allocation.budgets import Budget, parse_budget
from lcpaq.config import RunConfig
from lcpaq.model.zoo import load_model
from lcpaq.quant.onnx_qdq import check_onnx
from lcpaq.runfolder import load_candidates
from lcpaq.stages import pipeline

ACTIVATION_FORMATS = ("int4", "int6", "int8")


def _run(config: RunConfig, run_dir: Path, budget: Budget | None, test_path: str) -> dict[str, Any]:
    """analyze → allocate (``budget``, or W4A4's BitOps when None) → export → onnx check."""
    start = time.perf_counter()
    pipeline.analyze(config, run_dir, progress=False)
    if budget is None:
        table = load_candidates(run_dir / "candidates.npz")
        column = table.format_index("int4/int4")
        costs = pipeline.candidate_costs(run_dir, table).values(
            np.full(len(table.layer_names), column)
        )
        budget = Budget("bitops-g", costs["bitops-g"])
    allocation = pipeline.allocate(run_dir, [budget])
    pipeline.export(run_dir)
    stages_s = time.perf_counter() - start
    check = pipeline.export_onnx(run_dir, check_path=test_path, check_images=10_000)
    checkpoint_bytes = (run_dir / "quantized" / "model.safetensors").stat().st_size
    return {
        "budget": str(budget),
        "average_bits": allocation.average_bits,
        "formats": dict(zip(allocation.layer_names, allocation.formats)),
        "stages_s": stages_s,
        "safetensors_bytes": checkpoint_bytes,
        **check,
    }


def _fp32(
    model: torch.nn.Module, folder: Path, inputs: torch.Tensor, labels: torch.Tensor
) -> dict[str, Any]:
    """The FP32 model exported with torch.onnx's optimiser, in ONNX Runtime and in PyTorch."""
    path = folder / "fp32.onnx"
    exported = torch.onnx.export(
        model,
        (inputs[:2],),
        dynamo=True,
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        verbose=False,
    )
    assert exported is not None  # the dynamo exporter returns the program (None is the legacy path)
    folder.mkdir(parents=True, exist_ok=True)
    exported.save(str(path))
    check = check_onnx(path, model, inputs, labels)
    return {"onnx": str(path), "file_bytes": path.stat().st_size, **check.to_dict()}


def main() -> None:
    parser = _study.parser(__doc__, "bench_onnx")
    args = parser.parse_args()
    _, test, result = _study.start(args)
    test_path = str(_study.test_path(args.shared))
    for model_name in args.models.split(","):
        work = args.work / model_name
        base = _study.base_config(args.shared, model_name)
        fp_model = load_model(base.analysis.model, base.analysis.checkpoint)
        runs = {
            "fp32": _fp32(fp_model, work, test.inputs, test.labels),
            "weights_only": _run(base, work / "w3", parse_budget("avg-bits=3"), test_path),
            "weights_and_inputs": _run(
                base.with_analysis(act_formats=ACTIVATION_FORMATS),
                work / "w4a4-bitops",
                None,
                test_path,
            ),
        }
        _study.add_study(args.out, result, {"model": model_name, **runs})
        for name, row in runs.items():
            print(
                f"{model_name} {name}: agreement {100 * row['top1_agreement']:.2f} %, max |dlogit| "
                f"{row['max_abs_logit_difference']:.3g}, top-1 ORT {100 * row['onnx_top1']:.2f} "
                f"PyTorch {100 * row['torch_top1']:.2f}, {row['onnx_seconds']:.2f} s ORT vs "
                f"{row['torch_seconds']:.2f} s PyTorch, {row['file_bytes'] / 1e6:.3f} MB"
            )


if __name__ == "__main__":
    main()
