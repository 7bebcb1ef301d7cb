"""``--model hf:DIR``: a local Hugging Face transformers folder as a `TextModel`.

The folder must hold ``config.json``, safetensors weights and the tokenizer files; nothing is
downloaded (``local_files_only``). Untrusted folders run no code of their own: a config or tokenizer
that names custom code (``auto_map``, ``*.py`` files) is refused unless the user passes
``--trust-remote-code``, and pickled ``.bin`` weights unless ``--allow-unsafe-pickle``. The task
comes from ``config.architectures`` (``--task`` overrides it): ``*ForCausalLM``/``*LMHeadModel``
→ causal-lm, ``*ForSequenceClassification`` → sequence-classification, anything else → encoder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, cast

from torch import nn

from lcpaq.errors import InputError
from lcpaq.model.text import TASKS, Task, TextModel, read_pooling

logger = logging.getLogger(__name__)

#: ``--model`` prefix of a local transformers folder.
HF_PREFIX = "hf:"


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise InputError("--model hf:DIR needs transformers: pip install 'lcpaq[hf]'") from None
    return transformers


def _config_dict(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not folder.is_dir():
        raise InputError(f"--model hf:{folder}: no such folder")
    if not path.is_file():
        raise InputError(f"--model hf:{folder}: no config.json (not a transformers model folder)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path} is not readable JSON: {error}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def task_of(config: dict[str, Any]) -> Task:
    """The task ``config.architectures`` names (encoder when it names none we recognise)."""
    architectures = [str(name) for name in config.get("architectures") or []]
    if any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures):
        return "causal-lm"
    if any(name.endswith("ForSequenceClassification") for name in architectures):
        return "sequence-classification"
    return "encoder"


def _custom_code(folder: Path, config: dict[str, Any]) -> str | None:
    """What in the folder would run the folder's own code, or None."""
    if "auto_map" in config:
        return "config.json has an auto_map"
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file() and '"auto_map"' in tokenizer_config.read_text(errors="replace"):
        return "tokenizer_config.json has an auto_map"
    scripts = sorted(path.name for path in folder.glob("*.py"))
    return f"it holds Python files ({', '.join(scripts)})" if scripts else None


def _weights_are_safe(folder: Path, allow_unsafe_pickle: bool) -> bool:
    """True for safetensors weights; pickled ``.bin`` weights only with the user's opt-in."""
    if any(folder.glob("*.safetensors")):
        return True
    pickled = sorted(path.name for path in folder.glob("*.bin"))
    if not pickled:
        raise InputError(f"--model hf:{folder}: no weights (*.safetensors) in the folder")
    if not allow_unsafe_pickle:
        raise InputError(
            f"--model hf:{folder}: weights {pickled[0]} are pickled, which can run anything; "
            "refusing. Convert them to safetensors, or pass --allow-unsafe-pickle if you trust "
            "their source"
        )
    return False


def _check_code(folder: Path, config: dict[str, Any], trust_remote_code: bool) -> None:
    reason = _custom_code(folder, config)
    if reason and not trust_remote_code:
        raise InputError(
            f"--model hf:{folder}: the model needs its own code ({reason}), which can run "
            "anything; refusing. Pass --trust-remote-code if you trust its source"
        )


def load_hf_model(
    folder: str | Path,
    *,
    task: str | None = None,
    trust_remote_code: bool = False,
    allow_unsafe_pickle: bool = False,
) -> TextModel:
    """The transformers model in ``folder`` wrapped as a `TextModel` in eval mode, float32."""
    folder = Path(folder)
    config = _config_dict(folder)
    chosen = cast(Task, task) if task else task_of(config)
    if chosen not in TASKS:
        raise InputError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    _check_code(folder, config, trust_remote_code)
    safe = _weights_are_safe(folder, allow_unsafe_pickle)
    transformers = _transformers()
    auto = {
        "encoder": transformers.AutoModel,
        "causal-lm": transformers.AutoModelForCausalLM,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
    }[chosen]
    try:
        model = auto.from_pretrained(
            str(folder),
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            use_safetensors=safe,
        )
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise InputError(
            f"--model hf:{folder}: transformers cannot load it as {chosen}: {detail}"
        ) from None
    pooling = read_pooling(folder) if chosen == "encoder" else None
    logger.info("loaded %s from %s as %s", type(model).__name__, folder, chosen)
    # float32 whatever the folder stores (fp16/bf16 → fp32 is exact); no dtype argument, whose
    # name changed across transformers versions.
    return TextModel(cast(nn.Module, model).float().eval(), chosen, pooling).eval()


def load_tokenizer(folder: str | Path, *, trust_remote_code: bool = False) -> Any:
    """The folder's own tokenizer (fast when available), with a padding token."""
    folder = Path(folder)
    _check_code(folder, _config_dict(folder), trust_remote_code)
    transformers = _transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise InputError(f"--model hf:{folder}: cannot load its tokenizer: {detail}") from None
    tokenizer.padding_side = "right"  # causal LMs: padding after the text keeps its positions
    if tokenizer.pad_token_id is None:
        # Causal LMs often have none; padding is masked out everywhere, so any id will do.
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise InputError(f"--model hf:{folder}: the tokenizer has no pad, EOS or UNK token")
        tokenizer.pad_token = fallback
    return tokenizer
