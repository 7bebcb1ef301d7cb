"""Low-cost proxy search over the pipeline's own options at fixed budgets (METHOD §5), on Optuna.

A *configuration* is a `RunConfig`: the search varies documented, typed options of the pipeline
(`SearchSpace`, docs/05-search.md), never search-only knobs, and every configuration keeps the
same hard budgets, so proxy scores compare like for like. One trial:

1. curvature for its (calibration samples, loss, seed, estimator options): computed once per
   distinct key by the ordinary ``analyze`` stage into ``cache/curvature-…/`` and reloaded after;
2. candidate table from cached quantized weights (``cache/weights/<scheme>/<format>.safetensors``,
   pure weight arithmetic, once per (scheme, format));
3. the ordinary ``allocate`` stage (HiGHS) on a trial folder ``trials/NNNNN/`` that holds the
   analysis artifacts (hard links into the cache) — so it is a run folder ``lcpaq export`` accepts;
4. the quantized model from the cached weights, statistics correction as ``export`` does it;
5. the proxy on a held-out calibration slice disjoint from the curvature and correction images
   (the file's tail): mean KL(p_FP ‖ p_Q) by default, on growing slices (128 → 384 → 1152
   images) with Optuna's successive-halving pruner between them.

The study (TPE, multivariate, seeded; lcpaq's default configuration enqueued first) lives in an
Optuna RDB storage, ``search.db`` (SQLite) in the run folder unless ``--storage`` names another,
so several processes can share it and an interrupted search resumes. At the end only the top-k
configurations by proxy (and the default) get a full evaluation; the best is written as
``best_config.json`` and run through the ordinary stages into ``best/``.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import logging
import math
import os
import shutil
import socket
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import TrialState
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lcpaq import runfolder
from lcpaq.allocation.budgets import Budget, counts_activation_bits, parse_budget
from lcpaq.allocation.frontier import SCORERS
from lcpaq.allocation.result import Allocation
from lcpaq.allocation.table import CandidateTable
from lcpaq.config import DEFAULT_FORMATS, RecoveryConfig, RunConfig
from lcpaq.errors import InputError
from lcpaq.model.data import Dataset, load_dataset
from lcpaq.model.evaluate import Accuracy, evaluate_accuracy, paired_difference
from lcpaq.model.graph import LayerInfo, get_module
from lcpaq.model.recovery import (
    ReferenceStats,
    collect_input_hessians,
    collect_reference_stats,
    correct_statistics,
)
from lcpaq.model.zoo import file_sha256, load_model, num_classes_of
from lcpaq.quant.activations import activation_quantizers, attach_activation_quantizers
from lcpaq.quant.formats import QuantScheme, get_format, parse_format_list
from lcpaq.quant.weights import fake_quantize_formats
from lcpaq.sensitivity.activation import (
    ActivationSensitivity,
    load_activation_sensitivity,
    save_activation_sensitivity,
)
from lcpaq.sensitivity.candidates import (
    parse_activation_formats,
    table_from_weights,
)
from lcpaq.sensitivity.curvature import CurvatureEstimate
from lcpaq.stages import pipeline

logger = logging.getLogger(__name__)

PROXIES = ("kl", "loss", "sqnr")
DEFAULT_RUNGS = (128, 384, 1152)
DEFAULT_STUDY_NAME = "lcpaq-search"
#: Seconds between heartbeats of a running trial, and after which a silent one counts as stale.
HEARTBEAT_S = 10
GRACE_S = 60
_EVAL_BATCH = 256

# ---------------------------------------------------------------------------------------------
# Search space: each dimension sets documented RunConfig fields.

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
        ),
        Dimension(
            "granularity",
            tuple(GRANULARITY_CHOICES),
            "channel",
            "analysis.scheme.granularity/group_size (--granularity, --group-size)",
            _apply_granularity,
            _choice_text(GRANULARITY_CHOICES),
            "finer scales cut the error but cost scale bits",
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
        ),
        Dimension(
            "first_last",
            ("search", "keep-8bit"),
            "search",
            "allocation.first_last (--first-last)",
            lambda config, value: config.with_allocation(first_last=value),
            _choice_text({"search": 0, "keep-8bit": 0}),
            "fixing the first and last layer at INT8 is common practice",
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


@dataclass(frozen=True)
class SearchSpace:
    dimensions: tuple[Dimension, ...] = field(default_factory=default_dimensions)

    @classmethod
    def default(cls, also: Sequence[str] = ()) -> SearchSpace:
        """The default dimensions; optional ones pinned to their default unless named in ``also``."""
        dimensions = default_dimensions()
        names = {dimension.name for dimension in dimensions}
        for name in also:
            if name not in names:
                raise InputError(
                    f"--also {name}: no such search dimension; known: {', '.join(names)}"
                )
        return cls(
            tuple(
                d if not d.optional or d.name in also else replace(d, choices=(d.default,))
                for d in dimensions
            )
        )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(dimension.name for dimension in self.dimensions)

    @property
    def size(self) -> int:
        """The number of distinct configurations."""
        return math.prod(len(dimension.choices) for dimension in self.dimensions)

    def dimension(self, name: str) -> Dimension:
        for dimension in self.dimensions:
            if dimension.name == name:
                return dimension
        raise InputError(f"--fix {name}: no such search dimension; known: {', '.join(self.names)}")

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        return {d.name: trial.suggest_categorical(d.name, d.choices) for d in self.dimensions}

    def with_default(self, name: str, value: Any) -> SearchSpace:
        """The same choices with another default (the configuration trial 0 measures)."""
        self.dimension(name)  # an unknown name fails here
        return SearchSpace(
            tuple(replace(d, default=value) if d.name == name else d for d in self.dimensions)
        )

    def default_params(self) -> dict[str, Any]:
        return {dimension.name: dimension.default for dimension in self.dimensions}

    def config(self, base: RunConfig, params: Mapping[str, Any]) -> RunConfig:
        """``params`` without a dimension (a trial of a study made before it existed) leave it
        at its default."""
        for dimension in self.dimensions:
            base = dimension.apply(base, params.get(dimension.name, dimension.default))
        return base

    def fix(self, values: Mapping[str, str], base: RunConfig) -> SearchSpace:
        """The space with some dimensions pinned to one value (also the default's value)."""
        dimensions = list(self.dimensions)
        for name, text in values.items():
            index = self.names.index(self.dimension(name).name)
            dimension = dimensions[index]
            try:
                value = dimension.parse(text)
                dimension.apply(base, value)  # a value the pipeline rejects fails here
            except InputError as error:
                raise InputError(f"--fix {name}={text}: {error}") from None
            dimensions[index] = replace(dimension, choices=(value,), default=value)
        return SearchSpace(tuple(dimensions))

    def describe(self) -> list[dict[str, object]]:
        return [
            {"name": d.name, "option": d.option, "choices": list(d.choices), "default": d.default}
            for d in self.dimensions
        ]


def parse_fix(texts: Sequence[str]) -> dict[str, str]:
    values = {}
    for text in texts:
        name, sep, value = text.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise InputError(f"--fix {text!r}: use NAME=VALUE, e.g. --fix num_samples=256")
        values[name.strip()] = value.strip()
    return values


def parse_rungs(text: str) -> tuple[int, ...]:
    """``128,384,1152``: growing proxy slices with a constant whole ratio (the halving rate)."""
    try:
        rungs = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise InputError(
            f"--proxy-samples {text!r}: give whole numbers, e.g. 128,384,1152"
        ) from None
    if not rungs or rungs[0] < 1:
        raise InputError(f"--proxy-samples {text!r}: give at least one positive sample count")
    if len(rungs) > 1:
        ratio = rungs[1] // rungs[0]
        geometric = all(b == a * ratio for a, b in zip(rungs, rungs[1:]))
        if ratio < 2 or not geometric:
            raise InputError(
                f"--proxy-samples {text!r}: successive halving needs each slice a whole multiple "
                "(>= 2, the same each time) of the one before, e.g. 128,384,1152"
            )
    return rungs


# ---------------------------------------------------------------------------------------------
# Calibration slices.


@dataclass(frozen=True)
class Slices:
    """Calibration images [0, head) feed curvature and correction; the proxy uses the tail
    [proxy_start, proxy_start + rungs[-1]); the two never overlap."""

    num_images: int
    head: int
    proxy_start: int
    rungs: tuple[int, ...]

    def to_dict(self) -> dict[str, object]:
        return {
            "calibration_images": self.num_images,
            "curvature_and_correction": [0, self.head],
            "proxy": [self.proxy_start, self.proxy_start + self.rungs[-1]],
            "proxy_rungs": list(self.rungs),
        }


def head_samples(config: RunConfig) -> int:
    """How many leading calibration images a configuration's analysis and correction read."""
    analysis = config.analysis
    used = [analysis.num_samples]
    if config.recovery.enabled:
        used.append(config.recovery.num_samples)
    if analysis.hutchinson_probes:
        used.append(analysis.hutchinson_samples)
    if getattr(analysis, "pairwise", "none") != "none":
        used.append(getattr(analysis, "pair_samples", 0))
    return max(used)


def plan_slices(num_images: int, rungs: Sequence[int], head: int, source: str) -> Slices:
    needed = head + rungs[-1]
    if needed > num_images:
        raise InputError(
            f"calibration file {source} has {num_images} images; the search needs {head} for "
            f"curvature/correction plus {rungs[-1]} disjoint proxy images ({needed}): give a "
            "larger file, smaller --proxy-samples, or --fix smaller sample counts"
        )
    return Slices(num_images, head, num_images - rungs[-1], tuple(rungs))


def space_head(space: SearchSpace, base: RunConfig) -> int:
    """The most leading images any configuration of the space reads (each dimension sets its own
    fields, so the maximum over each dimension's choices bounds every combination)."""
    defaults = space.config(base, space.default_params())
    most = head_samples(defaults)
    for dimension in space.dimensions:
        for choice in dimension.choices:
            most = max(most, head_samples(dimension.apply(defaults, choice)))
    return most


# ---------------------------------------------------------------------------------------------
# Proxy scores.


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


# ---------------------------------------------------------------------------------------------
# Caches: curvature (per analysis key), quantized weights (per scheme and format).

#: AnalysisConfig fields that do not change the curvature (they change the candidates, or the
#: inter-layer terms, which the search does not cache).
_NOT_CURVATURE = ("scheme", "formats", "act_formats", "act_clipping", "allow_unsafe_pickle")


def curvature_key(config: RunConfig, identity: Mapping[str, str]) -> str:
    """Every analysis option that can change the curvature, plus the checkpoint and data files."""
    data = {
        name: value
        for name, value in asdict(config.analysis).items()
        if name not in _NOT_CURVATURE and not name.startswith("pair")
    }
    text = json.dumps({"analysis": data, "files": dict(identity)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _cache_analysis_config(config: RunConfig) -> RunConfig:
    """The configuration the curvature cache runs ``analyze`` with: the same curvature options,
    the cheapest candidate table (one min-max format) and no inter-layer terms."""
    changes: dict[str, Any] = {"formats": ("int8",), "scheme": QuantScheme(clipping="minmax")}
    names = {item.name for item in fields(config.analysis)}
    if "act_formats" in names:
        changes["act_formats"] = ()
    if "pairwise" in names:
        changes["pairwise"] = "none"
    return config.with_analysis(**changes)


def interactions_key(config: RunConfig, identity: Mapping[str, str]) -> str:
    """The curvature key plus what the inter-layer terms also depend on: the quantized weights
    (scheme, formats) and the pair options."""
    analysis = config.analysis
    data = {
        "curvature": curvature_key(config, identity),
        "scheme": analysis.scheme.to_dict(),
        "formats": list(analysis.formats),
        **{name: value for name, value in asdict(analysis).items() if name.startswith("pair")},
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def activations_key(config: RunConfig, identity: Mapping[str, str]) -> str:
    """The curvature key (same images, batches and seed) plus the activation formats and how
    their ranges are calibrated."""
    analysis = config.analysis
    data = {
        "curvature": curvature_key(config, identity),
        "act_formats": list(analysis.act_formats),
        "act_clipping": analysis.act_clipping,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def scheme_slug(scheme: QuantScheme) -> str:
    """A readable cache folder name for a scheme, e.g. ``asym-channel-mse100``."""
    parts = ["sym" if scheme.symmetric else "asym"]
    parts.append(
        f"group{scheme.group_size}" if scheme.granularity == "group" else scheme.granularity
    )
    if scheme.clipping == "mse":
        parts.append(f"mse{scheme.mse_grid_points}")
    elif scheme.clipping == "percentile":
        parts.append(f"p{scheme.percentile:g}")
    else:
        parts.append(scheme.clipping)
    if scheme.rounding == "gptq":
        parts.append(f"gptq{scheme.gptq_damp:g}")
    return "-".join(parts)


def candidate_table(
    layers: Sequence[LayerInfo],
    weights: Mapping[str, torch.Tensor],
    quantized: Mapping[str, Mapping[str, torch.Tensor]],
    format_names: Sequence[str],
    scheme: QuantScheme,
    diagonal: Mapping[str, np.ndarray] | None,
    activation_formats: Sequence[str] = (),
    input_hessians: Mapping[str, torch.Tensor] | None = None,
) -> CandidateTable:
    """`lcpaq.sensitivity.candidates.measure_candidates` from already quantized weights
    (``quantized[format][layer]``): the same arithmetic, without quantizing again."""
    by_layer = {
        layer.name: [quantized[name][layer.name] for name in format_names] for layer in layers
    }
    return table_from_weights(
        layers,
        weights,
        by_layer,
        format_names,
        scheme,
        diagonal,
        activation_formats,
        input_hessians,
    )


def _link_or_copy(source: Path, target: Path, *, copy_only: bool = False) -> None:
    target.unlink(missing_ok=True)
    if not copy_only:
        try:
            os.link(source, target)
            return
        except OSError:
            pass  # another file system, or links not allowed: copy instead
    shutil.copyfile(source, target)


class Infeasible(Exception):
    """The allocation stage found no assignment for this configuration under the budgets."""

    def __init__(self, message: str, timings: Mapping[str, float]) -> None:
        super().__init__(message)
        self.timings = dict(timings)


@dataclass
class Prepared:
    config: RunConfig
    allocation: Allocation
    quantized: nn.Module | None
    timings: dict[str, float]


def model_key(config: RunConfig, allocation: Allocation) -> str:
    """What fixes the quantized model: scheme, correction and the chosen formats. Configurations
    that differ elsewhere (curvature samples, scorer, first/last policy, format set) often
    allocate the same formats; they share this key and so their proxy values. GPTQ codes also
    depend on the curvature images, whose input second moments they are rounded against."""
    scheme = config.analysis.scheme
    data = {
        "scheme": scheme.to_dict(),
        "gptq_samples": config.analysis.num_samples if scheme.rounding == "gptq" else None,
        "recovery": asdict(config.recovery),
        "assignment": list(allocation.formats),
    }
    if config.analysis.act_formats:  # activation ranges come from the curvature images
        data["activations"] = activations_key(config, {})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class SearchContext:
    """What every trial of one process shares: the FP32 model, the calibration data and its
    slices, the proxy's FP32 outputs, and the caches (curvature, quantized weights, FP32
    correction statistics)."""

    def __init__(
        self,
        base: RunConfig,
        run_dir: Path,
        space: SearchSpace,
        proxy: str,
        rungs: Sequence[int],
        *,
        max_cached_weights: int = 96,
    ) -> None:
        analysis = base.analysis
        self.base, self.run_dir, self.space = base, run_dir, space
        self.cache_dir = run_dir / "cache"
        self.model = load_model(
            analysis.model, analysis.checkpoint, allow_unsafe_pickle=analysis.allow_unsafe_pickle
        ).eval()
        self.calib = load_dataset(
            analysis.calib,
            normalization=analysis.normalize,
            num_classes=num_classes_of(self.model),
            image_size=analysis.image_size,
        )
        self.slices = plan_slices(len(self.calib), rungs, space_head(space, base), analysis.calib)
        proxy_data = self.calib.subset(self.slices.proxy_start, self.slices.num_images)
        self.scorer = ProxyScorer.build(proxy, self.model, proxy_data)
        self.identity = {
            "checkpoint": file_sha256(Path(analysis.checkpoint)) if analysis.checkpoint else "",
            "calib": file_sha256(Path(analysis.calib)) if Path(analysis.calib).is_file() else "",
        }
        self._curvature: dict[str, tuple[Path, CurvatureEstimate]] = {}
        self._weights: OrderedDict[tuple[str, str], dict[str, torch.Tensor]] = OrderedDict()
        self._max_cached_weights = max_cached_weights
        self._reference: dict[int, ReferenceStats] = {}
        self._input_hessians: dict[int, dict[str, torch.Tensor]] = {}
        self._activations: dict[str, ActivationSensitivity] = {}
        self.layers: tuple[LayerInfo, ...] | None = None
        self.fp_weights: dict[str, torch.Tensor] = {}
        self.analyze_calls = 0

    # -- curvature -------------------------------------------------------------------------
    def curvature(self, config: RunConfig) -> tuple[Path, CurvatureEstimate, float]:
        """(cache folder, estimate, seconds spent computing it now: 0 on a cache hit)."""
        key = curvature_key(config, self.identity)
        if key in self._curvature:
            return (*self._curvature[key], 0.0)
        folder = self.cache_dir / f"curvature-n{config.analysis.num_samples}-{key}"
        seconds = 0.0
        # ``analyze`` writes candidates.npz last, so its presence marks a complete analysis.
        if not (folder / "candidates.npz").is_file():
            start = time.perf_counter()
            with _quiet("lcpaq.stages"):
                pipeline.analyze(_cache_analysis_config(config), folder, progress=False)
            self.analyze_calls += 1
            seconds = time.perf_counter() - start
            runfolder.write_json(folder / "cache_key.json", {"key": key, **self.identity})
        estimate = runfolder.load_curvature(folder / "curvature.npz")
        if self.layers is None:
            self.layers, _ = pipeline.read_layers(folder)
            self.fp_weights = {
                layer.name: get_module(self.model, layer.name).weight.detach().clone()
                for layer in self.layers
            }
        self._curvature[key] = (folder, estimate)
        return folder, estimate, seconds

    def interactions(self, config: RunConfig) -> tuple[Path, float]:
        """``interactions.npz`` for this configuration's pair options, scheme and formats:
        computed once per distinct key by the ordinary ``analyze`` code (seconds spent now)."""
        assert self.layers is not None, "curvature() loads the layer list first"
        folder = self.cache_dir / f"pairs-{interactions_key(config, self.identity)}"
        path = folder / "interactions.npz"
        if path.is_file():
            return path, 0.0
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with _quiet("lcpaq.stages"):
            pipeline.analyze_interactions(
                config,
                self.model,
                self.layers,
                folder,
                progress=False,
                input_hessians=self.input_hessians(config),
            )
        return path, time.perf_counter() - start

    def activations(self, config: RunConfig) -> tuple[ActivationSensitivity | None, float]:
        """The activation sensitivity and ranges of the configuration's activation formats on
        its curvature images, as ``analyze`` measures them, once per distinct key (seconds spent
        now); None without activation formats."""
        if not config.analysis.act_formats:
            return None, 0.0
        assert self.layers is not None, "curvature() loads the layer list first"
        path = self._activations_path(config)
        if path in self._activations:
            return self._activations[path], 0.0
        seconds = 0.0
        if path.is_file():
            sensitivity = load_activation_sensitivity(path)
        else:
            start = time.perf_counter()
            inputs = self.calib.inputs[: config.analysis.num_samples]
            sensitivity = pipeline.measure_activations(config, self.model, self.layers, inputs)
            save_activation_sensitivity(path, sensitivity)
            seconds = time.perf_counter() - start
        self._activations[path] = sensitivity
        return sensitivity, seconds

    def _activations_path(self, config: RunConfig) -> Path:
        key = activations_key(config, self.identity)
        return self.cache_dir / f"activations-n{config.analysis.num_samples}-{key}.npz"

    # -- quantized weights -----------------------------------------------------------------
    def input_hessians(self, config: RunConfig) -> dict[str, torch.Tensor] | None:
        """GPTQ's per-layer input second moments on the configuration's curvature images (as
        ``analyze`` computes them), once per image count; None for round-to-nearest."""
        if config.analysis.scheme.rounding != "gptq":
            return None
        return self._hessians_of_first(config.analysis.num_samples)

    def _hessians_of_first(self, samples: int) -> dict[str, torch.Tensor]:
        """The input second moments on the first ``samples`` calibration images (as many as
        there are, if fewer), from memory, the cache folder, or computed and cached."""
        assert self.layers is not None, "curvature() loads the layer list first"
        count = min(samples, len(self.calib))
        if count not in self._input_hessians:
            path = self._input_hessians_path(count)
            if path.is_file():
                hessians = runfolder.load_tensors(path, "input Hessians")
            else:
                hessians = collect_input_hessians(
                    self.model,
                    [layer.name for layer in self.layers],
                    self.calib.inputs[:count],
                    batch_size=self.base.analysis.batch_size,
                )
                runfolder.save_tensors(path, hessians)
            self._input_hessians[count] = hessians
        return self._input_hessians[count]

    def _input_hessians_tag(self, samples: int) -> str:
        """``n<count>-<hash>`` of everything the input second moments of the first ``samples``
        images depend on: model, images, their normalisation and count."""
        count = min(samples, len(self.calib))
        analysis = self.base.analysis
        data = {
            **self.identity,
            "count": count,
            "normalize": analysis.normalize,
            "image_size": analysis.image_size,
        }
        key = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]
        return f"n{count}-{key}"

    def _input_hessians_path(self, samples: int) -> Path:
        return self.cache_dir / f"input-hessians-{self._input_hessians_tag(samples)}.safetensors"

    def quantized_weights(
        self, scheme: QuantScheme, format_name: str, samples: int = 0
    ) -> dict[str, torch.Tensor]:
        """Fake-quantized weight of every layer (what export stores, decoded), cached. GPTQ
        rounding reads the input second moments of the first ``samples`` calibration images."""
        return self.quantized_weight_sets(scheme, (format_name,), samples)[format_name]

    def quantized_weight_sets(
        self, scheme: QuantScheme, format_names: Sequence[str], samples: int = 0
    ) -> dict[str, dict[str, torch.Tensor]]:
        """`quantized_weights` of several formats; the ones not cached yet are computed together
        (GPTQ rounds the INT formats of a layer in one pass)."""
        assert self.layers is not None, "curvature() loads the layer list first"
        slug = scheme_slug(scheme)
        hessians = None
        if scheme.rounding == "gptq":
            hessians = self._hessians_of_first(samples)
            slug += f"-{self._input_hessians_tag(samples)}"
        scheme_key = json.dumps(scheme.to_dict(), sort_keys=True) + slug
        names = [layer.name for layer in self.layers]
        found: dict[str, dict[str, torch.Tensor]] = {}
        for format_name in format_names:
            key = (scheme_key, format_name)
            if key in self._weights:
                self._weights.move_to_end(key)
                found[format_name] = self._weights[key]
                continue
            path = self.cache_dir / "weights" / slug / f"{format_name}.safetensors"
            if path.is_file():
                with safe_open(str(path), "pt") as handle:
                    same = handle.metadata() == self._weights_metadata(
                        scheme_key, format_name
                    ) and sorted(handle.keys()) == sorted(names)
                if same:  # else another scheme or checkpoint wrote it: recompute
                    found[format_name] = load_file(str(path))
        missing = [name for name in format_names if name not in found]
        if missing:
            fmts = [get_format(name) for name in missing]
            per_layer = {
                layer: fake_quantize_formats(
                    self.fp_weights[layer], fmts, scheme, hessians[layer] if hessians else None
                )
                for layer in names
            }
            for position, format_name in enumerate(missing):
                weights = {layer: per_layer[layer][position].contiguous() for layer in names}
                path = self.cache_dir / "weights" / slug / f"{format_name}.safetensors"
                with runfolder.atomic_path(path) as temp:
                    metadata = self._weights_metadata(scheme_key, format_name)
                    save_file(weights, str(temp), metadata=metadata)
                found[format_name] = weights
        for format_name in format_names:
            self._weights[(scheme_key, format_name)] = found[format_name]
            self._weights.move_to_end((scheme_key, format_name))
        while len(self._weights) > self._max_cached_weights:
            self._weights.popitem(last=False)
        return {name: found[name] for name in format_names}

    def _weights_metadata(self, scheme_key: str, format_name: str) -> dict[str, str]:
        return {
            "scheme": scheme_key,
            "format": format_name,
            "checkpoint": self.identity["checkpoint"],
        }

    def table(self, config: RunConfig, estimate: CurvatureEstimate) -> CandidateTable:
        assert self.layers is not None
        analysis = config.analysis
        quantized = self.quantized_weight_sets(
            analysis.scheme, analysis.formats, analysis.num_samples
        )
        return candidate_table(
            self.layers,
            self.fp_weights,
            quantized,
            analysis.formats,
            analysis.scheme,
            estimate.diagonal,
            analysis.act_formats,
            self.input_hessians(config),
        )

    # -- allocation on a run folder --------------------------------------------------------
    def write_analysis(
        self,
        run_dir: Path,
        config: RunConfig,
        cache_folder: Path,
        table: CandidateTable,
        *,
        copy_files: bool = False,
    ) -> None:
        """Make ``run_dir`` an analysed run folder: the artifacts ``analyze`` would write."""
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        for name in ("layers.json", "curvature.npz", "hutchinson.npz"):
            if (cache_folder / name).is_file():
                _link_or_copy(cache_folder / name, run_dir / name, copy_only=copy_files)
        if self.input_hessians(config) is not None:  # export (of best/) reads them from here
            _link_or_copy(
                self._input_hessians_path(config.analysis.num_samples),
                run_dir / pipeline.INPUT_HESSIANS_FILE,
                copy_only=copy_files,
            )
        if config.analysis.act_formats:  # the allocation's score and export read it
            self.activations(config)  # cached; measured here for the size cap and a resumed best/
            _link_or_copy(
                self._activations_path(config), run_dir / "activations.npz", copy_only=copy_files
            )
        runfolder.save_candidates(run_dir / "candidates.npz", table)
        runfolder.write_json(run_dir / "run_config.json", config.to_dict())

    def prepare(self, config: RunConfig, run_dir: Path, *, build: bool = True) -> Prepared:
        """Curvature (cached), candidates (cached weights), the allocate stage on ``run_dir``,
        then (``build``) the quantized and corrected model, as ``export`` builds it."""
        timings = {}
        folder, estimate, timings["hessian_s"] = self.curvature(config)
        _, seconds = self.activations(config)
        timings["hessian_s"] += seconds  # curvature work, in the report's Hessian share
        start = time.perf_counter()
        table = self.table(config, estimate)
        timings["candidates_s"] = time.perf_counter() - start
        start = time.perf_counter()
        self.write_analysis(run_dir, config, folder, table)
        if config.analysis.pairwise != "none":
            pairs_path, seconds = self.interactions(config)
            timings["hessian_s"] += seconds  # curvature work, in the report's Hessian share
            _link_or_copy(pairs_path, run_dir / "interactions.npz")
        budgets = [parse_budget(text) for text in config.allocation.budgets]
        try:
            with _quiet("lcpaq.stages"):
                allocation = pipeline.allocate(run_dir, budgets, **config.allocation.options())
        except InputError as error:
            timings["ilp_s"] = time.perf_counter() - start
            raise Infeasible(str(error), timings) from None
        timings["ilp_s"] = time.perf_counter() - start
        prepared = Prepared(config, allocation, None, timings)
        if build:
            self.build(prepared)
        return prepared

    def build(self, prepared: Prepared) -> nn.Module:
        """The quantized and corrected model of a prepared configuration (timed once)."""
        if prepared.quantized is None:
            start = time.perf_counter()
            prepared.quantized = self.quantized_model(prepared.config, prepared.allocation)
            prepared.timings["correction_s"] = time.perf_counter() - start
        return prepared.quantized

    # -- quantized model -------------------------------------------------------------------
    def reference(self, num_samples: int, names: Sequence[str]) -> ReferenceStats:
        if num_samples not in self._reference:
            self._reference[num_samples] = collect_reference_stats(
                self.model, self.calib.inputs[:num_samples], names
            )
        return self._reference[num_samples]

    @torch.no_grad()
    def quantized_model(self, config: RunConfig, allocation: Allocation) -> nn.Module:
        assignment = pipeline.weight_assignment(allocation.layer_names, allocation.formats)
        quantized = copy.deepcopy(self.model).eval()
        for name, format_name in assignment.items():
            weights = self.quantized_weights(
                config.analysis.scheme, format_name, config.analysis.num_samples
            )
            get_module(quantized, name).weight.copy_(weights[name])
        sensitivity, _ = self.activations(config)
        if sensitivity is not None:  # inputs quantized before the correction, as export does
            formats = pipeline.paired_activation_formats(allocation.layer_names, allocation.formats)
            attach_activation_quantizers(quantized, activation_quantizers(sensitivity, formats))
        if config.recovery.enabled:
            count = min(config.recovery.num_samples, len(self.calib))
            names = list(assignment)
            correct_statistics(
                self.model,
                quantized,
                self.calib.inputs[:count],
                names,
                reference=self.reference(count, names),
            )
        return quantized


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Silence a logger's INFO lines (the stages log one per call; a search makes hundreds)."""
    target = logging.getLogger(name)
    level = target.level
    target.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        target.setLevel(level)


# ---------------------------------------------------------------------------------------------
# The study.


@dataclass(frozen=True)
class SearchOptions:
    """What ``lcpaq search`` was asked (see `lcpaq.cli`)."""

    base: RunConfig
    out: Path
    trials: int = 60
    eval_path: str | None = None
    storage: str | None = None
    study_name: str = DEFAULT_STUDY_NAME
    resume: bool = False
    top_k: int = 3
    proxy: str = "kl"
    rungs: tuple[int, ...] = DEFAULT_RUNGS
    fixed: Mapping[str, str] = field(default_factory=dict)
    also: tuple[str, ...] = ()
    size_cap: bool = True
    seed: int = 0
    #: The best of the full evaluation replaces lcpaq's default only when its paired gain over
    #: the default on the evaluation data exceeds this many standard errors.
    min_gain_se: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_gain_se < math.inf:
            raise InputError(f"--min-gain-se must be a finite number >= 0, got {self.min_gain_se}")
        if self.trials < 1:
            raise InputError(f"--trials must be at least 1, got {self.trials}")
        if self.top_k < 1:
            raise InputError(f"--top-k must be at least 1, got {self.top_k}")
        if self.proxy not in PROXIES:
            raise InputError(f"--proxy must be one of {', '.join(PROXIES)}, got {self.proxy!r}")
        if not self.base.allocation.budgets:
            raise InputError("give at least one --budget, e.g. --budget avg-bits=3")

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.out / 'search.db').resolve()}"


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage with heartbeats (stale running trials can be detected)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # heartbeat options are flagged experimental
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S
            )
    except Exception as error:  # noqa: BLE001 - SQLAlchemy raises many types for bad URLs
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"cannot open --storage {url!r}: {message}") from None


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process runs no trial yet when it cleans up
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_stale_trials(study: optuna.Study) -> list[int]:
    """Mark trials left RUNNING by a dead process as failed: at once when that process ran on
    this machine (its pid is gone), else when its heartbeat is older than the grace period."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)
    failed = []
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = str(trial.user_attrs.get("worker", ""))
        worker_host, _, pid = worker.rpartition(":")
        if worker_host == host and pid.isdigit() and not _process_alive(int(pid)):
            study.tell(trial.number, state=TrialState.FAIL)
            failed.append(trial.number)
    return failed


def _study_settings(options: SearchOptions, space: SearchSpace) -> dict[str, object]:
    """What a resumed study must agree with (base configuration, space, proxy, slices)."""
    base = options.base.to_dict()
    base["analysis"].pop("allow_unsafe_pickle", None)
    return {
        "base_config": base,
        "space": space.describe(),
        "proxy": options.proxy,
        "rungs": list(options.rungs),
        "size_cap": options.size_cap,
    }


def open_study(options: SearchOptions, space: SearchSpace) -> tuple[optuna.Study, bool]:
    """Create the study (error if it exists without --resume) or load it (--resume)."""
    storage = open_storage(options.storage_url)
    sampler = optuna.samplers.TPESampler(
        multivariate=True, seed=options.seed, constant_liar=True, n_startup_trials=10
    )
    pruner: optuna.pruners.BasePruner = (
        optuna.pruners.SuccessiveHalvingPruner(
            min_resource=options.rungs[0],
            reduction_factor=options.rungs[1] // options.rungs[0],
            min_early_stopping_rate=0,
        )
        if len(options.rungs) > 1
        else optuna.pruners.NopPruner()
    )
    names = optuna.study.get_all_study_names(storage)
    settings = json.loads(json.dumps(_study_settings(options, space), default=str))
    if options.study_name in names:
        if not options.resume:
            raise InputError(
                f"study {options.study_name!r} already exists in {options.storage_url}: pass "
                "--resume to continue it, or choose another --study-name or --out"
            )
        study = optuna.load_study(
            study_name=options.study_name, storage=storage, sampler=sampler, pruner=pruner
        )
        stored = study.user_attrs.get("settings")
        for key, value in settings.items():
            if stored is not None and stored.get(key) != value:
                raise InputError(
                    f"--resume: study {options.study_name!r} was created with a different "
                    f"{key.replace('_', ' ')} ({_short(stored.get(key))} vs {_short(value)})"
                )
        return study, False
    if options.resume:
        raise InputError(
            f"--resume: there is no study {options.study_name!r} in {options.storage_url}"
        )
    study = optuna.create_study(
        study_name=options.study_name,
        storage=storage,
        sampler=sampler,
        pruner=pruner,
        direction="minimize",
    )
    study.set_user_attr("settings", settings)
    return study, True


def _short(value: object) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _ceil_budget_mb(size_bytes: float) -> float:
    """A size-mb limit ≥ ``size_bytes`` that survives `Budget`'s 6-significant-digit text."""
    value = math.ceil(size_bytes) / 1e6
    text_value = float(f"{value:g}")
    while text_value < value:
        value = value * (1 + 1e-6)
        text_value = float(f"{value:g}")
    return text_value


