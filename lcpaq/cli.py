"""Command line: one subcommand per pipeline stage, plus ``run`` (all of them) and ``demo``.

The stage order: analyze → allocate → export → evaluate → sweep → report/plot (``onnx`` after
export); ``search`` wraps them. The options are generated from their declarations on the config
dataclasses (`lcpaq.config`), parsed back into those dataclasses, and handed to
`lcpaq.stages.pipeline`; the CLI holds no algorithm.
Bad input ends with one line ``lcpaq: error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lcpaq import __version__, runfolder
from lcpaq.allocation.budgets import Budget, parse_budget
from lcpaq.config import (
    AllocationConfig,
    AnalysisConfig,
    ExportSettings,
    RecoveryConfig,
    ResumeSettings,
    RunConfig,
    SearchSettings,
    SweepSettings,
)
from lcpaq.config.flags import RESUME_GROUP, SEARCH_GROUP
from lcpaq.config.options import Declared, add_arguments, build, declared_options, given_flags
from lcpaq.errors import InputError
from lcpaq.sensitivity import distributed
from lcpaq.stages import pipeline

if TYPE_CHECKING:
    from lcpaq.search import SearchOptions

logger = logging.getLogger("lcpaq")

#: What ``lcpaq search`` holds fixed for every trial, by field of AnalysisConfig / AllocationConfig.
_SEARCH_FIXED_ANALYSIS = (
    "model",
    "checkpoint",
    "calib",
    "normalize",
    "image_size",
    "allow_unsafe_pickle",
    "batch_size",
    "loss",
)
_SEARCH_FIXED_ALLOCATION = ("budgets", "ties", "tie_rule", "latency_table")


def _analysis_options() -> list[Declared]:
    """The flags of ``lcpaq analyze``: what ``run_config.json`` records besides the allocation."""
    return declared_options(AnalysisConfig) + declared_options(RecoveryConfig)


def _run_options() -> list[Declared]:
    return _analysis_options() + declared_options(AllocationConfig)


def _add_run_parsers(commands: argparse._SubParsersAction) -> None:
    """``demo``, ``run`` and ``analyze``: the subcommands that start a run folder."""
    demo = commands.add_parser("demo", help="train a small digits CNN and run the whole pipeline")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    add_arguments(
        demo, declared_options(AllocationConfig, ["budgets"]), require=False, grouped=False
    )
    add_arguments(demo, declared_options(SweepSettings))

    run = commands.add_parser(
        "run", help="analyze, allocate, export, evaluate, sweep, plot, report"
    )
    run.add_argument(
        "--config",
        type=Path,
        help="a run configuration (run_config.json of a run, or best_config.json of lcpaq search); "
        "analysis and allocation options then come from it (--budget overrides its budgets)",
    )
    add_arguments(run, _run_options(), require=False)
    run.add_argument(
        "--eval",
        help="evaluation data: labelled images (.npz, .pt or ImageFolder dir); for hf:DIR models "
        "query/document JSONL (encoder) or text (causal LM)",
    )
    run.add_argument("--out", type=Path, required=True, help="run folder")
    add_arguments(run, declared_options(SweepSettings))
    add_arguments(run, declared_options(ExportSettings))
    add_arguments(run, declared_options(ResumeSettings), group=RESUME_GROUP)

    analyze = commands.add_parser("analyze", help="curvature and candidate table into a run folder")
    add_arguments(analyze, _analysis_options())
    analyze.add_argument("--out", type=Path, required=True, help="run folder")
    add_arguments(analyze, declared_options(ResumeSettings), group=RESUME_GROUP)


def _add_stage_parsers(commands: argparse._SubParsersAction) -> None:
    """The subcommands that work on an existing run folder."""
    allocate = commands.add_parser("allocate", help="solve the ILP for new budgets (seconds)")
    allocate.add_argument("run_dir", type=Path)
    add_arguments(allocate, declared_options(AllocationConfig))

    export = commands.add_parser("export", help="write the quantized checkpoint")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--out", type=Path, help="checkpoint folder (default RUN/quantized)")
    add_arguments(export, declared_options(ExportSettings))

    evaluate = commands.add_parser(
        "evaluate",
        help="the model's metric (top-1, recall@1, perplexity) for FP32 and the exported checkpoint",
    )
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
    add_arguments(sweep, declared_options(SweepSettings))

    for name, text in (("plot", "write the PNG plots"), ("report", "write report.md/.json")):
        stage = commands.add_parser(name, help=text)
        stage.add_argument("run_dir", type=Path)


def _add_search_parser(commands: argparse._SubParsersAction) -> None:
    """``lcpaq search``: the options it does not search (model, data, budgets) and its own."""
    search = commands.add_parser(
        "search",
        help="low-cost proxy search over the pipeline's options at fixed budgets (Optuna)",
    )
    fixed = declared_options(AnalysisConfig, _SEARCH_FIXED_ANALYSIS) + declared_options(
        AllocationConfig, _SEARCH_FIXED_ALLOCATION
    )
    add_arguments(
        search,
        fixed,
        group="model, data and budgets (fixed for every trial)",
        helps={
            "calib": "calibration data; its head feeds curvature/correction, its tail the proxy"
        },
    )
    own = declared_options(SearchSettings) + declared_options(AnalysisConfig, ["seed"])
    add_arguments(search, own, group=SEARCH_GROUP)


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
    _add_run_parsers(commands)
    _add_stage_parsers(commands)
    _add_search_parser(commands)
    return parser


def _search_options(args: argparse.Namespace) -> SearchOptions:
    from lcpaq.search import SearchOptions, parse_fix, parse_rungs

    return SearchOptions(
        base=_config_from_flags(args),
        out=args.out,
        trials=args.trials,
        eval_path=args.eval,
        storage=args.storage,
        study_name=args.study_name,
        resume=args.resume,
        worker=args.worker,
        top_k=args.top_k,
        min_gain_se=args.min_gain_se,
        proxy=args.proxy,
        rungs=parse_rungs(args.proxy_samples),
        fidelity=args.fidelity,
        cheap_samples=args.cheap_samples,
        fixed=parse_fix(args.fix or []),
        also=tuple(args.also or ()),
        size_cap=args.size_cap == "default",
        seed=args.seed,
    )


def _config_from_file(args: argparse.Namespace) -> RunConfig:
    """``run --config FILE``: the file's configuration; only flags that amend it may be given."""
    fixed_by_file = [d for d in _run_options() if not d.option.amends_config]
    given = given_flags(fixed_by_file, args)
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
    if args.trust_remote_code:
        text = replace(config.analysis.text, trust_remote_code=True)
        config = config.with_analysis(text=text)
    return config


