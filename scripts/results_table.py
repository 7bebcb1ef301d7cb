"""Render the JSON written by scripts/cifar_resnet.py as a Markdown table (for docs/results.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def render(path: Path) -> str:
    result = json.loads(path.read_text())
    lines = [
        f"`{result['checkpoint']}` on `{result['eval']}` ({result['num_eval_samples']} images); "
        f"git {result['git_sha'][:10]}; {result['machine']}; whole script {result['total_s']:.0f} s.",
        "",
        "| configuration | top-1 % | paired vs lcpaq 3-bit (points ± SE) |",
        "|---|---|---|",
    ]
    for row in result["rows"]:
        paired = row.get("paired_vs_lcpaq_3bit_pct")
        paired_text = (
            "–" if paired is None else f"{paired:+.2f} ± {row['paired_vs_lcpaq_3bit_se_pct']:.2f}"
        )
        lines.append(f"| {row['name']} | {row['top1_pct']:.2f} | {paired_text} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", type=Path, nargs="+")
    for path in parser.parse_args().results:
        print(render(path) + "\n")


if __name__ == "__main__":
    main()
