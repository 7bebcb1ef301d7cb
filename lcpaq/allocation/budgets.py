"""Budgets and tied layers: what the allocation must respect (allocate).

Input: the ``--budget METRIC=VALUE`` and ``--tie`` texts and the tie rule of the run. Output:
`Budget` limits on the metrics of `lcpaq.allocation.costs.COST_METRICS` and groups of layer names
that must share one format (`tie_units` maps them to the units the problem solves over).
Numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lcpaq.allocation.costs import ACTIVATION_METRICS, COST_METRICS
from lcpaq.errors import InputError

BUDGET_METRICS = COST_METRICS
TIE_RULES = ("none", "downsample")
#: A budget counts as binding when the allocation uses it up to this fraction.
BINDING_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Budget:
    """A hard limit on one metric of `lcpaq.allocation.costs.COST_METRICS`: ``avg-bits`` (weight bits per
    quantized parameter), ``size-mb`` (the whole checkpoint), ``size-frac`` (of the FP32 checkpoint),
    ``bitops-g`` / ``ebops-g`` (GBOPs per sample) or ``latency-ms``."""

    metric: str
    value: float

    def __str__(self) -> str:
        return f"{self.metric}={self.value:g}"


def counts_activation_bits(budgets: Sequence[str]) -> bool:
    """Whether one of the ``--budget`` texts counts activation bits (BitOps, EBOPs, latency)."""
    return any(parse_budget(text).metric in ACTIVATION_METRICS for text in budgets)


def parse_budget(text: str) -> Budget:
    """Parse ``avg-bits=3``, ``size-mb=0.12``, ``size-frac=0.25``, ``bitops-g=1.5``, …"""
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep:
        raise InputError(f"--budget {text!r}: expected METRIC=VALUE, e.g. avg-bits=3")
    if key not in BUDGET_METRICS:
        raise InputError(
            f"--budget {text!r}: unknown metric {key!r}; known: {', '.join(BUDGET_METRICS)}"
        )
    try:
        value = float(value_text)
    except ValueError:
        raise InputError(f"--budget {text!r}: {value_text!r} is not a number") from None
    if not np.isfinite(value) or value <= 0:
        raise InputError(f"--budget {text!r}: the value must be a positive number")
    return Budget(key, value)


def parse_tie(text: str) -> tuple[str, ...]:
    """Parse ``--tie layer1.0.conv1,layer1.0.conv2`` into layer names (at least two)."""
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if len(names) < 2:
        raise InputError(f"--tie {text!r}: give at least two layer names separated by commas")
    return names


def tie_rule_groups(layer_names: Sequence[str], rule: str) -> list[tuple[str, ...]]:
    """Layer groups a rule ties. ``none``: nothing. ``downsample``: a residual shortcut conv
    (a name with a ``downsample`` or ``shortcut`` component) shares the format of the first layer of
    its block (the same name prefix), which reads the same input (HAWQ's ResNet ties)."""
    if rule == "none":
        return []
    if rule != "downsample":
        raise InputError(f"unknown tie rule {rule!r}; known: {', '.join(TIE_RULES)}")
    groups: list[tuple[str, ...]] = []
    for name in layer_names:
        parts = name.split(".")
        marks = [k for k, part in enumerate(parts) if part in ("downsample", "shortcut")]
        if not marks:
            continue
        prefix = ".".join(parts[: marks[0]]) + "."
        partner = next(
            (other for other in layer_names if other.startswith(prefix) and other != name), None
        )
        if partner is not None:
            groups.append((partner, name))
    return groups


def tie_units(layer_names: Sequence[str], ties: Sequence[Sequence[str]]) -> np.ndarray:
    """Unit index per layer: tied layers (transitively) share one unit, numbered by first layer."""
    parent = list(range(len(layer_names)))

    def root(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for group in ties:
        indices = []
        for name in group:
            if name not in layer_names:
                raise InputError(f"cannot tie layer {name!r}: no such quantizable layer")
            indices.append(layer_names.index(name))
        for other in indices[1:]:
            a, b = sorted((root(indices[0]), root(other)))
            parent[b] = a
    roots = [root(k) for k in range(len(layer_names))]
    _, unit = np.unique(roots, return_inverse=True)
    return unit
