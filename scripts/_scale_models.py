"""Depth-scaled torchvision models for ``scripts/bench_scale.py``, as ``--model`` factories.

``_scale_models:resnet18_x{k}`` is torchvision's ResNet with k basic blocks per stage (k = 2 is
ResNet18) and ``_scale_models:mobilenet_v2_x{k}`` MobileNetV2 with every inverted-residual
stage repeated k times as often (k = 1 is MobileNetV2): the layers keep their shapes and only their
number grows, so a stage's time against depth shows how it scales. Random weights (no checkpoint).
"""

from __future__ import annotations

import re

from torch import nn

#: MobileNetV2's inverted-residual stages: expansion t, channels c, repeats n, stride s.
_MOBILENET_V2_STAGES = [
    [1, 16, 1, 1],
    [6, 24, 2, 2],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


def resnet18_blocks(blocks: int) -> nn.Module:
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [blocks] * 4)


def mobilenet_v2_repeats(factor: int) -> nn.Module:
    from torchvision.models import MobileNetV2

    stages = [[t, c, n * factor, s] for t, c, n, s in _MOBILENET_V2_STAGES]
    return MobileNetV2(inverted_residual_setting=stages)


def __getattr__(name: str):  # module attributes resnet18_x{k}, mobilenet_v2_x{k}: the factories
    match = re.fullmatch(r"(resnet18|mobilenet_v2)_x(\d+)", name)
    if match is None:
        raise AttributeError(name)
    family, k = match.group(1), int(match.group(2))
    if family == "resnet18":
        return lambda: resnet18_blocks(k)
    return lambda: mobilenet_v2_repeats(k)
