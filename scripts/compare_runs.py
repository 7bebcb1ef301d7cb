"""Compare two lcpaq run folders file by file: is the output the same, up to timings?

Every file byte for byte; where bytes differ, JSON without timing keys (``*_s``, ``*_seconds``,
``seconds``), ``.npz`` array by array, PNGs pixel by pixel. Used to check that a refactoring leaves
a run unchanged:

    python scripts/compare_runs.py runs/before runs/after     # exit 0: the same up to timings
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np


def _without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            key: _without_timings(item)
            for key, item in value.items()
            if key != "seconds" and not key.endswith(("_s", "_seconds"))
        }
    if isinstance(value, list):
        return [_without_timings(item) for item in value]
    return value


# report.md lines that hold timings: "(27.5 s)", "2.6 ms", and the stage timing table's rows.
_TIMING = re.compile(r"\d+(\.\d+)? ?m?s\b|^\| \w+ \| \d+(\.\d+)? \|$")


def _report_without_timings(path: Path) -> list[str]:
    return [_TIMING.sub("<t>", line) for line in path.read_text().splitlines()]


def _same_arrays(first: Path, second: Path) -> bool:
    with np.load(first) as a, np.load(second) as b:
        return set(a.files) == set(b.files) and all(np.array_equal(a[k], b[k]) for k in a.files)


def _same_pixels(first: Path, second: Path) -> bool:
    import matplotlib.image as mpimg

    a, b = mpimg.imread(first), mpimg.imread(second)
    return a.shape == b.shape and bool(np.array_equal(a, b))


def compare_file(first: Path, second: Path) -> str:
    """'same bytes', 'same content', 'timings only' or 'DIFFERENT'."""
    if first.read_bytes() == second.read_bytes():
        return "same bytes"
    if first.name == "timings.json":
        return "timings only"
    if first.name == "report.md":
        same = _report_without_timings(first) == _report_without_timings(second)
        return "timings only" if same else "DIFFERENT"
    if first.suffix == ".json":
        a, b = (_without_timings(json.loads(path.read_text())) for path in (first, second))
        return "same content" if a == b else "DIFFERENT"
    if first.suffix == ".npz":
        return "same content" if _same_arrays(first, second) else "DIFFERENT"
    if first.suffix == ".png":
        return "same content" if _same_pixels(first, second) else "DIFFERENT"
    return "DIFFERENT"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    args = parser.parse_args(argv)
    names = {p.relative_to(root) for root in (args.first, args.second) for p in root.rglob("*")}
    same = True
    for name in sorted(
        n for n in names if (args.first / n).is_file() or (args.second / n).is_file()
    ):
        first, second = args.first / name, args.second / name
        if not (first.is_file() and second.is_file()):
            verdict = "MISSING in one folder"
        else:
            verdict = compare_file(first, second)
        same &= not verdict.startswith(("DIFFERENT", "MISSING"))
        print(f"{verdict:30s} {name}")
    print("the same up to timings" if same else "differences found")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
