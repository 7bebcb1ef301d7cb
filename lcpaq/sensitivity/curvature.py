"""The result type of every per-layer curvature estimator: `CurvatureEstimate`.

Written by `lcpaq.sensitivity.gauss_newton` and `lcpaq.sensitivity.hutchinson` in the analyze stage,
saved as ``curvature.npz`` (and ``hutchinson.npz`` for the cross-check) by `lcpaq.runfolder`, read by
the candidate scores, the report and the search.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class CurvatureEstimate:
    """Per-layer trace of the Hessian (or Gauss–Newton) block of the mean calibration loss.

    ``trace[l]`` and ``trace_stderr[l]`` refer to ``layer_names[l]``. ``diagonal`` maps a layer name to
    the per-element diagonal (weight-shaped, float32) when the estimator provides it.
    ``flags[l]`` is ``""``, ``"negative"`` (estimate ≤ 0, clamped when scoring) or
    ``"insignificant"`` (|estimate| < 2 standard errors).
    """

    layer_names: tuple[str, ...]
    trace: np.ndarray
    trace_stderr: np.ndarray
    num_samples: int
    method: str
    num_probes: int
    flags: tuple[str, ...]
    diagonal: dict[str, np.ndarray] = field(default_factory=dict)
    #: Per-sample trace contributions [N, L] (exact estimators only): ranking stability, bootstrap.
    sample_traces: np.ndarray | None = None
    #: Probes spent on each layer (single-layer Hutchinson only).
    probes_per_layer: np.ndarray | None = None

    def clamped_trace(self) -> np.ndarray:
        """Traces with non-positive values replaced by 1e-12 × the largest (METHOD §1a)."""
        floor = 1e-12 * max(float(self.trace.max()), 1e-30)
        return np.maximum(self.trace, floor)


def flag_estimates(trace: np.ndarray, stderr: np.ndarray) -> tuple[str, ...]:
    """`CurvatureEstimate.flags` for these traces and their standard errors."""
    flags = []
    for value, error in zip(trace, stderr):
        if value <= 0:
            flags.append("negative")
        elif abs(value) < 2 * error:
            flags.append("insignificant")
        else:
            flags.append("")
    return tuple(flags)
