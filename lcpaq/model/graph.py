"""Layer discovery: the only module that walks a model's modules.

`discover_layers` finds every Conv1d/Conv2d/Linear weight, names it by its module path (the state-dict
key of its weight is ``<name>.weight``), and measures MACs per sample from one traced forward pass, so
layers come out in execution order. Everything downstream refers to layers by these names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lcpaq.errors import InputError

QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Linear)
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable weight.

    ``macs_per_sample`` counts multiply-accumulates of the layer for one input sample, as measured on
    the traced batch; ``execution_index`` is the order in which the layer ran in that forward pass.
    """

    name: str
    weight_key: str
    kind: str
    weight_shape: tuple[int, ...]
    num_params: int
    macs_per_sample: int
    execution_index: int
    has_bias: bool

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["weight_shape"] = list(self.weight_shape)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerInfo:
        """Read `to_dict`'s output (parsed JSON, so values are untyped until the fields check them)."""
        values = dict(data)
        values["weight_shape"] = tuple(values["weight_shape"])
        return cls(**values)


def _layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    """MACs for one sample: each output element costs one dot product of the kernel's fan-in."""
    per_sample_outputs = int(output[0].numel())
    # For convolutions weight[0] holds in_channels/groups x kernel elements: the fan-in.
    fan_in = int(layer_weight(module)[0].numel())
    return per_sample_outputs * fan_in


def quantizable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules whose weights lcpaq quantizes, by module path, in registration order."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, QUANTIZABLE_TYPES) and name
    }


def discover_layers(model: nn.Module, example_batch: torch.Tensor) -> tuple[LayerInfo, ...]:
    """Trace one forward pass and describe every quantizable layer, in execution order.

    Layers that are registered but never run in the forward pass are left out (they cannot affect
    the loss, so they have no sensitivity to measure).
    """
    modules = quantizable_modules(model)
    if not modules:
        raise InputError("the model has no Conv1d, Conv2d or Linear layer to quantize")
    seen: dict[str, tuple[int, int]] = {}

    def make_hook(name: str):
        def hook(
            module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor
        ) -> None:
            if name not in seen:
                seen[name] = (len(seen), _layer_macs(module, output))

        return hook

    handles = [module.register_forward_hook(make_hook(name)) for name, module in modules.items()]
    try:
        with torch.no_grad():
            model(example_batch[:1])
    finally:
        for handle in handles:
            handle.remove()
    layers = [
        LayerInfo(
            name=name,
            weight_key=f"{name}.weight",
            kind=type(module).__name__,
            weight_shape=tuple(int(size) for size in layer_weight(module).shape),
            num_params=int(layer_weight(module).numel()),
            macs_per_sample=seen[name][1],
            execution_index=seen[name][0],
            has_bias=module.bias is not None,
        )
        for name, module in modules.items()
        if name in seen
    ]
    return tuple(sorted(layers, key=lambda layer: layer.execution_index))


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at a dotted path, with an error naming the path if it does not exist."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise InputError(f"the model has no module named {name!r}") from None


def layer_weight(module: nn.Module) -> torch.Tensor:
    """The weight tensor of a quantizable module (every one of `QUANTIZABLE_TYPES` has one)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise InputError(f"{type(module).__name__} has no weight tensor to quantize")
    return weight


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (lcpaq keeps a model on one device)."""
    return next(model.parameters()).device


def norm_modules(model: nn.Module) -> dict[str, nn.Module]:
    """BatchNorm modules by path, in registration order (used by statistics correction)."""
    return {
        name: module for name, module in model.named_modules() if isinstance(module, NORM_TYPES)
    }


def first_and_last(layers: tuple[LayerInfo, ...]) -> tuple[str, str]:
    """Names of the first and last quantizable layers in execution order."""
    return layers[0].name, layers[-1].name
