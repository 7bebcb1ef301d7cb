"""Calibration and evaluation data: ``.npz`` (``x`` integer NCHW pixels 0..255 or float
features, ``y`` integer labels), ``.pt`` tensors, or an ImageFolder directory, normalised per
channel. Every problem (dtype, shape, value range, label range, empty, a shape the model cannot
take) is reported as `InputError` naming the file and the value.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lcpaq.errors import InputError

#: Per-channel normalisation presets: (mean, std) applied after scaling pixels to [0, 1].
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # The shared CIFAR ResNet checkpoints were trained with the ImageNet statistics.
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "none": ((0.0,), (1.0,)),
}


@dataclass(frozen=True)
class Dataset:
    """Normalised float32 inputs [N, ...] and int64 labels [N], in file order."""

    inputs: torch.Tensor
    labels: torch.Tensor
    source: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def has_labels(self) -> bool:
        """Whether the labels are real: unlabeled text has every label -1
        (`lcpaq.model.text_data`)."""
        return len(self) > 0 and bool((self.labels >= 0).all())

    def subset(self, start: int, stop: int) -> Dataset:
        return Dataset(
            self.inputs[start:stop], self.labels[start:stop], f"{self.source}[{start}:{stop}]"
        )


def parse_normalization(text: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A preset name or ``"m1,m2,m3/s1,s2,s3"``."""
    if text in NORMALIZATIONS:
        return NORMALIZATIONS[text]
    try:
        mean_text, std_text = text.split("/")
        mean = tuple(float(v) for v in mean_text.split(","))
        std = tuple(float(v) for v in std_text.split(","))
    except ValueError:
        raise InputError(
            f"--normalize {text!r}: use one of {', '.join(NORMALIZATIONS)} or 'm1,m2,m3/s1,s2,s3'"
        ) from None
    if len(mean) != len(std) or any(s <= 0 for s in std):
        raise InputError(f"--normalize {text!r}: need as many means as positive stds")
    return mean, std


def _normalise(pixels: torch.Tensor, normalization: str, path: Path) -> torch.Tensor:
    mean, std = parse_normalization(normalization)
    channels = pixels.shape[1]
    if len(mean) not in (1, channels):
        raise InputError(
            f"{path}: normalisation has {len(mean)} channel(s) but the data has {channels}"
        )
    shape = (1, -1) + (1,) * (pixels.dim() - 2)
    mean_t = torch.tensor(mean, dtype=torch.float32).reshape(shape)
    std_t = torch.tensor(std, dtype=torch.float32).reshape(shape)
    return (pixels - mean_t) / std_t


def _as_tensor(array: np.ndarray | torch.Tensor, key: str, path: Path) -> torch.Tensor:
    """A numeric tensor of ``array``, or an error naming the array and its dtype."""
    if isinstance(array, torch.Tensor):
        return array
    array = np.asarray(array)
    if array.dtype.kind not in "biuf":  # strings, bytes, objects, dates, complex
        raise InputError(
            f"{path}: array {key!r} has dtype {array.dtype}; expected numbers "
            "(uint8 images or float features for 'x', integer labels for 'y')"
        )
    return torch.as_tensor(array)


def _pixels(x_t: torch.Tensor, path: Path) -> torch.Tensor:
    """Integer images as float pixels in [0, 1]: any integer dtype whose values lie in 0..255."""
    if x_t.dim() != 4:
        raise InputError(f"{path}: integer images 'x' must be NCHW, got shape {tuple(x_t.shape)}")
    low, high = int(x_t.min()), int(x_t.max())
    if low < 0 or high > 255:
        bad = low if low < 0 else high
        raise InputError(
            f"{path}: integer images 'x' must hold pixel values 0..255, found {bad} "
            "(pass float features for other ranges)"
        )
    return x_t.float() / 255.0


