"""The bad-input matrix (issue 18), run folders and output folders: a file a later stage reads that
is truncated, garbage or edited gives exit status 2 and one line ``run folder X: file Y is damaged
(reason); rerun `lcpaq STAGE``` (the stage that writes Y), no traceback; an interrupted analysis
is refused until it is resumed; writes that cannot happen (a file or folder in the way, no
permission, a full disk) name the target and leave nothing half-written. Inputs:
`tests/test_bad_input.py`."""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from bad_input_cases import assert_clean_error, leftovers, run_args
from conftest import write_digits_files

from lcpaq.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")

#: Measures every optional analysis file, evaluates and sweeps (two measured points).
FULL_RUN = [
    *["--act-formats", "int8", "--hutchinson-probes", "8", "--batch-size", "8"],
    *["--pairwise", "hessian", "--pair-samples", "16", "--sweep-points", "2"],
    *["--sweep-eval-samples", "8"],
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """(a finished run folder with every file, its data file), made once for the module."""
    folder = tmp_path_factory.mktemp("finished")
    checkpoint, data = write_digits_files(folder, num_images=32)
    out = folder / "run"
    files = {"checkpoint": checkpoint, "data": data}
    assert main([*run_args(files, out, "--eval", str(data)), *FULL_RUN]) == 0
    return out, data


@pytest.fixture()
def run_dir(finished, tmp_path) -> Path:
    """A copy of the finished run folder for one test to damage."""
    return Path(shutil.copytree(finished[0], tmp_path / "run"))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00 not what was written")


def _edit_json(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))

    return edit


def _edit_npz(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        with np.load(path) as archive:
            arrays = {name: archive[name] for name in archive.files}
        change(arrays)
        np.savez(path, **arrays)

    return edit


def _set(data: dict, path: tuple, value: object) -> None:
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


#: (file, damage, command reading it, the stage the message says to rerun)
DAMAGED = [
    ("curvature.npz", _truncate, "allocate", "analyze"),
    ("curvature.npz", _edit_npz(lambda a: a.pop("trace")), "allocate", "analyze"),
    ("curvature.npz", _edit_npz(lambda a: a.update(trace=a["trace"][:-1])), "allocate", "analyze"),
    ("candidates.npz", _truncate, "allocate", "analyze"),
    ("candidates.npz", _edit_npz(lambda a: a.pop("error_sq")), "allocate", "analyze"),
    ("candidates.npz", _edit_npz(lambda a: a.update(bits=a["bits"][:-1])), "allocate", "analyze"),
    ("activations.npz", _truncate, "allocate", "analyze"),
    ("activations.npz", _garbage, "export", "analyze"),
    ("interactions.npz", _truncate, "allocate", "analyze"),
    ("hutchinson.npz", _garbage, "report", "analyze"),
    ("input_hessians.safetensors", _truncate, "export", "analyze"),
    ("input_hessians.safetensors", _garbage, "sweep", "analyze"),
    ("layers.json", _truncate, "allocate", "analyze"),
    ("layers.json", _edit_json(lambda d: d["layers"][0].pop("name")), "allocate", "analyze"),
    ("run_config.json", _edit_json(lambda d: d.pop("analysis")), "export", "analyze"),
    (
        "run_config.json",
        _edit_json(lambda d: _set(d, ("analysis", "num_samples"), "many")),
        "export",
        "analyze",
    ),
    ("allocation.json", _truncate, "export", "allocate"),
    ("allocation.json", _edit_json(lambda d: d.pop("formats")), "export", "allocate"),
    (
        "allocation.json",
        _edit_json(lambda d: _set(d, ("formats", 0), "int77/int8")),
        "export",
        "allocate",
    ),
    (
        "allocation.json",
        _edit_json(lambda d: _set(d, ("layer_names", 0), "nolayer")),
        "export",
        "allocate",
    ),
    ("allocation.json", _edit_json(lambda d: d.update(bits=d["bits"][:-1])), "export", "allocate"),
    ("frontiers.npz", _garbage, "plot", "allocate"),
    ("evaluation.json", _truncate, "report", "evaluate"),
    ("sweep.json", _garbage, "report", "sweep"),
]


@pytest.mark.parametrize(("name", "damage", "command", "stage"), DAMAGED)
def test_damaged_run_folder(run_dir, finished, capsys, name, damage, command, stage):
    damage(run_dir / name)
    args = ["-q", command, str(run_dir)]
    args += {"allocate": ["--budget", "avg-bits=4"], "evaluate": ["--eval", str(finished[1])]}.get(
        command, []
    )
    assert_clean_error(
        capsys,
        main(args),
        run_dir,
        f"run folder {run_dir}",
        f"file {name}",
        "damaged",
        f"lcpaq {stage}",
    )


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("manifest.json", _truncate),
        ("manifest.json", _edit_json(lambda d: d.pop("layers"))),
        ("manifest.json", _edit_json(lambda d: d["layers"][0].pop("weight_key"))),
        ("model.safetensors", _garbage),
    ],
)
def test_damaged_quantized_checkpoint(run_dir, finished, capsys, name, damage):
    damage(run_dir / "quantized" / name)
    code = main(["-q", "evaluate", str(run_dir), "--eval", str(finished[1])])
    assert_clean_error(
        capsys, code, run_dir, f"quantized checkpoint {run_dir / 'quantized'}", name, "lcpaq export"
    )


