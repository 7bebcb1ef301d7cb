"""What the scripts that measure lcpaq on the CIFAR checkpoints share: their command lines, the
shared checkpoints and images, the run configuration they start from, the JSON they write (header,
study appends), and the measurement every one of them repeats (quantize to an assignment the way
export does, correct statistics, evaluate top-1, paired against another model)."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypedDict

import torch
from _provenance import git_sha
from torch import nn

from lcpaq.config import AnalysisConfig, RunConfig
from lcpaq.model.data import Dataset, load_dataset
from lcpaq.model.evaluate import Accuracy, evaluate_accuracy, paired_difference
from lcpaq.model.graph import LayerInfo
from lcpaq.model.zoo import load_model
from lcpaq.quant.activations import ActivationQuantizer, activation_quantizers
from lcpaq.sensitivity.activation_file import load_activation_sensitivity
from lcpaq.stages import pipeline

MODELS = {"resnet20": "resnet20-12fca82f.th", "resnet32": "resnet32-d509ac18.th"}


def checkpoint_path(shared: Path, model: str) -> Path:
    return shared / "checkpoints" / MODELS[model]


def calib_path(shared: Path) -> Path:
    return shared / "data" / "cifar10_train_subset.npz"


def test_path(shared: Path) -> Path:
    return shared / "data" / "cifar10_test.npz"


class StudyFile(TypedDict):
    """The JSON of the studies: where it ran, then one entry per study (appended as they finish)."""

    git_sha: str
    machine: str
    studies: list[Mapping[str, object]]


class Paired(TypedDict):
    """first − second on the same images, in points, with its standard error."""

    difference_pct: float
    stderr_pct: float


def parser(doc: str, name: str, budgets: Sequence[float] = ()) -> argparse.ArgumentParser:
    """``--shared --out --work --models --threads`` (and ``--budgets`` when given defaults)."""
    result = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    result.add_argument("--shared", type=Path, default=Path("../shared"))
    result.add_argument("--out", type=Path, default=Path(f"results/{name}.json"))
    result.add_argument("--work", type=Path, default=Path(f"results/{name}"))
    result.add_argument("--models", default="resnet20,resnet32")
    if budgets:
        result.add_argument("--budgets", default=",".join(f"{b:g}" for b in budgets))
    result.add_argument("--threads", type=int, default=2)
    return result


def add_input_paths(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint --calib --eval``: a script that names its files rather than ``--shared``."""
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--calib", required=True)
    parser.add_argument("--eval", required=True)


def set_up(threads: int, *, verbose: bool) -> None:
    """Logging (stage progress with logger names when ``verbose``, else warnings only) and
    torch's thread count."""
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    else:
        logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(threads)


def start(args: argparse.Namespace) -> tuple[Dataset, Dataset, StudyFile]:
    """Quiet logging and the thread count; the calibration and test images; the JSON header."""
    set_up(args.threads, verbose=False)
    calib = load_dataset(str(calib_path(args.shared)), num_classes=10)
    test = load_dataset(str(test_path(args.shared)), num_classes=10)
    header: StudyFile = {
        "git_sha": git_sha(),
        "machine": f"{platform.machine()}, torch {torch.__version__}, {args.threads} threads",
        "studies": [],
    }
    return calib, test, header


def write_json(path: Path, result: Mapping[str, object]) -> None:
    """``result`` as indented JSON (numpy scalars as floats), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=float) + "\n")


def add_study(out: Path, result: StudyFile, entry: Mapping[str, object]) -> None:
    """Append one study to the JSON and rewrite the file (partial results survive a crash)."""
    result["studies"].append(entry)
    write_json(out, result)


#: One model's study: (arguments, model name, budgets in average bits, calibration, test) → entry.
ModelStudy = Callable[
    [argparse.Namespace, str, list[float], Dataset, Dataset], Mapping[str, object]
]


def run_per_model(args: argparse.Namespace, study: ModelStudy) -> None:
    """`start`, then ``study`` for each of ``--models`` at ``--budgets``, each appended to
    ``--out`` as it finishes."""
    calib, test, result = start(args)
    result["machine"] += " (shared 2-core CPU, other jobs running)"
    budgets = [float(text) for text in args.budgets.split(",")]
    for model_name in args.models.split(","):
        add_study(args.out, result, study(args, model_name, budgets, calib, test))


def default_config(checkpoint: str | Path, calib: str | Path) -> RunConfig:
    """lcpaq's default configuration of a CIFAR ResNet checkpoint and a calibration file."""
    return RunConfig(
        analysis=AnalysisConfig(model="cifar-resnet", checkpoint=str(checkpoint), calib=str(calib))
    )


