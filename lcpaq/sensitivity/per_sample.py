"""Per-sample weight gradients of a layer from its recorded inputs and output gradients.

Input: a Linear / Conv1d / Conv2d module, the inputs it saw (kept by `LayerRecorder`, forward
hooks) and gradients with respect to its outputs [K, N, ...]. Output: per-sample weight gradients
[K, N, *weight.shape] (unfold for convolutions), formed in micro-batches that bound the memory.
Used by the exact Gauss–Newton traces (`lcpaq.sensitivity.gauss_newton`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

#: Per-sample gradients are formed in micro-batches of at most this many float32 elements.
PER_SAMPLE_ELEMENTS_LIMIT = 1 << 25


def module_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a quantized layer (Linear or convolution), typed as the tensor it is."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def layer_input_columns(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The layer input arranged so that per-sample weight gradients are one contraction away.

    Linear: [N, T, in] (T = 1 without a sequence axis). Convolution: the unfolded, padded input
    [N, groups, in/groups x kernel, positions].
    """
    count = inputs.shape[0]
    if isinstance(module, nn.Linear):
        return inputs.reshape(count, -1, inputs.shape[-1])
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if isinstance(module, nn.Conv1d):  # view a 1-d convolution as a 2-d one of height 1
            inputs = inputs.unsqueeze(2)
            kernel, stride, dilation = (
                (1, *module.kernel_size),
                (1, *module.stride),
                (1, *module.dilation),
            )
            padding = (*module._reversed_padding_repeated_twice, 0, 0)
        else:
            kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
            padding = tuple(module._reversed_padding_repeated_twice)
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        if any(padding):
            inputs = F.pad(inputs, padding, mode=mode)
        columns = F.unfold(inputs, kernel, dilation=dilation, stride=stride)  # [N, Cin*k, P]
        return columns.reshape(count, module.groups, -1, columns.shape[-1])
    raise TypeError(f"per-sample gradients are not implemented for {type(module).__name__}")


def per_sample_grads_from_columns(
    module: nn.Module, columns: torch.Tensor, grad_outputs: torch.Tensor
) -> torch.Tensor:
    """Per-sample weight gradients [K, N, *weight.shape] for K stacked output gradients [K, N, ...]."""
    factors, count = grad_outputs.shape[:2]
    if isinstance(module, nn.Linear):
        grads = grad_outputs.reshape(factors, count, -1, grad_outputs.shape[-1])
        return torch.einsum("knto,nti->knoi", grads, columns)
    conv = cast("nn.Conv1d | nn.Conv2d", module)  # layer_input_columns accepted nothing else
    groups = conv.groups
    grads = grad_outputs.reshape(factors, count, groups, conv.out_channels // groups, -1)
    per_sample = torch.einsum("kngop,ngqp->kngoq", grads, columns)
    return per_sample.reshape(factors, count, *conv.weight.shape)


def per_sample_weight_grads(
    module: nn.Module, inputs: torch.Tensor, grad_outputs: torch.Tensor
) -> torch.Tensor:
    """Per-sample ∂/∂W of Σ (grad_outputs · module(inputs)), shape [N, *weight.shape]."""
    columns = layer_input_columns(module, inputs)
    return per_sample_grads_from_columns(module, columns, grad_outputs[None])[0]


class LayerRecorder:
    """Forward hooks that keep each layer's inputs and outputs of one forward pass."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.outputs: dict[str, list[torch.Tensor]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> LayerRecorder:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *_exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def _hook(
        self, name: str
    ) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            self.inputs.setdefault(name, []).append(args[0].detach())
            self.outputs.setdefault(name, []).append(output)

        return hook

    def clear(self) -> None:
        self.inputs.clear()
        self.outputs.clear()


def micro_batches(count: int, elements_per_sample: int) -> list[slice]:
    """Sample slices whose per-sample gradients stay under `PER_SAMPLE_ELEMENTS_LIMIT` elements."""
    size = max(1, PER_SAMPLE_ELEMENTS_LIMIT // max(1, elements_per_sample))
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]
