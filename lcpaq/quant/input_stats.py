"""Input second moments for GPTQ rounding (`lcpaq.quant.gptq.gptq_round`).

`collect_input_hessians` runs the FP32 model on calibration inputs and averages E[x xᵀ] over every
position of the patches each named layer's weight meets in its F.linear / F.conv call
(`_input_patches` of the captured calls, `lcpaq.model.op_capture`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from lcpaq.errors import InputError
from lcpaq.model.graph import (
    failing_layer,
    get_module,
    layer_parameter_of,
    layer_weight,
    masked_positions,
    model_device,
    token_mask,
)
from lcpaq.model.op_capture import LINEAR_OPS, OpCall, OpCapture, conv_padding, samples_first
from lcpaq.state_file import NO_STATE, StateFile


def _input_patches(
    call: OpCall, kernel: tuple[int, ...], count: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The vectors each output element of one captured call sees, [groups, positions, fan_in per
    group]: rows of the input for Linear-like calls (padded tokens dropped given ``mask``
    [N, T]), im2col patches (channel-major, then kernel offsets, as the weight is flattened) for
    convolutions, with the call's own padding, stride and dilation."""
    if call.op in LINEAR_OPS:
        rows = samples_first(call.input, call, count)  # [N, T, in]
        return masked_positions(rows, mask).reshape(1, -1, rows.shape[-1])
    padded = call.input
    padding = conv_padding(call, kernel)
    stride, dilation = call.stride, call.dilation
    if call.op == "conv1d":  # as a 1 x k two-dimensional convolution
        padded, padding = padded.unsqueeze(2), (*padding, 0, 0)
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
    if any(padding):
        padded = nn.functional.pad(padded, padding)
    patches = nn.functional.unfold(padded, kernel, dilation=dilation, stride=stride)
    samples, width, positions = patches.shape
    per_group = width // call.groups
    return (
        patches.reshape(samples, call.groups, per_group, positions)
        .permute(1, 0, 3, 2)
        .reshape(call.groups, samples * positions, per_group)
    )


def _snapshot(
    sums: dict[str, torch.Tensor], counts: dict[str, int], batches_done: int
) -> dict[str, torch.Tensor]:
    names = list(counts)
    return {
        **{f"sum/{name}": values for name, values in sums.items()},
        "counts": torch.tensor([counts[name] for name in names], dtype=torch.int64),
        "batches_done": torch.tensor(batches_done),
    }


def _restore(
    snapshot: dict[str, torch.Tensor] | None, names: Sequence[str], device: torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, int], int]:
    """The sums, position counts and batches done of a snapshot (None: the start)."""
    if snapshot is None:
        return {}, dict.fromkeys(names, 0), 0
    sums = {name: snapshot[f"sum/{name}"].to(device) for name in names if f"sum/{name}" in snapshot}
    counts = {name: int(count) for name, count in zip(names, snapshot["counts"])}
    return sums, counts, int(snapshot["batches_done"])


@torch.no_grad()
def collect_input_hessians(
    model: nn.Module,
    names: Sequence[str],
    inputs: torch.Tensor,
    *,
    batch_size: int = 128,
    state_file: StateFile = NO_STATE,
) -> dict[str, torch.Tensor]:
    """H = E[x xᵀ] over every position of what each named layer's weight meets in the FP32
    model on ``inputs`` (the input of its F.linear / F.conv call, `lcpaq.model.op_capture`):
    float32 [fan_in, fan_in], or [groups, fan_in / groups, ...] for a grouped conv. Padded tokens
    (`lcpaq.model.graph.token_mask`) are left out.

    The FP32 model's inputs, not the partly quantized model's (GPTQ's own sequential variant):
    each layer's codes then depend on its own format only, so the candidates of every layer and
    format are computed once and stay valid for every allocation the ILP tries.

    ``state_file`` (`lcpaq.state_file`): the running sums are saved after batches and a snapshot
    found there is continued from its next batch, to the same result.
    """
    model.eval()
    weights = {name: layer_parameter_of(model, name) for name in names}
    kernels = {name: tuple(layer_weight(get_module(model, name)).shape[2:]) for name in names}
    device = model_device(model)
    sums, counts, done = _restore(state_file.load(), names, device)
    starts = range(0, len(inputs), batch_size)
    for position, start in enumerate(starts[done:], start=done + 1):
        batch = inputs[start : start + batch_size].to(device)
        with OpCapture(weights, keep_outputs=False) as capture:
            model(batch)
        mask = token_mask(model, batch)
        for name, calls in capture.calls.items():
            kind = type(get_module(model, name)).__name__
            for call in calls:
                with failing_layer(name, kind, "the GPTQ input statistics"):
                    patches = _input_patches(call, kernels[name], len(batch), mask)
                # float32 products per batch (4x faster than float64), summed in float64
                moment = (patches.transpose(1, 2) @ patches).double()
                sums[name] = sums[name] + moment if name in sums else moment
                counts[name] += patches.shape[1]
        state_file.save(partial(_snapshot, sums, counts, position), last=position == len(starts))
    missing = [name for name in names if name not in sums]
    if missing:
        raise InputError(
            "layer(s) never ran a linear or convolution operation on the calibration inputs: "
            + ", ".join(missing)
        )
    means = {name: (sums[name] / max(counts[name], 1)).float() for name in names}
    return {name: mean[0] if len(mean) == 1 else mean for name, mean in means.items()}
