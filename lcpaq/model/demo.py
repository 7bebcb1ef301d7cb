"""The embedded default: a small CNN trained in-process on scikit-learn's 8×8 handwritten digits.

No download and no ``../shared``: the digits ship inside scikit-learn. The trained checkpoint and the
calibration/test splits are written into the run folder as ordinary files (``.safetensors`` and
``.npz``), and the demo then runs the same pipeline a user runs on their own checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

logger = logging.getLogger(__name__)

DEMO_MODEL = "demo-digits"


class DigitsNet(nn.Module):
    """Conv(1→16)-BN-ReLU, Conv(16→32, stride 2)-BN-ReLU, Conv(32→32)-BN-ReLU, pool, Linear(32→10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def digits_splits(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """sklearn digits as uint8 NCHW images (0..16 scaled to 0..240): train (1297) and test (500)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * 15).round().astype(np.uint8)[:, None]  # [1797, 1, 8, 8]
    labels = digits.target.astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(labels))
    test, train = order[:500], order[500:]
    return images[train], labels[train], images[test], labels[test]


def train_digits_net(
    images: np.ndarray, labels: np.ndarray, *, epochs: int = 30, seed: int = 0
) -> DigitsNet:
    """Adam with light augmentation (random 1-pixel shifts); ~20 s on 2 CPU cores."""
    torch.manual_seed(seed)
    model = DigitsNet()
    inputs = torch.from_numpy(images).float() / 255.0
    targets = torch.from_numpy(labels).long()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=3e-3, total_steps=epochs * ((len(inputs) + 63) // 64)
    )
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(inputs), 64):
            batch = order[start : start + 64]
            shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
            x = torch.roll(inputs[batch], shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(x), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


def prepare_demo(run_dir: Path, *, seed: int = 0) -> tuple[Path, Path, Path]:
    """Train the demo network and write its checkpoint and data into ``run_dir/demo``.

    Returns (checkpoint, calibration data, evaluation data) paths.
    """
    folder = run_dir / "demo"
    folder.mkdir(parents=True, exist_ok=True)
    train_x, train_y, test_x, test_y = digits_splits(seed)
    logger.info("training the demo CNN on %d digits images", len(train_x))
    model = train_digits_net(train_x, train_y, seed=seed)
    checkpoint = folder / "digits_cnn.safetensors"
    save_file(
        {key: value.contiguous() for key, value in model.state_dict().items()}, str(checkpoint)
    )
    calib, evaluation = folder / "digits_train.npz", folder / "digits_test.npz"
    np.savez(calib, x=train_x, y=train_y)
    np.savez(evaluation, x=test_x, y=test_y)
    return checkpoint, calib, evaluation
