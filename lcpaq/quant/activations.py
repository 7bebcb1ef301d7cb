"""Static activation quantization at inference: calibrated ranges and the hooks that apply them.

An activation format (a `lcpaq.quant.formats` name, or fp32/fp16/bf16 for a cast) quantizes a
layer's input with one per-tensor scale fixed beforehand from calibration statistics: the
observed min/max of that input over the calibration set (`range_statistics`), optionally clipped to
the range with the least squared error (`clipped_ranges`, `activation_mse_range`).
`fake_quantize_activation` is Q(a) on such a range; an `ActivationQuantizer` holds one layer's
format and range, and `attach_activation_quantizers` applies them as forward pre-hooks on a model.
`lcpaq.sensitivity.activation` measures the loss increase of the same Q(a), so the predicted and
the applied perturbation agree. Formulas follow METHOD §0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from lcpaq.errors import InputError
from lcpaq.model.graph import LayerInfo, get_module, model_device
from lcpaq.quant.formats import FORMATS, NumberFormat, QuantScheme, get_format
from lcpaq.quant.grids import round_to_grid
from lcpaq.quant.rounding import mse_ranges, round_trip, scale_and_zero

#: Activation "formats" that stay floating point: their noise is that of a dtype cast (0 for fp32).
FLOAT_ACTIVATIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: How a layer's input range is calibrated: observed min/max, or the MSE-optimal clipping.
ACTIVATION_CLIPPINGS = ("minmax", "mse")
#: Values of each layer's input kept per calibration batch for the MSE range search.
RANGE_SAMPLE_PER_BATCH = 16384


def check_activation_formats(format_names: Sequence[str]) -> tuple[str, ...]:
    for name in format_names:
        if name not in FORMATS and name not in FLOAT_ACTIVATIONS:
            known = ", ".join([*FORMATS, *FLOAT_ACTIVATIONS])
            raise InputError(f"unknown activation format {name!r}; known formats: {known}")
    return tuple(format_names)


def quantize_activation(
    values: torch.Tensor, format_name: str, low: float, high: float, *, symmetric: bool = False
) -> torch.Tensor:
    """Q(a) for one activation format with the calibration range [low, high]."""
    if format_name in FLOAT_ACTIVATIONS:
        return values.to(FLOAT_ACTIVATIONS[format_name]).to(values.dtype)
    return fake_quantize_activation(values, get_format(format_name), low, high, symmetric=symmetric)


# ---------------------------------------------------------------------------------------------
# Static activation quantization at inference.


@dataclass(frozen=True)
class ActivationQuantizer:
    """Static quantization of one layer's input: every call maps the input onto the grid fixed by
    the calibration range [``low``, ``high``] (values outside saturate), the same Q(a) whose noise
    `lcpaq.sensitivity.activation.activation_sensitivity` measured, so the predicted and the applied perturbation agree."""

    format_name: str
    low: float
    high: float
    symmetric: bool = False

    def __post_init__(self) -> None:
        check_activation_formats([self.format_name])
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low > self.high:
            raise InputError(
                f"activation range [{self.low}, {self.high}] of format {self.format_name} is not "
                "a finite interval"
            )

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        return quantize_activation(
            values, self.format_name, self.low, self.high, symmetric=self.symmetric
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "format": self.format_name,
            "low": self.low,
            "high": self.high,
            "symmetric": self.symmetric,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> ActivationQuantizer:
        """Read `to_dict`'s output; ``where`` names the file and layer in the error."""
        try:
            return cls(
                format_name=str(data["format"]),
                low=float(data["low"]),
                high=float(data["high"]),
                symmetric=bool(data.get("symmetric", False)),
            )
        except InputError as error:
            raise InputError(f"{where}: {error}") from None
        except (KeyError, TypeError, ValueError) as error:
            raise InputError(f"{where}: bad activation quantizer {data!r} ({error})") from None


class CalibratedRanges(Protocol):
    """The calibrated input ranges of analysed layers, as ``analyze --act-formats`` measured them
    (`lcpaq.sensitivity.activation.ActivationSensitivity`)."""

    @property
    def layer_names(self) -> tuple[str, ...]: ...

    @property
    def symmetric(self) -> bool: ...

    def range_of(self, row: int, format_name: str) -> tuple[float, float]: ...


