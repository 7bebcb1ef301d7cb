"""What every stage shares about the run folder: its checks, its timings file and typed readers of
the files earlier stages wrote (``run_config.json``, ``layers.json``, ``allocation.json``,
``input_hessians.safetensors``), plus loading the run's FP32 model and data the way ``analyze``
did. Writers live with the stage that owns each file (`lcpaq.stages.analyze`, …)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypedDict, cast, overload

import torch
from torch import nn

from lcpaq import runfolder
from lcpaq.allocation.result import Allocation
from lcpaq.config import AllocationConfig, RunConfig
from lcpaq.errors import InputError
from lcpaq.model.data import Dataset, check_inputs_fit, load_dataset
from lcpaq.model.graph import LayerInfo
from lcpaq.model.hf import HF_PREFIX, load_tokenizer
from lcpaq.model.text import TextModel
from lcpaq.model.text_data import RetrievalPairs, load_text_data
from lcpaq.model.zoo import load_model, num_classes_of
from lcpaq.stages.resume import check_finished

logger = logging.getLogger(__name__)

#: Per-layer input second moments E[x xᵀ] that GPTQ rounding needs (written by ``analyze``).
INPUT_HESSIANS_FILE = "input_hessians.safetensors"


class LayersFile(TypedDict):
    """``layers.json``: the quantizable layers and the model's sizes in bits (``analyze``)."""

    model: str
    checkpoint_sha256: str | None
    fp32_size_bits: float
    unquantized_size_bits: float
    curvature_seconds: float
    hutchinson_seconds: float | None
    activations_seconds: float | None
    interactions_seconds: float | None
    input_hessians_seconds: float | None
    layers: list[dict[str, Any]]
    #: Weight tensors left in FP32 (`lcpaq.model.graph.KeptWeight`): key, num_params, reason
    #: (absent in files from before it existed: read with ``.get``).
    kept_fp32: list[dict[str, Any]]


def ensure_writable(run_dir: Path) -> None:
    """Fail early, naming the folder, if the run folder cannot be created or written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise InputError(f"output folder {run_dir} is not writable: {error.strerror}") from None


@contextmanager
def timed(run_dir: Path, stage: str) -> Iterator[None]:
    """Record the wall time of a stage in ``timings.json`` (seconds, merged across stages)."""
    start = time.perf_counter()
    yield
    elapsed = time.perf_counter() - start
    path = run_dir / "timings.json"
    timings = runfolder.read_json(path, "timings") if path.is_file() else {}
    timings.pop("schema_version", None)
    timings[stage] = round(elapsed, 3)
    runfolder.write_json(path, timings)
    logger.info("stage %s took %.1f s", stage, elapsed)


def read_config(run_dir: Path) -> RunConfig:
    """The run's configuration; refused while its analysis is interrupted (`check_finished`)."""
    check_finished(run_dir)
    path = run_dir / "run_config.json"
    data = runfolder.read_json(path, "run configuration")
    try:
        return RunConfig.from_dict(data, source=str(path))
    except InputError as error:  # written by analyze: a bad value means the file was edited
        raise runfolder.damaged(path, error) from None


def read_layers_file(run_dir: Path, what: str = "layer list (lcpaq analyze)") -> LayersFile:
    return cast(LayersFile, runfolder.read_json(run_dir / "layers.json", what))


def read_layers(run_dir: Path) -> tuple[tuple[LayerInfo, ...], float]:
    """The quantizable layers and the bits of everything they do not quantize."""
    data = read_layers_file(run_dir)
    with runfolder.reading(run_dir / "layers.json"):
        layers = tuple(LayerInfo.from_dict(item) for item in data["layers"])
        return layers, float(data["unquantized_size_bits"])


def read_allocation(run_dir: Path) -> tuple[Allocation, dict[str, object]]:
    path = run_dir / "allocation.json"
    data = runfolder.read_json(path, "allocation (lcpaq allocate)")
    with runfolder.reading(path):
        return Allocation.from_dict(data), data


def allocation_config_of(allocation_data: dict[str, object]) -> AllocationConfig:
    """The options an ``allocation.json`` was solved with (its budgets are in the `Allocation`);
    defaults for the fields of files written before they existed."""
    stored = dict(cast(dict[str, Any], allocation_data.get("pairwise") or {}))
    options: dict[str, Any] = {
        name: allocation_data[name]
        for name in ("first_last", "scorer", "ties", "tie_rule", "latency_table")
        if name in allocation_data
    }
    pairwise: dict[str, Any] = {
        name: stored[name]
        for name in ("pairwise_weight", "pair_z", "pair_clip", "pairwise_mode")
        if name in stored
    }
    return AllocationConfig.from_dict({**options, **pairwise})


