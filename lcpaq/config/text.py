"""The text options of the analysis (transformers models, ``--model hf:DIR``): the task, the
sequence length and the opt-in to a folder's own code. `TextOptions` is stored under
``analysis.text`` in ``run_config.json``; its flags are `TEXT_OPTIONS` (nested like the
`QuantScheme` of ``analysis.scheme``). Image models ignore them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lcpaq.config.options import MODEL_GROUP, Option
from lcpaq.errors import InputError

#: The tasks of `lcpaq.model.text.TextModel` (`lcpaq.model.hf.task_of` infers one from the folder).
TEXT_TASKS: tuple[str, ...] = ("encoder", "causal-lm", "sequence-classification")


@dataclass(frozen=True)
class TextOptions:
    """``task``: None (from ``config.architectures``) or one of `TEXT_TASKS`. ``seq_len``: texts
    are truncated to this many tokens and padded to the longest (at most this). ``trust_remote_code``:
    let transformers run the folder's own Python code."""

    task: str | None = None
    seq_len: int = 128
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.task is not None and self.task not in TEXT_TASKS:
            raise InputError(f"task must be one of {', '.join(TEXT_TASKS)}, got {self.task!r}")
        if self.seq_len < 2:
            raise InputError(f"seq-len must be at least 2 tokens, got {self.seq_len}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextOptions:
        return cls(**data)


#: The `TextOptions` fields on the command line, in help order.
TEXT_OPTIONS: dict[str, Option] = {
    "task": Option(
        "--task",
        group=MODEL_GROUP,
        choices=TEXT_TASKS,
        help="hf:DIR models: the task (default: from config.architectures; *ForCausalLM → "
        "causal-lm, *ForSequenceClassification → sequence-classification, else encoder)",
    ),
    "seq_len": Option(
        "--seq-len",
        group=MODEL_GROUP,
        help="hf:DIR models: tokens per text (longer texts are truncated; default %(default)s)",
    ),
    "trust_remote_code": Option(
        "--trust-remote-code",
        group=MODEL_GROUP,
        amends_config=True,
        help="hf:DIR models: run the folder's own Python code (only for folders you trust)",
    ),
}
