"""The analysis stage's configuration: model, calibration data, quantizer and what is measured.

`AnalysisConfig` (stored under ``analysis`` in ``run_config.json``) with the command-line flags of
its fields and of the `QuantScheme` it holds (`SCHEME_OPTIONS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from lcpaq.config.options import (
    ANALYSIS_GROUP,
    MODEL_GROUP,
    NESTED,
    PAIR_GROUP,
    Option,
    option,
)
from lcpaq.config.text import TEXT_OPTIONS, TextOptions
from lcpaq.errors import InputError
from lcpaq.quant.formats import CLIPPINGS, GRANULARITIES, ROUNDINGS, QuantScheme, parse_format_list

Loss = Literal["auto", "cross_entropy", "mse", "kl"]
Estimator = Literal["gauss-newton", "hutchinson"]
ESTIMATORS: tuple[str, ...] = get_args(Estimator)
LOSSES: tuple[str, ...] = get_args(Loss)
DEFAULT_FORMATS = "int2,int3,int4,int5,int6,int8"
#: The pipeline's quantizer: `QuantScheme`'s data-free defaults (asymmetric, per channel, MSE
#: clipping) with GPTQ rounding, which the pipeline can afford because it has calibration images:
#: +1.4 to +7.7 points over round-to-nearest on the shared ResNets at 2-3 average bits
#: (docs/results.md, "Rounding").
DEFAULT_SCHEME = QuantScheme(rounding="gptq")

#: The `QuantScheme` fields on the command line (its defaults: `DEFAULT_SCHEME`'s), in help order.
SCHEME_OPTIONS: dict[str, Option] = {
    "symmetric": Option(
        "--symmetric", group=ANALYSIS_GROUP, help="symmetric codes (default asymmetric)"
    ),
    "granularity": Option(
        "--granularity",
        group=ANALYSIS_GROUP,
        choices=GRANULARITIES,
        help="scales per output channel, per tensor, per --group-size inputs, or OCP MX blocks "
        "of 32",
    ),
    "group_size": Option(
        "--group-size", group=ANALYSIS_GROUP, help="inputs per scale with --granularity group"
    ),
    "clipping": Option("--clipping", group=ANALYSIS_GROUP, choices=CLIPPINGS),
    "percentile": Option(
        "--percentile",
        group=ANALYSIS_GROUP,
        help="p of --clipping percentile: cut each scale group's range at the p-th percentile",
    ),
    "rounding": Option(
        "--rounding",
        group=ANALYSIS_GROUP,
        choices=ROUNDINGS,
        help="GPTQ (default): error-compensating rounding against each layer's input second "
        "moments on the calibration images (one extra forward pass), or round to nearest; same "
        "scales and size either way",
    ),
    "gptq_damp": Option(
        "--gptq-damp",
        group=ANALYSIS_GROUP,
        help="GPTQ dampening: this fraction of the mean diagonal of E[x x^T] is added to it",
    ),
}


def _patterns(texts: list[str] | None) -> tuple[str, ...]:
    """``--include``/``--exclude`` glob patterns on layer names (`fnmatch`), empty ones refused."""
    patterns = tuple(text.strip() for text in texts or [])
    if any(not pattern for pattern in patterns):
        raise InputError("--include/--exclude need a non-empty glob pattern on layer names")
    return patterns


def _pattern_list(values: tuple[str, ...]) -> list[str] | None:
    return list(values) or None


def _activation_formats(text: str | None) -> tuple[str, ...]:
    # local: keeps config's imports minimal
    from lcpaq.allocation.table import parse_activation_formats

    return parse_activation_formats(text) if text else ()


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
    label-free; for Gauss–Newton it equals cross-entropy's curvature, `lcpaq.sensitivity.gauss_newton`),
    or ``auto``: the model's default (`lcpaq.sensitivity.losses.default_loss`). ``text``: the
    options of ``hf:DIR`` models (`lcpaq.config.text.TextOptions`).
    ``act_formats``: activation formats paired with every weight format into (weight, activation)
    candidates (`lcpaq.sensitivity.candidates`); empty: one candidate per weight format, 8-bit activations
    assumed by the cost models. Activations of a paired candidate are quantized at inference with
    one static range per layer input, calibrated by ``act_clipping``: ``mse`` (the range that
    minimises each format's squared error on the calibration activations, the default) or
    ``minmax`` (the observed range, what run configurations from before the option used).
    ``pyhessian_iters``: 0 (off) or the iteration cap of the PyHessian cross-check (whole-model
    trace and top eigenvalue over the layers' weights, on the Hutchinson samples, cross-entropy).
    Each field's ``metadata`` declares its command-line flag (`lcpaq.options`).
    """

    model: str = field(
        metadata=option(
            "--model",
            group=MODEL_GROUP,
            required=True,
            help="cifar-resnet | torchvision:<name> | package.module:factory | demo-digits | "
            "hf:DIR (a local transformers folder: encoder, causal LM or sequence classifier)",
        )
    )
    checkpoint: str | None = field(
        metadata=option(
            "--checkpoint", group=MODEL_GROUP, help="state dict file (.th/.pt/.pth/.safetensors)"
        )
    )
    calib: str = field(
        metadata=option(
            "--calib",
            group=MODEL_GROUP,
            required=True,
            help="calibration data: .npz, .pt or ImageFolder dir; hf: models: text (one "
            "document per line), .jsonl (text, or query/document) or tokenized .npz/.safetensors",
        )
    )
    normalize: str = field(
        default="imagenet",
        metadata=option(
            "--normalize",
            group=MODEL_GROUP,
            help="imagenet | cifar | none | 'm1,m2,m3/s1,s2,s3' (applied to uint8 images; "
            "default %(default)s)",
        ),
    )
    image_size: int | None = field(
        default=None,
        metadata=option(
            "--image-size", group=MODEL_GROUP, help="resize ImageFolder images to this size"
        ),
    )
    num_samples: int = field(
        default=256,
        metadata=option(
            "--num-samples", group=ANALYSIS_GROUP, help="calibration images for curvature"
        ),
    )
    batch_size: int = field(default=64, metadata=option("--batch-size", group=ANALYSIS_GROUP))
    loss: Loss = field(
        default="auto",
        metadata=option(
            "--loss",
            group=ANALYSIS_GROUP,
            help="loss whose curvature is measured; kl: KL to the FP32 outputs (label-free); "
            "auto (default): cross_entropy for classifiers, mse to the FP32 embedding for "
            "encoders, kl for causal LMs",
        ),
    )
    formats: tuple[str, ...] = field(
        default=parse_format_list(DEFAULT_FORMATS),
        metadata=option(
            "--formats",
            group=ANALYSIS_GROUP,
            parse=parse_format_list,
            show=",".join,
            help="candidate formats: int2..int8, fp8_e4m3, fp8_e5m2, fp6_e3m2, fp6_e2m3, fp4_e2m1, "
            "and below two bits ternary (log2(3) bits), binary, pruned (0 bits), which make "
            "budgets under 2 average bits feasible (default %(default)s)",
        ),
    )
    act_formats: tuple[str, ...] = field(
        default=(),
        metadata=option(
            "--act-formats",
            group=ANALYSIS_GROUP,
            parse=_activation_formats,
            show=lambda names: ",".join(names) or None,
            help="activation formats paired with every weight format into (weight, activation) "
            "candidates, e.g. int8,int4,fp8_e4m3 (also fp16, fp32: unquantized); they set the "
            "activation bits of BitOps/EBOPs/latency, and each layer's input is quantized at "
            "inference. Default: weight formats only, activations stay FP32 (the cost models "
            "assume 8 bits)",
        ),
    )
    act_clipping: Literal["mse", "minmax"] = field(
        default="mse",
        metadata=option(
            "--act-clipping",
            group=ANALYSIS_GROUP,
            help="static range of each layer's input per activation format: the MSE-optimal "
            "clipping of the calibration activations (default) or their observed min/max",
        ),
    )
    scheme: QuantScheme = field(default=DEFAULT_SCHEME, metadata={NESTED: SCHEME_OPTIONS})
    hutchinson_probes: int = field(
        default=0,
        metadata=option(
            "--hutchinson-probes",
            group=ANALYSIS_GROUP,
            help="gauss-newton: run the Hutchinson cross-check with at most this many probes "
            "(0: off); hutchinson: the cap on probes over all layers (at least 2 per layer)",
        ),
    )
    hutchinson_samples: int = field(
        default=128, metadata=option("--hutchinson-samples", group=ANALYSIS_GROUP)
    )
    estimator: Estimator = field(
        default="gauss-newton",
        metadata=option(
            "--estimator",
            group=ANALYSIS_GROUP,
            help="curvature used for scoring: exact per-layer Gauss-Newton traces (default) or "
            "exact-Hessian single-layer Hutchinson traces (needs --hutchinson-probes)",
        ),
    )
    hutchinson_rel_tol: float = field(
        default=0.05,
        metadata=option(
            "--hutchinson-rel-tol",
            group=ANALYSIS_GROUP,
            help="Hutchinson stops once every layer's standard error is below this x |trace|",
        ),
    )
    pyhessian_iters: int = field(
        default=0,
        metadata=option(
            "--pyhessian-iters",
            group=ANALYSIS_GROUP,
            help="run the PyHessian cross-check (whole-model trace and top eigenvalue, "
            "cross-entropy, on the --hutchinson-samples images) with at most this many "
            "iterations (0: off) into pyhessian.json",
        ),
    )
    seed: int = field(default=0, metadata=option("--seed", group=ANALYSIS_GROUP))
    allow_unsafe_pickle: bool = field(
        default=False,
        metadata=option(
            "--allow-unsafe-pickle",
            group=MODEL_GROUP,
            amends_config=True,
            help="allow checkpoints that need arbitrary unpickling (only for files you trust)",
        ),
    )
    # Inter-layer terms (`lcpaq.sensitivity.interactions`, METHOD §1c): off by default, see docs/results.md.
    pairwise: Literal["none", "hessian", "gauss-newton", "forward"] = field(
        default="none",
        metadata=option(
            "--pairwise",
            group=PAIR_GROUP,
            help="measure C_ij(f,g) between layer pairs into interactions.npz: Δw_iᵀH_ijΔw_j "
            "(hessian, gauss-newton) or ΔL(i,j)−ΔL(i)−ΔL(j) by forward passes (forward)",
        ),
    )
    pair_rule: Literal["window", "block", "all"] = field(
        default="window",
        metadata=option(
            "--pair-rule",
            group=PAIR_GROUP,
            help="which pairs: within --pair-window in execution order, same residual block, or all",
        ),
    )
    pair_window: int = field(
        default=3,
        metadata=option("--pair-window", group=PAIR_GROUP, help="window of --pair-rule window"),
    )
    pair_samples: int = field(
        default=256,
        metadata=option(
            "--pair-samples", group=PAIR_GROUP, help="calibration images for the pair terms"
        ),
    )
    pair_loss: Literal["kl", "cross_entropy"] = field(
        default="kl",
        metadata=option(
            "--pair-loss",
            group=PAIR_GROUP,
            help="loss of --pairwise forward: label-free KL to the FP32 outputs (default) or "
            "task loss",
        ),
    )
    pair_max_bits: int = field(
        default=4,
        metadata=option(
            "--pair-max-bits",
            group=PAIR_GROUP,
            help="measure pair terms for formats of at most this many bits; wider ones count as 0",
        ),
    )

    # LIMPQ's learned step sizes (`lcpaq.sensitivity.limpq`, METHOD §9): off by default.
    limpq_steps: int = field(
        default=0,
        metadata=option(
            "--limpq-steps",
            group=ANALYSIS_GROUP,
            help="learn a step size per layer, integer format and output channel for this many "
            "steps on the calibration images (KL to FP32; each step costs one forward+backward "
            "pass per format plus one) into step_sizes.npz, for --scorer limpq (0: off)",
        ),
    )
    include: tuple[str, ...] = field(
        default=(),
        metadata=option(
            "--include",
            group=MODEL_GROUP,
            repeat=True,
            metavar="PATTERN",
            parse=_patterns,
            show=_pattern_list,
            help="quantize only layers whose name matches this glob (e.g. 'features.*'); repeat "
            "for several (default: every supported layer)",
        ),
    )
    exclude: tuple[str, ...] = field(
        default=(),
        metadata=option(
            "--exclude",
            group=MODEL_GROUP,
            repeat=True,
            metavar="PATTERN",
            parse=_patterns,
            show=_pattern_list,
            help="keep layers whose name matches this glob in FP32 (e.g. '*.attn', 'head'); the "
            "report lists them; repeat for several",
        ),
    )
    text: TextOptions = field(default=TextOptions(), metadata={NESTED: TEXT_OPTIONS})

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
        if self.limpq_steps < 0:
            raise InputError(f"limpq-steps must be 0 (off) or positive, got {self.limpq_steps}")
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
    if config.pyhessian_iters and config.loss not in ("auto", "cross_entropy"):
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
