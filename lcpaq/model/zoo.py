"""Model sources and safe checkpoint loading.

``--model`` accepts ``cifar-resnet`` (depth inferred from the state dict), ``torchvision:<name>`` and
``package.module:factory`` for a user's own ``nn.Module``. Checkpoints are untrusted: they are read with
``torch.load(..., weights_only=True)`` (or safetensors) and anything that needs arbitrary unpickling is
refused unless the caller opts in explicitly.
"""

from __future__ import annotations

import hashlib
import importlib
import pickle
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lcpaq.errors import InputError
from lcpaq.model.hf import HF_PREFIX, load_hf_model

# ---------------------------------------------------------------------------------------------
# CIFAR ResNet ("option A", He et al. 2016), the architecture of the shared checkpoints.


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # Option A: where the shape changes the shortcut subsamples and zero-pads channels, so it
        # has no parameters and nothing to quantize.
        self.pad_channels = planes // 4 if (stride != 1 or in_planes != planes) else 0
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.pad_channels:
            shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad_channels, self.pad_channels))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """CIFAR-10 ResNet with 6n+2 layers and 16/32/64 channels."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise InputError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            stage = []
            for index in range(blocks):
                stage.append(_BasicBlock(in_planes, planes, stride if index == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def infer_cifar_resnet_depth(state_dict: dict[str, torch.Tensor]) -> int:
    """Depth 6n+2 from the number of blocks in ``layer1`` of the state dict."""
    block_ids = {
        int(match.group(1))
        for key in state_dict
        if (match := re.match(r"layer1\.(\d+)\.conv1\.weight$", key))
    }
    if not block_ids:
        raise InputError(
            "state dict does not look like a CIFAR ResNet: no 'layer1.<i>.conv1.weight' keys"
        )
    return 6 * (max(block_ids) + 1) + 2


# ---------------------------------------------------------------------------------------------
# Checkpoint files.


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(
            f"checkpoint {path}: expected a state dict (name -> tensor), "
            f"or a dict with a 'state_dict' entry; got {type(obj).__name__}"
        )
    # DataParallel/DistributedDataParallel save every key with a 'module.' prefix.
    if obj and all(key.startswith("module.") for key in obj):
        obj = {key[len("module.") :]: value for key, value in obj.items()}
    return dict(obj)


def load_checkpoint(
    path: str | Path, *, allow_unsafe_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.th``/``.pt``/``.pth`` (torch) or ``.safetensors``.

    Raises `InputError` naming the file for a missing, truncated or unsafe checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise InputError(f"checkpoint {path} is empty")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except (SafetensorError, OSError) as error:
            raise InputError(
                f"checkpoint {path} is not a readable safetensors file: {error}"
            ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # Only a pickle that names a global outside the allow-list needs arbitrary code; any
        # other unpickling failure means the file is not a checkpoint at all.
        message = str(error)
        if "allowed global" not in message and "Unsupported global" not in message:
            raise InputError(f"checkpoint {path} is corrupt or not a PyTorch checkpoint") from None
        if not allow_unsafe_pickle:
            raise InputError(
                f"checkpoint {path} needs unpickling of arbitrary code, which can run anything; "
                "refusing. Re-save it as a plain state dict, or pass --allow-unsafe-pickle if you "
                "trust its source"
            ) from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as unsafe_error:  # noqa: BLE001 - any failure: the file is unusable
            raise InputError(
                f"checkpoint {path} could not be unpickled ({type(unsafe_error).__name__})"
            ) from None
    except Exception as error:  # noqa: BLE001 - truncated zips, junk bytes, I/O errors, ...
        lines = str(error).strip().splitlines()
        detail = lines[0] if lines else type(error).__name__
        raise InputError(f"checkpoint {path} is corrupt or truncated ({detail})") from None
    state_dict = _unwrap_state_dict(obj, path)
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise InputError(f"checkpoint {path}: tensor {key!r} contains NaN or Inf values")
    return state_dict


def load_state_dict_strict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], source: str
) -> None:
    """Load a state dict that must match the model exactly, naming the first mismatching key."""
    expected = model.state_dict()
    # Checkpoints saved before PyTorch 0.4.1 lack BatchNorm's step counter; it does not affect
    # inference, so the model's own value is kept.
    state_dict = dict(state_dict)
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in state_dict:
            state_dict[key] = value
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    if missing:
        raise InputError(
            f"{source}: state dict does not fit the model: key {missing[0]!r} is missing "
            f"({len(missing)} missing, {len(unexpected)} unexpected)"
        )
    if unexpected:
        raise InputError(
            f"{source}: state dict does not fit the model: unexpected key {unexpected[0]!r} "
            f"({len(unexpected)} unexpected)"
        )
    for key, tensor in expected.items():
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise InputError(
                f"{source}: state dict does not fit the model: {key!r} has shape "
                f"{tuple(state_dict[key].shape)}, the model expects {tuple(tensor.shape)}"
            )
    model.load_state_dict(state_dict, strict=True)


# ---------------------------------------------------------------------------------------------
# Model specs.


def build_model(spec: str, state_dict: dict[str, torch.Tensor] | None) -> nn.Module:
    """Instantiate the architecture named by ``spec`` (weights are loaded separately).

    ``cifar-resnet`` needs the state dict to infer depth and class count.
    """
    if spec == "cifar-resnet" or re.fullmatch(r"cifar-resnet\d+", spec):
        if state_dict is not None:
            depth = infer_cifar_resnet_depth(state_dict)
            num_classes = (
                int(state_dict["linear.weight"].shape[0]) if "linear.weight" in state_dict else 10
            )
        else:
            depth, num_classes = int(spec[len("cifar-resnet") :] or 20), 10
        return CifarResNet(depth, num_classes)
    if spec.startswith(HF_PREFIX):
        # The folder's model with the task its config names (`load_model` takes ``--task``).
        return load_hf_model(spec.removeprefix(HF_PREFIX))
    if spec == "demo-digits":
        from lcpaq.model.demo import DigitsNet

        return DigitsNet()
    if spec.startswith("torchvision:"):
        import torchvision

        name = spec.split(":", 1)[1]
        try:
            return torchvision.models.get_model(name, weights=None)
        except ValueError as error:
            raise InputError(f"--model {spec}: {error}") from None
    if ":" in spec:
        module_name, factory_name = spec.split(":", 1)
        try:
            factory = getattr(importlib.import_module(module_name), factory_name)
        except (ImportError, AttributeError) as error:
            raise InputError(
                f"--model {spec}: cannot import {factory_name} from {module_name}: {error}"
            ) from None
        model = factory()
        if not isinstance(model, nn.Module):
            raise InputError(
                f"--model {spec}: factory returned {type(model).__name__}, not nn.Module"
            )
        return model
    raise InputError(
        f"unknown --model {spec!r}; use 'cifar-resnet', 'torchvision:<name>', 'hf:DIR' or "
        "'package.module:factory'"
    )


def load_model(
    spec: str,
    checkpoint: str | Path | None,
    *,
    allow_unsafe_pickle: bool = False,
    task: str | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Build the model named by ``spec``, load the checkpoint into it, and put it in eval mode.

    ``hf:DIR``: the local transformers folder as a `lcpaq.model.text.TextModel`
    (`lcpaq.model.hf.load_hf_model`; ``task`` and ``trust_remote_code`` apply to it only); a
    checkpoint, when given, replaces its weights (keys ``model.<HF key>``)."""
    state_dict = (
        load_checkpoint(checkpoint, allow_unsafe_pickle=allow_unsafe_pickle) if checkpoint else None
    )
    if spec.startswith(HF_PREFIX):
        model: nn.Module = load_hf_model(
            spec.removeprefix(HF_PREFIX),
            task=task,
            trust_remote_code=trust_remote_code,
            allow_unsafe_pickle=allow_unsafe_pickle,
        )
    else:
        model = build_model(spec, state_dict)
    if state_dict is not None:
        load_state_dict_strict(model, state_dict, f"checkpoint {checkpoint}")
    return model.eval()


def num_classes_of(model: nn.Module) -> int | None:
    """Output width of the last Linear layer, used to check labels; None if there is none."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    return int(linears[-1].out_features) if linears else None
