"""Shared pieces of the bad-input matrix (issue 18: `tests/test_bad_input.py` for data files,
checkpoints, budgets and formats; `tests/test_bad_run_folder.py` for run folders and output
folders): the digits run every case starts from and the assertion every case ends with."""

from __future__ import annotations

from pathlib import Path

from conftest import digits_command


def run_args(files: dict[str, Path], out: Path, *extra: str, data: Path | None = None) -> list[str]:
    """``lcpaq run`` on the digits files at one budget, no sweep, then ``extra``."""
    return digits_command(
        "run",
        files["checkpoint"],
        data or files["data"],
        "--num-samples",
        "16",
        "--correction-samples",
        "16",
        "--sweep-points",
        "0",
        "--budget",
        "avg-bits=4",
        "--out",
        str(out),
        *extra,
    )


def leftovers(folder: Path) -> list[str]:
    """Temporary files and folders of an atomic write that a failure left behind."""
    if not folder.is_dir():
        return []
    return [
        p.name
        for p in folder.rglob("*")
        if p.name.endswith(".tmp") or ".tmp-" in p.name or ".old-" in p.name
    ]


def assert_clean_error(capsys, code: int, folder: Path, *needles: str) -> str:
    """Exit status 2, one line ``lcpaq: error: …`` holding every needle, no traceback, and
    nothing half-written under ``folder``."""
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = [line for line in captured.err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("lcpaq: error: ")
    assert "Traceback" not in captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert leftovers(folder) == []
    return lines[0]