def load_fp_model(config: RunConfig) -> nn.Module:
    """The run's FP32 model, as ``analyze`` loaded it."""
    analysis = config.analysis
    return load_model(
        analysis.model,
        analysis.checkpoint,
        allow_unsafe_pickle=analysis.allow_unsafe_pickle,
        task=analysis.text.task,
        trust_remote_code=analysis.text.trust_remote_code,
    )


def _text_data(
    config: RunConfig, model: TextModel, path: str, num_samples: int | None, pairs: bool
) -> Dataset | RetrievalPairs:
    """Text data for an ``hf:DIR`` model, tokenized with the folder's own tokenizer."""
    analysis = config.analysis
    hf_config = getattr(model.model, "config", None)
    data = load_text_data(
        path,
        load_tokenizer(
            analysis.model.removeprefix(HF_PREFIX),
            trust_remote_code=analysis.text.trust_remote_code,
        ),
        seq_len=analysis.text.seq_len,
        num_samples=num_samples,
        model_max=getattr(hf_config, "max_position_embeddings", None),
        vocab_size=getattr(hf_config, "vocab_size", None),
        pairs=pairs,
    )
    num_labels = getattr(hf_config, "num_labels", None)
    if (
        isinstance(data, Dataset)
        and model.task == "sequence-classification"
        and isinstance(num_labels, int)
        and int(data.labels.max()) >= num_labels
    ):
        raise InputError(
            f"{path}: label {int(data.labels.max())} is out of range for a classifier with "
            f"{num_labels} labels"
        )
    return data


def load_model_and_data(config: RunConfig, num_samples: int) -> tuple[nn.Module, Dataset]:
    """The FP32 model and the first ``num_samples`` calibration images (or texts)."""
    analysis = config.analysis
    model = load_fp_model(config)
    if isinstance(model, TextModel):
        texts = _text_data(config, model, analysis.calib, num_samples, pairs=False)
        assert isinstance(texts, Dataset), "pairs=False gives texts"
        check_inputs_fit(model, texts, analysis.model)
        return model, texts
    calib = load_dataset(
        analysis.calib,
        normalization=analysis.normalize,
        num_classes=num_classes_of(model),
        image_size=analysis.image_size,
    )
    check_inputs_fit(model, calib, analysis.model)
    return model, calib.subset(0, min(num_samples, len(calib)))


@overload
def load_eval(  # type: ignore[overload-overlap]  # a TextModel is an nn.Module
    config: RunConfig, model: TextModel, eval_path: str
) -> Dataset | RetrievalPairs: ...
@overload
def load_eval(config: RunConfig, model: nn.Module, eval_path: str) -> Dataset: ...
def load_eval(config: RunConfig, model: nn.Module, eval_path: str) -> Dataset | RetrievalPairs:
    """The evaluation data: images, or for a text model (`TextModel`) its texts or
    query/document pairs (`RetrievalPairs`)."""
    if isinstance(model, TextModel):
        data = _text_data(config, model, eval_path, None, pairs=True)
        check_inputs_fit(
            model, data.queries if isinstance(data, RetrievalPairs) else data, config.analysis.model
        )
        return data
    dataset = load_dataset(
        eval_path,
        normalization=config.analysis.normalize,
        num_classes=num_classes_of(model),
        image_size=config.analysis.image_size,
    )
    check_inputs_fit(model, dataset, config.analysis.model)
    return dataset


def read_input_hessians(run_dir: Path, config: RunConfig) -> dict[str, torch.Tensor] | None:
    """``input_hessians.safetensors`` of an analysed run with ``--rounding gptq``, else None."""
    if config.analysis.scheme.rounding != "gptq":
        return None
    return runfolder.load_tensors(run_dir / INPUT_HESSIANS_FILE, "input Hessians (analyze)")


def pair_options_of(allocation_data: dict[str, object]) -> dict[str, object]:
    """The pairwise options an allocation used (defaults for files written before they existed)."""
    options = allocation_config_of(allocation_data)
    return {
        name: getattr(options, name)
        for name in ("pairwise_weight", "pair_z", "pair_clip", "pairwise_mode")
    }
