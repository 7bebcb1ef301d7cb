"""Command line: one subcommand per pipeline stage, plus ``run`` (all of them) and ``demo``.

The CLI parses options into the config dataclasses and calls `lcpaq.stages.pipeline`; it holds no algorithm.
Bad input ends with one line ``lcpaq: error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from lcpaq import __version__, runfolder
from lcpaq.allocation.budgets import TIE_RULES, Budget, parse_budget, parse_tie
from lcpaq.allocation.costs import COST_METRICS
from lcpaq.config import (
    DEFAULT_FORMATS,
    AllocationConfig,
    AnalysisConfig,
    RecoveryConfig,
    RunConfig,
)
from lcpaq.errors import InputError
from lcpaq.quant.formats import QuantScheme, parse_format_list
from lcpaq.sensitivity import distributed
from lcpaq.sensitivity.candidates import parse_activation_formats
from lcpaq.stages import pipeline

logger = logging.getLogger("lcpaq")


def _add_analysis_options(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    group = parser.add_argument_group("model and calibration")
    group.add_argument(
        "--model",
        required=required,
        help="cifar-resnet | torchvision:<name> | package.module:factory | demo-digits",
    )
    group.add_argument("--checkpoint", help="state dict file (.th/.pt/.pth/.safetensors)")
    group.add_argument(
        "--calib", required=required, help="calibration data: .npz, .pt or ImageFolder dir"
    )
    group.add_argument(
        "--normalize",
        default="imagenet",
        help="imagenet | cifar | none | 'm1,m2,m3/s1,s2,s3' (applied to uint8 images; default imagenet)",
    )
    group.add_argument("--image-size", type=int, help="resize ImageFolder images to this size")
    group.add_argument(
        "--allow-unsafe-pickle",
        action="store_true",
        help="allow checkpoints that need arbitrary unpickling (only for files you trust)",
    )
    group = parser.add_argument_group("analysis")
    group.add_argument(
        "--num-samples", type=int, default=256, help="calibration images for curvature"
    )
    group.add_argument("--batch-size", type=int, default=64)
    group.add_argument(
        "--loss",
        choices=["cross_entropy", "mse", "kl"],
        default="cross_entropy",
        help="loss whose curvature is measured; kl: KL to the FP32 outputs (label-free)",
    )
    group.add_argument(
        "--formats",
        default=DEFAULT_FORMATS,
        help=f"candidate formats: int2..int8, fp8_e4m3, fp8_e5m2, fp6_e3m2, fp6_e2m3, fp4_e2m1 "
        f"(default {DEFAULT_FORMATS})",
    )
    group.add_argument(
        "--act-formats",
        help="activation formats paired with every weight format into (weight, activation) "
        "candidates, e.g. int8,int4,fp8_e4m3 (also fp16, fp32: unquantized); they set the "
        "activation bits of BitOps/EBOPs/latency, and each layer's input is quantized at "
        "inference. Default: weight formats only, activations stay FP32 (the cost models assume "
        "8 bits)",
    )
    group.add_argument(
        "--act-clipping",
        choices=["mse", "minmax"],
        default="mse",
        help="static range of each layer's input per activation format: the MSE-optimal clipping "
        "of the calibration activations (default) or their observed min/max",
    )
    group.add_argument(
        "--symmetric", action="store_true", help="symmetric codes (default asymmetric)"
    )
    group.add_argument(
        "--granularity",
        choices=["channel", "tensor", "group", "mx"],
        default="channel",
        help="scales per output channel, per tensor, per --group-size inputs, or OCP MX blocks of 32",
    )
    group.add_argument(
        "--group-size", type=int, default=128, help="inputs per scale with --granularity group"
    )
    group.add_argument("--clipping", choices=["mse", "minmax", "percentile"], default="mse")
    group.add_argument(
        "--percentile",
        type=float,
        default=99.9,
        help="p of --clipping percentile: cut each scale group's range at the p-th percentile",
    )
    group.add_argument(
        "--rounding",
        choices=["gptq", "nearest"],
        default="gptq",
        help="GPTQ (default): error-compensating rounding against each layer's input second "
        "moments on the calibration images (one extra forward pass), or round to nearest; same "
        "scales and size either way",
    )
    group.add_argument(
        "--gptq-damp",
        type=float,
        default=0.01,
        help="GPTQ dampening: this fraction of the mean diagonal of E[x x^T] is added to it",
    )
    group.add_argument(
        "--hutchinson-probes",
        type=int,
        default=0,
        help="gauss-newton: run the Hutchinson cross-check with at most this many probes (0: off); "
        "hutchinson: the cap on probes over all layers (at least 2 per layer)",
    )
    group.add_argument("--hutchinson-samples", type=int, default=128)
    group.add_argument(
        "--estimator",
        choices=["gauss-newton", "hutchinson"],
        default="gauss-newton",
        help="curvature used for scoring: exact per-layer Gauss-Newton traces (default) or "
        "exact-Hessian single-layer Hutchinson traces (needs --hutchinson-probes)",
    )
    group.add_argument(
        "--hutchinson-rel-tol",
        type=float,
        default=0.05,
        help="Hutchinson stops once every layer's standard error is below this x |trace|",
    )
    group.add_argument(
        "--pyhessian-iters",
        type=int,
        default=0,
        help="run the PyHessian cross-check (whole-model trace and top eigenvalue, "
        "cross-entropy, on the --hutchinson-samples images) with at most this many iterations "
        "(0: off) into pyhessian.json",
    )
    group = parser.add_argument_group("inter-layer terms (METHOD §1c; off by default)")
    group.add_argument(
        "--pairwise",
        choices=["none", "hessian", "gauss-newton", "forward"],
        default="none",
        help="measure C_ij(f,g) between layer pairs into interactions.npz: Δw_iᵀH_ijΔw_j "
        "(hessian, gauss-newton) or ΔL(i,j)−ΔL(i)−ΔL(j) by forward passes (forward)",
    )
    group.add_argument(
        "--pair-rule",
        choices=["window", "block", "all"],
        default="window",
        help="which pairs: within --pair-window in execution order, same residual block, or all",
    )
    group.add_argument("--pair-window", type=int, default=3, help="window of --pair-rule window")
    group.add_argument(
        "--pair-samples", type=int, default=256, help="calibration images for the pair terms"
    )
    group.add_argument(
        "--pair-loss",
        choices=["kl", "cross_entropy"],
        default="kl",
        help="loss of --pairwise forward: label-free KL to the FP32 outputs (default) or task loss",
    )
    group.add_argument(
        "--pair-max-bits",
        type=int,
        default=4,
        help="measure pair terms for formats of at most this many bits; wider ones count as 0",
    )
    group.add_argument("--seed", type=int, default=0)
    group.add_argument(
        "--correction-samples",
        type=int,
        default=1024,
        help="calibration images for BN statistics / bias correction after quantization",
    )
    group.add_argument("--no-correction", action="store_true", help="skip statistics correction")


def _add_allocation_options(parser: argparse.ArgumentParser, *, required: bool) -> None:
    group = parser.add_argument_group("allocation")
    group.add_argument(
        "--budget",
        action="append",
        required=required,
        metavar="METRIC=VALUE",
        help="avg-bits, size-mb, size-frac (of FP32), bitops-g, ebops-g (GBOPs per sample) or "
        "latency-ms, e.g. size-mb=0.12; repeat to combine (all are hard limits)",
    )
    group.add_argument(
        "--tie",
        action="append",
        metavar="LAYER,LAYER[,...]",
        help="layers that must share one format; repeatable",
    )
    group.add_argument(
        "--tie-rule",
        choices=list(TIE_RULES),
        default="none",
        help="tie layers by a rule: none (default) or downsample (shortcut conv with its block)",
    )
    group.add_argument(
        "--latency-table",
        help="measured per-layer latency (CSV layer,format,ms or JSON); default: roofline estimate",
    )
    group.add_argument("--first-last", choices=["search", "keep-8bit"], default="search")
    group.add_argument(
        "--scorer",
        choices=["hawq_v2", "diagonal", "output"],
        default="hawq_v2",
        help="per-layer score: trace/n × weight error (hawq_v2), the curvature diagonal × error "
        "(diagonal), or trace/n × the error seen through the layer's input correlations (output; "
        "needs GPTQ's input second moments)",
    )
    group.add_argument(
        "--pairwise-weight",
        type=float,
        default=AllocationConfig.pairwise_weight,
        help="λ on the inter-layer terms of interactions.npz, if the analysis stored any (0: ignore)",
    )
    group.add_argument(
        "--pair-z",
        type=float,
        default=AllocationConfig.pair_z,
        help="set a pair term to 0 when |C| < z·SE (default 2; 0 keeps all)",
    )
    group.add_argument(
        "--pair-clip",
        choices=["none", "negative", "psd"],
        default="none",
        help="clip negative pair terms, or project Ω to PSD (CLADO); default none",
    )
    group.add_argument(
        "--pairwise-mode",
        choices=["ilp", "augmented"],
        default=AllocationConfig.pairwise_mode,
        help="separable scores around the incumbent (METHOD §1d; default: best mean and smallest "
        "worst case on ResNet20, docs/results.md) or exact pair products in the ILP",
    )


def _sweep_points(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0 or value == 1:
        raise argparse.ArgumentTypeError(f"must be 0 (no sweep) or at least 2, got {value}")
    return value


def _add_sweep_options(parser: argparse.ArgumentParser, default_points: int) -> None:
    parser.add_argument(
        "--sweep-points",
        type=_sweep_points,
        default=default_points,
        help=f"budgets on the model-level curve (default {default_points}; 0 skips the sweep)",
    )
    parser.add_argument("--sweep-min-bits", type=float, default=None)
    parser.add_argument(
        "--sweep-metric",
        action="append",
        choices=list(COST_METRICS),
        help="budget metric to sweep (repeatable; default: the metrics of the run's budgets, the "
        "other budgets held fixed)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lcpaq", description="Hessian-guided mixed-precision quantization for PyTorch models"
    )
    parser.add_argument("--version", action="version", version=f"lcpaq {__version__}")
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars, warnings only"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train a small digits CNN and run the whole pipeline")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--budget", action="append", metavar="METRIC=VALUE")
    _add_sweep_options(demo, default_points=8)

    run = commands.add_parser(
        "run", help="analyze, allocate, export, evaluate, sweep, plot, report"
    )
    run.add_argument(
        "--config",
        type=Path,
        help="a run configuration (run_config.json of a run, or best_config.json of lcpaq search); "
        "analysis and allocation options then come from it (--budget overrides its budgets)",
    )
    _add_analysis_options(run, required=False)
    _add_allocation_options(run, required=False)
    run.add_argument("--eval", help="labelled evaluation data (.npz, .pt or ImageFolder dir)")
    run.add_argument("--out", type=Path, required=True, help="run folder")
    _add_sweep_options(run, default_points=8)

    analyze = commands.add_parser("analyze", help="curvature and candidate table into a run folder")
    _add_analysis_options(analyze)
    analyze.add_argument("--out", type=Path, required=True, help="run folder")

    allocate = commands.add_parser("allocate", help="solve the ILP for new budgets (seconds)")
    allocate.add_argument("run_dir", type=Path)
    _add_allocation_options(allocate, required=True)

    export = commands.add_parser("export", help="write the quantized checkpoint")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--out", type=Path, help="checkpoint folder (default RUN/quantized)")

    evaluate = commands.add_parser("evaluate", help="top-1 of FP32 and of the exported checkpoint")
    evaluate.add_argument("run_dir", type=Path)
    evaluate.add_argument("--eval", required=True)
    evaluate.add_argument(
        "--quantized", type=Path, help="checkpoint folder (default RUN/quantized)"
    )

    onnx = commands.add_parser(
        "onnx",
        help="the exported checkpoint as an ONNX QDQ model, checked in ONNX Runtime "
        "(needs lcpaq[onnx])",
    )
    onnx.add_argument("run_dir", type=Path)
    onnx.add_argument("--quantized", type=Path, help="checkpoint folder (default RUN/quantized)")
    onnx.add_argument("--out", type=Path, help="ONNX file (default QUANTIZED/model.onnx)")
    onnx.add_argument(
        "--eval", help="labelled data for the check (default: the calibration data, unlabelled)"
    )
    onnx.add_argument("--images", type=int, default=1024, help="images of the check (default 1024)")

    sweep = commands.add_parser("sweep", help="model-level Pareto curves over budgets")
    sweep.add_argument("run_dir", type=Path)
    sweep.add_argument("--eval", help="measure top-1 at every point")
    _add_sweep_options(sweep, default_points=8)

    for name, text in (("plot", "write the PNG plots"), ("report", "write report.md/.json")):
        stage = commands.add_parser(name, help=text)
        stage.add_argument("run_dir", type=Path)
    _add_search_parser(commands)
    return parser


def _add_search_parser(commands: argparse._SubParsersAction) -> None:
    """``lcpaq search``: the options it does not search (model, data, budgets) and its own."""
    search = commands.add_parser(
        "search",
        help="low-cost proxy search over the pipeline's options at fixed budgets (Optuna)",
    )
    group = search.add_argument_group("model, data and budgets (fixed for every trial)")
    group.add_argument("--model", required=True, help="as for lcpaq run")
    group.add_argument("--checkpoint")
    group.add_argument(
        "--calib",
        required=True,
        help="calibration data; its head feeds curvature/correction, its tail the proxy",
    )
    group.add_argument("--normalize", default="imagenet")
    group.add_argument("--image-size", type=int)
    group.add_argument("--allow-unsafe-pickle", action="store_true")
    group.add_argument("--batch-size", type=int, default=64)
    group.add_argument("--loss", choices=["cross_entropy", "mse", "kl"], default="cross_entropy")
    group.add_argument("--budget", action="append", required=True, metavar="METRIC=VALUE")
    group.add_argument("--tie", action="append", metavar="LAYER,LAYER[,...]")
    group.add_argument("--tie-rule", choices=list(TIE_RULES), default="none")
    group.add_argument("--latency-table")
    group = search.add_argument_group("search")
    group.add_argument("--out", type=Path, required=True, help="search folder")
    group.add_argument("--trials", type=int, default=60, help="finished trials (default 60)")
    group.add_argument("--eval", help="labelled data for the full evaluation of the top-k")
    group.add_argument("--top-k", type=int, default=3, help="configurations fully evaluated")
    group.add_argument(
        "--min-gain-se",
        type=float,
        default=1.0,
        help="the best of the full evaluation replaces the default configuration only when it "
        "beats it by more than this many paired standard errors (default 1)",
    )
    group.add_argument("--proxy", choices=["kl", "loss", "sqnr"], default="kl")
    group.add_argument(
        "--proxy-samples",
        default="128,384,1152",
        help="growing proxy slices for successive halving (default 128,384,1152)",
    )
    group.add_argument(
        "--fix",
        action="append",
        metavar="NAME=VALUE",
        help="pin a search dimension, e.g. --fix formats=int-pow2 (docs/05-search.md)",
    )
    group.add_argument(
        "--also",
        action="append",
        metavar="NAME",
        help="search an optional dimension too (estimator: Hutchinson traces; pairwise: "
        "inter-layer terms and their window; act_formats: quantized activations, with "
        "act_clipping their ranges; each costs extra curvature-like passes)",
    )
    group.add_argument(
        "--size-cap",
        choices=["default", "none"],
        default="default",
        help="hold every trial to the default configuration's size (default) unless a size "
        "budget is given",
    )
    group.add_argument("--storage", help="Optuna storage URL (default sqlite:///OUT/search.db)")
    group.add_argument("--study-name", default="lcpaq-search")
    group.add_argument("--resume", action="store_true", help="continue an existing study")
    group.add_argument("--seed", type=int, default=0)


def _search_options(args: argparse.Namespace) -> object:
    from lcpaq.search import SearchOptions, parse_fix, parse_rungs

    base = RunConfig(
        analysis=AnalysisConfig(
            model=args.model,
            checkpoint=args.checkpoint,
            calib=args.calib,
            normalize=args.normalize,
            image_size=args.image_size,
            batch_size=args.batch_size,
            loss=args.loss,
            seed=args.seed,
            allow_unsafe_pickle=args.allow_unsafe_pickle,
        ),
        allocation=AllocationConfig(
            budgets=tuple(str(budget) for budget in _budgets(args.budget)),
            ties=tuple(parse_tie(text) for text in args.tie or []),
            tie_rule=args.tie_rule,
            latency_table=args.latency_table,
        ),
    )
    return SearchOptions(
        base=base,
        out=args.out,
        trials=args.trials,
        eval_path=args.eval,
        storage=args.storage,
        study_name=args.study_name,
        resume=args.resume,
        top_k=args.top_k,
        min_gain_se=args.min_gain_se,
        proxy=args.proxy,
        rungs=parse_rungs(args.proxy_samples),
        fixed=parse_fix(args.fix or []),
        also=tuple(args.also or ()),
        size_cap=args.size_cap == "default",
        seed=args.seed,
    )


#: Options a --config file supplies; giving them as well would be ambiguous.
_CONFIG_OPTIONS = (
    "model",
    "checkpoint",
    "calib",
    "normalize",
    "image_size",
    "num_samples",
    "batch_size",
    "loss",
    "formats",
    "act_formats",
    "act_clipping",
    "pairwise",
    "pair_rule",
    "pair_window",
    "pair_samples",
    "pair_loss",
    "pair_max_bits",
    "pairwise_weight",
    "pair_z",
    "pair_clip",
    "pairwise_mode",
    "symmetric",
    "granularity",
    "group_size",
    "clipping",
    "percentile",
    "rounding",
    "gptq_damp",
    "hutchinson_probes",
    "hutchinson_samples",
    "estimator",
    "hutchinson_rel_tol",
    "pyhessian_iters",
    "seed",
    "correction_samples",
    "no_correction",
    "tie",
    "tie_rule",
    "latency_table",
    "first_last",
    "scorer",
)


def _config_from_file(args: argparse.Namespace) -> RunConfig:
    defaults = build_parser().parse_args([args.command, "--out", str(args.out)])
    given = [
        "--" + name.replace("_", "-")
        for name in _CONFIG_OPTIONS
        if getattr(args, name, None) != getattr(defaults, name, None)
    ]
    if given:
        raise InputError(
            f"{', '.join(given)} cannot be combined with --config {args.config}: "
            "edit the configuration file instead"
        )
    config = RunConfig.from_dict(
        runfolder.read_json(args.config, "run configuration"), source=str(args.config)
    )
    if args.allow_unsafe_pickle:
        config = config.with_analysis(allow_unsafe_pickle=True)
    return config


def _run_config(args: argparse.Namespace) -> RunConfig:
    for name in ("model", "calib"):
        if getattr(args, name) is None:
            raise InputError(f"--{name} is required (or give a run configuration with --config)")
    return RunConfig(
        analysis=AnalysisConfig(
            model=args.model,
            checkpoint=args.checkpoint,
            calib=args.calib,
            normalize=args.normalize,
            image_size=args.image_size,
            num_samples=args.num_samples,
            batch_size=args.batch_size,
            loss=args.loss,
            formats=parse_format_list(args.formats),
            act_formats=parse_activation_formats(args.act_formats) if args.act_formats else (),
            act_clipping=args.act_clipping,
            scheme=QuantScheme(
                symmetric=args.symmetric,
                granularity=args.granularity,
                clipping=args.clipping,
                percentile=args.percentile,
                group_size=args.group_size,
                rounding=args.rounding,
                gptq_damp=args.gptq_damp,
            ),
            hutchinson_probes=args.hutchinson_probes,
            hutchinson_samples=args.hutchinson_samples,
            estimator=args.estimator,
            hutchinson_rel_tol=args.hutchinson_rel_tol,
            pyhessian_iters=args.pyhessian_iters,
            seed=args.seed,
            allow_unsafe_pickle=args.allow_unsafe_pickle,
            pairwise=args.pairwise,
            pair_rule=args.pair_rule,
            pair_window=args.pair_window,
            pair_samples=args.pair_samples,
            pair_loss=args.pair_loss,
            pair_max_bits=args.pair_max_bits,
        ),
        recovery=RecoveryConfig(
            enabled=not args.no_correction, num_samples=args.correction_samples
        ),
        allocation=_allocation_config(args) if hasattr(args, "first_last") else AllocationConfig(),
    )


def _budgets(texts: list[str] | None) -> list[Budget]:
    return [parse_budget(text) for text in texts or []]


def _allocation_config(args: argparse.Namespace) -> AllocationConfig:
    return AllocationConfig(
        budgets=tuple(str(budget) for budget in _budgets(args.budget)),
        first_last=args.first_last,
        scorer=args.scorer,
        ties=tuple(parse_tie(text) for text in args.tie or []),
        tie_rule=args.tie_rule,
        latency_table=args.latency_table,
        pairwise_weight=args.pairwise_weight,
        pair_z=args.pair_z,
        pair_clip=args.pair_clip,
        pairwise_mode=args.pairwise_mode,
    )


def _finish(run_dir: Path, eval_path: str | None, args: argparse.Namespace) -> None:
    """Export, evaluate, sweep, plot and report after an allocation."""
    progress = not args.quiet
    pipeline.export(run_dir)
    if eval_path:
        pipeline.evaluate(run_dir, eval_path)
    if args.sweep_points:
        pipeline.sweep(
            run_dir,
            eval_path,
            num_points=args.sweep_points,
            min_bits=args.sweep_min_bits,
            metrics=args.sweep_metric,
            progress=progress,
        )
    else:
        (run_dir / "sweep.json").unlink(missing_ok=True)
    pipeline.plot(run_dir)
    path = pipeline.report(run_dir)
    print(f"report: {path}")


def _dispatch(args: argparse.Namespace) -> None:
    progress = not args.quiet
    if not distributed.is_main_process() and args.command not in ("analyze", "run"):
        return  # under torchrun only the analysis is shared; rank 0 does the rest
    if args.command == "demo":
        from lcpaq.model.demo import DEMO_MODEL, prepare_demo

        budgets = _budgets(args.budget or ["avg-bits=3"])
        pipeline.ensure_writable(args.out)
        checkpoint, calib, evaluation = prepare_demo(args.out)
        config = RunConfig(
            analysis=AnalysisConfig(
                model=DEMO_MODEL,
                checkpoint=str(checkpoint),
                calib=str(calib),
                normalize="none",
                num_samples=512,
                hutchinson_probes=64,
                hutchinson_samples=256,
                pyhessian_iters=64,
            ),
            allocation=AllocationConfig(budgets=tuple(str(budget) for budget in budgets)),
        )
        pipeline.analyze(pipeline.with_default_activations(config), args.out, progress=progress)
        pipeline.allocate(args.out, budgets)
        _finish(args.out, str(evaluation), args)
    elif args.command == "run":
        config = _config_from_file(args) if args.config else _run_config(args)
        if args.budget:
            config = config.with_allocation(
                budgets=tuple(str(budget) for budget in _budgets(args.budget))
            )
        if not config.allocation.budgets:
            raise InputError("give at least one --budget, e.g. --budget avg-bits=3")
        config = pipeline.with_default_activations(config)
        pipeline.analyze(config, args.out, progress=progress)
        if not distributed.is_main_process():
            return
        pipeline.allocate(
            args.out,
            _budgets(list(config.allocation.budgets)),
            **config.allocation.options(),
        )
        _finish(args.out, args.eval, args)
    elif args.command == "analyze":
        pipeline.analyze(_run_config(args), args.out, progress=progress)
    elif args.command == "allocate":
        pipeline.allocate(args.run_dir, _budgets(args.budget), **_allocation_config(args).options())
    elif args.command == "export":
        pipeline.export(args.run_dir, out_dir=args.out)
    elif args.command == "evaluate":
        pipeline.evaluate(args.run_dir, args.eval, quantized_dir=args.quantized)
    elif args.command == "onnx":
        result = pipeline.export_onnx(
            args.run_dir,
            quantized_dir=args.quantized,
            out_path=args.out,
            check_path=args.eval,
            check_images=args.images,
        )
        if (args.run_dir / "report.md").is_file():  # a finished run: its report shows the check
            pipeline.report(args.run_dir)
        print(result["onnx"])
    elif args.command == "sweep":
        pipeline.sweep(
            args.run_dir,
            args.eval,
            num_points=args.sweep_points,
            min_bits=args.sweep_min_bits,
            metrics=args.sweep_metric,
            progress=progress,
        )
    elif args.command == "plot":
        for path in pipeline.plot(args.run_dir):
            print(path)
    elif args.command == "report":
        print(pipeline.report(args.run_dir))
    elif args.command == "search":
        from lcpaq.search import run_search

        run_search(_search_options(args), progress=progress)  # type: ignore[arg-type]
        print(f"best configuration: {args.out / 'best_config.json'}")
        print(f"report: {args.out / 'search_report.md'}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Configure our own logger only: third-party INFO chatter (matplotlib's font cache) stays off.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("lcpaq: %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    logger.propagate = False
    if args.threads:
        torch.set_num_threads(args.threads)
    # Under torchrun (RANK/WORLD_SIZE set) analysis splits its batches over the processes.
    if distributed.init_from_environment() and not distributed.is_main_process():
        logger.setLevel(logging.WARNING)
        args.quiet = True
    try:
        _dispatch(args)
    except InputError as error:
        print(f"lcpaq: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lcpaq: interrupted; artifacts already written are complete", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
