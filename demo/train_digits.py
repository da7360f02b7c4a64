"""Train the demo model: a small CNN on scikit-learn's handwritten digits (real data shipped with
scikit-learn), exported as TorchScript and ONNX with its input spec embedded.

    python demo/train_digits.py            # writes demo/digits.pt, demo/digits.onnx, demo/images/

The input spec travels inside the files (TorchScript extra file / ONNX metadata `xai.json`), so
`xai explain demo/digits.pt demo/images` needs no preprocessing flags.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

SIZE = 32
SPEC = {"size": [SIZE, SIZE], "channels": 1, "mean": [0.25], "std": [0.35], "interpolation": "bilinear", "crop_pct": 1.0,
        "labels": [str(d) for d in range(10)]}


def build_model() -> nn.Module:
    """Three conv blocks (with BatchNorm, so canonization matters) and a linear classifier."""
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(1, 16), nn.MaxPool2d(2),
        *block(16, 32), nn.MaxPool2d(2),
        *block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 10),
    )


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digits as uint8 images SIZE×SIZE (white ink on black) and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images / 16.0).float()[:, None]
    images = torch.nn.functional.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return (images[:, 0].clamp(0, 1).numpy() * 255).round().astype(np.uint8), data.target


def normalise(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).float()[:, None] / 255.0
    return (x - SPEC["mean"][0]) / SPEC["std"][0]


def train(epochs: int = 12, seed: int = 0) -> tuple[nn.Module, float, np.ndarray, np.ndarray]:
    """Train on a random 80% of the digits; return (model, accuracy on the held-out 20%, their images, labels)."""
    torch.manual_seed(seed)
    images, labels = digits_images()
    x, y = normalise(images), torch.from_numpy(labels).long()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=gen)
    train_idx, test_idx = order[:1437], order[1437:]
    model = build_model()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        model.train()
        for idx in train_idx[torch.randperm(len(train_idx), generator=gen)].split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[test_idx]).argmax(1) == y[test_idx]).float().mean().item()
    return model, accuracy, images[test_idx.numpy()], labels[test_idx.numpy()]


def export(model: nn.Module, out: Path) -> tuple[Path, Path]:
    """Save TorchScript (traced) and ONNX (dynamic batch) with the spec embedded."""
    out.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, 1, SIZE, SIZE)
    ts_path, onnx_path = out / "digits.pt", out / "digits.onnx"
    traced = torch.jit.trace(model.eval(), example)
    torch.jit.save(traced, str(ts_path), _extra_files={"xai.json": json.dumps(SPEC)})
    torch.onnx.export(model, (example,), str(onnx_path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    import onnx

    proto = onnx.load(str(onnx_path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "xai.json", json.dumps(SPEC)
    onnx.save(proto, str(onnx_path))
    return ts_path, onnx_path


def save_images(images: np.ndarray, labels: np.ndarray, folder: Path, per_class: int = 2) -> list[Path]:
    """A few test-split digits as PNG files named by class: images/<digit>/<index>.png."""
    from PIL import Image

    paths = []
    for digit in range(10):
        for i in np.flatnonzero(labels == digit)[:per_class]:
            path = folder / str(digit) / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(path)
            paths.append(path)
    return paths


if __name__ == "__main__":
    here = Path(__file__).parent
    net, acc, test_images, test_labels = train()
    export(net, here)
    save_images(test_images, test_labels, here / "images")
    print(f"test accuracy: {acc:.4f} on {len(test_labels)} held-out digits")
