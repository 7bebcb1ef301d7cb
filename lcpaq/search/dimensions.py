"""The searched dimensions: each sets documented `RunConfig` fields of the pipeline.

Input: a `RunConfig` and a value of one dimension (an Optuna choice, or ``--fix NAME=VALUE`` text
through the dimension's ``parse``). Output: the `RunConfig` with that dimension's fields set.
The search never varies search-only knobs, so every configuration is one ``lcpaq run`` accepts;
docs/05-search.md says why each dimension and its choices are there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from lcpaq.allocation.budgets import parse_budget
from lcpaq.allocation.frontier import SCORERS
from lcpaq.allocation.table import parse_activation_formats
from lcpaq.config import DEFAULT_FORMATS, RecoveryConfig, RunConfig
from lcpaq.errors import InputError
from lcpaq.quant.formats import parse_format_list

#: Candidate format sets (``--formats`` of the pipeline). Every set holds int2 (so budgets down to
#: 2 average bits stay feasible) and int8 (``--first-last keep-8bit`` needs it).
FORMAT_SETS: dict[str, str] = {
    "int": DEFAULT_FORMATS,
    "int-pow2": "int2,int4,int8",
    "int-all": "int2,int3,int4,int5,int6,int7,int8",
    "int+fp4": DEFAULT_FORMATS + ",fp4_e2m1",
    "int+fp": DEFAULT_FORMATS + ",fp4_e2m1,fp6_e2m3,fp6_e3m2,fp8_e4m3",
}
#: ``--granularity`` / ``--group-size``.
GRANULARITY_CHOICES: dict[str, tuple[str, int]] = {
    "tensor": ("tensor", 128),
    "channel": ("channel", 128),
    "group32": ("group", 32),
    "group64": ("group", 64),
    "group128": ("group", 128),
}
#: ``--clipping`` / ``--percentile``.
CLIPPING_CHOICES: dict[str, tuple[str, float]] = {
    "mse": ("mse", 99.9),
    "minmax": ("minmax", 99.9),
    "p99": ("percentile", 99.0),
    "p99.9": ("percentile", 99.9),
    "p99.99": ("percentile", 99.99),
}
#: ``--act-formats`` sets: "none" keeps activations in FP32 (the cost models assume 8 bits); a
#: single format quantizes every layer input to it; several let the ILP trade them (BitOps,
#: EBOPs and latency budgets count activation bits; avg-bits and size do not).
ACTIVATION_SETS: dict[str, tuple[str, ...]] = {
    "none": (),
    "int8": ("int8",),
    "fp8": ("fp8_e4m3",),
    "int4-8": ("int4", "int6", "int8"),
    "int8+fp8": ("int8", "fp8_e4m3"),
}
#: Rounding choices: (rounding, GPTQ dampening).
ROUNDING_CHOICES: dict[str, tuple[str, float]] = {
    "nearest": ("nearest", 0.01),
    "gptq": ("gptq", 0.01),
    "gptq-damp0.1": ("gptq", 0.1),
}


@dataclass(frozen=True)
class Dimension:
    """One searched option: Optuna parameter ``name`` over ``choices``; ``apply`` writes a value
    into a RunConfig (the fields named in ``option``); ``parse`` reads a ``--fix`` value."""

    name: str
    choices: tuple[Any, ...]
    default: Any
    option: str
    apply: Callable[[RunConfig, Any], RunConfig]
    parse: Callable[[str], Any]
    why: str = ""
    #: Optional dimensions stay at their default unless ``--also NAME`` asks for them.
    optional: bool = False
    #: The dimension changes what the budgets count (bits, BitOps, size), so it can make a
    #: configuration that does not fit the budgets fit (`lcpaq.search.start`).
    changes_costs: bool = False


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise InputError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise InputError(f"expected a whole number >= 1, got {value}")
    return value


def _choice_text(choices: Mapping[str, object]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise InputError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return parse


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered not in ("true", "false"):
        raise InputError(f"expected true or false, got {text!r}")
    return lowered == "true"


def _scheme(config: RunConfig, **changes: Any) -> RunConfig:
    return config.with_analysis(scheme=replace(config.analysis.scheme, **changes))


def _apply_granularity(config: RunConfig, value: str) -> RunConfig:
    granularity, group_size = GRANULARITY_CHOICES[value]
    return _scheme(config, granularity=granularity, group_size=group_size)


def _apply_clipping(config: RunConfig, value: str) -> RunConfig:
    clipping, percentile = CLIPPING_CHOICES[value]
    return _scheme(config, clipping=clipping, percentile=percentile)


def _apply_activations(config: RunConfig, value: str) -> RunConfig:
    return config.with_analysis(act_formats=ACTIVATION_SETS.get(value) or _activation_list(value))


def _activation_list(text: str) -> tuple[str, ...]:
    return () if text == "none" else parse_activation_formats(text)


def _parse_activations(text: str) -> str:
    if text not in ACTIVATION_SETS:
        _activation_list(text)  # validates a format list
    return text


def _apply_rounding(config: RunConfig, value: str) -> RunConfig:
    rounding, damp = ROUNDING_CHOICES[value]
    return _scheme(config, rounding=rounding, gptq_damp=damp)


def _apply_formats(config: RunConfig, value: str) -> RunConfig:
    return config.with_analysis(formats=parse_format_list(FORMAT_SETS.get(value, value)))


def _parse_formats(text: str) -> str:
    parse_format_list(FORMAT_SETS.get(text, text))  # validates a set name or a format list
    return text


def _apply_correction(config: RunConfig, value: str) -> RunConfig:
    if value == "off":
        return replace(config, recovery=RecoveryConfig(enabled=False))
    return replace(config, recovery=RecoveryConfig(enabled=True, num_samples=int(value)))


def _parse_correction(text: str) -> str:
    return "off" if text == "off" else str(_positive_int(text))


def _apply_cost_weight(config: RunConfig, value: float) -> RunConfig:
    """λ on the first budget's metric (METHOD §4): the objective adds λ·cost/budget, trading
    predicted loss against staying below the budget."""
    budgets = config.allocation.budgets
    if not value or not budgets:
        return config.with_allocation(cost_weights=())
    metric = parse_budget(budgets[0]).metric
    return config.with_allocation(cost_weights=((metric, float(value)),))


def _parse_weight(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"expected a number >= 0, got {text!r}") from None
    if not 0 <= value < math.inf:
        raise InputError(f"expected a finite number >= 0, got {text!r}")
    return value


def _apply_estimator(config: RunConfig, value: str) -> RunConfig:
    if value == "gauss-newton":
        return config.with_analysis(estimator="gauss-newton", hutchinson_probes=0)
    return config.with_analysis(estimator="hutchinson", hutchinson_probes=int(value.split("-")[1]))


def _parse_estimator(text: str) -> str:
    if text == "gauss-newton":
        return text
    name, _, probes = text.partition("-")
    if name != "hutchinson" or not probes.isdigit() or int(probes) < 2:
        raise InputError(f"expected gauss-newton or hutchinson-N (N >= 2 probes), got {text!r}")
    return text


#: ``--pairwise`` / ``--pair-window`` (Gauss-Newton cross terms, the cheapest exact source).
PAIRWISE_CHOICES: dict[str, int] = {"none": 0, "gn-w1": 1, "gn-w2": 2, "gn-w3": 3}


def _apply_pairwise(config: RunConfig, value: str) -> RunConfig:
    """Inter-layer terms on or off, and their window. The default augmented score takes no cost
    weights, so with a cost weight the terms enter the ILP exactly, negative ones clipped (the
    exact form that lost least in the ResNet20 ablation of docs/results.md)."""
    if value == "none":
        return config.with_analysis(pairwise="none")
    config = config.with_analysis(
        pairwise="gauss-newton", pair_rule="window", pair_window=PAIRWISE_CHOICES[value]
    )
    if config.allocation.cost_weights:
        config = config.with_allocation(pairwise_mode="ilp", pair_clip="negative")
    return config


def default_dimensions() -> tuple[Dimension, ...]:
    """The searched options, in the order Optuna suggests them (docs/05-search.md says why)."""
    return (*_scheme_dimensions(), *_allocation_dimensions(), *_optional_dimensions())


def _scheme_dimensions() -> tuple[Dimension, ...]:
    """Curvature samples and how weights are quantized (scheme and candidate formats)."""
    return (
        Dimension(
            "num_samples",
            (128, 256, 512, 1024),
            256,
            "analysis.num_samples (--num-samples)",
            lambda config, value: config.with_analysis(num_samples=int(value)),
            _positive_int,
            "curvature SE shrinks as 1/sqrt(N); each value costs one curvature pass",
        ),
        Dimension(
            "clipping",
            tuple(CLIPPING_CHOICES),
            "mse",
            "analysis.scheme.clipping/percentile (--clipping, --percentile)",
            _apply_clipping,
            _choice_text(CLIPPING_CHOICES),
            "min-max, MSE-optimal or percentile ranges",
        ),
        Dimension(
            "symmetric",
            (False, True),
            False,
            "analysis.scheme.symmetric (--symmetric)",
            lambda config, value: _scheme(config, symmetric=bool(value)),
            _boolean,
            "zero points cost 16 bits per scale group but fit skewed channels",
            changes_costs=True,
        ),
        Dimension(
            "granularity",
            tuple(GRANULARITY_CHOICES),
            "channel",
            "analysis.scheme.granularity/group_size (--granularity, --group-size)",
            _apply_granularity,
            _choice_text(GRANULARITY_CHOICES),
            "finer scales cut the error but cost scale bits",
            changes_costs=True,
        ),
        Dimension(
            "rounding",
            tuple(ROUNDING_CHOICES),
            "gptq",
            "analysis.scheme.rounding/gptq_damp (--rounding, --gptq-damp)",
            _apply_rounding,
            _choice_text(ROUNDING_CHOICES),
            "round to nearest, or GPTQ's error-compensating rounding on the curvature images",
        ),
        Dimension(
            "formats",
            tuple(FORMAT_SETS),
            "int",
            "analysis.formats (--formats)",
            _apply_formats,
            _parse_formats,
            "INT-only and INT+FP candidate sets",
            changes_costs=True,
        ),
    )


def _allocation_dimensions() -> tuple[Dimension, ...]:
    """How the allocation scores and constrains candidates, and the statistics correction."""
    return (
        Dimension(
            "first_last",
            ("search", "keep-8bit"),
            "search",
            "allocation.first_last (--first-last)",
            lambda config, value: config.with_allocation(first_last=value),
            _choice_text({"search": 0, "keep-8bit": 0}),
            "fixing the first and last layer at INT8 is common practice",
            changes_costs=True,
        ),
        Dimension(
            "scorer",
            ("hawq_v2", "diagonal"),
            "hawq_v2",
            "allocation.scorer (--scorer)",
            lambda config, value: config.with_allocation(scorer=value),
            _choice_text(SCORERS),  # --fix scorer=output too (not searched: docs/results.md)
            "trace/n times the error norm, or the diagonal-weighted error",
        ),
        Dimension(
            "correction",
            ("off", "256", "512", "1024"),
            "1024",
            "recovery.enabled/num_samples (--no-correction, --correction-samples)",
            _apply_correction,
            _parse_correction,
            "BN statistics and bias correction, and its calibration images",
        ),
        Dimension(
            "cost_weight",
            (0.0, 0.003, 0.01, 0.03),
            0.0,
            "allocation.cost_weights (λ on the first --budget's metric)",
            _apply_cost_weight,
            _parse_weight,
            "METHOD §4 trade-off weight, in nats per whole budget; predicted losses are ~0.01-0.1",
        ),
    )


def _optional_dimensions() -> tuple[Dimension, ...]:
    """Costly dimensions, pinned to their default unless ``--also NAME`` asks for them."""
    return (
        Dimension(
            "estimator",
            ("gauss-newton", "hutchinson-64", "hutchinson-256"),
            "gauss-newton",
            "analysis.estimator/hutchinson_probes (--estimator, --hutchinson-probes)",
            _apply_estimator,
            _parse_estimator,
            "exact Gauss-Newton traces, or Hutchinson with a probe cap (costly: opt-in)",
            optional=True,
        ),
        Dimension(
            "act_formats",
            tuple(ACTIVATION_SETS),
            "none",
            "analysis.act_formats (--act-formats)",
            _apply_activations,
            _parse_activations,
            "activation formats every layer input may be quantized to (one activation "
            "sensitivity pass per set: opt-in)",
            optional=True,
            changes_costs=True,
        ),
        Dimension(
            "act_clipping",
            ("mse", "minmax"),
            "mse",
            "analysis.act_clipping (--act-clipping)",
            lambda config, value: config.with_analysis(act_clipping=value),
            _choice_text({"mse": 0, "minmax": 0}),
            "static activation ranges: MSE-optimal clipping or observed min/max (with act_formats)",
            optional=True,
        ),
        Dimension(
            "pairwise",
            tuple(PAIRWISE_CHOICES),
            "none",
            "analysis.pairwise/pair_window (--pairwise gauss-newton --pair-window K)",
            _apply_pairwise,
            _choice_text(PAIRWISE_CHOICES),
            "inter-layer terms within K layers (one computation per scheme and candidate set: "
            "costly, opt-in)",
            optional=True,
        ),
    )
