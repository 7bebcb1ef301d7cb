"""Run configuration: one frozen dataclass per stage, stored in the run folder as ``run_config.json``
so later stages (and re-runs) read the same model, data and options the analysis used."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from lcpaq.errors import InputError
from lcpaq.quant.formats import QuantScheme, parse_format_list

FirstLastPolicy = Literal["search", "keep-8bit"]
DEFAULT_FORMATS = "int2,int3,int4,int5,int6,int8"
#: The pipeline's quantizer: `QuantScheme`'s data-free defaults (asymmetric, per channel, MSE
#: clipping) with GPTQ rounding, which the pipeline can afford because it has calibration images:
#: +1.4 to +7.7 points over round-to-nearest on the shared ResNets at 2-3 average bits
#: (docs/results.md, "Rounding").
DEFAULT_SCHEME = QuantScheme(rounding="gptq")


@dataclass(frozen=True)
class AnalysisConfig:
    """Model, calibration data and what the analysis measures.

    ``num_samples``: calibration images for the curvature (standard errors shrink as 1/√N; on
    ResNet20 256 images give ~20-50 % per-layer relative error of the data mean, see report).
    ``estimator``: the curvature used for scoring: ``gauss-newton`` (exact per-layer Gauss–Newton
    traces, the default) or ``hutchinson`` (exact-Hessian single-layer Hutchinson traces with
    probe budgets allocated by layer variance, stopped at ``hutchinson_rel_tol`` relative standard
    error per layer or after ``hutchinson_probes`` probes in all, which must be >= 2 per layer).
    ``hutchinson_probes``: with ``gauss-newton``, 0 disables the Hutchinson cross-check, otherwise
    its probe cap. ``loss``: ``cross_entropy``, ``mse`` or ``kl`` (KL to the FP32 outputs,
    label-free; for Gauss–Newton it equals cross-entropy's curvature, `lcpaq.sensitivity.gauss_newton`).
    ``act_formats``: activation formats paired with every weight format into (weight, activation)
    candidates (`lcpaq.sensitivity.candidates`); empty: one candidate per weight format, 8-bit activations
    assumed by the cost models. Activations of a paired candidate are quantized at inference with
    one static range per layer input, calibrated by ``act_clipping``: ``mse`` (the range that
    minimises each format's squared error on the calibration activations, the default) or
    ``minmax`` (the observed range, what run configurations from before the option used).
    ``pyhessian_iters``: 0 (off) or the iteration cap of the PyHessian cross-check (whole-model
    trace and top eigenvalue over the layers' weights, on the Hutchinson samples, cross-entropy).
    """

    model: str
    checkpoint: str | None
    calib: str
    normalize: str = "imagenet"
    image_size: int | None = None
    num_samples: int = 256
    batch_size: int = 64
    loss: Literal["cross_entropy", "mse", "kl"] = "cross_entropy"
    formats: tuple[str, ...] = parse_format_list(DEFAULT_FORMATS)
    act_formats: tuple[str, ...] = ()
    act_clipping: Literal["minmax", "mse"] = "mse"
    scheme: QuantScheme = DEFAULT_SCHEME
    hutchinson_probes: int = 0
    hutchinson_samples: int = 128
    estimator: Literal["gauss-newton", "hutchinson"] = "gauss-newton"
    hutchinson_rel_tol: float = 0.05
    pyhessian_iters: int = 0
    seed: int = 0
    allow_unsafe_pickle: bool = False
    # Inter-layer terms (`lcpaq.sensitivity.interactions`, METHOD §1c): off by default, see docs/results.md.
    pairwise: Literal["none", "hessian", "gauss-newton", "forward"] = "none"
    pair_rule: Literal["window", "block", "all"] = "window"
    pair_window: int = 3
    pair_samples: int = 256
    pair_loss: Literal["kl", "cross_entropy"] = "kl"
    pair_max_bits: int = 4

    def __post_init__(self) -> None:
        for name in (
            "num_samples",
            "batch_size",
            "hutchinson_samples",
            "pair_window",
            "pair_samples",
        ):
            if getattr(self, name) < 1:
                raise InputError(
                    f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        _check_pair_options(self)
        if self.hutchinson_probes < 0 or self.hutchinson_probes == 1:
            raise InputError(
                f"hutchinson-probes must be 0 (off) or at least 2, got {self.hutchinson_probes}"
            )
        _check_estimator_options(self)
        from lcpaq.allocation.table import (
            activation_bits,  # local: keeps config's imports minimal
        )

        for name in self.act_formats:
            activation_bits(name)  # an unknown activation format fails before any analysis
        if self.act_clipping not in ("minmax", "mse"):
            raise InputError(f"act-clipping must be minmax or mse, got {self.act_clipping!r}")


ESTIMATORS = ("gauss-newton", "hutchinson")
LOSSES = ("cross_entropy", "mse", "kl")


def _check_estimator_options(config: AnalysisConfig) -> None:
    if config.estimator not in ESTIMATORS:
        raise InputError(
            f"estimator must be one of {', '.join(ESTIMATORS)}, got {config.estimator!r}"
        )
    if config.loss not in LOSSES:
        raise InputError(f"loss must be one of {', '.join(LOSSES)}, got {config.loss!r}")
    if config.estimator == "hutchinson" and config.hutchinson_probes < 2:
        raise InputError(
            "estimator hutchinson needs a probe cap: give --hutchinson-probes (at least 2 per "
            f"layer), got {config.hutchinson_probes}"
        )
    if config.pyhessian_iters < 0 or config.pyhessian_iters == 1:
        raise InputError(
            f"pyhessian-iters must be 0 (off) or at least 2, got {config.pyhessian_iters}"
        )
    if config.pyhessian_iters and config.loss != "cross_entropy":
        raise InputError(
            f"the PyHessian cross-check (--pyhessian-iters) measures cross-entropy; it cannot "
            f"check loss {config.loss!r}"
        )
    if not 0 <= config.hutchinson_rel_tol < float("inf"):
        raise InputError(
            f"hutchinson-rel-tol must be a finite number >= 0, got {config.hutchinson_rel_tol}"
        )


def _check_pair_options(config: AnalysisConfig) -> None:
    from lcpaq.sensitivity.interaction_terms import PAIR_RULES, PAIR_SOURCES

    for name, value, known in (
        ("pairwise", config.pairwise, PAIR_SOURCES),
        ("pair-rule", config.pair_rule, PAIR_RULES),
        ("pair-loss", config.pair_loss, ("kl", "cross_entropy")),
    ):
        if value not in known:
            raise InputError(f"{name} must be one of {', '.join(known)}, got {value!r}")
    if config.pair_max_bits < 2:
        raise InputError(f"pair-max-bits must be at least 2, got {config.pair_max_bits}")


@dataclass(frozen=True)
class RecoveryConfig:
    """Statistics correction after quantization (see `lcpaq.model.recovery`)."""

    enabled: bool = True
    num_samples: int = 1024

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise InputError(f"correction-samples must be at least 1, got {self.num_samples}")


@dataclass(frozen=True)
class AllocationConfig:
    """How the ILP chooses formats (see `lcpaq.allocation.problem`); the options of ``lcpaq allocate``.

    ``budgets``: ``METRIC=VALUE`` texts (`lcpaq.allocation.problem.parse_budget`), all hard limits; empty means
    "given on the command line". ``cost_weights``: λ_k of the objective Σ s + Σ_k λ_k·cost_k/B_k
    (METHOD §4; 0 for every metric by default, so hard budgets alone decide).
    ``pairwise_weight`` (λ), ``pair_z``, ``pair_clip``, ``pairwise_mode``: how the inter-layer terms
    of ``interactions.npz`` (if the analysis stored them) enter the objective (`lcpaq.allocation.pairwise`):
    C := 0 where |C| < z·SE, then λ·C, then optional clipping; ``augmented`` (separable scores
    around the incumbent, METHOD §1d; the default: best mean and smallest worst case on ResNet20,
    docs/results.md) or ``ilp`` (exact pair products). λ = 0 ignores them.
    """

    budgets: tuple[str, ...] = ()
    first_last: FirstLastPolicy = "search"
    scorer: str = "hawq_v2"
    ties: tuple[tuple[str, ...], ...] = ()
    tie_rule: str = "none"
    latency_table: str | None = None
    cost_weights: tuple[tuple[str, float], ...] = ()
    pairwise_weight: float = 1.0
    pair_z: float = 2.0
    pair_clip: Literal["none", "negative", "psd"] = "none"
    pairwise_mode: Literal["ilp", "augmented"] = "augmented"

    def __post_init__(self) -> None:
        if self.first_last not in ("search", "keep-8bit"):
            raise InputError(f"first-last must be 'search' or 'keep-8bit', got {self.first_last!r}")
        from lcpaq.allocation.pairwise import PAIR_CLIPS, PAIRWISE_MODES

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
        options: dict[str, Any] = {
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
        if self.cost_weights:
            options["cost_weights"] = dict(self.cost_weights)
        return options

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AllocationConfig:
        data = dict(data)
        data["budgets"] = tuple(data.get("budgets", ()))
        data["ties"] = tuple(tuple(group) for group in data.get("ties", ()))
        data["cost_weights"] = tuple(
            (str(metric), float(weight)) for metric, weight in data.get("cost_weights", ())
        )
        return cls(**data)


#: Version of the run_config.json layout; files without one are version 1 (no allocation block).
CONFIG_VERSION = 2


@dataclass(frozen=True)
class RunConfig:
    """Everything a run does, as one JSON file (``run_config.json``; ``lcpaq run --config`` reads it
    back, which is how a configuration found by ``lcpaq search`` is reproduced)."""

    analysis: AnalysisConfig
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    allocation: AllocationConfig = field(default_factory=AllocationConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"config_version": CONFIG_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "run configuration") -> RunConfig:
        try:
            analysis = dict(data["analysis"])
            analysis["scheme"] = QuantScheme.from_dict(analysis["scheme"])
            analysis["formats"] = tuple(analysis["formats"])
            analysis["act_formats"] = tuple(analysis.get("act_formats", ()))
            analysis.setdefault("act_clipping", "minmax")  # what older configurations did
            return cls(
                analysis=AnalysisConfig(**analysis),
                recovery=RecoveryConfig(**data.get("recovery", {})),
                allocation=AllocationConfig.from_dict(data.get("allocation", {})),
            )
        except (KeyError, TypeError) as error:
            raise InputError(f"{source} is malformed: {error}") from None

    def with_analysis(self, **changes: Any) -> RunConfig:
        return replace(self, analysis=replace(self.analysis, **changes))

    def with_allocation(self, **changes: Any) -> RunConfig:
        return replace(self, allocation=replace(self.allocation, **changes))