def activation_quantizers(
    sensitivity: CalibratedRanges, formats_by_layer: Mapping[str, str]
) -> dict[str, ActivationQuantizer]:
    """The quantizer of every layer whose activation format is not fp32, with the calibration
    range ``analyze --act-formats`` measured for that layer."""
    rows = {name: row for row, name in enumerate(sensitivity.layer_names)}
    quantizers = {}
    for name, format_name in formats_by_layer.items():
        if format_name == "fp32":
            continue
        if name not in rows:
            raise InputError(
                f"layer {name!r} has no activation range in activations.npz (analysed layers: "
                f"{', '.join(sensitivity.layer_names)})"
            )
        low, high = sensitivity.range_of(rows[name], format_name)
        quantizers[name] = ActivationQuantizer(format_name, low, high, sensitivity.symmetric)
    return quantizers


def attach_activation_quantizers(
    model: nn.Module, quantizers: Mapping[str, ActivationQuantizer]
) -> list[torch.utils.hooks.RemovableHandle]:
    """Quantize each named layer's input on every forward pass (a forward pre-hook, so the state
    dict and the module tree stay those of the FP32 model). Returns the handles that undo it."""
    return [
        get_module(model, name).register_forward_pre_hook(_QuantizeInput(quantizer))
        for name, quantizer in quantizers.items()
    ]


@dataclass(frozen=True)
class _QuantizeInput:
    """The pre-hook itself: a module-level class, so a model with its hooks still pickles
    (``torch.save(model)``, ``copy.deepcopy``)."""

    quantizer: ActivationQuantizer

    def __call__(
        self, _module: nn.Module, args: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, ...]:
        return (self.quantizer(args[0]), *args[1:])


# ---------------------------------------------------------------------------------------------
# Pass 1: per-tensor ranges of every layer's input.


def _input_hooks(
    modules: dict[str, nn.Module], record: dict[str, list[torch.Tensor]]
) -> list[torch.utils.hooks.RemovableHandle]:
    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            record.setdefault(name, []).append(args[0].detach())

        return hook

    return [module.register_forward_pre_hook(hook_for(name)) for name, module in modules.items()]


