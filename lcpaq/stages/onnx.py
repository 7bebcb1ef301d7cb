"""The ``onnx`` stage (optional, after ``export``): the exported checkpoint as an ONNX QDQ model,
checked in ONNX Runtime against PyTorch. Reads ``run_config.json`` and ``quantized/``; writes
``quantized/model.onnx`` and ``onnx.json`` (which ``report`` shows)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from lcpaq import runfolder
from lcpaq.errors import InputError
from lcpaq.model.text import TextModel
from lcpaq.model.zoo import build_model
from lcpaq.quant.activations import attach_activation_quantizers
from lcpaq.quant.checkpoint import manifest_activation_quantizers, read_manifest
from lcpaq.stages.folder import load_eval, load_fp_model, read_config, timed

logger = logging.getLogger(__name__)


def export_onnx(
    run_dir: Path,
    *,
    quantized_dir: Path | None = None,
    out_path: Path | None = None,
    check_path: str | None = None,
    check_images: int = 1024,
) -> dict[str, object]:
    """The exported checkpoint as an ONNX QDQ model (default ``RUN/quantized/model.onnx``), run in
    ONNX Runtime next to PyTorch on ``check_images`` images of ``check_path`` (labelled data:
    top-1 of both too) or, without it, of the calibration data; the check goes to ``onnx.json``."""
    from lcpaq.quant.onnx_qdq import check_onnx, export_onnx

    if check_images < 1:
        raise InputError(f"--images must be at least 1, got {check_images}")
    config = read_config(run_dir)
    quantized_dir = quantized_dir or run_dir / "quantized"
    out_path = out_path or quantized_dir / "model.onnx"
    with timed(run_dir, "onnx"):
        fp_model = load_fp_model(config)
        data = load_eval(config, fp_model, check_path or config.analysis.calib)
        data = data.subset(0, min(check_images, len(data)))
        skeleton = (
            copy.deepcopy(fp_model)  # a transformers model as loaded (its task, its code)
            if isinstance(fp_model, TextModel)
            else build_model(config.analysis.model, fp_model.state_dict())
        )
        export_onnx(skeleton, quantized_dir, out_path, data.inputs[:2])  # loads the weights
        # ... so PyTorch's side of the check is `load_quantized`'s model without a second read.
        quantizers = manifest_activation_quantizers(
            read_manifest(quantized_dir), quantized_dir / "manifest.json"
        )
        attach_activation_quantizers(skeleton, quantizers)
        check = check_onnx(out_path, skeleton, data.inputs, data.labels if check_path else None)
        result = {
            "onnx": str(out_path),
            "file_bytes": out_path.stat().st_size,
            "quantized": str(quantized_dir),
            "check_data": check_path or config.analysis.calib,
            **check.to_dict(),
        }
        runfolder.write_json(run_dir / "onnx.json", result)
    logger.info(
        "wrote %s; ONNX Runtime vs PyTorch on %d images: top-1 agreement %.2f %%, "
        "max |logit difference| %.2g",
        out_path,
        check.images,
        100 * check.top1_agreement,
        check.max_abs_logit_difference,
    )
    return result
