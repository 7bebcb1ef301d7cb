"""Data loading in `lcpaq.model.data`: normalisation, validation errors that name the file, ImageFolder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lcpaq.errors import InputError
from lcpaq.model.data import NORMALIZATIONS, batches, load_dataset, parse_normalization

pytestmark = pytest.mark.usefixtures("single_thread")


def _images(count: int = 6, channels: int = 3, size: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, channels, size, size), np.uint8)


def _labels(count: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 10, count).astype(np.uint8)


def _write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_npz_images_are_normalised(tmp_path: Path) -> None:
    x, y = _images(), _labels()
    path = _write_npz(tmp_path / "data.npz", x=x, y=y)
    dataset = load_dataset(path)  # ImageNet statistics by default
    mean, std = NORMALIZATIONS["imagenet"]
    expected = (x.astype(np.float64) / 255.0 - np.array(mean)[None, :, None, None]) / np.array(std)[
        None, :, None, None
    ]
    assert dataset.inputs.dtype == torch.float32
    assert dataset.labels.dtype == torch.int64
    np.testing.assert_allclose(dataset.inputs.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(dataset.labels.numpy(), y)
    assert len(dataset) == 6
    assert dataset.source == str(path)

    plain = load_dataset(path, normalization="none")
    np.testing.assert_allclose(plain.inputs.numpy(), x / 255.0, rtol=1e-6)
    custom = load_dataset(path, normalization="0.5,0.5,0.5/0.25,0.5,1")
    expected = (x / 255.0 - 0.5) / np.array([0.25, 0.5, 1.0])[None, :, None, None]
    np.testing.assert_allclose(custom.inputs.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_pt_files_dict_and_pair(tmp_path: Path) -> None:
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 1, 0])
    for name, payload in {"dict.pt": {"x": x, "y": y}, "pair.pth": (x, y)}.items():
        torch.save(payload, tmp_path / name)
        dataset = load_dataset(tmp_path / name, num_classes=3)
        assert torch.equal(dataset.inputs, x)  # float features are taken as preprocessed
        assert torch.equal(dataset.labels, y)


def test_subset_and_batches(tmp_path: Path) -> None:
    dataset = load_dataset(_write_npz(tmp_path / "d.npz", x=_images(7), y=_labels(7)))
    part = dataset.subset(2, 5)
    assert len(part) == 3 and torch.equal(part.inputs, dataset.inputs[2:5])
    chunks = batches(dataset, 3)
    assert [len(labels) for _, labels in chunks] == [3, 3, 1]
    assert torch.equal(torch.cat([inputs for inputs, _ in chunks]), dataset.inputs)


def _assert_input_error(path: Path, match: str, **kwargs: object) -> None:
    with pytest.raises(InputError, match=match) as info:
        load_dataset(path, **kwargs)
    assert str(path) in str(info.value)


def test_missing_empty_and_corrupt_files(tmp_path: Path) -> None:
    _assert_input_error(tmp_path / "nope.npz", "does not exist")
    for suffix in (".npz", ".pt"):
        empty = tmp_path / f"empty{suffix}"
        empty.write_bytes(b"")
        _assert_input_error(empty, "not a readable")
        corrupt = tmp_path / f"corrupt{suffix}"
        corrupt.write_bytes(b"PK\x03\x04 definitely not a real archive" * 3)
        _assert_input_error(corrupt, "not a readable")
    truncated = _write_npz(tmp_path / "truncated.npz", x=_images(50), y=_labels(50))
    truncated.write_bytes(truncated.read_bytes()[:300])
    _assert_input_error(truncated, "not a readable")
    other = tmp_path / "data.csv"
    other.write_text("1,2,3\n")
    _assert_input_error(other, "unsupported type")


def test_zero_samples(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "none.npz", x=_images(0), y=_labels(0))
    _assert_input_error(path, "empty")


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (_images().astype(np.int32) + 256, _labels(), "pixel values 0..255, found 5"),
        (_images()[:, 0], _labels(), "integer images 'x' must be NCHW"),
        (np.zeros(6, np.float32), _labels(), "sample axis and non-empty feature axes"),
        (np.array(["a"] * 6), _labels(), "array 'x' has dtype <U1"),
        (_images(), _labels(5), "x has 6 samples"),
        (_images(), _labels()[:, None], "one label per sample"),
        (_images(), np.array([0, 1, -1, 2, 3, 4]), "label -1 is negative"),
        (_images(), _labels().astype(np.float32), "labels 'y' must be integers"),
        (np.full((6, 2), np.nan, np.float32), _labels(), "NaN or Inf"),
    ],
    ids=[
        "int32-x-out-of-range",
        "3d-uint8-x",
        "1d-x",
        "string-x",
        "length-mismatch",
        "2d-labels",
        "negative-label",
        "float-labels",
        "nan-x",
    ],
)
def test_invalid_arrays(tmp_path: Path, x: np.ndarray, y: np.ndarray, match: str) -> None:
    path = _write_npz(tmp_path / "bad.npz", x=x, y=y)
    _assert_input_error(path, match)


def test_labels_out_of_range_for_the_model(tmp_path: Path) -> None:
    y = np.array([0, 1, 2, 9, 3, 4], np.uint8)
    path = _write_npz(tmp_path / "data.npz", x=_images(), y=y)
    _assert_input_error(path, "label 9 is out of range for a model with 5 classes", num_classes=5)
    assert len(load_dataset(path, num_classes=10)) == 6


def test_missing_keys(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "only_x.npz", x=_images())
    _assert_input_error(path, "missing array 'y'")
    torch.save({"x": torch.zeros(2, 3)}, tmp_path / "only_x.pt")
    _assert_input_error(tmp_path / "only_x.pt", "expected a dict with tensors 'x' and 'y'")


def test_normalisation_errors(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "gray.npz", x=_images(channels=1), y=_labels())
    _assert_input_error(path, "normalisation has 3 channel\\(s\\) but the data has 1")
    assert load_dataset(path, normalization="0.5/0.5").inputs.shape == (6, 1, 4, 4)
    with pytest.raises(InputError, match="--normalize 'bogus'"):
        parse_normalization("bogus")
    with pytest.raises(InputError, match="positive stds"):
        parse_normalization("0.5,0.5/0.5,0")
    with pytest.raises(InputError, match="as many means"):
        parse_normalization("0.5,0.5/0.5")


def _write_image_folder(root: Path, sizes: dict[str, list[int]]) -> dict[str, list[np.ndarray]]:
    from PIL import Image

    rng = np.random.default_rng(3)
    pixels: dict[str, list[np.ndarray]] = {}
    for label, image_sizes in sizes.items():
        (root / label).mkdir(parents=True)
        pixels[label] = []
        for index, size in enumerate(image_sizes):
            array = rng.integers(0, 256, (size, size, 3), np.uint8)
            Image.fromarray(array).save(root / label / f"img{index}.png")
            pixels[label].append(array)
    return pixels


def test_image_folder(tmp_path: Path) -> None:
    root = tmp_path / "images"
    pixels = _write_image_folder(root, {"cat": [5, 5], "ant": [5], "dog": [5, 5, 5]})
    dataset = load_dataset(root, normalization="none", num_classes=3)
    # Classes are the sorted folder names: ant=0, cat=1, dog=2; files in name order.
    assert dataset.labels.tolist() == [0, 1, 1, 2, 2, 2]
    expected = [pixels["ant"][0], *pixels["cat"], *pixels["dog"]]
    for image, array in zip(dataset.inputs, expected):
        np.testing.assert_allclose(image.numpy(), array.transpose(2, 0, 1) / 255.0, rtol=1e-6)
    _assert_input_error(root, "out of range", num_classes=2)


def test_image_folder_sizes(tmp_path: Path) -> None:
    root = tmp_path / "images"
    _write_image_folder(root, {"a": [4, 6], "b": [5]})
    _assert_input_error(root, "different sizes; pass --image-size")
    resized = load_dataset(root, normalization="none", image_size=3)
    assert resized.inputs.shape == (3, 3, 3, 3)
    assert resized.labels.tolist() == [0, 0, 1]
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_input_error(empty, "not a usable ImageFolder")


def test_shared_cifar_files_load(shared_dir: Path) -> None:
    path = shared_dir / "data" / "cifar10_test.npz"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    dataset = load_dataset(path, num_classes=10)
    assert dataset.inputs.shape == (1017, 3, 32, 32)
    assert dataset.labels.min() >= 0 and dataset.labels.max() <= 9
