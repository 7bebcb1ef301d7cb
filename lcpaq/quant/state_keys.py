"""State-dict keys of a quantized checkpoint beyond one tensor per key: tied tensors, weights that
a module stores transposed, and the ``model.`` prefix of lcpaq's transformers wrapper.

* Tied tensors: a causal LM's embedding and LM head are often one parameter, so its state dict holds
  the same storage under two keys. safetensors refuses to save such a dict, and the tensor must
  keep one format; the checkpoint stores it once and records the other key as an alias
  (`tied_aliases`).
* transformers' ``Conv1D`` (GPT-2) stores its weight in×out; the quantizer sees it as out×in
  (`lcpaq.model.graph.layer_weight`), so its codes are out×in and its decoded weight is transposed
  back into the module's layout (`stores_transposed`).
* `lcpaq.model.text.TextModel` holds the Hugging Face model at attribute ``model``, so its keys are
  ``model.<HF key>``; `fit_wrapper_prefix` maps a checkpoint's keys onto a model that has the
  prefix where the checkpoint has not, or the other way round.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

import torch

#: The attribute of `lcpaq.model.text.TextModel` holding the Hugging Face model.
WRAPPER_PREFIX = "model."
#: Layer kinds (`LayerInfo.kind`, the module's class name) whose module stores its weight in×out.
TRANSPOSED_KINDS = frozenset({"Conv1D"})


def stores_transposed(kind: str) -> bool:
    """Whether a layer of this kind stores its weight in×out (its codes are out×in)."""
    return kind in TRANSPOSED_KINDS


def _storage_key(tensor: torch.Tensor) -> tuple[int, int, tuple[int, ...], tuple[int, ...]]:
    """Tensors with the same key are the same values (same memory, offset, shape and strides)."""
    return (
        tensor.untyped_storage().data_ptr(),
        int(tensor.storage_offset()),
        tuple(tensor.shape),
        tuple(tensor.stride()),
    )


def tied_aliases(
    state_dict: Mapping[str, torch.Tensor], preferred: Collection[str] = ()
) -> dict[str, str]:
    """Alias key → the key that stays, for every group of keys holding the same tensor. The key
    kept is the first of the group in ``preferred`` (a quantized layer's weight), else the first
    in the state dict's order."""
    groups: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], list[str]] = {}
    for key, tensor in state_dict.items():
        if tensor.numel():
            groups.setdefault(_storage_key(tensor), []).append(key)
    aliases = {}
    for keys in groups.values():
        if len(keys) < 2:
            continue
        kept = next((key for key in keys if key in preferred), keys[0])
        aliases.update({key: kept for key in keys if key != kept})
    return aliases


def fit_wrapper_prefix(keys: Iterable[str], model_keys: Collection[str]) -> str | None:
    """How to rename ``keys`` for a model with ``model_keys``: ``"keep"``, ``"strip"`` (drop the
    wrapper's ``model.``), ``"add"`` (prepend it), or None when no renaming makes them fit."""
    keys = list(keys)
    if all(key in model_keys for key in keys):
        return "keep"
    if all(key.startswith(WRAPPER_PREFIX) for key in keys) and all(
        key.removeprefix(WRAPPER_PREFIX) in model_keys for key in keys
    ):
        return "strip"
    if all(WRAPPER_PREFIX + key in model_keys for key in keys):
        return "add"
    return None


def renamed(name: str, change: str | None) -> str:
    """``name`` under a `fit_wrapper_prefix` change (None and ``"keep"`` leave it alone)."""
    if change == "strip":
        return name.removeprefix(WRAPPER_PREFIX)
    if change == "add":
        return WRAPPER_PREFIX + name
    return name
