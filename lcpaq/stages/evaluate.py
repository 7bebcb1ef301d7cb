"""The ``evaluate`` stage: the model's metric (`lcpaq.model.evaluate.evaluate_model`: top-1 of a
classifier, recall@1 of an encoder on query/document pairs, perplexity of a causal LM) for the
FP32 model and for the exported checkpoint read back from disk, with their paired difference.

Reads ``run_config.json`` and ``quantized/``; writes ``evaluation.json``. `evaluate_models` is the
in-memory part. The next stage is ``sweep``.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from torch import nn

from lcpaq import runfolder
from lcpaq.model.data import Dataset
from lcpaq.model.evaluate import MetricResult, evaluate_model, format_metric, paired_difference
from lcpaq.model.text_data import RetrievalPairs
from lcpaq.quant.activations import ActivationQuantizer
from lcpaq.quant.checkpoint import load_quantized, manifest_activation_quantizers, read_manifest
from lcpaq.stages.folder import load_eval, load_fp_model, read_config, timed

logger = logging.getLogger(__name__)


def evaluate_models(
    fp_model: nn.Module,
    quantized_model: nn.Module,
    dataset: Dataset | RetrievalPairs,
    input_quantizers: Mapping[str, ActivationQuantizer],
) -> dict[str, object]:
    """``evaluation.json``'s content: both models' metric on ``dataset`` (a classifier's under
    ``top1``, as before there were others; secondary metrics beside it) and their paired
    difference; ``input_quantizers``: the layer inputs the quantized model quantizes."""
    fp_result = evaluate_model(fp_model, dataset)
    q_result = evaluate_model(quantized_model, dataset, reference=fp_result)
    difference, difference_se = paired_difference(q_result, fp_result)
    paired = q_result.paired_quantity or q_result.name
    logger.info(
        "%s: FP32 %s, quantized %s (paired difference of %s %+.4g ± %.2g)",
        q_result.name,
        format_metric(fp_result.name, fp_result.value),
        format_metric(q_result.name, q_result.value),
        paired,
        difference,
        difference_se,
    )
    return {
        "eval_data": dataset.source,
        **metric_fields(q_result),
        "fp32": fp_result.to_dict(),
        "quantized": q_result.to_dict(),
        "paired_difference": difference,
        "paired_difference_stderr": difference_se,
        # Layers whose inputs the evaluated checkpoint quantizes, per activation format.
        "quantized_inputs": dict(
            Counter(quantizer.format_name for quantizer in input_quantizers.values())
        ),
    }


def metric_fields(result: MetricResult) -> dict[str, object]:
    """What a results file says about its metric: its name, its direction and the quantity its
    paired differences are in (a fraction for top-1 and recall, NLL in nats/token for
    perplexity)."""
    return {
        "metric": result.name,
        "higher_is_better": result.higher_is_better,
        "paired_quantity": result.paired_quantity or result.name,
    }


def evaluate(
    run_dir: Path, eval_path: str, *, quantized_dir: Path | None = None
) -> dict[str, object]:
    """The metric of the FP32 model and of the exported checkpoint, read back from disk, paired."""
    config = read_config(run_dir)
    quantized_dir = quantized_dir or run_dir / "quantized"
    with timed(run_dir, "evaluate"):
        fp_model = load_fp_model(config)
        dataset = load_eval(config, fp_model, eval_path)
        # A copy of the FP32 model (any architecture, hf:DIR included) filled with the exported
        # codes: the figure is for the file a user ships, not an in-memory model.
        quantized_model = load_quantized(quantized_dir, copy.deepcopy(fp_model))
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