def base_config(shared: Path, model: str) -> RunConfig:
    """lcpaq's default configuration on a shared checkpoint and the calibration file."""
    return default_config(checkpoint_path(shared, model), calib_path(shared))


def paired(first: Accuracy, second: Accuracy) -> Paired:
    """first − second on the same images, in points, with its standard error."""
    difference, stderr = paired_difference(first, second)
    return {"difference_pct": 100 * difference, "stderr_pct": 100 * stderr}


def quantized_accuracy(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    assignment: dict[str, str],
    config: RunConfig,
    correction_inputs: torch.Tensor,
    test: Dataset,
    *,
    reference: object | None = None,
    input_hessians: Mapping[str, torch.Tensor] | None = None,
    input_quantizers: Mapping[str, ActivationQuantizer] | None = None,
) -> Accuracy:
    """Top-1 of ``model`` quantized to ``assignment`` (layer → weight format) and corrected on
    ``correction_inputs`` the way export does (`pipeline.quantize_and_recover`)."""
    quantized, _ = pipeline.quantize_and_recover(
        model,
        layers,
        assignment,
        config,
        correction_inputs,
        reference,
        input_hessians,
        input_quantizers,
    )
    return evaluate_accuracy(quantized, test)


def run_accuracy(
    run_dir: Path,
    config: RunConfig,
    candidates: Sequence[str],
    calib: Dataset,
    test: Dataset,
    activations: dict[str, str] | None = None,
) -> tuple[Accuracy, float]:
    """A fresh model from the checkpoint with weights to the weight halves of ``candidates`` (one
    per layer of ``run_dir``) and, when given, layer inputs to ``activations`` (layer → format)
    with this run's ranges, corrected as export does; top-1 and seconds."""
    start_s = time.perf_counter()
    model = load_model(config.analysis.model, config.analysis.checkpoint)
    layers, _ = pipeline.read_layers(run_dir)
    names = [layer.name for layer in layers]
    input_quantizers = None
    if activations is not None:
        sensitivity = load_activation_sensitivity(run_dir / "activations.npz")
        input_quantizers = activation_quantizers(sensitivity, activations)
    accuracy = quantized_accuracy(
        model,
        layers,
        pipeline.weight_assignment(names, candidates),
        config,
        calib.inputs[: config.recovery.num_samples],
        test,
        input_hessians=pipeline.read_input_hessians(run_dir, config),
        input_quantizers=input_quantizers,
    )
    return accuracy, time.perf_counter() - start_s


def cached_accuracy(
    model: nn.Module,
    run_dir: Path,
    config: RunConfig,
    correction_inputs: torch.Tensor,
    test: Dataset,
    reference: object | None = None,
) -> AccuracyCache:
    """Top-1 per distinct assignment (a candidate per layer of ``run_dir``, weights to their
    weight halves with GPTQ's input second moments from ``run_dir``), measured once each."""
    layers, _ = pipeline.read_layers(run_dir)
    names = [layer.name for layer in layers]
    input_hessians = pipeline.read_input_hessians(run_dir, config)
    return AccuracyCache(
        lambda formats: quantized_accuracy(
            model,
            layers,
            pipeline.weight_assignment(names, formats),
            config,
            correction_inputs,
            test,
            reference=reference,
            input_hessians=input_hessians,
        )
    )


class AccuracyCache:
    """Top-1 per distinct assignment (one format per layer): ``measure`` runs once for each."""

    def __init__(self, measure: Callable[[tuple[str, ...]], Accuracy]) -> None:
        self.measure = measure
        self.measured: dict[tuple[str, ...], Accuracy] = {}

    def __call__(self, formats: Sequence[str]) -> Accuracy:
        key = tuple(formats)
        if key not in self.measured:
            self.measured[key] = self.measure(key)
        return self.measured[key]

    def __len__(self) -> int:
        return len(self.measured)
