"""Hardware cost vectors per (layer, candidate) for the allocation budgets (METHOD §2). Numpy only.

Every budget metric is affine in the one-hot assignment: ``metric(choice) = Σ_l coef[l, choice_l] +
offset``. `CostModel` holds one ``[L, F]`` coefficient array and one offset per available metric, in the
metric's own unit, so the ILP, the Pareto pruning and the reports all read the same numbers.

Metrics (`COST_METRICS`):

- ``avg-bits``: n_l·b_w / Σ_l n_l (weight bits per quantized parameter).
- ``size-mb``: the stored checkpoint in MB = 10⁶ bytes: codes + scales + zero points
  (``CandidateTable.size_bits``) plus every unquantized tensor (the offset).
- ``size-frac``: the same size as a fraction of the FP32 checkpoint (``fp32_size_bits``).
- ``bitops-g``: GBOPs per input sample, MACs_l · b_w · b_a / 10⁹ (HAWQ-V3, LIMPQ).
- ``ebops-g``: HGQ's effective BOPs at layer-uniform bits, MACs_l · b̃_w · b̃_a / 10⁹, where b̃ counts
  magnitude bits only (HGQ does not count the sign): b̃_w = b_w − 1 for formats that store a sign bit
  (symmetric INT and every FP format), b_w otherwise; INT activations are taken as unsigned (after
  ReLU), b̃_a = b_a, FP activation formats store a sign bit, b̃_a = b_a − 1.
- ``latency-ms``: per-layer time for one sample, from a measured table (`load_latency_table`) or
  the roofline estimate max(MACs / peak(f), bytes / bandwidth) (`Roofline`); layers add up (an
  assumption: no overlap between layers).

Activation bits: one value per candidate, the width of its activation format
(``CandidateTable.activation_bits``; 8 when no activation formats were chosen, as before).
With activation formats they are also what the exported model quantizes each layer's input to;
without, activations stay FP32 at inference and the 8 bits are an assumption of the costs only.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lcpaq.allocation.table import CandidateTable
from lcpaq.errors import InputError

BITS_PER_MB = 8e6  # sizes are reported in MB = 10^6 bytes
COST_METRICS = ("avg-bits", "size-mb", "size-frac", "bitops-g", "ebops-g", "latency-ms")
#: The metrics that count activation bits (8 when no activation formats are chosen).
ACTIVATION_METRICS = ("bitops-g", "ebops-g", "latency-ms")


@dataclass(frozen=True)
class Roofline:
    """Roofline latency: max(MACs / peak(f), weight bytes / bandwidth) per layer and sample.

    ``peak_macs_per_s_8bit`` is the MAC rate at 8-bit operands; narrower operands run
    proportionally faster, peak(f) = peak_8bit · 8 / max(b_w, b_a) (as INT4 tensor cores do twice
    the INT8 rate). ``peak_macs_per_s`` overrides the rate per format name. Weight bytes are the
    stored codes and scales (``size_bits / 8``); activation traffic is not counted. Defaults are an
    edge-class accelerator: 1 TMAC/s at 8 bits, 100 GB/s.
    """

    peak_macs_per_s_8bit: float = 1e12
    bandwidth_bytes_per_s: float = 100e9
    peak_macs_per_s: Mapping[str, float] = field(default_factory=dict)

    def latency_ms(
        self,
        macs: np.ndarray,
        size_bits: np.ndarray,
        format_names: Sequence[str],
        weight_bits: np.ndarray,
        activation_bits: np.ndarray,
    ) -> np.ndarray:
        """[L, F] milliseconds from MACs [L], size bits [L, F], bit widths [F]."""
        widths = np.maximum(weight_bits, activation_bits).astype(float)
        peak = self.peak_macs_per_s_8bit * 8.0 / widths
        for column, name in enumerate(format_names):
            if name in self.peak_macs_per_s:
                peak[column] = self.peak_macs_per_s[name]
        compute = macs[:, None] / peak[None, :]
        memory = size_bits / 8.0 / self.bandwidth_bytes_per_s
        return 1e3 * np.maximum(compute, memory)


def shape_key(shape: Sequence[int]) -> str:
    """A layer shape as a latency-table key, e.g. ``64x64x3x3``."""
    return "x".join(str(int(size)) for size in shape)


def load_latency_table(path: str | Path) -> dict[str, dict[str, float]]:
    """Read measured per-layer latencies: ``{layer name or shape key: {format: ms}}``.

    CSV: a header with columns ``layer,format,ms`` (``layer`` is a layer name or a shape such as
    ``64x64x3x3``). JSON: ``{"layer1.0.conv1": {"int4": 0.12, ...}, "64x64x3x3": {...}}``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"latency table {str(path)!r} does not exist")
    table: dict[str, dict[str, float]] = {}
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text())
            for key, row in data.items():
                table[str(key)] = {str(name): float(value) for name, value in row.items()}
        else:
            with path.open(newline="") as handle:
                for record in csv.DictReader(handle):
                    layer, name = record["layer"].strip(), record["format"].strip()
                    table.setdefault(layer, {})[name] = float(record["ms"])
    except (KeyError, ValueError, TypeError, AttributeError, json.JSONDecodeError) as error:
        raise InputError(
            f"latency table {str(path)!r} is malformed ({error}); expected CSV columns "
            "layer,format,ms or JSON {layer: {format: ms}}"
        ) from None
    return table


