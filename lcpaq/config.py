"""Run configuration: one frozen dataclass per stage, stored in the run folder as ``run_config.json``
so later stages (and re-runs) read the same model, data and options the analysis used."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from lcpaq.errors import InputError
from lcpaq.formats import QuantScheme, parse_format_list

FirstLastPolicy = Literal["search", "keep-8bit"]
DEFAULT_FORMATS = "int2,int3,int4,int5,int6,int8"


@dataclass(frozen=True)
class AnalysisConfig:
    """Model, calibration data and what the analysis measures.

    ``num_samples``: calibration images for the curvature (standard errors shrink as 1/√N; on
    ResNet20 256 images give ~20-50 % per-layer relative error of the data mean, see report).
    ``hutchinson_probes``: 0 disables the Hutchinson cross-check, otherwise its probe cap.
    """

    model: str
    checkpoint: str | None
    calib: str
    normalize: str = "imagenet"
    image_size: int | None = None
    num_samples: int = 256
    batch_size: int = 64
    loss: Literal["cross_entropy", "mse"] = "cross_entropy"
    formats: tuple[str, ...] = parse_format_list(DEFAULT_FORMATS)
    scheme: QuantScheme = field(default_factory=QuantScheme)
    hutchinson_probes: int = 0
    hutchinson_samples: int = 128
    seed: int = 0
    allow_unsafe_pickle: bool = False

    def __post_init__(self) -> None:
        for name in ("num_samples", "batch_size", "hutchinson_samples"):
            if getattr(self, name) < 1:
                raise InputError(
                    f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if self.hutchinson_probes < 0 or self.hutchinson_probes == 1:
            raise InputError(
                f"hutchinson-probes must be 0 (off) or at least 2, got {self.hutchinson_probes}"
            )


@dataclass(frozen=True)
class RecoveryConfig:
    """Statistics correction after quantization (see `lcpaq.recovery`)."""

    enabled: bool = True
    num_samples: int = 1024

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise InputError(f"correction-samples must be at least 1, got {self.num_samples}")


@dataclass(frozen=True)
class RunConfig:
    analysis: AnalysisConfig
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        analysis = dict(data["analysis"])
        analysis["scheme"] = QuantScheme.from_dict(analysis["scheme"])
        analysis["formats"] = tuple(analysis["formats"])
        return cls(analysis=AnalysisConfig(**analysis), recovery=RecoveryConfig(**data["recovery"]))

    def with_analysis(self, **changes: Any) -> RunConfig:
        return replace(self, analysis=replace(self.analysis, **changes))
