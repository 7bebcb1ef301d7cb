"""What the CIFAR studies (rounding, activations, scorers) share: their command line, the shared
checkpoints and images, the run configuration they start from, and the JSON header."""

from __future__ import annotations

import argparse
import json
import logging
import platform
from collections.abc import Sequence
from pathlib import Path

import torch
from _provenance import git_sha

from lcpaq.config import AnalysisConfig, RunConfig
from lcpaq.model.data import Dataset, load_dataset
from lcpaq.model.evaluate import Accuracy, paired_difference

MODELS = {"resnet20": "resnet20-12fca82f.th", "resnet32": "resnet32-d509ac18.th"}


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


def start(args: argparse.Namespace) -> tuple[Dataset, Dataset, dict[str, object]]:
    """Quiet logging and the thread count; the calibration and test images; the JSON header."""
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    calib = load_dataset(str(args.shared / "data" / "cifar10_train_subset.npz"), num_classes=10)
    test = load_dataset(str(args.shared / "data" / "cifar10_test.npz"), num_classes=10)
    header: dict[str, object] = {
        "git_sha": git_sha(),
        "machine": f"{platform.machine()}, torch {torch.__version__}, {args.threads} threads",
        "studies": [],
    }
    return calib, test, header


def add_study(out: Path, result: dict[str, object], entry: dict[str, object]) -> None:
    """Append one study to the JSON and rewrite the file (partial results survive a crash)."""
    result["studies"].append(entry)  # type: ignore[union-attr]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def base_config(shared: Path, model: str, **analysis: object) -> RunConfig:
    """lcpaq's default configuration on a shared checkpoint and the calibration file."""
    return RunConfig(
        analysis=AnalysisConfig(
            model="cifar-resnet",
            checkpoint=str(shared / "checkpoints" / MODELS[model]),
            calib=str(shared / "data" / "cifar10_train_subset.npz"),
            **analysis,  # type: ignore[arg-type]
        )
    )


def paired(first: Accuracy, second: Accuracy) -> dict[str, float]:
    """first − second on the same images, in points, with its standard error."""
    difference, stderr = paired_difference(first, second)
    return {"difference_pct": 100 * difference, "stderr_pct": 100 * stderr}
