"""The ``evaluate`` stage: top-1 of the FP32 model and of the exported checkpoint read back from
disk, on labelled evaluation data, with their paired difference.

Reads ``run_config.json`` and ``quantized/``; writes ``evaluation.json``. `evaluate_models` is the
in-memory part. The next stage is ``sweep``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from torch import nn

from lcpaq import runfolder
from lcpaq.model.data import Dataset
from lcpaq.model.evaluate import evaluate_accuracy, paired_difference
from lcpaq.model.zoo import build_model
from lcpaq.quant.activations import ActivationQuantizer
from lcpaq.quant.checkpoint import load_quantized, manifest_activation_quantizers, read_manifest
from lcpaq.stages.folder import load_eval, load_fp_model, read_config, timed

logger = logging.getLogger(__name__)


def evaluate_models(
    fp_model: nn.Module,
    quantized_model: nn.Module,
    dataset: Dataset,
    input_quantizers: Mapping[str, ActivationQuantizer],
) -> dict[str, object]:
    """``evaluation.json``'s content: both top-1s on ``dataset`` and their paired difference;
    ``input_quantizers``: the layer inputs the quantized model quantizes."""
    fp_accuracy = evaluate_accuracy(fp_model, dataset)
    q_accuracy = evaluate_accuracy(quantized_model, dataset)
    difference, difference_se = paired_difference(q_accuracy, fp_accuracy)
    logger.info(
        "top-1: FP32 %.2f %%, quantized %.2f %% (paired difference %+.2f ± %.2f points)",
        100 * fp_accuracy.top1,
        100 * q_accuracy.top1,
        100 * difference,
        100 * difference_se,
    )
    return {
        "eval_data": dataset.source,
        "fp32": fp_accuracy.to_dict(),
        "quantized": q_accuracy.to_dict(),
        "paired_difference": difference,
        "paired_difference_stderr": difference_se,
        # Layers whose inputs the evaluated checkpoint quantizes, per activation format.
        "quantized_inputs": dict(
            Counter(quantizer.format_name for quantizer in input_quantizers.values())
        ),
    }


def evaluate(
    run_dir: Path, eval_path: str, *, quantized_dir: Path | None = None
) -> dict[str, object]:
    """Top-1 of the FP32 model and of the exported checkpoint, read back from disk, paired."""
    config = read_config(run_dir)
    quantized_dir = quantized_dir or run_dir / "quantized"
    with timed(run_dir, "evaluate"):
        fp_model = load_fp_model(config)
        dataset = load_eval(config, fp_model, eval_path)
        # Build the architecture from the FP32 state dict (depth inference), then load the
        # exported codes: the figure is for the file a user ships, not an in-memory model.
        skeleton = build_model(config.analysis.model, fp_model.state_dict())
        quantized_model = load_quantized(quantized_dir, skeleton)
        assert isinstance(quantized_model, nn.Module)  # given a model, it returns the model
        input_quantizers = manifest_activation_quantizers(
            read_manifest(quantized_dir), quantized_dir / "manifest.json"
        )
        result = {
            **evaluate_models(fp_model, quantized_model, dataset, input_quantizers),
            "eval_data": eval_path,
        }
        runfolder.write_json(run_dir / "evaluation.json", result)
    return result
