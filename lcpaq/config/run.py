"""A run's whole configuration as one file, ``run_config.json``: analysis, recovery, allocation.

`RunConfig.to_dict`/`from_dict` write and read it; `RecoveryConfig` (statistics correction) lives
here because it is a field of the run and has no stage module of its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from lcpaq.config.allocation import AllocationConfig
from lcpaq.config.analysis import AnalysisConfig
from lcpaq.config.options import CORRECTION_GROUP, option
from lcpaq.config.text import TextOptions
from lcpaq.errors import InputError
from lcpaq.quant.formats import QuantScheme


@dataclass(frozen=True)
class RecoveryConfig:
    """Statistics correction after quantization (see `lcpaq.model.recovery`)."""

    enabled: bool = field(
        default=True,
        metadata=option(
            "--no-correction",
            group=CORRECTION_GROUP,
            parse=lambda skip: not skip,
            show=lambda enabled: not enabled,
            help="skip statistics correction",
        ),
    )
    num_samples: int = field(
        default=1024,
        metadata=option(
            "--correction-samples",
            group=CORRECTION_GROUP,
            help="calibration images for BN statistics / bias correction after quantization",
        ),
    )
    learn_scales: bool = field(
        default=False,
        metadata=option(
            "--learn-scales",
            group=CORRECTION_GROUP,
            help="quantize integer formats at the step sizes analyze --limpq-steps learned "
            "(step_sizes.npz) instead of the scheme's clipping; per-channel scales only",
        ),
    )

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise InputError(f"correction-samples must be at least 1, got {self.num_samples}")


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
            for key in ("include", "exclude"):  # JSON lists; absent from older configurations
                analysis[key] = tuple(analysis.get(key, ()))
            analysis.setdefault("act_clipping", "minmax")  # what older configurations did
            analysis["text"] = TextOptions.from_dict(analysis.get("text", {}))
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
