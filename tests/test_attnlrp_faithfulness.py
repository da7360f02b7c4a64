"""Faithfulness of AttnLRP on a small vision transformer trained here (scikit-learn digits, 32×32).

Pixel flipping (xai's `pixel_flipping` metric plugin: most relevant pixels first, set to the image's
minimum, area under the target's softmax probability; lower is better) of AttnLRP must be lower than
gradient×input's and a random attribution's, as Achtibat et al. (ICML 2024) report for ViTs. CP-LRP
and integrated gradients are scored as well; run with `-s` to print every AUC. Training and scoring
run on one thread (17-token batches: 2-4x faster than two on a busy machine), seeded, deterministic.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from xaicli.descriptors import MetricContext
from xaicli.model import InputSpec, Model
from xaicli.params import resolve
from xaicli.registry import default_registry
from xaicli.rng import BatchRNG

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "demo"))
import train_digits  # noqa: E402

SEED = 0
EPOCHS = 12  # ~91 % held-out accuracy
EVALUATED = 48  # held-out digits scored
METHODS = {"AttnLRP": ("lrp", {"composite": "AttnLRP"}), "CP-LRP": ("lrp", {"composite": "CPLRP"}),
           "gradient×input": ("gradient_x_input", {}), "integrated gradients": ("integrated_gradients", {}),
           "random": (None, {})}


def build_vit() -> nn.Module:
    """timm's ViT (vit_tiny_patch16_224's family) cut down: 32×32 grey input, 8×8 patches, 2 blocks of width 64."""
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, in_chans=1,
                             embed_dim=64, num_heads=2, depth=2, mlp_ratio=2.0, num_classes=10)


def train_vit() -> tuple[nn.Module, float, torch.Tensor, torch.Tensor]:
    """Train on 80 % of the digits (seeded, deterministic); return the model, held-out accuracy and held-out data."""
    torch.manual_seed(SEED)
    images, labels = train_digits.digits_images()
    x, y = train_digits.normalise(images), torch.from_numpy(labels).long()
    gen = torch.Generator().manual_seed(SEED)
    order = torch.randperm(len(y), generator=gen)
    train_idx, test_idx = order[:1437], order[1437:]
    model = build_vit()
    steps = EPOCHS * -(-len(train_idx) // 32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.2)
    model.train()
    for _ in range(EPOCHS):
        for idx in train_idx[torch.randperm(len(train_idx), generator=gen)].split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            schedule.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        accuracy = (model(x[test_idx]).argmax(1) == y[test_idx]).float().mean().item()
    return model, accuracy, x[test_idx], y[test_idx]


def attribution(model: Model, method: str, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Relevance of `method` (a METHODS key) through xai's method plugins; random: seeded Gaussian noise."""
    name, params = METHODS[method]
    rng = BatchRNG(range(len(x)))
    if name is None:
        return rng.normal(x.shape[1:], device=x.device)
    plugin = default_registry().method(name)
    return plugin.explain(model, x, target, rng, **resolve(plugin.params, params)).relevance


def pixel_flipping(model: Model, x: torch.Tensor, target: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """xai's pixel_flipping metric (defaults: 32 steps, black baseline, softmax): one AUC per input."""
    metric = default_registry().metric("pixel_flipping")
    ctx = MetricContext(explain=None, masks=None, rng=BatchRNG(range(len(x))).child("pixel_flipping"))
    return metric.score(model, x, target, relevance, ctx, **resolve(metric.params, {}))


@pytest.fixture(scope="module")
def faithfulness_aucs() -> dict:
    """Mean pixel-flipping AUC per method over held-out digits the model classifies correctly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _score_methods()
    finally:
        torch.set_num_threads(threads)


def _score_methods() -> dict:
    start = time.perf_counter()
    module, accuracy, x, y = train_vit()
    trained = time.perf_counter() - start
    spec = InputSpec(size=(32, 32), channels=1, mean=tuple(train_digits.SPEC["mean"]),
                     std=tuple(train_digits.SPEC["std"]))
    model = Model("digits-vit", spec, torch.device("cpu"), module=module)
    with torch.no_grad():
        correct = (module(x).argmax(1) == y).nonzero().flatten()[:EVALUATED]
    x, y = x[correct], y[correct]
    aucs = {method: pixel_flipping(model, x, y, attribution(model, method, x, y)).mean().item() for method in METHODS}
    print(f"\naccuracy {accuracy:.3f}, trained in {trained:.1f} s; pixel-flipping AUC (lower is better):",
          ", ".join(f"{m} {a:.4f}" for m, a in aucs.items()))
    return {"accuracy": accuracy, "aucs": aucs}


def test_model_learned_digits(faithfulness_aucs: dict) -> None:
    assert faithfulness_aucs["accuracy"] >= 0.85


def test_attnlrp_beats_gradient_x_input_and_random(faithfulness_aucs: dict) -> None:
    aucs = faithfulness_aucs["aucs"]
    assert aucs["AttnLRP"] < aucs["gradient×input"], aucs
    assert aucs["AttnLRP"] < aucs["random"], aucs


def test_all_methods_scored(faithfulness_aucs: dict) -> None:
    aucs = faithfulness_aucs["aucs"]
    assert set(aucs) == set(METHODS) and all(0.0 <= a <= 1.0 for a in aucs.values()), aucs