def _has_size_budget(budgets: Sequence[str]) -> bool:
    return any(parse_budget(text).metric in ("size-mb", "size-frac") for text in budgets)


def search_space(options: SearchOptions) -> SearchSpace:
    """The searched space: the default dimensions, ``--also`` and ``--fix``. Under a budget that
    counts activation bits every configuration, the default included, quantizes its layer inputs
    to INT8 unless told otherwise: weights-only checkpoints would keep FP32 activations that the
    cost model counts as 8-bit, and the search would compare real costs with assumed ones."""
    space = SearchSpace.default(options.also)
    if (
        counts_activation_bits(options.base.allocation.budgets)
        and "act_formats" not in options.fixed
    ):
        if "act_formats" in options.also:
            space = space.with_default("act_formats", "int8")
        else:
            space = space.fix({"act_formats": "int8"}, options.base)
    return space.fix(options.fixed, options.base)


class Search:
    """One process's part of a search: trials, then the final step."""

    def __init__(self, options: SearchOptions, *, progress: bool = True) -> None:
        self.options = options
        self.progress = progress
        pipeline.ensure_writable(options.out)
        self.wall_start = time.perf_counter()
        self.cpu_start = time.process_time()
        self.space = search_space(options)
        self.context = SearchContext(
            options.base, options.out, self.space, options.proxy, options.rungs
        )
        self.study, self.created = open_study(options, self.space)
        self.base = options.base
        self.process_timings: dict[str, float] = {"setup_s": time.perf_counter() - self.wall_start}

    # -- budgets ---------------------------------------------------------------------------
    def _with_size_cap(self) -> RunConfig:
        """The base configuration with the size cap of this study (METHOD §5: fixed budgets).

        ``avg-bits`` counts code bits only; finer scale groups and zero points then come for
        free. Unless the user gave a size budget, every trial is also held to the size (codes,
        scales, zero points) of lcpaq's default configuration at the same budgets.
        """
        attrs = self.study.user_attrs
        if not self.options.size_cap or _has_size_budget(self.base.allocation.budgets):
            return self.base
        if "size_cap_mb" not in attrs:
            default = self.space.config(self.base, self.space.default_params())
            folder, estimate, seconds = self.context.curvature(default)
            _, activation_seconds = self.context.activations(default)
            self.process_timings["hessian_s"] = seconds + activation_seconds
            table = self.context.table(default, estimate)
            work = self.options.out / "cache" / "default-allocation"
            self.context.write_analysis(work, default, folder, table)
            budgets = [parse_budget(text) for text in default.allocation.budgets]
            with _quiet("lcpaq.stages"):
                allocation = pipeline.allocate(work, budgets, **default.allocation.options())
            self.study.set_user_attr("size_cap_mb", _ceil_budget_mb(allocation.size_bytes))
        cap = Budget("size-mb", float(self.study.user_attrs["size_cap_mb"]))
        return self.base.with_allocation(budgets=(*self.base.allocation.budgets, str(cap)))

    # -- trials ----------------------------------------------------------------------------
    def run_trials(self) -> None:
        options = self.options
        self.trial_base = self._with_size_cap()
        if self.created:
            self.study.enqueue_trial(self.space.default_params(), user_attrs={"default": True})
        else:
            stale = fail_stale_trials(self.study)
            if stale:
                logger.info("marked stale running trial(s) %s as failed", stale)
        finished = self._count_finished()
        wanted = min(options.trials, self.space.size)
        remaining = wanted - finished
        if remaining <= 0:
            logger.info("study already has %d scored configurations", finished)
            return
        logger.info(
            "search: %d configuration(s) to score (%d done), proxy %s on images %s of %s",
            remaining,
            finished,
            options.proxy,
            self.context.slices.to_dict()["proxy"],
            self.base.analysis.calib,
        )

        def stop_when_done(study: optuna.Study, _trial: optuna.trial.FrozenTrial) -> None:
            if self._count_finished() >= wanted:
                study.stop()

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.study.optimize(
                self._objective,
                # Repeats of a scored configuration cost nothing and do not count; this bounds
                # how many TPE may propose once it converges.
                n_trials=3 * remaining + 10,
                callbacks=[stop_when_done],
                gc_after_trial=False,
            )

    def _count_finished(self) -> int:
        """Scored configurations: complete or pruned trials that are not repeats."""
        states = (TrialState.COMPLETE, TrialState.PRUNED)
        trials = self.study.get_trials(deepcopy=False, states=states)
        return sum("duplicate_of" not in trial.user_attrs for trial in trials)

    def trial_dir(self, number: int) -> Path:
        return self.options.out / "trials" / f"{number:05d}"

    def _duplicate(self, params: Mapping[str, Any], number: int) -> optuna.trial.FrozenTrial | None:
        states = (TrialState.COMPLETE, TrialState.PRUNED)
        for other in self.study.get_trials(deepcopy=False, states=states):
            if (
                other.number != number
                and other.params == dict(params)
                and "duplicate_of" not in other.user_attrs
            ):
                return other
        return None

    def _objective(self, trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", _worker())
        params = self.space.suggest(trial)
        duplicate = self._duplicate(params, trial.number)
        if duplicate is not None:
            logger.info("trial %d: same configuration as trial %d", trial.number, duplicate.number)
            return self._replay(trial, duplicate)
        config = self.space.config(self.trial_base, params)
        try:
            prepared = self.context.prepare(config, self.trial_dir(trial.number), build=False)
        except Infeasible as error:
            # Pruned before the first slice: it counts as a trial (it cost an ILP solve) and TPE
            # ranks pruned trials without intermediate values last, so it learns to avoid them.
            trial.set_user_attr("error", str(error))
            for name, seconds in error.timings.items():
                trial.set_user_attr(name, seconds)
            logger.info("trial %d: infeasible, pruned (%s)", trial.number, error)
            raise optuna.TrialPruned() from None
        timings = prepared.timings
        allocation = prepared.allocation
        trial.set_user_attr("avg_bits", allocation.average_bits)
        trial.set_user_attr("size_bytes", allocation.size_bytes)
        trial.set_user_attr("predicted_loss_increase", allocation.predicted_loss_increase)
        trial.set_user_attr("assignment", list(allocation.formats))
        key = model_key(config, allocation)
        trial.set_user_attr("model_key", key)
        known, source = self._known_sums(key, trial.number)
        if known:
            logger.info("trial %d: same quantized model as trial %d", trial.number, source)
            trial.set_user_attr("same_model_as", source)
        scorer, sums, done = self.context.scorer, np.zeros(2), 0
        proxy_s = 0.0
        recorded: dict[str, list[float]] = {}
        try:
            for index, rung in enumerate(self.options.rungs):
                if rung in known:
                    sums = np.array(known[rung])
                else:
                    quantized = self.context.build(prepared)
                    start = time.perf_counter()
                    sums = sums + scorer.sums(quantized, done, rung)
                    proxy_s += time.perf_counter() - start
                done = rung
                value = scorer.value(sums, done)
                recorded[str(rung)] = [float(x) for x in sums]
                trial.set_user_attr("proxy_sums", recorded)
                trial.report(value, rung)
                if index < len(self.options.rungs) - 1 and trial.should_prune():
                    logger.info(
                        "trial %d: %s %.5g on %d images, pruned",
                        trial.number,
                        scorer.kind,
                        value,
                        rung,
                    )
                    raise optuna.TrialPruned()
        finally:
            timings["proxy_s"] = proxy_s
            for name, seconds in timings.items():
                trial.set_user_attr(name, seconds)
        logger.info(
            "trial %d: %s %.5g on %d images, %.3f bits, %.1f s",
            trial.number,
            scorer.kind,
            value,
            done,
            allocation.average_bits,
            sum(timings.values()),
        )
        return value

    def _known_sums(self, key: str, number: int) -> tuple[dict[int, list[float]], int | None]:
        """Proxy sums per slice already measured for this quantized model by another trial."""
        best: dict[int, list[float]] = {}
        source = None
        for other in self.study.get_trials(deepcopy=False):
            if other.number == number or other.user_attrs.get("model_key") != key:
                continue
            sums = {
                int(rung): value for rung, value in other.user_attrs.get("proxy_sums", {}).items()
            }
            if len(sums) > len(best):
                best, source = sums, other.number
        return best, source

    def _replay(self, trial: optuna.Trial, other: optuna.trial.FrozenTrial) -> float:
        """A configuration already scored: report its values again instead of recomputing."""
        trial.set_user_attr("duplicate_of", other.number)
        names = ("avg_bits", "size_bytes", "predicted_loss_increase", "assignment", "error")
        for name in (*names, "model_key", "proxy_sums"):
            if name in other.user_attrs:
                trial.set_user_attr(name, other.user_attrs[name])
        for step, value in sorted(other.intermediate_values.items()):
            trial.report(value, step)
        if other.state == TrialState.PRUNED:
            raise optuna.TrialPruned()
        assert other.value is not None
        return other.value

    # -- final step ------------------------------------------------------------------------
    def finish(self) -> dict[str, object]:
        """Full evaluation of the top-k (and the default), best_config.json, best/, tables,
        plots and the search report."""
        options, context = self.options, self.context
        trials = self.study.get_trials(deepcopy=False)
        complete = [
            t
            for t in trials
            if t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs
        ]
        if not complete:
            raise InputError(
                f"study {options.study_name!r} has no complete trial: nothing to choose from"
            )
        ranked = sorted(complete, key=lambda t: (t.value, t.number))
        top = ranked[: options.top_k]
        default_params = self.space.default_params()
        default_trial = next((t for t in complete if t.params == default_params), None)
        evaluate_trials = list(top)
        if default_trial is not None and default_trial not in evaluate_trials:
            evaluate_trials.append(default_trial)
        eval_data = (
            load_dataset(
                options.eval_path,
                normalization=self.base.analysis.normalize,
                num_classes=num_classes_of(context.model),
                image_size=self.base.analysis.image_size,
            )
            if options.eval_path
            else None
        )
        trial_base = getattr(self, "trial_base", None) or self._with_size_cap()
        evaluations: dict[int, Accuracy] = {}
        final_timings = {"final_prepare_s": 0.0, "full_eval_s": 0.0}
        if eval_data is not None:
            for trial in evaluate_trials:
                start = time.perf_counter()
                config = self.space.config(trial_base, trial.params)
                prepared = context.prepare(config, self.trial_dir(trial.number))
                final_timings["final_prepare_s"] += time.perf_counter() - start
                start = time.perf_counter()
                quantized = context.build(prepared)
                evaluations[trial.number] = evaluate_accuracy(quantized, eval_data)
                final_timings["full_eval_s"] += time.perf_counter() - start
                logger.info(
                    "full evaluation of trial %d: top-1 %.2f %%",
                    trial.number,
                    100 * evaluations[trial.number].top1,
                )
            top_scoring = max(
                evaluate_trials, key=lambda t: (evaluations[t.number].top1, -t.value, -t.number)
            )
            best = self._unless_within_noise(top_scoring, default_trial, evaluations)
            self.selection = {
                "rule": f"the best top-1 replaces the default if its paired gain > "
                f"{options.min_gain_se:g} SE",
                "min_gain_se": options.min_gain_se,
                "best_top1_trial": top_scoring.number,
                "kept_default": best is not top_scoring,
            }
        else:
            best = ranked[0]
            self.selection = {"rule": "lowest proxy (no --eval data)"}
        best_config = self.space.config(trial_base, best.params)
        runfolder.write_json(options.out / "best_config.json", best_config.to_dict())
        start = time.perf_counter()
        best_run = self._run_best(best, best_config)
        final_timings["best_run_s"] = time.perf_counter() - start
        summary = self._summary(
            trials, top, best, default_trial, evaluations, final_timings, best_run
        )
        self._write_tables(trials, evaluations)
        plots = self._plots(trials, best, default_trial, evaluations, summary)
        summary["plots"] = [str(path.relative_to(options.out)) for path in plots]
        runfolder.write_json(options.out / "search_report.json", summary)
        runfolder.write_text(options.out / "search_report.md", _report_markdown(summary))
        return summary

    def _unless_within_noise(
        self,
        best: optuna.trial.FrozenTrial,
        default: optuna.trial.FrozenTrial | None,
        evaluations: Mapping[int, Accuracy],
    ) -> optuna.trial.FrozenTrial:
        """Keep lcpaq's default unless ``best`` beats it by more than ``min_gain_se`` paired
        standard errors: the maximum of k noisy accuracies is biased upwards, and a gain within
        the noise of the evaluation data is as likely a loss on other data."""
        if default is None or best.number == default.number:
            return best
        gain, stderr = paired_difference(evaluations[best.number], evaluations[default.number])
        if gain > self.options.min_gain_se * stderr:
            return best
        logger.info(
            "the best configuration (trial %d) beats the default by %+.2f ± %.2f points on the "
            "evaluation data, within %.1f SE: keeping the default",
            best.number,
            100 * gain,
            100 * stderr,
            self.options.min_gain_se,
        )
        return default

    def _run_best(self, best: optuna.trial.FrozenTrial, config: RunConfig) -> dict[str, object]:
        """The ordinary stages on ``best/``: allocate, export, evaluate, plot, report."""
        context = self.context
        best_dir = self.options.out / "best"
        folder, estimate, _ = context.curvature(config)
        table = context.table(config, estimate)
        context.write_analysis(best_dir, config, folder, table, copy_files=True)
        budgets = [parse_budget(text) for text in config.allocation.budgets]
        allocation = pipeline.allocate(best_dir, budgets, **config.allocation.options())
        expected = best.user_attrs.get("assignment")
        if expected is not None and list(allocation.formats) != list(expected):
            raise RuntimeError(
                f"best/ allocation differs from trial {best.number}'s: the stages are not "
                "deterministic on this machine"
            )
        pipeline.export(best_dir)
        result: dict[str, object] = {"folder": str(best_dir)}
        if self.options.eval_path:
            evaluation = pipeline.evaluate(best_dir, self.options.eval_path)
            result["evaluation"] = evaluation
        pipeline.plot(best_dir)
        result["report"] = str(pipeline.report(best_dir))
        return result

    # -- outputs ---------------------------------------------------------------------------
    def _rows(
        self, trials: Sequence[optuna.trial.FrozenTrial], evaluations: Mapping[int, Accuracy]
    ) -> list[dict[str, object]]:
        rows = []
        for trial in trials:
            attrs = trial.user_attrs
            steps = trial.intermediate_values
            row: dict[str, object] = {
                "number": trial.number,
                "state": trial.state.name,
                "proxy": trial.value
                if trial.value is not None
                else (steps[max(steps)] if steps else None),
                "proxy_images": max(steps) if steps else None,
                **{f"proxy_{rung}": steps.get(rung) for rung in self.options.rungs},
                **{name: trial.params.get(name) for name in self.space.names},
                "avg_bits": attrs.get("avg_bits"),
                "size_bytes": attrs.get("size_bytes"),
                "predicted_loss_increase": attrs.get("predicted_loss_increase"),
                "top1": evaluations[trial.number].top1 if trial.number in evaluations else None,
                "default": bool(attrs.get("default", False)),
                "duplicate_of": attrs.get("duplicate_of"),
                "error": attrs.get("error"),
                **{name: attrs.get(name) for name in _TIMING_KEYS},
                "duration_s": trial.duration.total_seconds() if trial.duration else None,
            }
            rows.append(row)
        return rows

    def _write_tables(
        self, trials: Sequence[optuna.trial.FrozenTrial], evaluations: Mapping[int, Accuracy]
    ) -> None:
        rows = self._rows(trials, evaluations)
        runfolder.write_json(self.options.out / "trials.json", {"trials": rows})
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["number"])
        writer.writeheader()
        writer.writerows(rows)
        runfolder.write_text(self.options.out / "trials.csv", buffer.getvalue())

    def _summary(
        self,
        trials: Sequence[optuna.trial.FrozenTrial],
        top: Sequence[optuna.trial.FrozenTrial],
        best: optuna.trial.FrozenTrial,
        default_trial: optuna.trial.FrozenTrial | None,
        evaluations: Mapping[int, Accuracy],
        final_timings: Mapping[str, float],
        best_run: Mapping[str, object],
    ) -> dict[str, object]:
        options = self.options
        states = [t.state for t in trials]
        split = {name: 0.0 for name in _TIMING_KEYS}
        for trial in trials:
            for name in _TIMING_KEYS:
                split[name] += float(trial.user_attrs.get(name, 0.0))
        split["hessian_s"] += self.process_timings.get("hessian_s", 0.0)
        split.update({name: float(value) for name, value in final_timings.items()})
        split["setup_s"] = self.process_timings["setup_s"]
        comparison: dict[str, object] = {}
        if default_trial is not None and best.number in evaluations:
            chosen, default = evaluations[best.number], evaluations[default_trial.number]
            difference, stderr = paired_difference(chosen, default)
            comparison = {
                "best_top1": chosen.top1,
                "default_top1": default.top1,
                "paired_difference": difference,
                "paired_difference_stderr": stderr,
                "eval_images": chosen.num_samples,
            }
        evaluated = [t for t in trials if t.number in evaluations]
        spearman = None
        if len(evaluated) >= 3:
            from scipy.stats import spearmanr

            rho = spearmanr(
                [-t.value for t in evaluated], [evaluations[t.number].top1 for t in evaluated]
            ).statistic
            spearman = None if not np.isfinite(rho) else float(rho)
        params_distinct = {
            json.dumps(t.params, sort_keys=True, default=str) for t in trials if t.params
        }
        return {
            "study": options.study_name,
            "storage": options.storage_url,
            "budgets": list(
                self.space.config(self._with_size_cap(), best.params).allocation.budgets
            ),
            "user_budgets": list(self.base.allocation.budgets),
            "size_cap_mb": self.study.user_attrs.get("size_cap_mb"),
            "proxy": options.proxy,
            "slices": self.context.slices.to_dict(),
            "space": self.space.describe(),
            "trials": {
                "total": len(trials),
                "complete": states.count(TrialState.COMPLETE),
                "pruned": states.count(TrialState.PRUNED),
                "failed": states.count(TrialState.FAIL),
                "running": states.count(TrialState.RUNNING),
                "duplicates": sum("duplicate_of" in t.user_attrs for t in trials),
                "distinct_configurations": len(params_distinct),
            },
            "best": {
                "trial": best.number,
                "params": best.params,
                "proxy": best.value,
                "top1": evaluations[best.number].top1 if best.number in evaluations else None,
                "avg_bits": best.user_attrs.get("avg_bits"),
                "size_bytes": best.user_attrs.get("size_bytes"),
                "config": str(options.out / "best_config.json"),
                "run": dict(best_run),
            },
            "default": None
            if default_trial is None
            else {
                "trial": default_trial.number,
                "params": default_trial.params,
                "proxy": default_trial.value,
                "top1": evaluations[default_trial.number].top1
                if default_trial.number in evaluations
                else None,
                "avg_bits": default_trial.user_attrs.get("avg_bits"),
                "size_bytes": default_trial.user_attrs.get("size_bytes"),
            },
            "best_vs_default": comparison,
            "selection": getattr(self, "selection", None),
            "top_k": [t.number for t in top],
            "full_evaluations": len(evaluations),
            "eval_data": options.eval_path,
            "spearman_proxy_vs_top1": spearman,
            "importances": self._importances(trials),
            "wall_time_split_s": split,
            "this_process_wall_s": time.perf_counter() - self.wall_start,
            # CPU seconds of all threads: less sensitive than wall time to other jobs on the host.
            "this_process_cpu_s": time.process_time() - self.cpu_start,
            "curvature_computations": self.context.analyze_calls,
        }

    def _importances(self, trials: Sequence[optuna.trial.FrozenTrial]) -> dict[str, float]:
        """fANOVA importances of the first-rung proxy over every scored trial (complete and
        pruned): the last rung is reached by a few trials only. KL and loss are taken in log10."""
        first = self.options.rungs[0]
        varied = [d for d in self.space.dimensions if len(d.choices) > 1]
        scored = [
            t
            for t in trials
            if first in t.intermediate_values
            and "duplicate_of" not in t.user_attrs
            and all(d.name in t.params for d in varied)
        ]
        if len(scored) < 3 or not varied:
            return {}
        memory = optuna.create_study(direction="minimize")
        distributions = {
            d.name: optuna.distributions.CategoricalDistribution(d.choices) for d in varied
        }
        for trial in scored:
            value = float(trial.intermediate_values[first])
            if self.options.proxy != "sqnr":
                value = math.log10(max(value, 1e-300))
            memory.add_trial(
                optuna.trial.create_trial(
                    params={d.name: trial.params[d.name] for d in varied},
                    distributions=distributions,
                    value=value,
                )
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importances = optuna.importance.get_param_importances(
                    memory,
                    evaluator=optuna.importance.FanovaImportanceEvaluator(seed=self.options.seed),
                )
        except (RuntimeError, ValueError) as error:
            logger.warning("parameter importances not computed: %s", error)
            return {}
        return {name: float(value) for name, value in importances.items()}

    def _plots(
        self,
        trials: Sequence[optuna.trial.FrozenTrial],
        best: optuna.trial.FrozenTrial,
        default_trial: optuna.trial.FrozenTrial | None,
        evaluations: Mapping[int, Accuracy],
        summary: Mapping[str, object],
    ) -> list[Path]:
        from lcpaq.search import plots as search_plots

        folder = self.options.out / "plots"
        title = f"{self.base.analysis.model} — budget {', '.join(summary['budgets'])}"  # type: ignore[arg-type]
        proxy_label = _PROXY_LABELS[self.options.proxy]
        paths = [
            search_plots.plot_proxy_per_trial(
                folder / "proxy_per_trial.png",
                trials=self._rows(trials, evaluations),
                rungs=self.options.rungs,
                best=best.number,
                default=default_trial.number if default_trial else None,
                log_scale=self.options.proxy != "sqnr",
                ylabel=proxy_label,
                title=f"Proxy score per trial: {title}",
            ),
            search_plots.plot_importances(
                folder / "importances.png",
                importances=summary["importances"],  # type: ignore[arg-type]
                title=f"Parameter importances (fANOVA, first-rung proxy): {title}",
            ),
        ]
        if evaluations:
            paths.append(
                search_plots.plot_proxy_vs_accuracy(
                    folder / "proxy_vs_accuracy.png",
                    points=[
                        (t.number, float(t.value), 100 * evaluations[t.number].top1)
                        for t in trials
                        if t.number in evaluations and t.value is not None
                    ],
                    best=best.number,
                    default=default_trial.number if default_trial else None,
                    log_scale=self.options.proxy != "sqnr",
                    xlabel=proxy_label,
                    title=f"Proxy vs top-1 on {Path(self.options.eval_path or '').name}: {title}",
                )
            )
        return paths


_TIMING_KEYS = ("hessian_s", "candidates_s", "ilp_s", "correction_s", "proxy_s")
_PROXY_LABELS = {
    "kl": "mean KL(p_FP32 ‖ p_quantized), nats",
    "loss": "cross-entropy of the quantized model",
    "sqnr": "−SQNR of the logits, dB (lower is better)",
}


def _report_markdown(summary: Mapping[str, Any]) -> str:
    trials = summary["trials"]
    best, default = summary["best"], summary["default"]
    lines = [
        f"# lcpaq search: study `{summary['study']}`",
        "",
        f"Budgets (hard, every trial): {', '.join(summary['budgets'])}"
        + (
            f" (the size cap is lcpaq's default configuration's size at {', '.join(summary['user_budgets'])})"
            if summary.get("size_cap_mb")
            else ""
        )
        + ".",
        f"Proxy: `{summary['proxy']}` on calibration images {summary['slices']['proxy']} "
        f"(rungs {summary['slices']['proxy_rungs']}); curvature and correction use images "
        f"{summary['slices']['curvature_and_correction']}.",
        f"Trials: {trials['total']} ({trials['complete']} complete, {trials['pruned']} pruned, "
        f"{trials['failed']} failed, {trials['duplicates']} repeats of an earlier configuration; "
        f"{trials['distinct_configurations']} distinct configurations). Full evaluations: "
        f"{summary['full_evaluations']}"
        + (
            f" on `{summary['eval_data']}`."
            if summary["eval_data"]
            else " (no --eval: chosen by proxy)."
        ),
        "",
        "| | trial | proxy | top-1 % | avg bits | size bytes |",
        "|---|---|---|---|---|---|",
    ]
    for label, entry in (("best", best), ("default", default)):
        if entry is None:
            continue
        top1 = "" if entry["top1"] is None else f"{100 * entry['top1']:.2f}"
        lines.append(
            f"| {label} | {entry['trial']} | {entry['proxy']:.5g} | {top1} | "
            f"{entry['avg_bits']:.3f} | {entry['size_bytes']:.0f} |"
        )
    comparison = summary["best_vs_default"]
    if comparison:
        lines += [
            "",
            f"Best vs default, paired on {comparison['eval_images']} images: "
            f"{100 * comparison['paired_difference']:+.2f} ± "
            f"{100 * comparison['paired_difference_stderr']:.2f} points.",
        ]
    selection = summary.get("selection") or {}
    if selection.get("kept_default"):
        lines += [
            "",
            f"Trial {selection['best_top1_trial']} had the best top-1, but its gain over the "
            f"default was within {selection['min_gain_se']:g} paired SE: the default is kept.",
        ]
    lines += ["", "Best configuration (differences from the default in bold):", ""]
    for name, value in best["params"].items():
        changed = default is not None and default["params"].get(name) != value
        lines.append(f"- {name}: {'**' if changed else ''}{value}{'**' if changed else ''}")
    lines += ["", "## Wall time", "", "| part | seconds |", "|---|---|"]
    lines += [
        f"| {name[:-2]} | {seconds:.1f} |" for name, seconds in summary["wall_time_split_s"].items()
    ]
    if summary["importances"]:
        lines += ["", "## Parameter importances (fANOVA on the first-rung proxy)", ""]
        lines += [f"- {name}: {value:.3f}" for name, value in summary["importances"].items()]
    if summary["spearman_proxy_vs_top1"] is not None:
        lines += [
            "",
            f"Spearman(−proxy, top-1) over the {summary['full_evaluations']} evaluated "
            f"configurations: {summary['spearman_proxy_vs_top1']:.2f}.",
        ]
    lines += ["", f"Ordinary run folder of the best configuration: `{best['run']['folder']}`.", ""]
    return "\n".join(lines)


def run_search(options: SearchOptions, *, progress: bool = True) -> dict[str, object]:
    """``lcpaq search``: run (or resume) the study, then the final step."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # lcpaq logs each trial itself
    try:
        search = Search(options, progress=progress)
        search.run_trials()
        return search.finish()
    finally:
        optuna.logging.set_verbosity(verbosity)