def _from_arrays(
    x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, path: Path, normalization: str
) -> Dataset:
    x_t, y_t = _as_tensor(x, "x", path), _as_tensor(y, "y", path)
    if x_t.dim() == 0 or x_t.shape[0] == 0:
        raise InputError(f"{path}: the data set is empty (0 samples)")
    if x_t.dim() < 2 or x_t[0].numel() == 0:
        raise InputError(
            f"{path}: 'x' must have a sample axis and non-empty feature axes, "
            f"got shape {tuple(x_t.shape)}"
        )
    if y_t.dim() != 1 or y_t.shape[0] != x_t.shape[0]:
        raise InputError(
            f"{path}: 'y' must be one label per sample: x has {x_t.shape[0]} samples, "
            f"y has shape {tuple(y_t.shape)}"
        )
    if y_t.is_floating_point() or y_t.dtype == torch.bool:
        raise InputError(f"{path}: labels 'y' must be integers, got {y_t.dtype}")
    if int(y_t.min()) < 0:
        raise InputError(f"{path}: label {int(y_t.min())} is negative")
    if x_t.dtype == torch.bool:
        raise InputError(f"{path}: 'x' must be uint8 images or float features, got {x_t.dtype}")
    if x_t.is_floating_point():
        # Float inputs are taken as already preprocessed.
        inputs = x_t.float()
    else:
        inputs = _normalise(_pixels(x_t, path), normalization, path)
    if not torch.isfinite(inputs).all():
        raise InputError(f"{path}: 'x' contains NaN or Inf values")
    return Dataset(inputs.contiguous(), y_t.long(), str(path))


@torch.no_grad()
def check_inputs_fit(model: torch.nn.Module, dataset: Dataset, model_name: str) -> None:
    """One sample through ``model``: data whose shape the model cannot take fails here, naming
    the file and the shape, instead of deep inside a stage."""
    sample = dataset.inputs[:1]
    try:
        device = next(model.parameters()).device
        model(sample.to(device))
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(
            f"{dataset.source}: samples of shape {tuple(sample.shape[1:])} do not fit the model "
            f"{model_name} ({reason})"
        ) from None


def _load_image_folder(path: Path, normalization: str, image_size: int | None) -> Dataset:
    from torchvision import datasets, transforms

    steps = [transforms.Resize((image_size, image_size))] if image_size else []
    steps.append(transforms.PILToTensor())
    try:
        folder = datasets.ImageFolder(str(path), transform=transforms.Compose(steps))
    except (FileNotFoundError, RuntimeError) as error:
        raise InputError(f"{path}: not a usable ImageFolder directory: {error}") from None
    images = [folder[index][0] for index in range(len(folder))]
    if len({tuple(image.shape) for image in images}) > 1:
        raise InputError(f"{path}: images have different sizes; pass --image-size to resize them")
    return _from_arrays(torch.stack(images), torch.tensor(folder.targets), path, normalization)


def load_dataset(
    path: str | Path,
    *,
    normalization: str = "imagenet",
    num_classes: int | None = None,
    image_size: int | None = None,
) -> Dataset:
    """Load and validate a data set; labels must lie in [0, num_classes) when that is given."""
    path = Path(path)
    if path.is_dir():
        dataset = _load_image_folder(path, normalization, image_size)
    elif not path.is_file():
        raise InputError(f"data file {path} does not exist")
    elif path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                missing = [key for key in ("x", "y") if key not in archive.files]
                if missing:
                    raise InputError(
                        f"{path}: missing array {missing[0]!r} (found {archive.files})"
                    )
                x, y = archive["x"], archive["y"]
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
            if isinstance(error, InputError):
                raise
            raise InputError(f"{path}: not a readable .npz file ({error})") from None
        dataset = _from_arrays(x, y, path, normalization)
    elif path.suffix in (".pt", ".pth"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any failure here means an unreadable file
            raise InputError(
                f"{path}: not a readable tensor file ({type(error).__name__})"
            ) from None
        if isinstance(obj, (tuple, list)) and len(obj) == 2:
            obj = {"x": obj[0], "y": obj[1]}
        if not isinstance(obj, dict) or "x" not in obj or "y" not in obj:
            raise InputError(f"{path}: expected a dict with tensors 'x' and 'y' or a pair (x, y)")
        dataset = _from_arrays(obj["x"], obj["y"], path, normalization)
    else:
        raise InputError(
            f"data file {path}: unsupported type; use .npz, .pt or an ImageFolder directory"
        )
    if num_classes is not None and int(dataset.labels.max()) >= num_classes:
        raise InputError(
            f"{path}: label {int(dataset.labels.max())} is out of range for a model with "
            f"{num_classes} classes"
        )
    return dataset


def batches(dataset: Dataset, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive (inputs, labels) batches in file order."""
    return [
        (dataset.inputs[start : start + batch_size], dataset.labels[start : start + batch_size])
        for start in range(0, len(dataset), batch_size)
    ]
