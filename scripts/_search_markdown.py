"""The tables of docs/results.md from scripts/bench_search.py's JSON (``--phases markdown``)."""

from __future__ import annotations

import json
from pathlib import Path


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
