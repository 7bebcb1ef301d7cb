"""Checkpoint loading and model specs in `lcpaq.model.zoo`: untrusted files fail with a clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lcpaq.errors import InputError
from lcpaq.model.data import load_dataset
from lcpaq.model.evaluate import evaluate_accuracy
from lcpaq.model.zoo import (
    CifarResNet,
    build_model,
    infer_cifar_resnet_depth,
    load_checkpoint,
    load_model,
    load_state_dict_strict,
    num_classes_of,
)

pytestmark = pytest.mark.usefixtures("single_thread")


class CustomPayload:
    """A class that only full unpickling can rebuild (module-level so unpickling can find it)."""

    def __init__(self, value: int) -> None:
        self.value = value


def _small_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).state_dict()


def test_load_plain_and_wrapped_state_dicts(tmp_path: Path) -> None:
    state_dict = _small_state_dict()
    for index, payload in enumerate(
        [
            state_dict,
            {"state_dict": state_dict, "best_prec1": 91.5},
            {"model_state_dict": state_dict},
            {"model": state_dict},
        ]
    ):
        path = tmp_path / f"ckpt{index}.pt"
        torch.save(payload, path)
        loaded = load_checkpoint(path)
        assert list(loaded) == list(state_dict)
        assert all(torch.equal(loaded[key], state_dict[key]) for key in state_dict)


def test_module_prefix_is_stripped(tmp_path: Path) -> None:
    state_dict = _small_state_dict()
    path = tmp_path / "dp.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state_dict.items()}}, path)
    loaded = load_checkpoint(path)
    assert list(loaded) == list(state_dict)
    # Only a prefix on every key is DataParallel's; a partial one is kept as it is.
    mixed = {"module.a": torch.zeros(1), "b": torch.zeros(1)}
    torch.save(mixed, path)
    assert list(load_checkpoint(path)) == ["module.a", "b"]


def test_safetensors_checkpoint(tmp_path: Path) -> None:
    state_dict = {key: value.contiguous() for key, value in _small_state_dict().items()}
    path = tmp_path / "model.safetensors"
    save_file(state_dict, str(path))
    loaded = load_checkpoint(path)
    assert set(loaded) == set(state_dict)
    assert all(torch.equal(loaded[key], state_dict[key]) for key in state_dict)
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(InputError, match="not a readable safetensors file") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_missing_empty_and_truncated_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.th"
    with pytest.raises(InputError, match="does not exist") as info:
        load_checkpoint(missing)
    assert str(missing) in str(info.value)

    empty = tmp_path / "empty.th"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="is empty") as info:
        load_checkpoint(empty)
    assert str(empty) in str(info.value)

    truncated = tmp_path / "truncated.th"
    torch.save({"state_dict": _small_state_dict()}, truncated)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="corrupt or truncated") as info:
        load_checkpoint(truncated)
    assert str(truncated) in str(info.value)

    not_torch = tmp_path / "arrays.pt"  # a zip archive, but not a torch one
    with not_torch.open("wb") as handle:
        np.savez(handle, a=np.zeros(3))
    with pytest.raises(InputError, match="corrupt or truncated") as info:
        load_checkpoint(not_torch)
    assert str(not_torch) in str(info.value)


def test_garbage_files_give_a_clear_input_error(tmp_path: Path) -> None:
    payloads = {
        "text": b"this is not a checkpoint at all" * 10,
        "json": b'{"state_dict": {}}',
        "html": b"<html>404 Not Found</html>",
        "random": np.random.default_rng(0).bytes(1000),
    }
    for name, payload in payloads.items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(payload)
        for allow in (False, True):
            with pytest.raises(InputError) as info:
                load_checkpoint(path, allow_unsafe_pickle=allow)
            assert str(path) in str(info.value)
            assert "arbitrary code" not in str(info.value)


def test_pickled_custom_class_is_refused_unless_allowed(tmp_path: Path) -> None:
    state_dict = _small_state_dict()
    path = tmp_path / "unsafe.pth"
    torch.save({"state_dict": state_dict, "meta": CustomPayload(3)}, path)
    with pytest.raises(InputError, match="unpickling of arbitrary code") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    loaded = load_checkpoint(path, allow_unsafe_pickle=True)
    assert list(loaded) == list(state_dict)


def test_non_state_dict_and_nan_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(InputError, match="expected a state dict"):
        load_checkpoint(path)
    state_dict = _small_state_dict()
    state_dict["2.weight"][1, 0] = float("nan")
    torch.save(state_dict, path)
    with pytest.raises(InputError, match=r"tensor '2\.weight' contains NaN or Inf") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_load_state_dict_strict_names_the_first_problem() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    good = _small_state_dict()
    load_state_dict_strict(model, good, "ckpt.th")
    assert torch.equal(model[2].weight, good["2.weight"])

    missing = {key: value for key, value in good.items() if key != "1.running_mean"}
    with pytest.raises(InputError, match=r"ckpt\.th: .*key '1\.running_mean' is missing"):
        load_state_dict_strict(model, missing, "ckpt.th")

    unexpected = {**good, "3.weight": torch.zeros(1)}
    with pytest.raises(InputError, match=r"unexpected key '3\.weight'"):
        load_state_dict_strict(model, unexpected, "ckpt.th")

    wrong_shape = {**good, "2.weight": torch.zeros(3, 4)}
    with pytest.raises(
        InputError, match=r"'2\.weight' has shape \(3, 4\), the model expects \(2, 4\)"
    ):
        load_state_dict_strict(model, wrong_shape, "ckpt.th")

    # Old checkpoints lack BatchNorm's step counter: accepted.
    old = {key: value for key, value in good.items() if not key.endswith("num_batches_tracked")}
    load_state_dict_strict(model, old, "ckpt.th")


@pytest.mark.parametrize("depth", [20, 32, 44])
def test_build_cifar_resnet_infers_depth(depth: int) -> None:
    torch.manual_seed(depth)
    state_dict = CifarResNet(depth).state_dict()
    assert infer_cifar_resnet_depth(state_dict) == depth
    model = build_model("cifar-resnet", state_dict)
    assert isinstance(model, CifarResNet)
    assert len(model.layer1) == len(model.layer2) == len(model.layer3) == (depth - 2) // 6
    weight_layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weight_layers) == depth
    load_state_dict_strict(model, state_dict, "test")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_build_model_specs() -> None:
    state_dict = CifarResNet(20, num_classes=100).state_dict()
    model = build_model("cifar-resnet", state_dict)
    assert num_classes_of(model) == 100
    assert len(build_model("cifar-resnet32", None).layer1) == 5
    model = build_model("torch.nn:Identity", None)
    assert isinstance(model, nn.Identity)
    assert num_classes_of(model) is None
    with pytest.raises(InputError, match="6n\\+2"):
        CifarResNet(21)
    with pytest.raises(InputError, match="does not look like a CIFAR ResNet"):
        build_model("cifar-resnet", {"conv.weight": torch.zeros(1)})
    with pytest.raises(InputError, match="unknown --model 'resnet'"):
        build_model("resnet", None)
    with pytest.raises(InputError, match="cannot import nothing_here"):
        build_model("torch.nn:nothing_here", None)
    with pytest.raises(InputError, match="not nn.Module"):
        build_model("collections:OrderedDict", None)


def test_load_model_puts_the_model_in_eval_mode(tmp_path: Path) -> None:
    torch.manual_seed(1)
    state_dict = CifarResNet(20).state_dict()
    path = tmp_path / "r20.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state_dict.items()}}, path)
    model = load_model("cifar-resnet", path)
    assert isinstance(model, CifarResNet) and not model.training
    assert torch.equal(model.linear.weight, state_dict["linear.weight"])


# ---------------------------------------------------------------------------------------------
# Real checkpoints from the shared folder.


@pytest.mark.parametrize(
    ("file_name", "depth"),
    [("resnet20-12fca82f.th", 20), ("resnet32-d509ac18.th", 32)],
)
def test_shared_checkpoints_load_with_weights_only(
    shared_dir: Path, file_name: str, depth: int
) -> None:
    path = shared_dir / "checkpoints" / file_name
    state_dict = load_checkpoint(path)  # weights_only=True, no opt-in needed
    assert not any(key.startswith("module.") for key in state_dict)
    assert infer_cifar_resnet_depth(state_dict) == depth
    model = load_model("cifar-resnet", path)
    assert isinstance(model, CifarResNet) and not model.training
    assert len(model.layer1) == (depth - 2) // 6
    assert num_classes_of(model) == 10


def test_shared_resnet20_accuracy_matches_the_reference(shared_dir: Path) -> None:
    """shared/README: ResNet20 FP32 top-1 on cifar10_test.npz (1017 images) is 91.64 %."""
    test_file = shared_dir / "data" / "cifar10_test.npz"
    if not test_file.is_file():
        pytest.skip(f"{test_file} is missing")
    model = load_model("cifar-resnet", shared_dir / "checkpoints" / "resnet20-12fca82f.th")
    dataset = load_dataset(test_file, normalization="imagenet", num_classes=10)
    accuracy = evaluate_accuracy(model, dataset, batch_size=512)
    assert accuracy.num_samples == 1017
    assert int(np.sum(accuracy.correct)) == round(0.9164 * 1017)
