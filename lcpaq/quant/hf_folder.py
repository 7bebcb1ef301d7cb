"""A quantized transformers model as a ready-to-load Hugging Face folder: its config, its source
folder's tokenizer (and sentence-transformers pooling) files, and the dequantized weights as
safetensors, so ``AutoModel.from_pretrained(folder)`` (and ``AutoTokenizer``) work on it with no
lcpaq installed and give the quantized model's outputs.

The weights are the checkpoint's decoded values in float32 (what `lcpaq.load_quantized` gives):
the folder is as large as the FP32 model, and layer-input quantizers are not in it (the lcpaq
checkpoint, the compressed-tensors folder and the ONNX file carry those). transformers writes the
config and weights (``save_pretrained``: tied weights stay tied); lcpaq only copies the side files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from torch import nn

from lcpaq.errors import InputError
from lcpaq.quant.checkpoint import make_build_dir, replace_dir_atomically

#: Files holding weights in some format: never copied from the source folder (they hold FP32
#: values, or other formats of them, that would be mistaken for the quantized model).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".h5", ".msgpack", ".ckpt")
#: Written by ``save_pretrained`` from the loaded model; the source's copies are not taken.
SAVED_BY_TRANSFORMERS = ("config.json", "generation_config.json", "model.safetensors.index.json")


def hf_model_of(model: nn.Module) -> nn.Module:
    """The Hugging Face model of ``model``: itself, or the one lcpaq's wrapper holds at ``model``."""
    inner = getattr(model, "model", None)
    for candidate in (model, inner):
        if isinstance(candidate, nn.Module) and hasattr(candidate, "save_pretrained"):
            return candidate
    raise InputError(f"{type(model).__name__} is not a transformers model (no save_pretrained)")


def is_hf_model(model: nn.Module) -> bool:
    """Whether `hf_model_of` finds a transformers model in ``model``."""
    try:
        hf_model_of(model)
    except InputError:
        return False
    return True


def copy_side_files(source_dir: Path, target_dir: Path) -> list[str]:
    """Copy the source folder's files that are neither weights nor written by transformers
    (tokenizer, pooling and sentence-transformers module configs, README); their relative paths."""
    copied = []
    for path in sorted(source_dir.rglob("*")):
        relative = path.relative_to(source_dir)
        skipped = (
            not path.is_file()
            or path.suffix in WEIGHT_SUFFIXES
            or str(relative) in SAVED_BY_TRANSFORMERS
            or any(part.startswith(".") for part in relative.parts)
        )
        if skipped:
            continue
        (target_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target_dir / relative)
        copied.append(str(relative))
    return copied


def save_hf_files(model: nn.Module, folder: Path, source_dir: Path | None = None) -> None:
    """Write ``model``'s Hugging Face files into ``folder``: config and weights by transformers'
    ``save_pretrained``, then the side files of ``source_dir`` (`copy_side_files`)."""
    hf_model = hf_model_of(model)
    if source_dir is not None and not source_dir.is_dir():
        raise InputError(f"the model's source folder {source_dir} does not exist")
    # nn.Module does not declare it: looked up, so the type checker sees transformers' method.
    save_pretrained = getattr(hf_model, "save_pretrained")  # noqa: B009
    save_pretrained(folder)
    if source_dir is not None:
        copy_side_files(source_dir, folder)


def write_hf_folder(model: nn.Module, out_dir: Path, source_dir: Path | None = None) -> Path:
    """``model`` (holding the dequantized weights, e.g. from `lcpaq.load_quantized`) as a Hugging
    Face folder at ``out_dir``, with the side files of ``source_dir`` (written atomically)."""
    hf_model_of(model)  # refused before anything is written
    build_dir = make_build_dir(out_dir)
    try:
        save_hf_files(model, build_dir, source_dir)
        build_dir.chmod(0o755)
        replace_dir_atomically(build_dir, out_dir)
    except BaseException:
        shutil.rmtree(build_dir, ignore_errors=True)
        raise
    return out_dir
