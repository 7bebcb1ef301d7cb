"""The allocation stage's configuration: budgets and how the ILP chooses formats.

`AllocationConfig` (stored under ``allocation`` in ``run_config.json``; the options of
``lcpaq allocate``) with the command-line flags of its fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lcpaq.allocation.budgets import TIE_RULES, parse_budget, parse_tie
from lcpaq.allocation.frontier import SCORERS
from lcpaq.allocation.pairwise import (
    DEFAULT_PAIR_CLIP,
    DEFAULT_PAIR_Z,
    DEFAULT_PAIRWISE_MODE,
    DEFAULT_PAIRWISE_WEIGHT,
    PAIR_CLIPS,
    PAIRWISE_MODES,
    PairClip,
    PairwiseMode,
)
from lcpaq.config.options import ALLOCATION_GROUP, option
from lcpaq.errors import InputError

FirstLastPolicy = Literal["search", "keep-8bit"]


def _budgets(texts: list[str] | None) -> tuple[str, ...]:
    """``--budget`` texts, validated and normalised (``avg-bits=3`` → ``avg-bits=3.0``)."""
    return tuple(str(parse_budget(text)) for text in texts or [])


def _ties(texts: list[str] | None) -> tuple[tuple[str, ...], ...]:
    return tuple(parse_tie(text) for text in texts or [])


def _repeated(values: tuple[Any, ...]) -> list[str] | None:
    """A repeatable flag's default: None (not given) for an empty field."""
    return [str(value) for value in values] or None


