"""Every stage's result as a file in the run folder: atomic writes, versioned reads.

JSON holds metadata, ``.npz`` holds arrays. Writes go to a temporary file in the same folder and are
renamed into place, so an interrupted stage never leaves a half-written artifact behind.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lcpaq.allocation.table import CandidateTable
from lcpaq.errors import InputError
from lcpaq.sensitivity.curvature import CurvatureEstimate

SCHEMA_VERSION = 1

#: Files derived from an analysis; a new analysis removes them so nothing stale is reported.
DOWNSTREAM_ARTIFACTS = (
    "frontiers.npz",
    "allocation.json",
    "evaluation.json",
    "onnx.json",
    "sweep.json",
    "infeasible.json",
    "report.md",
    "report.json",
    "timings.json",
)


#: The stage that writes each run-folder file, named in "file is damaged" messages.
WRITTEN_BY = {
    "frontiers.npz": "allocate",
    "allocation.json": "allocate",
    "infeasible.json": "allocate",
    "evaluation.json": "evaluate",
    "onnx.json": "onnx",
    "sweep.json": "sweep",
    "timings.json": "analyze",
}

#: What reading a truncated or edited file raises (besides InputError, which passes through).
_DAMAGE = (
    KeyError,
    ValueError,
    TypeError,
    IndexError,
    AttributeError,
    EOFError,
    OSError,
    zipfile.BadZipFile,
    zlib.error,
)


def damaged(path: Path, reason: object) -> InputError:
    """The one-line error for a run-folder file that exists but cannot be used."""
    stage = WRITTEN_BY.get(path.name, "analyze")
    text = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
    return InputError(
        f"run folder {path.parent}: file {path.name} is damaged ({text}); rerun `lcpaq {stage}`"
    )


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn whatever a truncated or hand-edited ``path`` makes its reader raise into `damaged`."""
    try:
        yield
    except InputError:
        raise
    except _DAMAGE as error:
        reason = f"missing {error}" if isinstance(error, KeyError) else error
        raise damaged(path, reason) from None


def check_length(path: Path, key: str, values: np.ndarray, length: int, axis: int = 0) -> None:
    """``values`` has ``length`` entries along ``axis``, else ``path`` is damaged."""
    if values.ndim <= axis or values.shape[axis] != length:
        raise damaged(path, f"{key!r} has shape {values.shape}, expected {length} along {axis}")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed.

    The file gets the ordinary 0644 mode (mkstemp creates 0600). An OSError while writing (disk
    full, a folder in the way) becomes an `InputError` naming ``path``.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise InputError(f"cannot write {path}: {error.strerror or error}") from None
    os.close(fd)
    temp = Path(name)
    try:
        yield temp
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except OSError as error:
        temp.unlink(missing_ok=True)
        raise InputError(f"cannot write {path}: {error.strerror or error}") from None
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Mapping[str, object]) -> Path:
    with atomic_path(path) as temp:
        temp.write_text(
            json.dumps({"schema_version": SCHEMA_VERSION, **data}, indent=2, default=_jsonable)
            + "\n"
        )
    return path


def write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as temp:
        temp.write_text(text)
    return path


def _jsonable(value: object) -> object:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in JSON")


def read_json(path: Path, what: str) -> dict[str, object]:
    if not path.is_file():
        raise InputError(f"{path} is missing: run the stage that writes the {what} first")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise damaged(path, f"not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise damaged(path, f"holds a JSON {type(data).__name__}, not an object")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise InputError(f"{path}: schema version {data.get('schema_version')} is not supported")
    return data


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> Path:
    named: dict[str, Any] = dict(arrays)  # numpy's stubs cannot type ``**Mapping`` against savez
    with atomic_path(path) as temp, temp.open("wb") as handle:
        np.savez(handle, **named)
    return path


def read_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise InputError(f"{path} is missing: run the stage that writes the {what} first")
    with reading(path), np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> Path:
    """Named tensors as safetensors (contiguous CPU copies), written atomically."""
    with atomic_path(path) as temp:
        save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, str(temp))
    return path