def batch_ranges(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    inputs: torch.Tensor,
    *,
    keep: int = 0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Min and max of each layer's input over one batch (all calls), float64 [L] each, and
    ``keep`` values of each layer's input drawn uniformly (with replacement; a CPU generator
    seeded with ``seed``, so any process draws the same values for the same batch)."""
    model.eval()
    modules = {layer.name: get_module(model, layer.name) for layer in layers}
    record: dict[str, list[torch.Tensor]] = {}
    handles = _input_hooks(modules, record)
    try:
        with torch.no_grad():
            model(inputs.to(model_device(model)))
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in modules if name not in record]
    if missing:
        raise ValueError(f"layer {missing[0]!r} did not run in the forward pass")
    low = np.array([min(float(t.min()) for t in record[name]) for name in modules])
    high = np.array([max(float(t.max()) for t in record[name]) for name in modules])
    samples = []
    if keep:
        generator = torch.Generator().manual_seed(seed)
        for name in modules:
            values = torch.cat([t.flatten() for t in record[name]])
            index = torch.randint(len(values), (keep,), generator=generator)
            samples.append(values[index.to(values.device)].double().cpu().numpy())
    return low, high, samples


def range_statistics(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    indexed_batches: Sequence[tuple[int, torch.Tensor]],
    *,
    keep: int = 0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, list[list[np.ndarray]]]:
    """Min, max and (``keep`` > 0) per-batch value samples [batch][layer] of every layer's input
    over (batch index, batch) pairs; batch ``i`` draws its sample with seed ``seed + i``."""
    low = np.full(len(layers), np.inf)
    high = np.full(len(layers), -np.inf)
    samples = []
    for index, inputs in indexed_batches:
        batch_low, batch_high, batch_samples = batch_ranges(
            model, layers, inputs, keep=keep, seed=seed + index
        )
        low, high = np.minimum(low, batch_low), np.maximum(high, batch_high)
        samples.append(batch_samples)
    return low, high, samples


def range_sample_size(clipping: str) -> int:
    """Values kept per layer and batch: the MSE range search needs a sample, min-max none."""
    return RANGE_SAMPLE_PER_BATCH if clipping == "mse" else 0


def clipped_ranges(
    low: np.ndarray,
    high: np.ndarray,
    samples: Sequence[Sequence[np.ndarray]],
    format_names: Sequence[str],
    clipping: str,
    *,
    symmetric: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """[L, F] range of each layer's input for each format: the observed [low, high]
    (``minmax``) or the range minimising the squared quantization error over the sampled values
    (``mse``, `activation_mse_range`; floating-point casts need no range)."""
    if clipping not in ACTIVATION_CLIPPINGS:
        raise InputError(
            f"unknown activation clipping {clipping!r}; known: {', '.join(ACTIVATION_CLIPPINGS)}"
        )
    clip_low = np.repeat(np.asarray(low, dtype=np.float64)[:, None], len(format_names), axis=1)
    clip_high = np.repeat(np.asarray(high, dtype=np.float64)[:, None], len(format_names), axis=1)
    if clipping == "minmax":
        return clip_low, clip_high
    for row in range(len(low)):
        sample = torch.from_numpy(np.concatenate([batch[row] for batch in samples]))
        for column, format_name in enumerate(format_names):
            if format_name in FLOAT_ACTIVATIONS:
                continue
            clip_low[row, column], clip_high[row, column] = activation_mse_range(
                sample, get_format(format_name), low[row], high[row], symmetric=symmetric
            )
    return clip_low, clip_high


def activation_mse_range(
    sample: torch.Tensor, fmt: NumberFormat, low: float, high: float, *, symmetric: bool = False
) -> tuple[float, float]:
    """The per-tensor activation range that minimises the squared error of
    `fake_quantize_activation` over ``sample`` (values of one layer's input), searched over ratios
    of the observed range [``low``, ``high``] as the MSE weight clipping is (METHOD §0), on a 4x
    finer grid: one tensor per layer makes the search cheap, and its error is not smooth in the
    ratio."""
    scheme = QuantScheme(
        symmetric=symmetric, granularity="tensor", clipping="mse", mse_grid_points=400
    )
    # Ratios of the observed range, which a sample may fall short of: ratio 1 is min-max.
    bounds = torch.tensor([[low], [high]], dtype=torch.float64, device=sample.device)
    values = sample.flatten().double()[None]
    clip_low, clip_high = mse_ranges(values, fmt, scheme, (bounds[0], bounds[1]))
    return float(clip_low[0]), float(clip_high[0])


def fake_quantize_activation(
    values: torch.Tensor, fmt: NumberFormat, low: float, high: float, *, symmetric: bool = False
) -> torch.Tensor:
    """Quantize then dequantize activations with one per-tensor scale fixed beforehand.

    Static activation quantization (METHOD §0): [``low``, ``high``] comes from calibration
    statistics, not from ``values``, so every batch is mapped onto the same grid and values outside
    the range saturate. INT is asymmetric by default (with ``low`` = 0 after a ReLU every code is
    used); minifloats are scaled so that max(|low|, |high|) maps to the format's largest value.
    The arithmetic is float64 for float64 values and float32 otherwise (5x faster than float64 on
    a CPU for INT; the grid is the same, only values within float32 rounding of a decision
    boundary can land on the neighbouring code).
    """
    scale, zero = activation_scale_and_zero(fmt, low, high, symmetric=symmetric)
    dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    computed = values.to(dtype)
    scales = torch.tensor([scale], dtype=dtype, device=values.device)
    if fmt.kind == "fp":  # the values only: no codes to store
        dequantized = round_to_grid(computed / scales, fmt) * scales
    else:
        zeros = torch.tensor([zero], dtype=dtype, device=values.device)
        scheme = QuantScheme(symmetric=symmetric, granularity="tensor", clipping="minmax")
        _, dequantized = round_trip(computed, scales, zeros, fmt, scheme)
    return dequantized.to(values.dtype)


def activation_scale_and_zero(
    fmt: NumberFormat, low: float, high: float, *, symmetric: bool = False
) -> tuple[float, float]:
    """The scale and zero point (float64; 0 for minifloats and symmetric INT) that
    `fake_quantize_activation` uses for the calibration range [``low``, ``high``]."""
    scheme = QuantScheme(symmetric=symmetric, granularity="tensor", clipping="minmax")
    bounds = torch.tensor([low, high], dtype=torch.float64)
    scale, zero = scale_and_zero(bounds[:1], bounds[1:], fmt, scheme)
    return float(scale[0]), float(zero[0])
