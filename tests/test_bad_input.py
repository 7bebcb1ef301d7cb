"""The bad-input matrix (issue 18), inputs: every class of bad input ends in exit status 2, one
line ``lcpaq: error: ...`` naming the file/field/value, no traceback, and no half-written file.

Classes here: data files (missing, unsupported, dtype, shape, value range, label range, empty),
checkpoints (missing, truncated, not one, tensors that do not fit, NaN/Inf weights), budgets,
formats and options. An infeasible budget and a NaN checkpoint are refused before any curvature
is computed. Run folders and output folders: `tests/test_bad_run_folder.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from bad_input_cases import assert_clean_error, run_args
from conftest import write_digits_files
from safetensors.torch import load_file, save_file

from lcpaq.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    checkpoint, data = write_digits_files(tmp_path, num_images=32)
    return {"checkpoint": checkpoint, "data": data}


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
    code = main(run_args(files, out, data=data))
    assert_clean_error(capsys, code, out, str(data), *needles)
    assert not (out / "curvature.npz").exists()


def test_truncated_data_file(files, tmp_path, capsys):
    data = tmp_path / "cut.npz"
    data.write_bytes(files["data"].read_bytes()[:200])
    out = tmp_path / "run"
    assert_clean_error(capsys, main(run_args(files, out, data=data)), out, str(data))


def test_pixels_as_small_integers_are_accepted(files, tmp_path):
    """Integer pixels in [0, 255] of any integer dtype are images, like uint8."""
    data = tmp_path / "int.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.integers(0, 255, (16, 1, 8, 8)), y=rng.integers(0, 10, 16))
    assert main(run_args(files, tmp_path / "run", data=data)) == 0


# -- checkpoints, budgets and formats ------------------------------------------------------------


def test_checkpoint_that_is_not_one(files, tmp_path, capsys):
    path = tmp_path / "notes.pt"
    path.write_text("this is text, not a checkpoint")
    args = run_args(files, tmp_path / "run")
    args[args.index(str(files["checkpoint"]))] = str(path)
    assert_clean_error(capsys, main(args), tmp_path / "run", str(path))


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--formats", "int2,int9"], ("int9",)),
        (["--act-formats", "int77"], ("int77",)),
    ],
)
def test_bad_format(files, tmp_path, capsys, extra, needles):
    out = tmp_path / "run"
    assert_clean_error(capsys, main([*run_args(files, out), *extra]), out, *needles)
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
    args = run_args(files, out, "--formats", "int2,int4,int8")
    args[args.index("avg-bits=4")] = budget
    assert_clean_error(capsys, main(args), out, *needles)
    assert not (out / "curvature.npz").exists()


@pytest.mark.parametrize(
    ("make", "needles"),
    [
        (lambda folder: folder / "nope.npz", ("nope.npz", "does not exist")),
        (lambda folder: _write(folder / "notes.txt", b"text"), ("notes.txt", "unsupported type")),
        (lambda folder: _mkdir(folder / "images"), ("images", "ImageFolder")),
        (lambda folder: _torch_save(folder / "x.pt", {"x": torch.zeros(4, 1, 8, 8)}), ("x.pt",)),
        (lambda folder: _npz(folder / "y.npz", y=np.zeros(4, np.int64)), ("y.npz", "'x'")),
    ],
)
def test_unusable_data_path(files, tmp_path, capsys, make, needles):
    out = tmp_path / "run"
    code = main(run_args(files, out, data=make(tmp_path)))
    assert_clean_error(capsys, code, out, *needles)
    assert not out.exists() or not any(out.iterdir())


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _torch_save(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


# -- checkpoints that load but do not fit ------------------------------------------------------------


def _edited_checkpoint(files: dict[str, Path], folder: Path, edit: str) -> Path:
    state = load_file(str(files["checkpoint"]))
    weight = next(key for key in state if key.endswith("weight"))
    if edit == "truncated":
        return _write(folder / "cut.safetensors", files["checkpoint"].read_bytes()[:100])
    if edit == "shape":
        state[weight] = torch.zeros(3)
    elif edit == "missing":
        del state[weight]
    elif edit == "unexpected":
        state["extra.weight"] = torch.zeros(2)
    elif edit in ("nan", "inf"):
        state[weight] = torch.full_like(state[weight], float(edit))
    path = folder / f"{edit}.safetensors"
    save_file(state, str(path))
    return path


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        ("truncated", ("cut.safetensors", "not a readable safetensors file")),
        ("shape", ("does not fit the model", "has shape (3,)")),
        ("missing", ("does not fit the model", "is missing")),
        ("unexpected", ("does not fit the model", "unexpected key 'extra.weight'")),
        ("nan", ("NaN or Inf",)),
        ("inf", ("NaN or Inf",)),
    ],
)
def test_checkpoint_that_does_not_fit(files, tmp_path, capsys, monkeypatch, edit, needles):
    """Refused when it is loaded, before any curvature (a NaN weight otherwise surfaced as a
    "NaN in the input Hessian" error after the analysis, naming no file)."""
    from lcpaq.stages import analyze

    def refuse(*_args, **_kwargs):
        raise AssertionError("the curvature was measured for a checkpoint that does not fit")

    monkeypatch.setattr(analyze, "measure_sensitivity", refuse)
    path = _edited_checkpoint(files, tmp_path, edit)
    out = tmp_path / "run"
    args = run_args({**files, "checkpoint": path}, out)
    assert_clean_error(capsys, main(args), out, f"checkpoint {path}", *needles)


@pytest.mark.parametrize(
    ("budget", "needles"),
    [
        ("avg-bits", ("'avg-bits'", "METRIC=VALUE")),
        ("avg-bits=abc", ("'abc' is not a number",)),
        ("foo=3", ("unknown metric 'foo'",)),
        ("avg-bits=-2", ("positive",)),
        ("size-mb=0", ("positive",)),
    ],
)
def test_malformed_budget(files, tmp_path, capsys, budget, needles):
    out = tmp_path / "run"
    args = run_args(files, out)
    args[args.index("avg-bits=4")] = budget
    assert_clean_error(capsys, main(args), out, budget, *needles)
    assert not (out / "curvature.npz").exists()


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--formats", ""], ("format list is empty",)),
        (["--num-samples", "0"], ("num-samples", "0")),
        (["--batch-size", "0"], ("batch-size", "0")),
        (["--state-every-s", "-1"], ("--state-every-s", "-1")),
    ],
)
def test_bad_option_value(files, tmp_path, capsys, extra, needles):
    out = tmp_path / "run"
    assert_clean_error(capsys, main([*run_args(files, out), *extra]), out, *needles)
    assert not (out / "curvature.npz").exists()
