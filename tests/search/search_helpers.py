"""Shared inputs of the search tests: the (untrained) demo DigitsNet, random calibration and
evaluation files, the ``lcpaq search`` arguments of a few-trial search, and small checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from safetensors.torch import save_file

from lcpaq.config import AllocationConfig, AnalysisConfig, RunConfig
from lcpaq.model.demo import DigitsNet

NUM_IMAGES = 160
RUNGS = "16,48"
HEAD = 32


def make_files(folder: Path, num_images: int = NUM_IMAGES) -> dict[str, Path]:
    torch.manual_seed(0)
    model = DigitsNet().eval()
    checkpoint = folder / "net.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    rng = np.random.default_rng(0)
    data = folder / "calib.npz"
    np.savez(
        data,
        x=rng.integers(0, 255, (num_images, 1, 8, 8), dtype=np.uint8),
        y=rng.integers(0, 10, num_images),
    )
    evaluation = folder / "eval.npz"
    np.savez(
        evaluation,
        x=rng.integers(0, 255, (64, 1, 8, 8), dtype=np.uint8),
        y=rng.integers(0, 10, 64),
    )
    return {"checkpoint": checkpoint, "calib": data, "eval": evaluation}


def search_args(files: dict[str, Path], out: Path, *extra: str, trials: int = 5) -> list[str]:
    return [
        "-q",
        "search",
        "--model",
        "demo-digits",
        "--checkpoint",
        str(files["checkpoint"]),
        "--calib",
        str(files["calib"]),
        "--normalize",
        "none",
        "--budget",
        "avg-bits=4",
        "--trials",
        str(trials),
        "--out",
        str(out),
        "--proxy-samples",
        RUNGS,
        "--fix",
        f"num_samples={HEAD}",
        "--fix",
        f"correction={HEAD}",
        *extra,
    ]


def digits_config(files: dict[str, Path], **analysis: Any) -> RunConfig:
    """The digits model on the test calibration file at 4 average bits."""
    return RunConfig(
        AnalysisConfig(
            model="demo-digits",
            checkpoint=str(files["checkpoint"]),
            calib=str(files["calib"]),
            normalize="none",
            **analysis,
        ),
        allocation=AllocationConfig(budgets=("avg-bits=4",)),
    )


def assert_clean_error(capsys, code: int, *needles: str) -> str:
    captured = capsys.readouterr()
    assert code == 2
    lines = [line for line in captured.err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("lcpaq: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def study_of(out: Path, name: str = "lcpaq-search") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{(out / 'search.db').resolve()}")
