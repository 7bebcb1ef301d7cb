"""Flags of the subcommands that are not part of a run configuration: the sweep's, the analysis'
resume, the export's and the search's.

Declared like the configuration's options (`lcpaq.config.options`); `lcpaq.cli` builds
`SweepSettings` and `ExportSettings` from the parsed flags and hands `SearchSettings`' values to
`lcpaq.search.SearchOptions`, whose defaults they must equal (tests/test_config.py checks).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lcpaq.allocation.costs import COST_METRICS
from lcpaq.config.options import option
from lcpaq.errors import InputError

SEARCH_GROUP = "search"
RESUME_GROUP = "interrupted analyses"
EXPORT_GROUP = "export of transformers models"


def _sweep_points(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0 or value == 1:
        raise argparse.ArgumentTypeError(f"must be 0 (no sweep) or at least 2, got {value}")
    return value


def _eval_samples(text: str) -> int | None:
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number or 'all'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 or 'all', got {value}")
    return value


@dataclass(frozen=True)
class SweepSettings:
    """The model-level curve after a run (`lcpaq.stages.pipeline.sweep`'s options)."""

    num_points: int = field(
        default=8,
        metadata=option(
            "--sweep-points",
            type=_sweep_points,
            help="budgets on the model-level curve (default %(default)s; 0 skips the sweep)",
        ),
    )
    min_bits: float | None = field(default=None, metadata=option("--sweep-min-bits"))
    metrics: list[str] | None = field(
        default=None,
        metadata=option(
            "--sweep-metric",
            repeat=True,
            choices=COST_METRICS,
            help="budget metric to sweep (repeatable; default: the metrics of the run's budgets, "
            "the other budgets held fixed)",
        ),
    )
    eval_samples: int | None = field(
        default=0,
        metadata=option(
            "--sweep-eval-samples",
            type=_eval_samples,
            help="evaluation samples each sweep point's metric (top-1, recall@1, perplexity) is "
            "measured on, or 'all' (default %(default)s: run/demo draw the predicted curve and "
            "take the chosen budget's metric from evaluate; lcpaq sweep --eval measures all "
            "samples unless a number > 0 is given)",
        ),
    )


@dataclass(frozen=True)
class ResumeSettings:
    """Interrupting and resuming ``analyze`` (`lcpaq.stages.resume`): no part of the run
    configuration, because they do not change what the analysis measures."""

    resume: bool = field(
        default=False,
        metadata=option(
            "--resume",
            help="continue the interrupted analysis in --out from the last saved batch of every "
            "estimator, to the same result (refused when the analysis options differ)",
        ),
    )
    every_s: float = field(
        default=10.0,
        metadata=option(
            "--state-every-s",
            help="seconds between saves of the analysis' running state into OUT/analysis_state "
            "(default %(default)g; 0: after every batch)",
        ),
    )

    def __post_init__(self) -> None:
        if not self.every_s >= 0:
            raise InputError(f"--state-every-s must be >= 0 seconds, got {self.every_s}")


@dataclass(frozen=True)
class ExportSettings:
    """What ``export`` writes beside the lcpaq checkpoint for a transformers model
    (`lcpaq.stages.hf_export`); other models get the checkpoint only."""

    hf_folder: bool = field(
        default=True,
        metadata=option(
            "--no-hf-folder",
            group=EXPORT_GROUP,
            parse=lambda skip: not skip,
            show=lambda write: not write,
            help="skip the ready-to-load Hugging Face folder of dequantized weights (QUANTIZED/hf)",
        ),
    )
    compressed_tensors: Literal["off", "dequantize", "refuse"] = field(
        default="dequantize",
        metadata=option(
            "--compressed-tensors",
            group=EXPORT_GROUP,
            help="the compressed-tensors folder vLLM serves (QUANTIZED/compressed-tensors): "
            "layers in formats it cannot express are written dequantized (default), or refused "
            "(refuse), or no folder is written (off)",
        ),
    )


@dataclass(frozen=True)
class SearchSettings:
    """``lcpaq search``'s own flags (the run options it holds fixed come from the configs)."""

    out: Path = field(metadata=option("--out", required=True, help="search folder"))
    trials: int = field(
        default=60, metadata=option("--trials", help="finished trials (default %(default)s)")
    )
    eval: str | None = field(
        default=None,
        metadata=option("--eval", help="labelled data for the full evaluation of the top-k"),
    )
    top_k: int = field(default=3, metadata=option("--top-k", help="configurations fully evaluated"))
    min_gain_se: float = field(
        default=1.0,
        metadata=option(
            "--min-gain-se",
            help="the best of the full evaluation replaces the default configuration only when it "
            "beats it by more than this many paired standard errors (default %(default)g)",
        ),
    )
    proxy: Literal["kl", "loss", "sqnr"] = field(default="kl", metadata=option("--proxy"))
    proxy_samples: str = field(
        default="128,384,1152",
        metadata=option(
            "--proxy-samples",
            help="growing proxy slices for successive halving (default %(default)s)",
        ),
    )
    fidelity: Literal["full", "multi"] = field(
        default="full",
        metadata=option(
            "--fidelity",
            help="multi: the first proxy slice on a cheap configuration (--cheap-samples "
            "curvature, GPTQ and correction images), full fidelity only for the trials the "
            "pruner keeps (default %(default)s: every slice at the trial's own settings)",
        ),
    )
    cheap_samples: int = field(
        default=128,
        metadata=option(
            "--cheap-samples",
            help="images of the cheap first rung's curvature, GPTQ and correction "
            "(default %(default)s)",
        ),
    )
    fix: list[str] | None = field(
        default=None,
        metadata=option(
            "--fix",
            repeat=True,
            metavar="NAME=VALUE",
            help="pin a search dimension, e.g. --fix formats=int-pow2 (docs/05-search.md)",
        ),
    )
    also: list[str] | None = field(
        default=None,
        metadata=option(
            "--also",
            repeat=True,
            metavar="NAME",
            help="search an optional dimension too (estimator: Hutchinson traces; pairwise: "
            "inter-layer terms and their window; act_formats: quantized activations, with "
            "act_clipping their ranges; each costs extra curvature-like passes)",
        ),
    )
    size_cap: Literal["default", "none"] = field(
        default="default",
        metadata=option(
            "--size-cap",
            help="hold every trial to the default configuration's size (default) unless a size "
            "budget is given",
        ),
    )
    storage: str | None = field(
        default=None,
        metadata=option("--storage", help="Optuna storage URL (default sqlite:///OUT/search.db)"),
    )
    study_name: str = field(default="lcpaq-search", metadata=option("--study-name"))
    resume: bool = field(
        default=False, metadata=option("--resume", help="continue an existing study")
    )
    worker: bool = field(
        default=False,
        metadata=option(
            "--worker",
            help="one of several processes on a shared --storage: create the study or join it, "
            "run trials until --trials are scored, skip the final step (run --resume after)",
        ),
    )