def test_an_interrupted_analysis_is_refused_by_later_stages(run_dir, capsys):
    (run_dir / "analysis_state").mkdir()
    code = main(["-q", "export", str(run_dir)])
    assert_clean_error(capsys, code, run_dir, "interrupted", "--resume")


def test_damaged_timings_are_started_anew(run_dir, capsys):
    """Wall times only: a damaged ``timings.json`` is replaced with a warning, not an error."""
    _garbage(run_dir / "timings.json")
    assert main(["-q", "allocate", str(run_dir), "--budget", "avg-bits=4"]) == 0
    assert "timings.json is damaged" in capsys.readouterr().err
    assert set(json.loads((run_dir / "timings.json").read_text())) == {"schema_version", "allocate"}


# -- output folders ------------------------------------------------------------------------------


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    checkpoint, data = write_digits_files(tmp_path, num_images=32)
    return {"checkpoint": checkpoint, "data": data}


def test_a_file_in_the_way_of_the_run_folder(files, tmp_path, capsys):
    blocker = tmp_path / "run"
    blocker.write_text("in the way")
    code = main(run_args(files, blocker))
    assert_clean_error(capsys, code, tmp_path, str(blocker), "not writable")
    assert blocker.read_text() == "in the way"


def test_a_folder_in_the_way_of_a_file(run_dir, capsys):
    (run_dir / "allocation.json").unlink()
    (run_dir / "allocation.json").mkdir()
    code = main(["-q", "allocate", str(run_dir), "--budget", "avg-bits=4"])
    assert_clean_error(capsys, code, run_dir, f"cannot write {run_dir / 'allocation.json'}")


def test_a_file_in_the_way_of_the_checkpoint_folder(run_dir, tmp_path, capsys):
    """The user's file is kept (it used to be replaced, and a ``.NAME.old-PID`` copy left)."""
    blocker = tmp_path / "checkpoint"
    blocker.write_text("mine")
    code = main(["-q", "export", str(run_dir), "--out", str(blocker)])
    assert_clean_error(capsys, code, tmp_path, str(blocker), "a file is in the way")
    assert blocker.read_text() == "mine"


def test_an_output_folder_that_cannot_be_created(files, capsys):
    out = Path("/sys/lcpaq-run")  # not writable, whoever runs the tests (root included)
    if out.parent.is_dir() and _writable(out.parent):
        pytest.skip(f"{out.parent} is writable here")
    assert_clean_error(
        capsys, main(run_args(files, out)), out.parent / "none", str(out), "not writable"
    )


def _writable(folder: Path) -> bool:
    try:
        (folder / ".lcpaq-probe").mkdir()
    except OSError:
        return False
    (folder / ".lcpaq-probe").rmdir()
    return True


def test_no_permission_to_write_a_file(run_dir, capsys, monkeypatch):
    """EACCES on the temporary file (a folder without write permission; root ignores modes, so
    it is simulated): the message names the target."""
    import tempfile

    def denied(*_args, **_kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    code = main(["-q", "allocate", str(run_dir), "--budget", "avg-bits=4"])
    assert_clean_error(capsys, code, run_dir, "cannot write", "frontiers.npz", "Permission denied")


def test_disk_full_while_exporting(run_dir, capsys, monkeypatch):
    """The checkpoint's build folder is removed and the message names the checkpoint folder."""
    from lcpaq.quant import checkpoint

    def full_disk(_tensors, path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    code = main(["-q", "export", str(run_dir)])
    assert_clean_error(capsys, code, run_dir, "No space left on device", "quantized")
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == []


def test_disk_full_during_a_write(files, tmp_path, capsys, monkeypatch):
    """A write that fails half way (ENOSPC) leaves no temporary file and names the target."""
    original = np.savez

    def full_disk(handle, **arrays):
        original(handle, **arrays)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    out = tmp_path / "run"
    assert_clean_error(capsys, main(run_args(files, out)), out, "No space left on device", str(out))


@pytest.mark.parametrize("module", ["lcpaq.state_file", "lcpaq.runfolder"])
def test_disk_full_during_a_safetensors_write(files, tmp_path, capsys, monkeypatch, module):
    """The analysis' running state (``lcpaq.state_file``) and the GPTQ input moments
    (``lcpaq.runfolder.save_tensors``): half a file, then ENOSPC."""
    import importlib

    target = importlib.import_module(module)

    def full_disk(_tensors, path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(target, "save_file", full_disk)
    out = tmp_path / "run"
    code = main(run_args(files, out, "--state-every-s", "0"))
    line = assert_clean_error(capsys, code, out, "No space left on device", "cannot write")
    assert ".safetensors" in line
    assert leftovers(out) == []
