"""`CurvatureEstimate` flags and clamping (`lcpaq.sensitivity.curvature`)."""

from __future__ import annotations

import numpy as np

from lcpaq.sensitivity.curvature import CurvatureEstimate, flag_estimates


def test_flag_estimates() -> None:
    trace = np.array([-1.0, 0.0, 0.1, 0.2, 5.0, 1e-9])
    stderr = np.array([0.1, 0.1, 0.1, 0.1, 0.1, 0.0])
    assert flag_estimates(trace, stderr) == (
        "negative",
        "negative",
        "insignificant",
        "",  # exactly 2 standard errors is significant
        "",
        "",
    )


def test_clamped_trace_replaces_non_positive_values() -> None:
    trace = np.array([-1.0, 0.0, 2.0])
    estimate = CurvatureEstimate(
        layer_names=("a", "b", "c"),
        trace=trace,
        trace_stderr=np.zeros(3),
        num_samples=1,
        method="test",
        num_probes=0,
        flags=flag_estimates(trace, np.zeros(3)),
    )
    np.testing.assert_array_equal(estimate.clamped_trace(), [2e-12, 2e-12, 2.0])
    assert estimate.flags == ("negative", "negative", "")