@dataclass(frozen=True)
class CostModel:
    """Coefficients [L, F] and offsets per metric: metric(choice) = Σ_l coef[l, choice_l] + offset."""

    layer_names: tuple[str, ...]
    format_names: tuple[str, ...]
    coefficients: Mapping[str, np.ndarray]
    offsets: Mapping[str, float]

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(metric for metric in COST_METRICS if metric in self.coefficients)

    def require(self, metric: str) -> None:
        if metric not in self.coefficients:
            needs = {
                "size-frac": "the FP32 size of the model (fp32_size_bits)",
                "bitops-g": "MACs per layer",
                "ebops-g": "MACs per layer",
                "latency-ms": "MACs per layer or a latency table",
            }.get(metric, "a cost model")
            raise InputError(f"budget metric {metric!r} needs {needs}, which was not given")

    def value(self, metric: str, choice: np.ndarray) -> float:
        """The metric of an assignment given as a format index per layer."""
        self.require(metric)
        rows = np.arange(len(choice))
        return float(self.coefficients[metric][rows, choice].sum() + self.offsets[metric])

    def values(self, choice: np.ndarray) -> dict[str, float]:
        return {metric: self.value(metric, choice) for metric in self.metrics}


def build_cost_model(
    table: CandidateTable,
    *,
    constant_size_bits: float = 0.0,
    fp32_size_bits: float | None = None,
    macs_per_sample: np.ndarray | None = None,
    weight_shapes: Sequence[Sequence[int]] | None = None,
    activation_bits: float | np.ndarray | None = None,
    weight_sign_bits: np.ndarray | None = None,
    activation_sign_bits: np.ndarray | None = None,
    latency_table: Mapping[str, Mapping[str, float]] | None = None,
    roofline: Roofline | None = None,
) -> CostModel:
    """Cost coefficients for a `CandidateTable`.

    Args:
        table: the candidate table (``num_params``, ``bits``, ``weight_bits``, ``size_bits``).
        constant_size_bits: size of every unquantized tensor (biases, BatchNorm, …).
        fp32_size_bits: size of the FP32 checkpoint; enables ``size-frac``.
        macs_per_sample: [L] MACs per input sample; enables ``bitops-g``, ``ebops-g`` and the
            roofline ``latency-ms``.
        weight_shapes: [L] weight shapes, for latency-table lookups by shape.
        activation_bits: activation bits per candidate (scalar or [F]); default: the table's
            ``activation_bits`` (its activation formats; 8 bits without them).
        weight_sign_bits: [F] 1 where the format stores a sign bit (EBOPs does not count it);
            default 0 (asymmetric unsigned INT codes).
        activation_sign_bits: [F] the same for the activation format; default: the table's
            ``activation_sign_bits`` (1 for FP activation formats), else 0.
        latency_table: measured ms per layer name or shape key and format (`load_latency_table`).
        roofline: peak rates for the roofline estimate used when no table is given.
    """
    names = tuple(table.layer_names)
    formats = tuple(table.format_names)
    num_params = np.asarray(table.num_params, dtype=np.float64)
    bits = np.asarray(table.bits, dtype=np.float64)
    size_bits = np.asarray(table.size_bits, dtype=np.float64)
    weight_bits = np.asarray(table.weight_bits, dtype=np.float64)
    if activation_bits is None:
        activation_bits = table.activation_bits
    if activation_sign_bits is None:
        activation_sign_bits = table.activation_sign_bits
    act = np.broadcast_to(np.asarray(activation_bits, dtype=np.float64), bits.shape)
    act_sign = np.broadcast_to(np.asarray(activation_sign_bits, dtype=np.float64), bits.shape)
    if np.any(act <= 0):
        raise InputError("activation bits must be positive")
    coefficients: dict[str, np.ndarray] = {
        "avg-bits": weight_bits / num_params.sum(),
        "size-mb": size_bits / BITS_PER_MB,
    }
    offsets = {"avg-bits": 0.0, "size-mb": constant_size_bits / BITS_PER_MB}
    if fp32_size_bits is not None:
        coefficients["size-frac"] = size_bits / fp32_size_bits
        offsets["size-frac"] = constant_size_bits / fp32_size_bits
    if macs_per_sample is not None:
        macs = np.asarray(macs_per_sample, dtype=float)
        if macs.shape != (len(names),):
            raise ValueError(f"macs_per_sample has shape {macs.shape}, expected ({len(names)},)")
        coefficients["bitops-g"] = macs[:, None] * (bits * act)[None, :] / 1e9
        sign = np.zeros_like(bits) if weight_sign_bits is None else np.asarray(weight_sign_bits)
        coefficients["ebops-g"] = macs[:, None] * ((bits - sign) * (act - act_sign))[None, :] / 1e9
        offsets["bitops-g"] = offsets["ebops-g"] = 0.0
    if latency_table is not None:
        coefficients["latency-ms"] = measured_latency(names, formats, latency_table, weight_shapes)
        offsets["latency-ms"] = 0.0
    elif macs_per_sample is not None:
        coefficients["latency-ms"] = (roofline or Roofline()).latency_ms(
            np.asarray(macs_per_sample, dtype=float), size_bits, formats, bits, act
        )
        offsets["latency-ms"] = 0.0
    return CostModel(names, formats, coefficients, offsets)


def measured_latency(
    names: Sequence[str],
    formats: Sequence[str],
    latency_table: Mapping[str, Mapping[str, float]],
    weight_shapes: Sequence[Sequence[int]] | None,
) -> np.ndarray:
    """[L, F] ms of every layer (looked up by name, then by weight shape) and format."""
    latency = np.zeros((len(names), len(formats)))
    for row, name in enumerate(names):
        keys = [name] + ([shape_key(weight_shapes[row])] if weight_shapes is not None else [])
        entry = next((latency_table[key] for key in keys if key in latency_table), None)
        for column, fmt in enumerate(formats):
            if entry is None or fmt not in entry:
                raise InputError(
                    f"latency table has no entry for layer {name!r} ("
                    f"{' or '.join(keys[1:]) or 'no shape given'}) and format {fmt!r}"
                )
            latency[row, column] = entry[fmt]
    return latency