@dataclass(frozen=True)
class AllocationConfig:
    """How the ILP chooses formats (see `lcpaq.allocation`); the options of ``lcpaq allocate``.

    ``budgets``: ``METRIC=VALUE`` texts (`lcpaq.allocation.budgets.parse_budget`), all hard limits; empty means
    "given on the command line". ``cost_weights``: λ_k of the objective Σ s + Σ_k λ_k·cost_k/B_k
    (METHOD §4; 0 for every metric by default, so hard budgets alone decide).
    ``pairwise_weight`` (λ), ``pair_z``, ``pair_clip``, ``pairwise_mode``: how the inter-layer terms
    of ``interactions.npz`` (if the analysis stored them) enter the objective (`lcpaq.allocation.pairwise`):
    C := 0 where |C| < z·SE, then λ·C, then optional clipping; ``augmented`` (separable scores
    around the incumbent, METHOD §1d; the default: best mean and smallest worst case on ResNet20,
    docs/results.md) or ``ilp`` (exact pair products). λ = 0 ignores them.
    """

    budgets: tuple[str, ...] = field(
        default=(),
        metadata=option(
            "--budget",
            group=ALLOCATION_GROUP,
            required=True,
            repeat=True,
            amends_config=True,
            metavar="METRIC=VALUE",
            parse=_budgets,
            show=_repeated,
            help="avg-bits, size-mb, size-frac (of FP32), bitops-g, ebops-g (GBOPs per sample) or "
            "latency-ms, e.g. size-mb=0.12; repeat to combine (all are hard limits)",
        ),
    )
    first_last: FirstLastPolicy = field(
        default="search", metadata=option("--first-last", group=ALLOCATION_GROUP)
    )
    scorer: str = field(
        default="hawq_v2",
        metadata=option(
            "--scorer",
            group=ALLOCATION_GROUP,
            choices=tuple(SCORERS),
            help="per-layer score: trace/n × weight error (hawq_v2), the curvature diagonal × "
            "error (diagonal), trace/n × the error seen through the layer's input correlations "
            "(output; needs GPTQ's input second moments), or LIMPQ's learned step sizes (limpq; "
            "needs analyze --limpq-steps)",
        ),
    )
    ties: tuple[tuple[str, ...], ...] = field(
        default=(),
        metadata=option(
            "--tie",
            group=ALLOCATION_GROUP,
            repeat=True,
            metavar="LAYER,LAYER[,...]",
            parse=_ties,
            show=_repeated,
            help="layers that must share one format; repeatable",
        ),
    )
    tie_rule: str = field(
        default="none",
        metadata=option(
            "--tie-rule",
            group=ALLOCATION_GROUP,
            choices=TIE_RULES,
            help="tie layers by a rule: none (default) or downsample (shortcut conv with its block)",
        ),
    )
    latency_table: str | None = field(
        default=None,
        metadata=option(
            "--latency-table",
            group=ALLOCATION_GROUP,
            help="measured per-layer latency (CSV layer,format,ms or JSON); default: roofline "
            "estimate",
        ),
    )
    cost_weights: tuple[tuple[str, float], ...] = ()  # not on the command line: run_config.json
    pairwise_weight: float = field(
        default=DEFAULT_PAIRWISE_WEIGHT,
        metadata=option(
            "--pairwise-weight",
            group=ALLOCATION_GROUP,
            help="λ on the inter-layer terms of interactions.npz, if the analysis stored any "
            "(0: ignore)",
        ),
    )
    pair_z: float = field(
        default=DEFAULT_PAIR_Z,
        metadata=option(
            "--pair-z",
            group=ALLOCATION_GROUP,
            help="set a pair term to 0 when |C| < z·SE (default %(default)g; 0 keeps all)",
        ),
    )
    pair_clip: PairClip = field(
        default=DEFAULT_PAIR_CLIP,
        metadata=option(
            "--pair-clip",
            group=ALLOCATION_GROUP,
            help="clip negative pair terms, or project Ω to PSD (CLADO); default %(default)s",
        ),
    )
    pairwise_mode: PairwiseMode = field(
        default=DEFAULT_PAIRWISE_MODE,
        metadata=option(
            "--pairwise-mode",
            group=ALLOCATION_GROUP,
            help="separable scores around the incumbent (METHOD §1d; default: best mean and "
            "smallest worst case on ResNet20, docs/results.md) or exact pair products in the ILP",
        ),
    )

    def __post_init__(self) -> None:
        if self.first_last not in ("search", "keep-8bit"):
            raise InputError(f"first-last must be 'search' or 'keep-8bit', got {self.first_last!r}")
        for name, value in (("pairwise-weight", self.pairwise_weight), ("pair-z", self.pair_z)):
            if not 0 <= value < float("inf"):
                raise InputError(f"{name} must be a finite number >= 0, got {value}")
        if self.pair_clip not in PAIR_CLIPS:
            raise InputError(
                f"pair-clip must be one of {', '.join(PAIR_CLIPS)}, got {self.pair_clip!r}"
            )
        if self.pairwise_mode not in PAIRWISE_MODES:
            raise InputError(
                f"pairwise-mode must be one of {', '.join(PAIRWISE_MODES)}, got {self.pairwise_mode!r}"
            )
        for metric, weight in self.cost_weights:
            if not weight >= 0:
                raise InputError(f"cost weight of {metric} must be >= 0, got {weight}")

    def options(self) -> dict[str, Any]:
        """Keyword arguments of `lcpaq.stages.pipeline.allocate` (everything but the budgets)."""
        options = self.problem_options()
        if self.cost_weights:
            options["cost_weights"] = dict(self.cost_weights)
        return options

    def problem_options(self) -> dict[str, Any]:
        """Keyword arguments of `lcpaq.stages.allocate.problem_of` (and ``options_record``)."""
        return {
            "first_last": self.first_last,
            "scorer": self.scorer,
            "ties": [list(group) for group in self.ties],
            "tie_rule": self.tie_rule,
            "latency_table": self.latency_table,
            "pairwise_weight": self.pairwise_weight,
            "pair_z": self.pair_z,
            "pair_clip": self.pair_clip,
            "pairwise_mode": self.pairwise_mode,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AllocationConfig:
        data = dict(data)
        data["budgets"] = tuple(data.get("budgets", ()))
        data["ties"] = tuple(tuple(group) for group in data.get("ties", ()))
        data["cost_weights"] = tuple(
            (str(metric), float(weight)) for metric, weight in data.get("cost_weights", ())
        )
        return cls(**data)
