"""Tiny models of the layer kinds real models use (shared by the graph and end-to-end tests):
a ConvNeXt-style block (depthwise conv, channels-last Linear), a ViT-style block
(nn.MultiheadAttention), a Swin-style window attention (F.linear on Linear weights), a conv
that pads in its own forward (efficientnet_pytorch), GPT-2's transformers Conv1D, and weights
lcpaq keeps in FP32 (embedding, Conv3d, a position embedding)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class StaticSamePadConv(nn.Conv2d):
    """efficientnet_pytorch's "static same padding": the module pads in its own forward."""

    def __init__(self, *args: int, **kwargs: int) -> None:
        super().__init__(*args, **kwargs)
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            self.pad(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups
        )


class ConvNeXtBlock(nn.Module):
    """Depthwise conv, then Linear layers on channels-last [N, H, W, C] tensors."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.pwconv1 = nn.Linear(channels, 2 * channels)
        self.pwconv2 = nn.Linear(2 * channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dwconv(x).permute(0, 2, 3, 1)
        out = self.pwconv2(F.gelu(self.pwconv1(self.norm(out))))
        return x + out.permute(0, 3, 1, 2)


class ViTBlock(nn.Module):
    """Patch tokens, a class token and position embedding, nn.MultiheadAttention, an MLP."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.randn(1, 5, dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([self.class_token.expand(len(tokens), -1, -1), tokens], dim=1)
        tokens = tokens + self.position
        tokens = tokens + self.attn(tokens, tokens, tokens, need_weights=False)[0]
        return tokens + F.gelu(self.mlp(tokens))


class SwinAttention(nn.Module):
    """Window attention applying its projections with F.linear on nn.Linear weights."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, H, W, C] channels last
        n, h, w, c = x.shape
        windows = x.reshape(n * 2, h * w // 2, c)
        q, k, v = F.linear(windows, self.qkv.weight, self.qkv.bias).chunk(3, dim=-1)
        attended = torch.softmax(q @ k.transpose(1, 2) / c**0.5, dim=-1) @ v
        return x + F.linear(attended, self.proj.weight, self.proj.bias).reshape(x.shape)


class ZooNet(nn.Module):
    """Every kind above in one classifier of [N, 3, 8, 8] images (10 classes)."""

    def __init__(self, with_unsupported: bool = False) -> None:
        super().__init__()
        self.stem = StaticSamePadConv(3, 8, 3, stride=2)  # -> [N, 8, 4, 4]
        self.block = ConvNeXtBlock(8)
        self.swin = SwinAttention(8)
        self.patch = nn.Conv2d(8, 8, 2, stride=2)  # -> [N, 8, 2, 2]: 4 tokens
        self.vit = ViTBlock(8)
        self.head = nn.Linear(8, 10)
        self.with_unsupported = with_unsupported
        if with_unsupported:
            self.volume = nn.Conv3d(1, 1, 1)
            self.embed = nn.Embedding(4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(self.stem(x))
        out = self.swin(out.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        tokens = self.patch(out).flatten(2).transpose(1, 2)  # [N, 4, 8]
        if self.with_unsupported:
            tokens = tokens + self.embed(torch.arange(4)) + self.volume(tokens[:, None]).squeeze(1)
        return self.head(self.vit(tokens)[:, 0])


class GPT2MLP(nn.Module):
    """transformers' Conv1D (weight stored [in, out]) in GPT-2's MLP on [N, T, 6] tokens, mean
    pooled to [N, 6] outputs."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c_fc = Conv1D(12, 6)
        self.c_proj = Conv1D(6, 12)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(tokens))).mean(1)


def gpt2_block() -> nn.Module:
    return GPT2MLP()
