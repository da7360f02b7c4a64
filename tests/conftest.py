"""Shared fixtures: a small CNN trained on real data (scikit-learn digits) in every format."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "demo"))

import train_digits  # noqa: E402

# one thread per pytest-xdist worker (`make test` runs two), two when run alone: never more threads
# than the 2 cores CI has
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@dataclass
class Digits:
    """The digits CNN: eager module, TorchScript and ONNX files, PNG inputs and a preprocessed batch."""

    module: torch.nn.Module
    accuracy: float
    torchscript: Path
    onnx: Path
    images: Path
    x: torch.Tensor
    y: torch.Tensor
    raw: np.ndarray  # uint8 images [N, 32, 32]

    @property
    def spec(self):
        from xaicli.model import InputSpec

        s = train_digits.SPEC
        return InputSpec(size=tuple(s["size"]), channels=1, mean=tuple(s["mean"]), std=tuple(s["std"]))


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Digits:
    """Trained in ~10 s once per session (97–98 % held-out accuracy), exported to TorchScript and ONNX."""
    folder = tmp_path_factory.mktemp("digits")
    module, accuracy, images, labels = train_digits.train()
    ts_path, onnx_path = train_digits.export(module, folder)
    train_digits.save_images(images, labels, folder / "images")
    x = train_digits.normalise(images[:32])
    return Digits(module, accuracy, ts_path, onnx_path, folder / "images", x, torch.from_numpy(labels[:32]).long(), images)


class Counted(torch.nn.Module):
    """A module that records the batch size of every forward it runs (`sizes`)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(x))
        return self.module(x)


@pytest.fixture
def counted(digits: Digits) -> Counted:
    """The digits CNN, counting its forwards: pass it as `module=` (gradients) or `forward_fn=` (forward-only)."""
    return Counted(digits.module)
