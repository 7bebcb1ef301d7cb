"""The bad-input matrix (issue 18): every class of bad input ends in exit status 2, one line
``lcpaq: error: ...`` naming the file/field/value, no traceback, and no half-written file.

Classes: data files (dtype, shape, value range, label range, empty), checkpoints, budgets and
formats, run folders read by later stages (damaged ``curvature.npz``, ``allocation.json``,
``candidates.npz``), output folders (a file in the way, disk full during a write). An infeasible
budget is refused before any curvature is computed.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import digits_command, write_digits_files

from lcpaq.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    checkpoint, data = write_digits_files(tmp_path, num_images=32)
    return {"checkpoint": checkpoint, "data": data}


def _run(files: dict[str, Path], out: Path, *extra: str, data: Path | None = None) -> list[str]:
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


def _leftovers(folder: Path) -> list[str]:
    """Temporary files of an atomic write that a failure left behind."""
    if not folder.is_dir():
        return []
    return [p.name for p in folder.rglob("*") if p.name.endswith(".tmp")]


def _assert_clean_error(capsys, code: int, folder: Path, *needles: str) -> str:
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = [line for line in captured.err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("lcpaq: error: ")
    assert "Traceback" not in captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert _leftovers(folder) == []
    return lines[0]


# -- data files --------------------------------------------------------------------------------

_PIXELS = np.zeros((4, 1, 8, 8), np.uint8)
_LABELS = np.zeros(4, np.int64)


@pytest.mark.parametrize(
    ("arrays", "needles"),
    [
        ({"x": np.array(["a", "b", "c", "d"]), "y": _LABELS}, ("'x'", "<U1")),
        ({"x": _PIXELS, "y": np.array(["0", "1", "2", "3"])}, ("'y'", "<U1")),
        ({"x": np.zeros((4, 1, 8, 8), np.float32), "y": np.zeros(4)}, ("'y'", "integers")),
        ({"x": np.zeros((0, 1, 8, 8), np.uint8), "y": np.zeros(0, np.int64)}, ("empty",)),
        ({"x": np.zeros((4, 0), np.float32), "y": _LABELS}, ("'x'", "(4, 0)")),
        ({"x": np.zeros((4, 3, 8, 8), np.uint8), "y": _LABELS}, ("(3, 8, 8)", "demo-digits")),
        ({"x": np.full((4, 1, 8, 8), np.inf, np.float32), "y": _LABELS}, ("NaN or Inf",)),
        ({"x": np.full((4, 1, 8, 8), 300, np.int64), "y": _LABELS}, ("'x'", "300")),
        ({"x": _PIXELS, "y": np.array([0, 1, 2, 10])}, ("label 10", "out of range")),
        ({"x": _PIXELS, "y": np.zeros(3, np.int64)}, ("'y'", "(3,)")),
    ],
)
def test_bad_data_file(files, tmp_path, capsys, arrays, needles):
    data = tmp_path / "bad.npz"
    np.savez(data, **arrays)
    out = tmp_path / "run"
    code = main(_run(files, out, data=data))
    _assert_clean_error(capsys, code, out, str(data), *needles)
    assert not (out / "curvature.npz").exists()


def test_truncated_data_file(files, tmp_path, capsys):
    data = tmp_path / "cut.npz"
    data.write_bytes(files["data"].read_bytes()[:200])
    out = tmp_path / "run"
    _assert_clean_error(capsys, main(_run(files, out, data=data)), out, str(data))


def test_pixels_as_small_integers_are_accepted(files, tmp_path):
    """Integer pixels in [0, 255] of any integer dtype are images, like uint8."""
    data = tmp_path / "int.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.integers(0, 255, (16, 1, 8, 8)), y=rng.integers(0, 10, 16))
    assert main(_run(files, tmp_path / "run", data=data)) == 0


# -- checkpoints, budgets and formats ------------------------------------------------------------


def test_checkpoint_that_is_not_one(files, tmp_path, capsys):
    path = tmp_path / "notes.pt"
    path.write_text("this is text, not a checkpoint")
    args = _run(files, tmp_path / "run")
    args[args.index(str(files["checkpoint"]))] = str(path)
    _assert_clean_error(capsys, main(args), tmp_path / "run", str(path))


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--formats", "int2,int9"], ("int9",)),
        (["--act-formats", "int77"], ("int77",)),
    ],
)
def test_bad_format(files, tmp_path, capsys, extra, needles):
    out = tmp_path / "run"
    _assert_clean_error(capsys, main([*_run(files, out), *extra]), out, *needles)
    assert not (out / "curvature.npz").exists()


@pytest.mark.parametrize(
    ("budget", "needles"),
    [
        ("avg-bits=1", ("avg-bits=1", "2 to 8", "before the analysis", "ternary, binary")),
        ("size-mb=0.00001", ("size-mb=1e-05", "before the analysis")),
    ],
)
def test_infeasible_budget_fails_before_the_curvature(
    files, tmp_path, capsys, monkeypatch, budget, needles
):
    """The budget is checked against candidate costs right after loading the model: the
    curvature estimator is never called."""
    from lcpaq.stages import analyze

    def refuse(*_args, **_kwargs):
        raise AssertionError("the curvature was measured for an infeasible budget")

    monkeypatch.setattr(analyze, "measure_sensitivity", refuse)
    out = tmp_path / "run"
    args = _run(files, out, "--formats", "int2,int4,int8")
    args[args.index("avg-bits=4")] = budget
    _assert_clean_error(capsys, main(args), out, *needles)
    assert not (out / "curvature.npz").exists()


# -- run folders read by later stages --------------------------------------------------------------


@pytest.fixture()
def analysed(files, tmp_path) -> Path:
    out = tmp_path / "run"
    assert main(_run(files, out)) == 0
    return out


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_key(path: Path, key: str) -> None:
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        del data[key]
        path.write_text(json.dumps(data))
        return
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files if name != key}
    np.savez(path, **arrays)


def _shorten(path: Path, key: str) -> None:
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files}
    arrays[key] = arrays[key][:-1]
    np.savez(path, **arrays)


@pytest.mark.parametrize(
    ("name", "damage", "command"),
    [
        ("curvature.npz", _truncate, "allocate"),
        ("curvature.npz", lambda p: _drop_key(p, "trace"), "allocate"),
        ("curvature.npz", lambda p: _shorten(p, "trace"), "allocate"),
        ("candidates.npz", _truncate, "allocate"),
        ("candidates.npz", lambda p: _drop_key(p, "error_sq"), "allocate"),
        ("candidates.npz", lambda p: _shorten(p, "bits"), "allocate"),
        ("layers.json", _truncate, "allocate"),
        ("allocation.json", _truncate, "export"),
        ("allocation.json", lambda p: _drop_key(p, "formats"), "export"),
        ("run_config.json", lambda p: _drop_key(p, "analysis"), "export"),
    ],
)
def test_damaged_run_folder(analysed, capsys, name, damage, command):
    damage(analysed / name)
    args = ["-q", command, str(analysed)]
    if command == "allocate":
        args += ["--budget", "avg-bits=4"]
    stage = "lcpaq allocate" if name == "allocation.json" else "lcpaq analyze"
    _assert_clean_error(
        capsys, main(args), analysed, f"run folder {analysed}", name, "damaged", stage
    )


# -- output folders ----------------------------------------------------------------------------------


def test_a_file_in_the_way_of_the_run_folder(files, tmp_path, capsys):
    blocker = tmp_path / "run"
    blocker.write_text("in the way")
    code = main(_run(files, blocker))
    _assert_clean_error(capsys, code, tmp_path, str(blocker), "not writable")
    assert blocker.read_text() == "in the way"


def test_disk_full_while_exporting(analysed, capsys, monkeypatch):
    """The checkpoint's build folder is removed and the message names the checkpoint folder."""
    from lcpaq.quant import checkpoint

    def full_disk(_tensors, path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    code = main(["-q", "export", str(analysed)])
    _assert_clean_error(capsys, code, analysed, "No space left on device", "quantized")
    assert [p.name for p in analysed.iterdir() if p.name.startswith(".")] == []


def test_disk_full_during_a_write(files, tmp_path, capsys, monkeypatch):
    """A write that fails half way (ENOSPC) leaves no temporary file and names the target."""
    original = np.savez

    def full_disk(handle, **arrays):
        original(handle, **arrays)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    out = tmp_path / "run"
    _assert_clean_error(capsys, main(_run(files, out)), out, "No space left on device", str(out))