def _config_from_flags(args: argparse.Namespace) -> RunConfig:
    """The run configuration the subcommand's flags give (flags it lacks: the defaults)."""
    for declared in declared_options(AnalysisConfig):
        if declared.option.required and getattr(args, declared.option.dest) is None:
            raise InputError(
                f"{declared.option.flag} is required (or give a run configuration with --config)"
            )
    return RunConfig(
        analysis=build(AnalysisConfig, args),
        recovery=build(RecoveryConfig, args),
        allocation=build(AllocationConfig, args),
    )


def _budgets(texts: list[str] | None) -> list[Budget]:
    return [parse_budget(text) for text in texts or []]


def _sweep(run_dir: Path, eval_path: str | None, args: argparse.Namespace) -> None:
    settings: SweepSettings = build(SweepSettings, args)
    # ``lcpaq sweep --eval`` asks for measured points: all images unless a number is given.
    pipeline.sweep(
        run_dir,
        eval_path,
        num_points=settings.num_points,
        min_bits=settings.min_bits,
        metrics=settings.metrics,
        eval_samples=settings.eval_samples or None,
        progress=not args.quiet,
    )


def _finish(run_dir: Path, eval_path: str | None, args: argparse.Namespace) -> None:
    """The stages after an allocation (`lcpaq.stages.pipeline.finish`)."""
    settings: SweepSettings = build(SweepSettings, args)
    path = pipeline.finish(
        run_dir,
        eval_path,
        sweep_points=settings.num_points,
        sweep_min_bits=settings.min_bits,
        sweep_metrics=settings.metrics,
        sweep_eval_samples=settings.eval_samples,
        progress=not args.quiet,
        export_settings=build(ExportSettings, args),
    )
    print(f"report: {path}")


