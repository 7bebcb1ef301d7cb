"""Layer discovery: the only module that walks a model's modules.

`discover_layers` finds every Conv1d/Conv2d/Linear weight, names it by its module path (the state-dict
key of its weight is ``<name>.weight``), and measures MACs per sample from one traced forward pass, so
layers come out in execution order. Everything downstream refers to layers by these names.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from lcpaq.errors import InputError
from lcpaq.model.op_capture import OpCall, OpCapture
from lcpaq.quant.state_keys import TRANSPOSED_KINDS

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


@dataclass(frozen=True)
class KeptWeight:
    """A weight tensor (≥ 2 dimensions) that stays in FP32, and why (listed in the report and the
    manifest; the size budgets count it with the unquantized tensors)."""

    key: str
    num_params: int
    reason: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Survey:
    """Every weight of a model: the layers lcpaq quantizes and the weights kept in FP32."""

    layers: tuple[LayerInfo, ...]
    kept: tuple[KeptWeight, ...]

    def quantized_share(self) -> float:
        """Share of the weight parameters (tensors of ≥ 2 dimensions) that are quantized."""
        quantized = sum(layer.num_params for layer in self.layers)
        total = quantized + sum(kept.num_params for kept in self.kept)
        return quantized / total if total else 0.0

    def quantized_share_at_inference(self) -> float:
        """`quantized_share` over the weights the inference forward pass uses (training-only
        heads such as GoogLeNet's auxiliary classifiers left out)."""
        unused = sum(kept.num_params for kept in self.kept if kept.reason == NOT_RUN_REASON)
        quantized = sum(layer.num_params for layer in self.layers)
        total = quantized + sum(kept.num_params for kept in self.kept) - unused
        return quantized / total if total else 0.0


#: Module types whose weights are known not to be supported, with the reason shown to the user.
UNSUPPORTED_REASONS: dict[type[nn.Module], str] = {
    nn.Embedding: "embedding table (a lookup, not a matmul)",
    nn.EmbeddingBag: "embedding table (a lookup, not a matmul)",
    nn.Conv3d: "Conv3d is not supported",
    nn.ConvTranspose1d: "transposed convolutions are not supported",
    nn.ConvTranspose2d: "transposed convolutions are not supported",
    nn.ConvTranspose3d: "transposed convolutions are not supported",
}


def _layer_name(model: nn.Module, key: str) -> str | None:
    """The layer name of a weight used by a captured operation, or None if it is not supported:
    ``<module>.weight`` → the module's path; ``nn.MultiheadAttention.in_proj_weight`` → the
    attention module's path (its ``out_proj`` is a Linear ``weight``)."""
    owner_path, _, attribute = key.rpartition(".")
    if attribute == "weight" and owner_path:
        return owner_path
    owner = model.get_submodule(owner_path) if owner_path else model
    if attribute == "in_proj_weight" and isinstance(owner, nn.MultiheadAttention) and owner_path:
        return owner_path
    return None


#: Why a Linear/Conv weight whose module never ran in the traced (inference) forward is kept.
NOT_RUN_REASON = "its module did not run in the inference forward pass (unused at inference)"


def _kept_reason(model: nn.Module, key: str, used: bool) -> str:
    owner_path = key.rpartition(".")[0]
    owner = model.get_submodule(owner_path) if owner_path else model
    for kind, reason in UNSUPPORTED_REASONS.items():
        if isinstance(owner, kind):
            return reason
    if used:
        return (
            f"a bare Parameter of {type(owner).__name__} used in F.linear/F.conv "
            "(not a Linear/Conv module weight)"
        )
    if isinstance(owner, QUANTIZABLE_TYPES):
        # GoogLeNet's and Inception's auxiliary heads run only in training mode.
        return NOT_RUN_REASON
    return "not the weight of a linear or convolution operation"


def _call_macs(call: OpCall, weight: torch.Tensor) -> int:
    """MACs of one call on a batch of one: each output element costs one fan-in dot product."""
    fan_in = weight.shape[0] if call.op == "addmm" else int(weight[0].numel())
    return int(call.output.numel()) * int(fan_in)


def survey_weights(
    model: nn.Module,
    example_batch: torch.Tensor,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> Survey:
    """Trace one forward pass of one sample and sort every weight tensor (≥ 2 dims) into
    quantizable layers (in execution order) and weights kept in FP32, with the reason.

    A weight is a layer when the operation it meets is F.linear, F.conv1d, F.conv2d or
    transformers' Conv1D (`lcpaq.model.op_capture`). ``include``/``exclude``: glob patterns on
    layer names (`fnmatch`); a layer is kept when it matches an include (or none are given) and
    no exclude.
    """
    weights = {key: value for key, value in model.named_parameters() if value.dim() >= 2}
    with torch.enable_grad(), OpCapture(weights, keep_graph=True) as capture:
        output = model(example_batch[:1])
        dead = _unused_outputs(output, capture.calls)
    layers: list[LayerInfo] = []
    kept: list[KeptWeight] = []
    used = {key: [_detached(call) for call in calls] for key, calls in capture.calls.items()}
    del output, capture
    shared = _sample_independent(model, example_batch, weights, used)
    for key, weight in weights.items():
        name = _layer_name(model, key) if key in used else None
        count = int(weight.numel())
        if name is None:
            kept.append(KeptWeight(key, count, _kept_reason(model, key, key in used)))
            continue
        if key in dead:
            kept.append(KeptWeight(key, count, DEAD_REASON))
            continue
        if key in shared:
            kept.append(KeptWeight(key, count, SHARED_INPUT_REASON))
            continue
        if not _selected(name, include, exclude):
            kept.append(KeptWeight(key, count, "excluded by --include/--exclude"))
            continue
        owner = model.get_submodule(name)
        view = weight_view(weight, type(owner).__name__)
        bias = getattr(owner, "in_proj_bias" if key.endswith("in_proj_weight") else "bias", None)
        layers.append(
            LayerInfo(
                name=name,
                weight_key=key,
                kind=type(owner).__name__,
                weight_shape=tuple(int(size) for size in view.shape),
                num_params=count,
                macs_per_sample=sum(_call_macs(call, weight) for call in used[key]),
                execution_index=list(used).index(key),
                has_bias=isinstance(bias, torch.Tensor),
            )
        )
    layers.sort(key=lambda layer: layer.execution_index)
    return Survey(tuple(layers), tuple(kept))


#: Why a weight that runs is kept in FP32 when nothing it computes reaches the model's output.
DEAD_REASON = "its output does not reach the model's output (e.g. BERT's pooler under mean pooling)"


def _unused_outputs(output: object, calls: Mapping[str, list[OpCall]]) -> set[str]:
    """The weights none of whose call outputs the model's output depends on: quantizing them
    changes nothing the curvature measures, and their traces would be undefined."""
    if not isinstance(output, torch.Tensor) or not output.requires_grad:
        return set()
    keys = [key for key, key_calls in calls.items() for _ in key_calls]
    outputs = [call.output for key_calls in calls.values() for call in key_calls]
    grads = torch.autograd.grad(output.float().sum(), outputs, allow_unused=True)
    reached = {key for key, grad in zip(keys, grads) if grad is not None}
    return set(calls) - reached


#: Why a weight is kept when what its operation meets is the same for every sample.
SHARED_INPUT_REASON = (
    "its operation's input does not depend on the sample (a table computed inside the model, "
    "e.g. Swin V2's continuous position bias MLP): no per-sample curvature"
)


def _sample_independent(
    model: nn.Module,
    example_batch: torch.Tensor,
    weights: Mapping[str, torch.Tensor],
    used: Mapping[str, list[OpCall]],
) -> set[str]:
    """The weights whose every call's input stays the same size when the batch doubles: they
    act on sample-independent tensors, so per-sample gradients (and their curvature, GPTQ
    statistics and corrections, which assume samples on the input's sample axis) do not exist."""
    pair = torch.cat([example_batch[:1], example_batch[:1]])
    try:
        with torch.no_grad(), OpCapture(dict(weights)) as capture:
            model(pair)
    except RuntimeError:  # a model that takes one sample at a time: nothing to compare
        return set()
    return {
        key
        for key, calls in capture.calls.items()
        if key in used
        and len(calls) == len(used[key])
        and all(two.input.numel() == one.input.numel() for one, two in zip(used[key], calls))
    }


def _detached(call: OpCall) -> OpCall:
    return replace(call, input=call.input.detach(), output=call.output.detach())


def _selected(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    if include and not any(fnmatch.fnmatchcase(name, pattern) for pattern in include):
        return False
    return not any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)


def quantizable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Linear/Conv modules by path, in registration order (a quick look without running the model;
    `survey_weights` is what decides)."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, QUANTIZABLE_TYPES) and name
    }


def discover_layers(
    model: nn.Module,
    example_batch: torch.Tensor,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    survey: Survey | None = None,
) -> tuple[LayerInfo, ...]:
    """The quantizable layers of `survey_weights` (or of ``survey`` when given), in execution
    order; an error if there are none.

    Layers that are registered but never run in the forward pass are left out (they cannot affect
    the loss, so they have no sensitivity to measure).
    """
    if survey is None:
        survey = survey_weights(model, example_batch, include=include, exclude=exclude)
    if not survey.layers:
        raise InputError(
            "the model has no Conv1d, Conv2d or Linear layer to quantize (no weight meets "
            "F.linear, F.conv1d or F.conv2d)"
            + (" (after --include/--exclude)" if include or exclude else "")
        )
    return survey.layers


@contextmanager
def failing_layer(name: str, kind: str, what: str) -> Iterator[None]:
    """Turn a failure inside one layer's treatment into a one-line `InputError` that names the
    layer, its type and what to do (lcpaq's own `InputError` passes through unchanged)."""
    try:
        yield
    except InputError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as error:
        detail = (str(error).strip().splitlines() or [""])[0][:200]
        raise InputError(
            f"{what} failed on layer {name!r} ({kind}): {type(error).__name__}: {detail}; "
            f"keep it in FP32 with --exclude '{name}'"
        ) from None


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at a dotted path, with an error naming the path if it does not exist."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise InputError(f"the model has no module named {name!r}") from None


def layer_weight(module: nn.Module) -> torch.Tensor:
    """The weight tensor of a quantizable module as the quantizer sees it, [out, in, ...]
    (`weight_view`); ``nn.MultiheadAttention``: its in-projection [3·E, E]."""
    attribute = "in_proj_weight" if isinstance(module, nn.MultiheadAttention) else "weight"
    weight = getattr(module, attribute, None)
    if not isinstance(weight, torch.Tensor):
        raise InputError(f"{type(module).__name__} has no weight tensor to quantize")
    return weight_view(weight, type(module).__name__)


def layer_parameter_of(model: nn.Module, name: str) -> torch.Tensor:
    """The parameter layer ``name`` quantizes, in the module's own layout (``weight``, or
    ``in_proj_weight`` of nn.MultiheadAttention)."""
    module = get_module(model, name)
    attribute = "in_proj_weight" if isinstance(module, nn.MultiheadAttention) else "weight"
    weight = getattr(module, attribute, None)
    if not isinstance(weight, torch.Tensor):
        raise InputError(f"layer {name!r} ({type(module).__name__}) has no weight to quantize")
    return weight


def weight_view(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """A layer's weight as [out, in, ...]: transformers' Conv1D stores [in, out], so it is the
    transposed view (writes through it land in the module's own layout)."""
    return weight.t() if kind in TRANSPOSED_KINDS else weight


def layer_parameter(model: nn.Module, layer: LayerInfo) -> torch.Tensor:
    """The parameter a layer quantizes, in the module's own layout (autograd differentiates it)."""
    try:
        return model.get_parameter(layer.weight_key)
    except AttributeError:
        raise InputError(f"the model has no parameter named {layer.weight_key!r}") from None


def weight_of(model: nn.Module, layer: LayerInfo) -> torch.Tensor:
    """The layer's weight as [out, in, ...] (`weight_view` of `layer_parameter`)."""
    return weight_view(layer_parameter(model, layer), layer.kind)


def channel_axis(module: nn.Module) -> int:
    """The axis of a module's inputs and outputs that holds channels: the last one for
    Linear-like layers on inputs of any rank [N, ..., C] (Linear, transformers' Conv1D,
    nn.MultiheadAttention's projections), 1 for convolutions and BatchNorm ([N, C, ...])
    (contract §3)."""
    linear_like = isinstance(module, nn.Linear | nn.MultiheadAttention)
    return -1 if linear_like or type(module).__name__ in TRANSPOSED_KINDS else 1


def token_mask(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor | None:
    """The [N, T] bool mask of real (not padding) tokens when the model defines
    ``token_mask(inputs)`` (`lcpaq.model.text.TextModel`), else None."""
    method = getattr(model, "token_mask", None)
    if not callable(method):
        return None
    mask = method(inputs)
    return mask.bool() if isinstance(mask, torch.Tensor) else None


def masked_positions(tensor: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A captured [N, T, ...] tensor restricted to mask-true positions [M, ...] when its first
    two dims are the mask's; otherwise unchanged (padding never enters a statistic)."""
    if mask is None or tensor.dim() < 2 or tuple(tensor.shape[:2]) != tuple(mask.shape):
        return tensor
    return tensor[mask.to(tensor.device)]


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
