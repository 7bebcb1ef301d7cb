"""Part of the ``export`` stage for transformers models: beside the lcpaq checkpoint, the same
quantized model as

* ``QUANTIZED/hf/``: a ready-to-load Hugging Face folder (config, the source folder's tokenizer
  and pooling files, dequantized float32 weights; `lcpaq.quant.hf_folder`);
* ``QUANTIZED/compressed-tensors/``: the compressed-tensors folder vLLM serves
  (`lcpaq.quant.compressed`), layers it cannot express dequantized or refused;
* ``QUANTIZED/exports.json``: what was written, and which layers stayed dequantized and why.

They live inside the checkpoint folder, which ``export`` replaces as a whole, so they never
outlive the checkpoint they were made from. Models that are not transformers models get none.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from lcpaq import runfolder
from lcpaq.config import ExportSettings
from lcpaq.model.hf import HF_PREFIX
from lcpaq.quant.hf_folder import is_hf_model, write_hf_folder

logger = logging.getLogger(__name__)

HF_FOLDER = "hf"
COMPRESSED_FOLDER = "compressed-tensors"
EXPORTS_FILE = "exports.json"


def source_folder(model_spec: str) -> Path | None:
    """The local folder an ``hf:DIR`` model was loaded from (its tokenizer files are copied)."""
    return Path(model_spec.removeprefix(HF_PREFIX)) if model_spec.startswith(HF_PREFIX) else None


def export_hf(
    model: nn.Module,
    checkpoint_dir: Path,
    model_spec: str,
    settings: ExportSettings | None = None,
) -> dict[str, object]:
    """Write the folders ``settings`` asks for into ``checkpoint_dir`` (the lcpaq checkpoint of
    ``model``, which holds its decoded weights) and ``exports.json``; returns what that file
    holds (empty, and nothing written, for a model that is not a transformers model)."""
    if not is_hf_model(model):
        return {}
    settings = settings or ExportSettings()
    source = source_folder(model_spec)
    summary: dict[str, object] = {"hf_folder": None, "compressed_tensors": None}
    if settings.hf_folder:
        summary["hf_folder"] = str(write_hf_folder(model, checkpoint_dir / HF_FOLDER, source))
    if settings.compressed_tensors != "off":
        from lcpaq.quant.compressed import write_compressed_tensors

        result = write_compressed_tensors(
            model,
            checkpoint_dir,
            checkpoint_dir / COMPRESSED_FOLDER,
            source,
            unsupported=settings.compressed_tensors,
        )
        summary["compressed_tensors"] = result.to_dict()
        if result.dequantized:
            listed = ", ".join(f"{name} ({why})" for name, why in result.dequantized.items())
            logger.warning(
                "compressed-tensors cannot express %d layer(s), written dequantized: %s",
                len(result.dequantized),
                listed,
            )
    runfolder.write_json(checkpoint_dir / EXPORTS_FILE, summary)
    return summary