def _demo(args: argparse.Namespace) -> None:
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
    pipeline.analyze(pipeline.with_default_activations(config), args.out, progress=not args.quiet)
    pipeline.allocate(args.out, budgets)
    _finish(args.out, str(evaluation), args)


def _run(args: argparse.Namespace) -> None:
    config = _config_from_file(args) if args.config else _config_from_flags(args)
    if args.budget:
        config = config.with_allocation(
            budgets=tuple(str(budget) for budget in _budgets(args.budget))
        )
    settings: SweepSettings = build(SweepSettings, args)
    path = pipeline.run(
        config,
        args.out,
        args.eval,
        sweep_points=settings.num_points,
        sweep_min_bits=settings.min_bits,
        sweep_metrics=settings.metrics,
        sweep_eval_samples=settings.eval_samples,
        progress=not args.quiet,
        export_settings=build(ExportSettings, args),
        resume=build(ResumeSettings, args),
    )
    if path is not None:  # None on a torchrun rank other than 0
        print(f"report: {path}")


def _allocate(args: argparse.Namespace) -> None:
    budgets = _budgets(args.budget)
    options = build(AllocationConfig, args).options()
    pipeline.allocate(args.run_dir, budgets, **options)


def _onnx(args: argparse.Namespace) -> None:
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


def _plot(args: argparse.Namespace) -> None:
    for path in pipeline.plot(args.run_dir):
        print(path)


def _search(args: argparse.Namespace) -> None:
    from lcpaq.search import run_search

    summary = run_search(_search_options(args), progress=not args.quiet)
    if args.worker:
        print(f"worker {summary['worker']} done; trials by state: {summary['trials']}")
        return
    print(f"best configuration: {args.out / 'best_config.json'}")
    print(f"report: {args.out / 'search_report.md'}")


#: What each subcommand does with its parsed flags.
_COMMANDS: dict[str, Callable[[argparse.Namespace], object]] = {
    "demo": _demo,
    "run": _run,
    "analyze": lambda args: pipeline.analyze(
        _config_from_flags(args),
        args.out,
        progress=not args.quiet,
        resume=build(ResumeSettings, args),
    ),
    "allocate": _allocate,
    "export": lambda args: pipeline.export(
        args.run_dir, out_dir=args.out, settings=build(ExportSettings, args)
    ),
    "evaluate": lambda args: pipeline.evaluate(
        args.run_dir, args.eval, quantized_dir=args.quantized
    ),
    "onnx": _onnx,
    "sweep": lambda args: _sweep(args.run_dir, args.eval, args),
    "plot": _plot,
    "report": lambda args: print(pipeline.report(args.run_dir)),
    "search": _search,
}


def _dispatch(args: argparse.Namespace) -> None:
    if not distributed.is_main_process() and args.command not in ("analyze", "run"):
        return  # under torchrun only the analysis is shared; rank 0 does the rest
    _COMMANDS[args.command](args)


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
    # SIGTERM (a scheduler's stop) unwinds like Ctrl-C: atomic writes drop their temporary file.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        _dispatch(args)
    except InputError as error:
        print(f"lcpaq: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lcpaq: interrupted; artifacts already written are complete", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        distributed.shutdown()
    return 0


def _interrupt(_signal: int, _frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
