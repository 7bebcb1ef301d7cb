"""Tiny float64 models and exact-Hessian oracles shared by the curvature estimator tests
(test_gauss_newton, test_hutchinson): every layer kind the per-sample gradient code handles."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from conftest import make_tiny_conv_net, make_tiny_mlp, weight_jacobians
from torch import nn


class GroupedConvNet(nn.Module):
    """Strided, padded, grouped and dilated Conv2d layers (one with reflect padding), BN, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, (3, 2), padding=(2, 1), dilation=(2, 1), groups=2, bias=False)
        self.conv3 = nn.Conv2d(6, 2, 3, padding=1, padding_mode="reflect")
        self.fc = nn.Linear(2 * 3 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, 2, 6, 6]
        out = torch.tanh(self.bn(self.conv1(x)))  # [N, 4, 3, 3]
        out = torch.tanh(self.conv2(out))  # [N, 6, 3, 4]
        out = torch.tanh(self.conv3(out))  # [N, 2, 3, 4]
        return self.fc(out.flatten(1))


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(3, 4, 3, stride=2, padding=2)
        self.conv2 = nn.Conv1d(4, 4, 3, padding=1, groups=2, padding_mode="circular", bias=False)
        self.fc = nn.Linear(4 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, 3, 9]
        out = torch.tanh(self.conv1(x))  # [N, 4, 6]
        out = torch.tanh(self.conv2(out))
        return self.fc(out.flatten(1))


class SequenceNet(nn.Module):
    """Linear layers applied to a [N, T, in] sequence, then a classifier on the flattened output."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 5)
        self.mix = nn.Linear(5, 2, bias=False)
        self.head = nn.Linear(4 * 2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, 4, 3]
        out = self.mix(torch.tanh(self.embed(x)))  # [N, 4, 2]
        return self.head(torch.tanh(out).flatten(1))


class SharedWeightNet(nn.Module):
    """One Linear applied twice: its curvature is that of the summed contributions."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def build(kind: str) -> tuple[nn.Module, torch.Tensor]:
    """A float64 model in eval mode and 10 inputs for it, both from fixed seeds."""
    generator = torch.Generator().manual_seed(123)
    if kind == "tiny_conv":
        model = make_tiny_conv_net(torch.float64)
        return model, torch.randn(10, 1, 6, 6, generator=generator, dtype=torch.float64)
    if kind == "mlp":
        return make_tiny_mlp(torch.float64), torch.randn(
            10, 5, generator=generator, dtype=torch.float64
        )
    torch.manual_seed(7)
    model, shape = {
        "grouped_conv": (GroupedConvNet, (10, 2, 6, 6)),
        "conv1d": (Conv1dNet, (10, 3, 9)),
        "sequence": (SequenceNet, (10, 4, 3)),
        "shared": (SharedWeightNet, (10, 4)),
    }[kind]
    net = model().double().eval()
    with torch.no_grad():  # make the logits large enough that softmax is far from uniform
        for parameter in net.parameters():
            parameter.mul_(2.0)
    return net, torch.randn(*shape, generator=generator, dtype=torch.float64)


MODEL_KINDS = ["tiny_conv", "mlp", "grouped_conv", "conv1d", "sequence", "shared"]


def labelled(kind: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model, inputs = build(kind)
    with torch.no_grad():
        classes = model(inputs[:1]).shape[-1]
    labels = torch.randint(0, classes, (len(inputs),), generator=torch.Generator().manual_seed(9))
    return model, inputs, labels


def _mean_loss_of_layer_weight(
    model: nn.Module, name: str, inputs: torch.Tensor, labels: torch.Tensor, loss: str
) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """w ↦ mean loss with layer ``name``'s weight replaced by w (flat); KL's reference is FP32."""
    params = {key: value.detach() for key, value in model.named_parameters()}
    params.update(dict(model.named_buffers()))
    shape = params[f"{name}.weight"].shape
    with torch.no_grad():
        reference = torch.log_softmax(model(inputs), dim=-1)

    def mean_loss(flat: torch.Tensor) -> torch.Tensor:
        logits = torch.func.functional_call(
            model, {**params, f"{name}.weight": flat.reshape(shape)}, (inputs,)
        )
        if loss == "kl":  # KL(p_FP || p) with p_FP fixed
            log_p = torch.log_softmax(logits, dim=-1)
            return (reference.exp() * (reference - log_p)).sum(-1).mean()
        if loss == "mse":
            return (logits - F.one_hot(labels, logits.shape[-1])).pow(2).mean(-1).mean()
        return F.cross_entropy(logits, labels)

    return mean_loss, params[f"{name}.weight"].reshape(-1)


def exact_hessian_blocks(
    model: nn.Module, names: list[str], inputs: torch.Tensor, labels: torch.Tensor, loss: str
) -> list[torch.Tensor]:
    """The diagonal Hessian blocks H_ll [n_l, n_l] of the mean loss, by torch.autograd.functional."""
    blocks = []
    for name in names:
        function, flat = _mean_loss_of_layer_weight(model, name, inputs, labels, loss)
        blocks.append(torch.autograd.functional.hessian(function, flat))
    return blocks


def explicit_gauss_newton_blocks(
    model: nn.Module, names: list[str], inputs: torch.Tensor
) -> list[torch.Tensor]:
    """(1/N) Σ_n J_nᵀ (diag(p) − ppᵀ) J_n per layer, from explicit Jacobians."""
    logits, jacobians = weight_jacobians(model, names, inputs)
    probs = torch.softmax(logits, dim=-1)
    h_out = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    return [torch.einsum("ncp,ncd,ndq->pq", jac, h_out, jac) / len(inputs) for jac in jacobians]