def load_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InputError(f"{path} is missing: run the stage that writes the {what} first")
    try:
        return load_file(str(path))
    except (OSError, ValueError, SafetensorError) as error:
        raise damaged(path, error) from None


# -- typed artifacts ---------------------------------------------------------------------------


def save_curvature(path: Path, estimate: CurvatureEstimate) -> Path:
    arrays = {
        "layer_names": np.array(estimate.layer_names),
        "trace": estimate.trace,
        "trace_stderr": estimate.trace_stderr,
        "flags": np.array(estimate.flags),
        "meta": np.array(
            json.dumps(
                {
                    "num_samples": estimate.num_samples,
                    "method": estimate.method,
                    "num_probes": estimate.num_probes,
                }
            )
        ),
    }
    if estimate.sample_traces is not None:
        arrays["sample_traces"] = estimate.sample_traces
    arrays.update({f"diagonal/{name}": values for name, values in estimate.diagonal.items()})
    return write_npz(path, arrays)


def load_curvature(path: Path) -> CurvatureEstimate:
    arrays = read_npz(path, "curvature estimate (lcpaq analyze)")
    with reading(path):
        meta = json.loads(str(arrays["meta"]))
        count = len(arrays["layer_names"])
        for key in ("trace", "trace_stderr", "flags"):
            check_length(path, key, arrays[key], count)
        return _curvature(arrays, meta)


def _curvature(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> CurvatureEstimate:
    return CurvatureEstimate(
        layer_names=tuple(str(name) for name in arrays["layer_names"]),
        trace=arrays["trace"],
        trace_stderr=arrays["trace_stderr"],
        num_samples=int(meta["num_samples"]),
        method=str(meta["method"]),
        num_probes=int(meta["num_probes"]),
        flags=tuple(str(flag) for flag in arrays["flags"]),
        diagonal={
            key.split("/", 1)[1]: value
            for key, value in arrays.items()
            if key.startswith("diagonal/")
        },
        sample_traces=arrays.get("sample_traces"),
    )


def save_candidates(path: Path, table: CandidateTable) -> Path:
    # CandidateTable fills these (NaN) when not measured
    assert table.output_error is not None and table.learned_step is not None
    return write_npz(
        path,
        {
            "layer_names": np.array(table.layer_names),
            "format_names": np.array(table.format_names),
            "num_params": table.num_params,
            "bits": table.bits,
            "weight_bits": table.weight_bits,
            "size_bits": table.size_bits,
            "error_sq": table.error_sq,
            "weighted_error": table.weighted_error,
            "output_error": table.output_error,
            "learned_step": table.learned_step,
            "weight_formats": np.array(table.weight_formats),
            "activation_formats": np.array(table.activation_formats),
        },
    )


def load_candidates(path: Path) -> CandidateTable:
    arrays = read_npz(path, "candidate table (lcpaq analyze)")
    with reading(path):
        rows, columns = len(arrays["layer_names"]), len(arrays["format_names"])
        check_length(path, "num_params", arrays["num_params"], rows)
        check_length(path, "bits", arrays["bits"], columns)
        for key in ("weight_bits", "size_bits", "error_sq", "weighted_error"):
            check_length(path, key, arrays[key], rows)
            check_length(path, key, arrays[key], columns, axis=1)
        return _candidates(arrays)


def _candidates(arrays: Mapping[str, np.ndarray]) -> CandidateTable:
    return CandidateTable(
        layer_names=tuple(str(name) for name in arrays["layer_names"]),
        format_names=tuple(str(name) for name in arrays["format_names"]),
        num_params=arrays["num_params"],
        bits=arrays["bits"],
        weight_bits=arrays["weight_bits"],
        size_bits=arrays["size_bits"],
        error_sq=arrays["error_sq"],
        weighted_error=arrays["weighted_error"],
        # Tables written before (weight, activation) pairs lack these; the defaults fill them.
        weight_formats=tuple(str(name) for name in arrays.get("weight_formats", ())),
        activation_formats=tuple(str(name) for name in arrays.get("activation_formats", ())),
        output_error=arrays.get("output_error"),  # NaN-filled for older tables
        learned_step=arrays.get("learned_step"),
    )
