"""What a layer's weight actually meets: the inputs and outputs of the functional operations
(``F.linear``, ``F.conv1d``, ``F.conv2d``, and ``torch.addmm`` for transformers' ``Conv1D``) that
receive a tracked weight tensor, with the operation's own stride, padding, dilation and groups.

Why the operation and not the module: a Conv2d subclass that pads in its own ``forward`` (the
"static same padding" of efficientnet_pytorch), an ``nn.Linear`` whose weight is used through
``F.linear`` by its parent (Swin's window attention), ``nn.MultiheadAttention``'s in-projection (a
bare Parameter) and its ``out_proj`` (whose own forward never runs) are all seen as they are
computed. `OpCapture` swaps the functions in for the duration of a ``with`` block only (and turns
off the fused attention fast path, which would bypass them) and restores them on exit.

Inside ``F.multi_head_attention_forward`` tensors are sequence-first ([T, N, E], flattened
[T·N, E] before ``out_proj``): such calls record ``sample_axis=1``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

OPS = ("linear", "conv1d", "conv2d", "addmm", "embedding")
#: Operations whose weight acts on the last axis of inputs of any rank.
LINEAR_OPS = ("linear", "addmm")


@dataclass
class OpCall:
    """One call of an operation on a tracked weight.

    ``op``: "linear" (input [..., in], weight [out, in]), "addmm" (``Conv1D``: input [rows, in],
    weight stored [in, out]), "conv1d" or "conv2d" (input [N, C, ...]). ``padding`` is the
    operation's own (ints per spatial axis, or "same"/"valid"); padding done before the call is
    already in ``input``. ``sample_axis``: the axis of the input (and output) that indexes samples
    (1 for sequence-first tensors inside multi-head attention).
    """

    op: str
    input: torch.Tensor
    output: torch.Tensor
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    sample_axis: int = 0


def _as_tuple(value: Any, size: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * size
    return tuple(int(item) for item in value)


_ACTIVE = threading.local()


class OpCapture:
    """Record every call of a tracked weight's operation, by the weight's name.

    Args:
        weights: name → the weight tensor (the Parameter itself, matched by identity).
        keep_graph: keep the output in the autograd graph (per-sample gradients need
            ∂loss/∂output); otherwise inputs and outputs are detached.
        keep_outputs: record outputs at all (input statistics need only inputs).
        embeddings: also record ``F.embedding`` lookups of tracked weights (op "embedding", input
            the ids): a table tied to an LM head is one layer whose gradient has both uses.
    """

    def __init__(
        self,
        weights: Mapping[str, torch.Tensor],
        *,
        keep_graph: bool = False,
        keep_outputs: bool = True,
        embeddings: bool = False,
    ) -> None:
        self.names = {id(weight): name for name, weight in weights.items()}
        self.weights = dict(weights)
        self.keep_graph = keep_graph
        self.keep_outputs = keep_outputs
        self.embeddings = embeddings
        self.calls: dict[str, list[OpCall]] = {}
        self._saved: dict[tuple[Any, str], Callable[..., Any]] = {}
        self._fastpath = True
        self._sequence_first = 0

    def clear(self) -> None:
        self.calls.clear()

    def _record(self, weight: Any, call: Callable[[], OpCall]) -> None:
        name = self.names.get(id(weight))
        if name is not None and self.weights[name] is weight:
            self.calls.setdefault(name, []).append(call())

    def _keep(self, tensor: torch.Tensor, *, output: bool) -> torch.Tensor:
        if output and not self.keep_outputs:
            return tensor.new_empty(0)
        return tensor if (self.keep_graph and output) else tensor.detach()

    def __enter__(self) -> OpCapture:
        if getattr(_ACTIVE, "capture", None) is not None:
            raise RuntimeError("OpCapture blocks do not nest")
        _ACTIVE.capture = self
        self._fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        for owner, name, wrapper in self._wrappers():
            self._saved[(owner, name)] = getattr(owner, name)
            setattr(owner, name, wrapper)
        return self

    def __exit__(self, *_exc: object) -> None:
        for (owner, name), original in self._saved.items():
            setattr(owner, name, original)
        self._saved.clear()
        torch.backends.mha.set_fastpath_enabled(self._fastpath)
        _ACTIVE.capture = None

    def _wrappers(self) -> list[tuple[Any, str, Callable[..., Any]]]:
        linear, addmm, embedding = F.linear, torch.addmm, F.embedding
        conv1d, conv2d, attention = F.conv1d, F.conv2d, F.multi_head_attention_forward

        def linear_hook(input: torch.Tensor, weight: torch.Tensor, bias: Any = None) -> Any:
            output = linear(input, weight, bias)
            axis = 1 if self._sequence_first else 0
            self._record(
                weight,
                lambda: OpCall(
                    "linear",
                    self._keep(input, output=False),
                    self._keep(output, output=True),
                    sample_axis=axis,
                ),
            )
            return output

        def addmm_hook(bias: Any, input: Any, weight: Any, *args: Any, **kwargs: Any) -> Any:
            output = addmm(bias, input, weight, *args, **kwargs)
            self._record(
                weight,
                lambda: OpCall(
                    "addmm", self._keep(input, output=False), self._keep(output, output=True)
                ),
            )
            return output

        def conv_hook(op: str, function: Callable[..., Any], size: int) -> Callable[..., Any]:
            def hook(
                input: torch.Tensor,
                weight: torch.Tensor,
                bias: Any = None,
                stride: Any = 1,
                padding: Any = 0,
                dilation: Any = 1,
                groups: int = 1,
            ) -> Any:
                output = function(input, weight, bias, stride, padding, dilation, groups)
                self._record(
                    weight,
                    lambda: OpCall(
                        op,
                        self._keep(input, output=False),
                        self._keep(output, output=True),
                        _as_tuple(stride, size),
                        padding if isinstance(padding, str) else _as_tuple(padding, size),
                        _as_tuple(dilation, size),
                        int(groups),
                    ),
                )
                return output

            return hook

        def embedding_hook(
            input: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any
        ) -> Any:
            output = embedding(input, weight, *args, **kwargs)
            self._record(
                weight,
                lambda: OpCall("embedding", input.detach(), self._keep(output, output=True)),
            )
            return output

        def attention_hook(*args: Any, **kwargs: Any) -> Any:
            self._sequence_first += 1
            try:
                return attention(*args, **kwargs)
            finally:
                self._sequence_first -= 1

        lookups = [(F, "embedding", embedding_hook)] if self.embeddings else []
        return [
            *lookups,
            (F, "linear", linear_hook),
            (torch, "addmm", addmm_hook),
            (F, "conv1d", conv_hook("conv1d", conv1d, 1)),
            (F, "conv2d", conv_hook("conv2d", conv2d, 2)),
            (F, "multi_head_attention_forward", attention_hook),
        ]


@contextmanager
def capture_ops(weights: Mapping[str, torch.Tensor], **options: bool) -> Iterator[OpCapture]:
    """`OpCapture` as a function (``with capture_ops(weights) as capture: model(x)``)."""
    with OpCapture(weights, **options) as capture:
        yield capture


def samples_first(tensor: torch.Tensor, call: OpCall, count: int, lead: int = 0) -> torch.Tensor:
    """A Linear call's input or output [lead dims, ..., features] as [lead dims, N, T, features]:
    the ``count`` samples first, every other position of a sample on T (order kept)."""
    features = tensor.shape[-1]
    body = tensor.shape[lead:]
    head = tensor.shape[:lead]
    if call.sample_axis == 0:
        return tensor.reshape(*head, count, -1, features)
    if len(body) >= 3:  # [T, N, ..., F]: samples on axis 1
        return tensor.movedim(lead + 1, lead).reshape(*head, count, -1, features)
    # Flattened sequence-first rows [T·N, F] (multi-head attention before out_proj).
    return tensor.reshape(*head, -1, count, features).movedim(lead + 1, lead)


def conv_padding(call: OpCall, kernel: Sequence[int]) -> tuple[int, ...]:
    """The call's padding as F.pad amounts (last axis first), for explicit, "valid" and "same"."""
    amounts: list[int] = []
    for axis in reversed(range(len(kernel))):
        if call.padding == "valid":
            before = after = 0
        elif call.padding == "same":
            total = call.dilation[axis] * (kernel[axis] - 1)
            before, after = total // 2, total - total // 2
        else:
            assert not isinstance(call.padding, str), f"unknown padding {call.padding!r}"
            before = after = call.padding[axis]
        amounts += [before, after]
    return tuple(amounts)
