"""Folders of seeded noise images for tests that need inputs but not their content."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def noise_images(folder: Path, count: int, size: int, seed: int = 0) -> Path:
    """`count` RGB PNGs (`0.png`, ...) of uniform noise, `size`×`size`, in `folder`; returns `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(folder / f"{i}.png")
    return folder
