"""Proxy scores: how far a quantized model's outputs are from the FP32 model's.

Input: the FP32 model and the proxy slice of the calibration data (`lcpaq.search.slices`).
Output: per-slice sums that add up over growing rungs, and the proxy value (lower is better)
that Optuna minimises and prunes on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lcpaq.errors import InputError
from lcpaq.model.data import Dataset

PROXIES = ("kl", "loss", "sqnr")
#: Images per forward pass when computing logits.
_EVAL_BATCH = 256


@dataclass
class ProxyScorer:
    """Per-sample sums of the proxy on the proxy slice; FP32 outputs are computed once.

    kl: mean KL(p_FP ‖ p_Q) (label-free); loss: mean cross-entropy of the quantized model;
    sqnr: −10·log10(Σ‖y‖² / Σ‖y − ŷ‖²) of the logits (negated so that lower is better).
    """

    kind: str
    inputs: torch.Tensor
    labels: torch.Tensor
    fp_logits: torch.Tensor

    @classmethod
    def build(cls, kind: str, model: nn.Module, data: Dataset) -> ProxyScorer:
        if kind not in PROXIES:
            raise InputError(f"--proxy must be one of {', '.join(PROXIES)}, got {kind!r}")
        return cls(kind, data.inputs, data.labels, _logits(model, data.inputs))

    def sums(self, model: nn.Module, start: int, stop: int) -> np.ndarray:
        """[2] sums over images [start, stop) of the slice (numerator, denominator for sqnr)."""
        logits = _logits(model, self.inputs[start:stop])
        reference = self.fp_logits[start:stop]
        if self.kind == "kl":
            log_p = torch.log_softmax(reference, dim=1)
            log_q = torch.log_softmax(logits, dim=1)
            kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
            return np.array([float(kl.sum()), 0.0])
        if self.kind == "loss":
            loss = torch.nn.functional.cross_entropy(
                logits, self.labels[start:stop], reduction="sum"
            )
            return np.array([float(loss), 0.0])
        signal = float(reference.pow(2).sum())
        noise = float((reference - logits).pow(2).sum())
        return np.array([signal, noise])

    def value(self, sums: np.ndarray, count: int) -> float:
        if self.kind == "sqnr":
            return -10.0 * math.log10(sums[0] / max(sums[1], 1e-300))
        return float(sums[0] / count)


@torch.no_grad()
def _logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    model.eval()
    parts = [
        model(inputs[start : start + _EVAL_BATCH]) for start in range(0, len(inputs), _EVAL_BATCH)
    ]
    return torch.cat(parts).double()
