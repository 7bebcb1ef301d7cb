"""Input second moments for GPTQ rounding (`lcpaq.quant.gptq.gptq_round`).

`collect_input_hessians` runs the FP32 model on calibration inputs and averages E[x xᵀ] over every
position of each named layer's input patches (`_input_patches`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lcpaq.errors import InputError
from lcpaq.model.graph import get_module, model_device


def _input_patches(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The vectors each output element sees, [groups, positions, fan_in per group]: rows of the
    input for Linear, im2col patches (channel-major, then kernel offsets, as the weight is
    flattened) for Conv1d/Conv2d, with the module's own padding applied first."""
    if isinstance(module, nn.Linear):
        return inputs.reshape(1, -1, inputs.shape[-1])
    if not isinstance(module, nn.Conv1d | nn.Conv2d):
        raise InputError(f"GPTQ rounding supports Conv1d, Conv2d and Linear, not {type(module)}")
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    padded = nn.functional.pad(inputs, module._reversed_padding_repeated_twice, mode=mode)
    if isinstance(module, nn.Conv1d):  # as a 1 x k two-dimensional convolution
        padded = padded.unsqueeze(2)
        kernel, stride, dilation = (
            (1, *module.kernel_size),
            (1, *module.stride),
            (1, *module.dilation),
        )
    else:
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    patches = nn.functional.unfold(padded, kernel, dilation=dilation, stride=stride)
    samples, width, positions = patches.shape
    per_group = width // module.groups
    return (
        patches.reshape(samples, module.groups, per_group, positions)
        .permute(1, 0, 3, 2)
        .reshape(module.groups, samples * positions, per_group)
    )


@torch.no_grad()
def collect_input_hessians(
    model: nn.Module, names: Sequence[str], inputs: torch.Tensor, *, batch_size: int = 128
) -> dict[str, torch.Tensor]:
    """H = E[x xᵀ] over every position of the FP32 model's input to each named layer on
    ``inputs``: float32 [fan_in, fan_in], or [groups, fan_in / groups, ...] for a grouped conv.

    The FP32 model's inputs, not the partly quantized model's (GPTQ's own sequential variant):
    each layer's codes then depend on its own format only, so the candidates of every layer and
    format are computed once and stay valid for every allocation the ILP tries.
    """
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(names, 0)
    handles = []
    for name in names:
        module = get_module(model, name)

        def hook(module, args, name=name):
            patches = _input_patches(module, args[0].detach())
            # float32 products per batch (4x faster than float64), summed over batches in float64
            moment = (patches.transpose(1, 2) @ patches).double()
            sums[name] = sums[name] + moment if name in sums else moment
            counts[name] += patches.shape[1]

        handles.append(module.register_forward_pre_hook(hook))
    device = model_device(model)
    try:
        for start in range(0, len(inputs), batch_size):
            model(inputs[start : start + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in names if name not in sums]
    if missing:
        raise InputError(f"layer(s) never ran on the calibration inputs: {', '.join(missing)}")
    means = {name: (sums[name] / counts[name]).float() for name in names}
    return {name: mean[0] if len(mean) == 1 else mean for name, mean in means.items()}
