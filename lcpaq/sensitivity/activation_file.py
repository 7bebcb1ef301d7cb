"""``activations.npz``: the activation sensitivity of `lcpaq.sensitivity.activation` as a run-folder
file (written by analyze, read by allocate, export and the search)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lcpaq import runfolder
from lcpaq.sensitivity.activation import ActivationSensitivity, activation_scores

#: The artifact: the per-layer arrays of ``activations.npz``, in the order the file stores them.
_LAYER_ARRAYS = (
    "trace",
    "trace_stderr",
    "num_elements",
    "noise",
    "weighted",
    "weighted_stderr",
    "low",
    "high",
)
#: Arrays only newer analyses have (None in the dataclass when absent).
_OPTIONAL_ARRAYS = ("sample_traces", "clip_low", "clip_high")


def save_activation_sensitivity(path: Path, sensitivity: ActivationSensitivity) -> Path:
    """Write ``activations.npz`` (atomically)."""
    meta = {
        "num_samples": sensitivity.num_samples,
        "method": sensitivity.method,
        "symmetric": sensitivity.symmetric,
        "clipping": sensitivity.clipping,
    }
    arrays = {
        "layer_names": np.array(sensitivity.layer_names),
        "format_names": np.array(sensitivity.format_names),
        **{name: getattr(sensitivity, name) for name in _LAYER_ARRAYS},
        "scores": activation_scores(sensitivity),
        "meta": np.array(json.dumps(meta)),
    }
    for name in _OPTIONAL_ARRAYS:
        if getattr(sensitivity, name) is not None:
            arrays[name] = getattr(sensitivity, name)
    return runfolder.write_npz(path, arrays)


def load_activation_sensitivity(path: Path) -> ActivationSensitivity:
    arrays = runfolder.read_npz(path, "activation sensitivity (lcpaq analyze --act-formats)")
    meta = json.loads(str(arrays["meta"]))
    return ActivationSensitivity(
        layer_names=tuple(str(name) for name in arrays["layer_names"]),
        format_names=tuple(str(name) for name in arrays["format_names"]),
        **{name: arrays[name] for name in _LAYER_ARRAYS},
        num_samples=int(meta["num_samples"]),
        method=str(meta["method"]),
        symmetric=bool(meta["symmetric"]),
        clipping=str(meta.get("clipping", "minmax")),
        sample_traces=arrays.get("sample_traces"),
        clip_low=arrays.get("clip_low"),
        clip_high=arrays.get("clip_high"),
    )
