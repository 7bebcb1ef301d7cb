"""The activation sensitivity as data (`ActivationSensitivity`, what ``activations.npz`` holds) and
the scores it gives each (layer, activation format): numpy only. Measured by
`lcpaq.sensitivity.activation` (see its docstring for the math)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lcpaq.errors import InputError

ACTIVATION_SCORERS = ("trace", "diagonal")


@dataclass(frozen=True)
class ActivationSensitivity:
    """Curvature w.r.t. each layer's input activation and the noise of each activation format.

    Arrays are indexed [layer] or [layer, format] in ``layer_names`` × ``format_names`` order.
    ``trace[l]`` = mean over samples of tr(H_n) (one sample's activation block), ``trace_stderr`` its
    standard error over samples, ``num_elements[l]`` = n_a per sample (summed over calls of a layer
    that runs several times). ``noise[l, f]`` = mean squared quantization error per element,
    ``weighted[l, f]`` = mean_n Σ_k (H_n)_kk e_nk² (``weighted_stderr`` over samples).
    ``low``/``high`` are the observed min/max of each layer's input; ``clip_low``/``clip_high``
    [L, F] the range each format quantizes with (`range_of`), equal to them for ``minmax``.
    """

    layer_names: tuple[str, ...]
    format_names: tuple[str, ...]
    trace: np.ndarray
    trace_stderr: np.ndarray
    num_elements: np.ndarray
    noise: np.ndarray
    weighted: np.ndarray
    weighted_stderr: np.ndarray
    low: np.ndarray
    high: np.ndarray
    num_samples: int
    method: str
    symmetric: bool = False
    #: Per-sample tr(H_n) [N, L]: stability of the ranking, as for the weight traces.
    sample_traces: np.ndarray | None = None
    #: How each format's range was calibrated (`ACTIVATION_CLIPPINGS`) and the ranges [L, F]
    #: (None: every format uses the observed ``low``/``high``, as files from before clipping).
    clipping: str = "minmax"
    clip_low: np.ndarray | None = None
    clip_high: np.ndarray | None = None

    def range_of(self, row: int, format_name: str) -> tuple[float, float]:
        """The calibrated range of layer ``row``'s input for ``format_name``; a format the analysis
        did not measure gets the observed min-max range (its score has no activation term either)."""
        if (
            self.clip_low is not None
            and self.clip_high is not None
            and format_name in self.format_names
        ):
            column = self.format_names.index(format_name)
            return float(self.clip_low[row, column]), float(self.clip_high[row, column])
        return float(self.low[row]), float(self.high[row])


def activation_scores(sensitivity: ActivationSensitivity, scorer: str = "trace") -> np.ndarray:
    """[L, A] predicted loss increase of quantizing each layer's input with each activation format.

    ``trace``: ½·T_l·σ²_l(f) (the HAWQ-V2 form, as `lcpaq.allocation.frontier.hawq_v2_score` for weights);
    ``diagonal``: ½·mean_n Σ_k (H_n)_kk e_nk². Add it to the weight score of a (weight, activation)
    candidate: under the diagonal (per-layer) model the two perturbations add.
    """
    if scorer == "trace":
        return 0.5 * sensitivity.trace[:, None] * sensitivity.noise
    if scorer == "diagonal":
        return 0.5 * sensitivity.weighted
    raise InputError(
        f"unknown activation scorer {scorer!r}; known: {', '.join(ACTIVATION_SCORERS)}"
    )
