"""`TextModel`: a transformers model behind lcpaq's one-tensor interface (contract §1-2).

Every stage slices ``dataset.inputs[a:b]`` and calls ``model(batch)``; for text a batch is one
int64 tensor [N, 2, T] (``[:, 0]`` input ids, ``[:, 1]`` attention mask, 1 for real tokens). The
wrapper returns what the task's curvature and metrics read: an encoder's pooled sentence embedding
[N, D], a causal LM's next-token logits [N, T, V] or a classifier's logits [N, C]. The Hugging Face
model sits at attribute ``model`` so checkpoint keys are ``model.<HF key>``
(`lcpaq.quant.state_keys.WRAPPER_PREFIX`).

Pooling follows the sentence-transformers files of the folder when present (``modules.json``,
``1_Pooling/config.json``): mean (over real tokens), CLS or max, optionally L2-normalised; a
folder without them gets mean pooling without normalisation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lcpaq.errors import InputError

Task = Literal["encoder", "causal-lm", "sequence-classification"]
TASKS: tuple[str, ...] = ("encoder", "causal-lm", "sequence-classification")
PoolingMode = Literal["mean", "cls", "max"]


@dataclass(frozen=True)
class Pooling:
    """How an encoder's token states become one embedding per text."""

    mode: PoolingMode = "mean"
    normalize: bool = False


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path} is not readable JSON: {error}") from None


def read_pooling(folder: Path) -> Pooling:
    """The sentence-transformers pooling of ``folder``: the Pooling module's config (mean, CLS or
    max tokens) and whether a Normalize module follows; mean without normalisation if absent."""
    modules_path = folder / "modules.json"
    modules = _read_json(modules_path) if modules_path.is_file() else []
    if not isinstance(modules, list):
        raise InputError(f"{modules_path}: expected a list of modules")
    types = {str(entry.get("type", "")): entry for entry in modules if isinstance(entry, dict)}
    normalize = any(name.endswith(".Normalize") for name in types)
    pooling_dir = next(
        (str(entry.get("path", "")) for name, entry in types.items() if name.endswith(".Pooling")),
        "1_Pooling",
    )
    config_path = folder / pooling_dir / "config.json"
    if not config_path.is_file():
        return Pooling("mean", normalize)
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise InputError(f"{config_path}: expected a JSON object")
    chosen = [
        mode
        for mode, key in (
            ("mean", "pooling_mode_mean_tokens"),
            ("cls", "pooling_mode_cls_token"),
            ("max", "pooling_mode_max_tokens"),
        )
        if config.get(key)
    ]
    unsupported = [
        key
        for key in ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")
        if config.get(key)
    ]
    if len(chosen) != 1 or unsupported:
        raise InputError(
            f"{config_path}: lcpaq supports exactly one of mean, CLS or max token pooling, "
            f"got {', '.join(chosen + unsupported) or 'none'}"
        )
    return Pooling(chosen[0], normalize)  # type: ignore[arg-type]


def pool(states: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Token states [N, T, D] → embeddings [N, D] over the real tokens of ``mask`` [N, T]."""
    if pooling.mode == "cls":
        pooled = states[:, 0]
    elif pooling.mode == "max":
        pooled = states.masked_fill(~mask[:, :, None], torch.finfo(states.dtype).min).amax(1)
    else:
        weights = mask.to(states.dtype)[:, :, None]
        pooled = (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    return F.normalize(pooled, dim=-1) if pooling.normalize else pooled


class TextModel(nn.Module):
    """A transformers model taking [N, 2, T] int64 batches (ids, attention mask)."""

    def __init__(self, model: nn.Module, task: Task, pooling: Pooling | None = None) -> None:
        super().__init__()
        if task not in TASKS:
            raise InputError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        self.model = model
        self.task: Task = task
        self.pooling = pooling or Pooling()

    def token_mask(self, inputs: torch.Tensor) -> torch.Tensor:
        """[N, T] bool: the real (not padding) tokens."""
        return inputs[:, 1].bool()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.dim() != 3 or inputs.shape[1] != 2:
            raise InputError(
                f"a text model takes int64 batches [N, 2, T] (ids, attention mask), got shape "
                f"{tuple(inputs.shape)}"
            )
        ids, mask = inputs[:, 0].long(), inputs[:, 1].long()
        outputs = self.model(input_ids=ids, attention_mask=mask)
        if self.task == "encoder":
            states = (
                outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
            )
            return pool(states, mask.bool(), self.pooling)
        return outputs.logits

    def extra_repr(self) -> str:
        return f"task={self.task}, pooling={self.pooling.mode}, normalize={self.pooling.normalize}"
