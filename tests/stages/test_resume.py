"""``lcpaq analyze`` interrupted at a random batch (Ctrl-C or SIGTERM) and continued with
``--resume`` (`lcpaq.stages.resume`): the run folder stays consistent, later stages refuse it
until the analysis is finished, and the resumed analysis files equal an uninterrupted run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, digits_command, write_digits_files
from safetensors.numpy import load_file
from torch import nn

from lcpaq.cli import main
from lcpaq.stages import analyze as analyze_stage
from lcpaq.stages.resume import STATE_DIR

pytestmark = pytest.mark.usefixtures("single_thread")

#: Measured by each estimator choice (the Hutchinson cross-check, activation sensitivity and
#: GPTQ input moments with gauss-newton; the control variate and single-layer probes otherwise).
ESTIMATOR_FLAGS = {
    "gauss-newton": [
        "--hutchinson-probes",
        "8",
        "--hutchinson-samples",
        "16",
        "--act-formats",
        "int8",
    ],
    "hutchinson": ["--estimator", "hutchinson", "--hutchinson-probes", "64"],
}
ANALYSIS_FILES = (
    "curvature.npz",
    "candidates.npz",
    "hutchinson.npz",
    "activations.npz",
    "input_hessians.safetensors",
    "layers.json",
    "run_config.json",
)


@pytest.fixture()
def files(tmp_path: Path) -> tuple[Path, Path]:
    return write_digits_files(tmp_path, num_images=48)


def _analyze(files: tuple[Path, Path], out: Path, estimator: str, *extra: str) -> list[str]:
    checkpoint, data = files
    flags = ["--num-samples", "32", "--batch-size", "8", "--out", str(out)]
    return digits_command("analyze", checkpoint, data, *flags, *ESTIMATOR_FLAGS[estimator], *extra)


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, at: int) -> dict[str, int]:
    """The analysed model raises KeyboardInterrupt at its forward call ``at`` (Ctrl-C there)."""
    calls = {"count": 0}
    original = analyze_stage.analyze_model

    def interrupted(config, model: nn.Module, *args, **kwargs):
        def hook(_module: nn.Module, _inputs: object) -> None:
            calls["count"] += 1
            if calls["count"] == at:
                raise KeyboardInterrupt

        handle = model.register_forward_pre_hook(hook)
        try:
            return original(config, model, *args, **kwargs)
        finally:
            handle.remove()

    monkeypatch.setattr(analyze_stage, "analyze_model", interrupted)
    return calls


def _same_files(left: Path, right: Path) -> None:
    """The analysis files of two run folders are equal (wall times aside)."""
    for name in ANALYSIS_FILES:
        if not (left / name).exists():
            assert not (right / name).exists(), name
            continue
        if name.endswith(".json"):
            one, two = (json.loads((folder / name).read_text()) for folder in (left, right))
            for data in (one, two):
                for key in [key for key in data if key.endswith("_seconds")]:
                    del data[key]
            assert one == two, name
            continue
        loader = load_file if name.endswith(".safetensors") else np.load
        one, two = loader(left / name), loader(right / name)
        keys = sorted(one.keys())
        assert keys == sorted(two.keys()), name
        for key in keys:
            np.testing.assert_array_equal(one[key], two[key], err_msg=f"{name}:{key}")


def _forward_calls(files, tmp_path: Path, estimator: str, monkeypatch) -> int:
    calls = _interrupt_at(monkeypatch, at=0)  # counts, never interrupts
    assert main(_analyze(files, tmp_path / "whole", estimator)) == 0
    monkeypatch.undo()
    return calls["count"]


@pytest.mark.parametrize("estimator", list(ESTIMATOR_FLAGS))
@pytest.mark.parametrize("seed", [0, 1])
def test_interrupted_analysis_resumes_to_the_same_files(
    files, tmp_path, monkeypatch, capsys, estimator, seed
):
    whole = tmp_path / "whole"
    total = _forward_calls(files, tmp_path, estimator, monkeypatch)
    at = int(np.random.default_rng(seed).integers(2, total))
    out = tmp_path / "run"
    _interrupt_at(monkeypatch, at)
    assert main(_analyze(files, out, estimator, "--state-every-s", "0")) == 130
    monkeypatch.undo()
    assert [p.name for p in out.rglob("*.tmp")] == []
    assert (out / STATE_DIR / "key.json").is_file()
    assert not (out / "curvature.npz").exists()
    capsys.readouterr()
    # Later stages refuse the folder until the analysis is finished.
    assert main(["-q", "allocate", str(out), "--budget", "avg-bits=4"]) == 2
    assert "interrupted" in capsys.readouterr().err
    calls = _interrupt_at(monkeypatch, at=0)
    assert main(_analyze(files, out, estimator, "--resume")) == 0
    # Saved batches are not repeated; only the activation ranges' pass (4 batches) is unsaved.
    assert calls["count"] <= total - (at - 1) + 4
    assert not (out / STATE_DIR).exists()
    _same_files(whole, out)


def test_resume_with_other_options_is_refused(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _interrupt_at(monkeypatch, 3)
    assert main(_analyze(files, out, "gauss-newton", "--state-every-s", "0")) == 130
    monkeypatch.undo()
    capsys.readouterr()
    code = main(_analyze(files, out, "gauss-newton", "--resume", "--batch-size", "4"))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert "--resume" in lines[0] and "batch_size: 8 → 4" in lines[0], lines[0]
    assert (out / STATE_DIR).is_dir()  # kept for a resume with the right options


def test_resume_without_an_interrupted_analysis(files, tmp_path, monkeypatch):
    """``--resume`` on an empty folder analyses from the start; on a finished analysis with the
    same options it keeps it (``run --resume`` after an interrupt in a later stage)."""
    out = tmp_path / "run"
    assert main(_analyze(files, out, "gauss-newton", "--resume")) == 0
    stamp = (out / "curvature.npz").stat().st_mtime_ns

    def refuse(*_args, **_kwargs):
        raise AssertionError("a finished analysis was measured again")

    monkeypatch.setattr(analyze_stage, "measure_sensitivity", refuse)
    assert main(_analyze(files, out, "gauss-newton", "--resume")) == 0
    assert (out / "curvature.npz").stat().st_mtime_ns == stamp


def test_sigterm_leaves_a_resumable_folder(tmp_path):
    """A real SIGTERM to ``lcpaq analyze``: exit status 130, no temporary file, and the state
    to resume from."""
    checkpoint, data = write_digits_files(tmp_path, num_images=2048)
    out = tmp_path / "run"
    args = digits_command("analyze", checkpoint, data, "--num-samples", "2048", "--batch-size", "8")
    args = ["--threads", "1", *args, "--out", str(out), "--state-every-s", "0"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "lcpaq.cli", *args], env=env, stderr=subprocess.PIPE, text=True
    )
    state = out / STATE_DIR / "gauss_newton.safetensors"
    deadline = time.monotonic() + 120
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert [p.name for p in out.rglob("*.tmp")] == []
    assert "gauss_newton" in {p.stem for p in (out / STATE_DIR).iterdir()}


def test_run_resume_finishes_an_interrupted_run(files, tmp_path, monkeypatch):
    """``run --resume`` continues the analysis, then runs every later stage."""
    checkpoint, data = files
    out = tmp_path / "run"
    args = digits_command(
        "run",
        checkpoint,
        data,
        *["--num-samples", "32", "--batch-size", "8", "--correction-samples", "16"],
        *["--sweep-points", "0", "--budget", "avg-bits=4", "--out", str(out)],
    )
    _interrupt_at(monkeypatch, 3)
    assert main([*args, "--state-every-s", "0"]) == 130
    monkeypatch.undo()
    assert (out / STATE_DIR).is_dir() and not (out / "report.md").exists()
    assert main([*args, "--resume"]) == 0
    assert (out / "report.md").is_file() and (out / "quantized").is_dir()
    assert not (out / STATE_DIR).exists()
