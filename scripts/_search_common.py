"""Shared pieces of scripts/bench_search.py: the CIFAR inputs, one configuration measured
through the search's caches (proxy and test top-1, timed), the ordinary stages from scratch
(the naive baseline), rank agreement, and cache seeding between searches of one model."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
from scipy.stats import kendalltau, spearmanr

from lcpaq.allocation.budgets import parse_budget
from lcpaq.config import AllocationConfig, AnalysisConfig, RunConfig
from lcpaq.model.data import Dataset
from lcpaq.model.evaluate import Accuracy, evaluate_accuracy, paired_difference
from lcpaq.search import DEFAULT_RUNGS, Infeasible, SearchContext, SearchSpace
from lcpaq.stages import pipeline

CHECKPOINTS = {
    "resnet20": "checkpoints/resnet20-12fca82f.th",
    "resnet32": "checkpoints/resnet32-d509ac18.th",
}
CALIB = "data/cifar10_train_subset.npz"
TEST = "data/cifar10_test.npz"
#: Held-out selection slice of the calibration file: after the largest head the space reads
#: (1024 images) and before the proxy tail (the last 1152 images).
SELECTION = (1024, 5085 - DEFAULT_RUNGS[-1])
SEARCHES = (("resnet20", 3.0), ("resnet20", 2.5), ("resnet32", 3.0), ("resnet32", 2.5))


def base_config(shared: Path, model: str, bits: float) -> RunConfig:
    return RunConfig(
        analysis=AnalysisConfig(
            model="cifar-resnet",
            checkpoint=str(shared / CHECKPOINTS[model]),
            calib=str(shared / CALIB),
        ),
        allocation=AllocationConfig(budgets=(f"avg-bits={bits:g}",)),
    )


def selection_file(shared: Path, out: Path) -> Path:
    """Images SELECTION of the calibration file as their own .npz (uint8, as stored)."""
    path = out / "selection.npz"
    if not path.is_file():
        with np.load(shared / CALIB) as data:
            start, stop = SELECTION
            np.savez(path, x=data["x"][start:stop], y=data["y"][start:stop])
    return path


def paired(first: Accuracy, second: Accuracy) -> dict[str, float]:
    difference, stderr = paired_difference(first, second)
    return {"difference_pct": 100 * difference, "stderr_pct": 100 * stderr}


def open_context(base: RunConfig, folder: Path) -> tuple[SearchContext, SearchSpace]:
    space = SearchSpace.default()
    return SearchContext.open(base, folder, space, "kl", DEFAULT_RUNGS), space


def trial_base_of(base: RunConfig, folder: Path) -> RunConfig:
    """The base configuration with the budgets every trial had (the size cap included)."""
    budgets = json.loads((folder / "search_report.json").read_text())["budgets"]
    return base.with_allocation(budgets=tuple(budgets))


def measure(
    context: SearchContext, config: RunConfig, test: Dataset, *, proxy: bool = True
) -> dict[str, Any]:
    """Prepare (cached), full-slice proxy, top-1 on the test set; each part timed (wall and, for
    prepare and evaluation, CPU seconds)."""
    start, cpu = time.perf_counter(), time.process_time()
    try:
        prepared = context.prepare(config)
        quantized = context.build(prepared)
    except Infeasible as error:
        return {"infeasible": str(error), "prepare_s": time.perf_counter() - start}
    row: dict[str, Any] = {
        "prepare_s": time.perf_counter() - start,
        "prepare_cpu_s": time.process_time() - cpu,
        **prepared.timings,
    }
    row["avg_bits"] = prepared.allocation.average_bits
    row["size_bytes"] = prepared.allocation.size_bytes
    if proxy:
        start = time.perf_counter()
        count = context.slices.rungs[-1]
        row["proxy"] = context.scorer.value(context.scorer.sums(quantized, 0, count), count)
        row["proxy_full_s"] = time.perf_counter() - start
    start, cpu = time.perf_counter(), time.process_time()
    accuracy = evaluate_accuracy(quantized, test)
    row["eval_s"] = time.perf_counter() - start
    row["eval_cpu_s"] = time.process_time() - cpu
    row["top1"] = accuracy.top1
    row["_accuracy"] = accuracy
    return row


def spearman_of(rows: list[dict[str, Any]]) -> dict[str, object]:
    scored = [row for row in rows if "top1" in row]
    proxy = np.array([float(row["proxy"]) for row in scored])
    top1 = np.array([float(row["top1"]) for row in scored])
    result: dict[str, object] = {"configurations": len(scored)}
    if len(scored) >= 3:
        result["spearman"] = float(spearmanr(-proxy, top1).statistic)
        result["kendall"] = float(kendalltau(-proxy, top1).statistic)
        # Among the better half by top-1: can the proxy still order the good configurations?
        good = top1 >= np.median(top1)
        if good.sum() >= 3:
            result["spearman_better_half"] = float(spearmanr(-proxy[good], top1[good]).statistic)
        corrected = np.array([row["params"]["correction"] != "off" for row in scored])
        if corrected.sum() >= 3:
            result["spearman_with_correction"] = float(
                spearmanr(-proxy[corrected], top1[corrected]).statistic
            )
            result["configurations_with_correction"] = int(corrected.sum())
    return result


def clean(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]


def seed_caches(out: Path, model: str, folder: Path) -> str | None:
    """Copy the curvature and quantized-weight caches of an earlier search of the same model (they
    do not depend on the budget) into ``folder``: later searches skip the curvature passes."""
    for earlier in sorted(out.glob(f"{model}-*")):
        if earlier != folder and (earlier / "search_report.json").is_file():
            cache = folder / "cache"
            cache.mkdir(parents=True)
            for item in (earlier / "cache").iterdir():
                if item.name.startswith("curvature-") or item.name == "weights":
                    shutil.copytree(item, cache / item.name)
                elif item.name.startswith("input-hessians-"):
                    shutil.copy2(item, cache / item.name)
            return earlier.name
    return None


def random_configurations(space: SearchSpace, count: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    picked = [space.default_params()]
    seen = {json.dumps(picked[0], sort_keys=True, default=str)}
    while len(picked) < count:
        params = {d.name: d.choices[int(rng.integers(len(d.choices)))] for d in space.dimensions}
        # numpy bools are not JSON; keep the Python values of the choices.
        key = json.dumps(params, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            picked.append(params)
    return picked


def naive_run(config: RunConfig, work: Path, test_path: str) -> dict[str, Any]:
    """The ordinary stages from scratch, as ``lcpaq run --sweep-points 0`` without plots."""
    if work.exists():
        shutil.rmtree(work)
    timings = {}
    cpu = time.process_time()
    start = time.perf_counter()
    pipeline.analyze(config, work, progress=False)
    timings["analyze_s"] = time.perf_counter() - start
    start = time.perf_counter()
    budgets = [parse_budget(text) for text in config.allocation.budgets]
    try:
        pipeline.allocate(work, budgets, **config.allocation.options())
    except Exception as error:  # noqa: BLE001 - infeasible: the naive search pays analyze only
        timings["allocate_s"] = time.perf_counter() - start
        return {**timings, "infeasible": str(error)}
    timings["allocate_s"] = time.perf_counter() - start
    start = time.perf_counter()
    pipeline.export(work)
    timings["export_s"] = time.perf_counter() - start
    start = time.perf_counter()
    evaluation = pipeline.evaluate(work, test_path)
    timings["evaluate_s"] = time.perf_counter() - start
    return {
        **timings,
        "cpu": time.process_time() - cpu,
        "top1": cast(dict[str, Any], evaluation["quantized"])["top1"],
    }
