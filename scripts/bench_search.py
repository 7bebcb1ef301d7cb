"""Proof for the proxy search (`lcpaq search`, issue 6) → results/bench_search.json.

All in one process, on the shared CIFAR checkpoints and data:

* ``search``: 60-trial searches (ResNet20 and ResNet32, 3.0 and 2.5 average bits). Selection never
  sees cifar10_test.npz: the top-k are fully evaluated on a held-out slice of
  cifar10_train_subset.npz (images 1024…3932: after the curvature/correction head, before the
  proxy tail). Then the chosen, the default and the proxy-best configuration are evaluated on the
  test images, paired. The ResNet20 3.0-bit search is also the timed "whole search".
* ``rank``: Spearman between the full-slice proxy (1152 images) and top-1 on cifar10_test.npz over
  random configurations of the space (plus the default), ResNet20 at 3.0 bits.
* ``cost``: the same configurations as the ResNet20 3.0-bit search, each fully evaluated on the test
  set: (a) with the search's caches (curvature, quantized weights), i.e. only the proxy replaced by
  a full evaluation; (b) naively, the ordinary stages per configuration (analyze with its own
  curvature, allocate, export, evaluate: ``lcpaq run`` without sweep and plots), on a seeded sample
  of the configurations, extrapolated to all of them. Over the configurations (a) also gives the
  rank agreement among the configurations the search actually visited.

    nice -n 10 python scripts/bench_search.py --shared ../shared --out results/bench_search
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from _provenance import git_sha
from scipy.stats import kendalltau, spearmanr

from lcpaq.allocation.budgets import parse_budget
from lcpaq.config import AllocationConfig, AnalysisConfig, RunConfig
from lcpaq.model.data import load_dataset
from lcpaq.model.evaluate import Accuracy, evaluate_accuracy, paired_difference
from lcpaq.search import (
    DEFAULT_RUNGS,
    Infeasible,
    SearchContext,
    SearchOptions,
    SearchSpace,
    run_search,
)
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


def _base(shared: Path, model: str, bits: float) -> RunConfig:
    return RunConfig(
        analysis=AnalysisConfig(
            model="cifar-resnet",
            checkpoint=str(shared / CHECKPOINTS[model]),
            calib=str(shared / CALIB),
        ),
        allocation=AllocationConfig(budgets=(f"avg-bits={bits:g}",)),
    )


def _selection_file(shared: Path, out: Path) -> Path:
    """Images SELECTION of the calibration file as their own .npz (uint8, as stored)."""
    path = out / "selection.npz"
    if not path.is_file():
        with np.load(shared / CALIB) as data:
            start, stop = SELECTION
            np.savez(path, x=data["x"][start:stop], y=data["y"][start:stop])
    return path


def _paired(first: Accuracy, second: Accuracy) -> dict[str, float]:
    difference, stderr = paired_difference(first, second)
    return {"difference_pct": 100 * difference, "stderr_pct": 100 * stderr}


def _context(base: RunConfig, folder: Path) -> tuple[SearchContext, SearchSpace]:
    space = SearchSpace.default()
    return SearchContext(base, folder, space, "kl", DEFAULT_RUNGS), space


def _trial_base(base: RunConfig, folder: Path) -> RunConfig:
    """The base configuration with the budgets every trial had (the size cap included)."""
    budgets = json.loads((folder / "search_report.json").read_text())["budgets"]
    return base.with_allocation(budgets=tuple(budgets))


def _measure(
    context: SearchContext, config: RunConfig, work: Path, test, *, proxy: bool = True
) -> dict[str, object]:
    """Prepare (cached), full-slice proxy, top-1 on the test set; each part timed (wall and, for
    prepare and evaluation, CPU seconds)."""
    start, cpu = time.perf_counter(), time.process_time()
    try:
        prepared = context.prepare(config, work)
        quantized = context.build(prepared)
    except Infeasible as error:
        return {"infeasible": str(error), "prepare_s": time.perf_counter() - start}
    row: dict[str, object] = {
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


def _spearman(rows: list[dict[str, object]]) -> dict[str, object]:
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


def _clean(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    return [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]


# -- phases ------------------------------------------------------------------------------------


def phase_search(
    args: argparse.Namespace, model: str, bits: float, test, selection: Path
) -> dict[str, object]:
    folder = args.out / f"{model}-{bits:g}"
    if folder.exists():
        shutil.rmtree(folder)
    seeded = _seed_caches(args.out, model, folder) if args.share_caches else None
    base = _base(args.shared, model, bits)
    options = SearchOptions(
        base=base,
        out=folder,
        trials=args.trials,
        eval_path=str(selection),
        top_k=args.top_k,
        seed=args.seed,
    )
    load_before = os.getloadavg()
    start, cpu = time.perf_counter(), time.process_time()
    summary = run_search(options, progress=False)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    load_after = os.getloadavg()
    # Test accuracy of the chosen, the default and the proxy-best configuration (test images are
    # used here only, after the choice).
    context, space = _context(base, folder)
    trial_base = _trial_base(base, folder)
    trials = json.loads((folder / "trials.json").read_text())["trials"]
    proxy_best = min(
        (t for t in trials if t["state"] == "COMPLETE" and not t["duplicate_of"]),
        key=lambda t: (t["proxy"], t["number"]),
    )
    picks = {
        "chosen": summary["best"]["params"],  # type: ignore[index]
        "default": summary["default"]["params"],  # type: ignore[index]
        "proxy_best": {name: proxy_best[name] for name in space.names},
        # The default with round-to-nearest weights (lcpaq's default before GPTQ rounding).
        "default_nearest": {**summary["default"]["params"], "rounding": "nearest"},  # type: ignore[index]
    }
    measured = {
        name: _measure(context, space.config(trial_base, params), folder / "bench" / name, test)
        for name, params in picks.items()
    }
    accuracy = {name: row["_accuracy"] for name, row in measured.items()}
    return {
        "model": model,
        "budget": f"avg-bits={bits:g}",
        "wall_s": wall,
        "cpu_s": cpu,
        "caches_seeded_from": seeded,
        "loadavg_1min_before_after": [load_before[0], load_after[0]],
        "summary": summary,
        "test": {
            name: {
                "top1_pct": 100 * row["top1"],
                "proxy_full": row["proxy"],
                "avg_bits": row["avg_bits"],
                "size_bytes": row["size_bytes"],
                "params": picks[name],
            }
            for name, row in measured.items()
        },
        "test_paired": {
            "chosen_vs_default": _paired(accuracy["chosen"], accuracy["default"]),
            "proxy_best_vs_default": _paired(accuracy["proxy_best"], accuracy["default"]),
            "chosen_vs_default_nearest": _paired(accuracy["chosen"], accuracy["default_nearest"]),
            "default_vs_default_nearest": _paired(accuracy["default"], accuracy["default_nearest"]),
        },
        "test_images": accuracy["chosen"].num_samples,
    }


def _seed_caches(out: Path, model: str, folder: Path) -> str | None:
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


def _random_configurations(space: SearchSpace, count: int, seed: int) -> list[dict[str, object]]:
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


def phase_rank(args: argparse.Namespace, test) -> dict[str, object]:
    folder = args.out / "resnet20-3"
    base = _base(args.shared, "resnet20", 3.0)
    context, space = _context(base, folder)
    trial_base = _trial_base(base, folder)
    rows = []
    for index, params in enumerate(_random_configurations(space, args.rank_configs, args.seed)):
        row = _measure(
            context, space.config(trial_base, params), folder / "rank" / f"{index:03d}", test
        )
        row["params"] = params
        rows.append(row)
        print(f"rank {index}: {row.get('proxy')} {row.get('top1')}", flush=True)
    return {"rows": _clean(rows), **_spearman(rows)}


def _naive(config: RunConfig, work: Path, test_path: str) -> dict[str, object]:
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
        "top1": evaluation["quantized"]["top1"],  # type: ignore[index]
    }


def phase_cost(args: argparse.Namespace, test) -> dict[str, object]:
    """Full evaluation of a seeded sample of the search's configurations, cached and naive; the
    totals for all of them are the sample means times the number of configurations."""
    folder = args.out / "resnet20-3"
    base = _base(args.shared, "resnet20", 3.0)
    context, space = _context(base, folder)
    trial_base = _trial_base(base, folder)
    report = json.loads((folder / "search_report.json").read_text())
    trials = json.loads((folder / "trials.json").read_text())["trials"]
    distinct = [
        t
        for t in trials
        if t["state"] in ("COMPLETE", "PRUNED") and not t["duplicate_of"] and not t["error"]
    ]
    rng = np.random.default_rng(args.seed)
    picked = sorted(
        rng.choice(len(distinct), size=min(args.cost_configs, len(distinct)), replace=False)
    )
    cached = []
    for index in picked:
        trial = distinct[int(index)]
        params = {name: trial[name] for name in space.names}
        row = _measure(
            context,
            space.config(trial_base, params),
            folder / "cost" / f"{trial['number']:05d}",
            test,
        )
        row["params"] = params
        row["trial"] = trial["number"]
        cached.append(row)
        print(f"cost {trial['number']}: {row.get('top1')}", flush=True)
    naive = []
    for row in cached[: args.naive_configs]:
        config = space.config(trial_base, row["params"])  # type: ignore[arg-type]
        result = _naive(config, folder / "naive" / f"{row['trial']:05d}", str(args.shared / TEST))
        result["trial"] = row["trial"]
        result["cached_top1"] = row.get("top1")
        naive.append(result)
        print(f"naive {row['trial']}: {result}", flush=True)
    count = len(distinct)
    split = report["wall_time_split_s"]
    one_time = split["setup_s"] + split["hessian_s"] + split["candidates_s"]
    cached_wall = [float(r["prepare_s"]) + float(r["eval_s"]) for r in cached]
    cached_cpu = [float(r["prepare_cpu_s"]) + float(r["eval_cpu_s"]) for r in cached]
    naive_wall = [sum(float(v) for k, v in r.items() if k.endswith("_s")) for r in naive]
    naive_cpu = [float(r["cpu"]) for r in naive]
    search_wall = float(report["this_process_wall_s"])
    search_cpu = float(report["this_process_cpu_s"])
    cached_total = one_time + count * float(np.mean(cached_wall)) + split.get("best_run_s", 0.0)
    return {
        "configurations": count,
        "sampled_configurations": len(cached),
        "proxy_search": {
            "wall_s": search_wall,
            "cpu_s": search_cpu,
            "cpu_per_configuration_s": search_cpu / count,
            "split_s": split,
        },
        "cached_full_eval": {
            "one_time_s": one_time,
            "per_configuration_wall_s": float(np.mean(cached_wall)),
            "per_configuration_cpu_s": float(np.mean(cached_cpu)),
            "total_wall_s": cached_total,
            "wall_ratio_vs_proxy_search": cached_total / search_wall,
            "cpu_ratio_per_configuration": float(np.mean(cached_cpu)) / (search_cpu / count),
        },
        "naive": {
            "sampled_configurations": len(naive),
            "per_configuration_wall_s": float(np.mean(naive_wall)),
            "per_configuration_cpu_s": float(np.mean(naive_cpu)),
            "per_configuration_wall": naive_wall,
            "total_wall_s": count * float(np.mean(naive_wall)),
            "wall_ratio_vs_proxy_search": count * float(np.mean(naive_wall)) / search_wall,
            "cpu_ratio_per_configuration": float(np.mean(naive_cpu)) / (search_cpu / count),
            "rows": naive,
            "top1_equal_to_cached": all(
                r.get("top1") is None or abs(float(r["top1"]) - float(r["cached_top1"])) < 1e-9
                for r in naive
            ),
        },
        "rank_over_sampled_search_configurations": _spearman(cached),
        "rows": _clean(cached),
        "loadavg_1min_end": os.getloadavg()[0],
    }


def markdown(result: dict) -> str:
    """The tables of docs/results.md from the JSON (``--phases markdown``)."""
    lines = []
    searches = result.get("searches", {})
    if searches:
        lines += [
            "| model, budget | search wall s (CPU s) | trials: complete / pruned (infeasible) / repeats | full evals | default top-1 % | chosen top-1 % | chosen − default (paired) | proxy-best top-1 % | proxy-best − default | default, nearest rounding, top-1 % | chosen − nearest default |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, entry in searches.items():
            summary, test, paired = entry["summary"], entry["test"], entry["test_paired"]
            trials = summary["trials"]
            infeasible = 0  # from the trials table, when the search folder is present
            folder = Path(result.get("out", "results/bench_search")) / name
            if (folder / "trials.json").is_file():
                rows = json.loads((folder / "trials.json").read_text())["trials"]
                infeasible = sum(1 for row in rows if row["error"])
            lines.append(
                f"| {entry['model']}, {entry['budget']} | {entry['wall_s']:.0f} ({entry.get('cpu_s', float('nan')):.0f}) | "
                f"{trials['complete']} / {trials['pruned']} ({infeasible}) / {trials['duplicates']} | "
                f"{summary['full_evaluations']} | {test['default']['top1_pct']:.2f} | "
                f"{test['chosen']['top1_pct']:.2f} | "
                f"{paired['chosen_vs_default']['difference_pct']:+.2f} ± {paired['chosen_vs_default']['stderr_pct']:.2f} | "
                f"{test['proxy_best']['top1_pct']:.2f} | "
                f"{paired['proxy_best_vs_default']['difference_pct']:+.2f} ± {paired['proxy_best_vs_default']['stderr_pct']:.2f} | "
                + (
                    f"{test['default_nearest']['top1_pct']:.2f} | "
                    f"{paired['chosen_vs_default_nearest']['difference_pct']:+.2f} ± {paired['chosen_vs_default_nearest']['stderr_pct']:.2f} |"
                    if "default_nearest" in test
                    else "– | – |"
                )
            )
    for key, label in (("rank_random", "random configurations"),):
        if key in result:
            rank = result[key]
            lines += [
                "",
                f"Rank agreement over {rank['configurations']} {label}: Spearman {rank.get('spearman', float('nan')):.3f}, "
                f"Kendall {rank.get('kendall', float('nan')):.3f}; better half by top-1: "
                f"{rank.get('spearman_better_half', float('nan')):.3f}; with correction on "
                f"({rank.get('configurations_with_correction', 0)}): {rank.get('spearman_with_correction', float('nan')):.3f}.",
            ]
    if "cost" in result:
        cost = result["cost"]
        search, cached, naive = cost["proxy_search"], cost["cached_full_eval"], cost["naive"]
        lines += [
            "",
            f"Cost, {cost['configurations']} configurations (full evaluation measured on "
            f"{cost['sampled_configurations']} of them, naive on {naive['sampled_configurations']}): "
            f"proxy search {search['wall_s']:.0f} s wall, {search['cpu_s']:.0f} CPU s "
            f"({search['cpu_per_configuration_s']:.0f} CPU s per configuration); cached pipeline "
            f"+ full evaluation {cached['per_configuration_cpu_s']:.0f} CPU s per configuration "
            f"({cached['cpu_ratio_per_configuration']:.2f}×), total {cached['total_wall_s']:.0f} s "
            f"wall ({cached['wall_ratio_vs_proxy_search']:.2f}×); naive pipeline "
            f"{naive['per_configuration_cpu_s']:.0f} CPU s per configuration "
            f"({naive['cpu_ratio_per_configuration']:.1f}×), total {naive['total_wall_s']:.0f} s "
            f"wall ({naive['wall_ratio_vs_proxy_search']:.1f}×).",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--out", type=Path, default=Path("results/bench_search"))
    parser.add_argument("--json", type=Path, default=Path("results/bench_search.json"))
    parser.add_argument(
        "--phases",
        default="search:resnet20:3,rank,cost,search:resnet20:2.5,search:resnet32:3,search:resnet32:2.5",
    )
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--rank-configs", type=int, default=40)
    parser.add_argument("--cost-configs", type=int, default=12)
    parser.add_argument("--naive-configs", type=int, default=4)
    parser.add_argument(
        "--share-caches",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="seed a search's curvature/weight caches from an earlier search of the same model",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--merge-from",
        type=Path,
        action="append",
        default=[],
        help="JSON files of other runs of this script (other phases) to merge into --json",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    selection = _selection_file(args.shared, args.out)
    test = load_dataset(str(args.shared / TEST), num_classes=10)
    result = json.loads(args.json.read_text()) if args.json.is_file() else {}
    for other in args.merge_from:
        for key, value in json.loads(other.read_text()).items():
            if isinstance(value, dict) and isinstance(result.get(key), dict):
                result[key] = {**result[key], **value}
            else:
                result.setdefault(key, value)
    result.update(
        {
            "git_sha": git_sha(),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{args.threads} threads; shared with other jobs (load averages recorded)",
            "selection_slice": list(SELECTION),
            "test": str(args.shared / TEST),
        }
    )
    for phase in [name for name in args.phases.split(",") if name]:
        start, cpu = time.perf_counter(), time.process_time()
        if phase.startswith("search:"):
            _, model, bits = phase.split(":")
            entry = phase_search(args, model, float(bits), test, selection)
            result.setdefault("searches", {})[f"{model}-{float(bits):g}"] = entry
        elif phase == "rank":
            result["rank_random"] = phase_rank(args, test)
        elif phase == "cost":
            result["cost"] = phase_cost(args, test)
        elif phase == "markdown":
            print(markdown({**result, "out": str(args.out)}))
            continue
        else:
            raise SystemExit(f"unknown phase {phase!r}")
        result.setdefault("phase_seconds", {})[phase] = time.perf_counter() - start
        result.setdefault("phase_cpu_seconds", {})[phase] = time.process_time() - cpu
        args.json.parent.mkdir(parents=True, exist_ok=True)
        # Another process may have written other phases meanwhile: merge, ours win.
        merged = json.loads(args.json.read_text()) if args.json.is_file() else {}
        for key, value in result.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        result = merged
        args.json.write_text(json.dumps(result, indent=2, default=float) + "\n")
        print(f"phase {phase} done in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
