"""Parity with Zennit 0.5.1 (the test oracle) on torchvision vgg16, vgg16_bn and resnet18 and real photos.

Random-init weights (no downloads) with random BatchNorm statistics, a fixed target class (random
nets have near-chance logits, so argmax targets would differ for no reason), Zennit with its
canonizers (SequentialMergeBatchNorm for vgg16_bn, ResNetCanonizer for resnet18) and its attributor
started at one_hot(target) * logits — our convention.

Zennit's MergeBatchNorm leaves each merged BatchNorm computing x / sqrt(1 + eps) (running_var is set
to 1, eps kept), a 5e-6 change per layer that near-zero denominators amplify; our fold is exact.
The BatchNorm models therefore use eps = 0, where both canonical forms are the same function.

Max pooling's winner-take-all is discontinuous: a one-ulp difference between two entries of a window
moves a pixel's relevance to its neighbour. Our engine runs convolutions in NHWC on CPUs by default
(faster), which rounds differently from Zennit's NCHW, so parity is checked in NCHW
(`channels_last=False`); test_channels_last_changes_only_rounding covers the default layout.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from skimage import data
from skimage.transform import resize

from xaicli.graph import from_module
from xaicli.lrp import LRP, Settings, composite

SIZES = {"vgg16": 64, "vgg16_bn": 64, "resnet18": 112}
TARGET = 3
COMPOSITES = ["EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonAlpha2Beta1"]


def photos(size: int) -> torch.Tensor:
    """astronaut, coffee and chelsea, resized to size×size and normalised like ImageNet inputs."""
    originals = (data.astronaut(), data.coffee(), data.chelsea())
    images = [resize(image, (size, size), anti_aliasing=True) for image in originals]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def network(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    net = getattr(torchvision.models, name)(weights=None).eval()
    gen = torch.Generator().manual_seed(1)
    for bn in net.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            bn.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            bn.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            bn.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)
            bn.eps = 0.0
    return net.requires_grad_(False)


@pytest.fixture(scope="module")
def models() -> dict:
    return {}


def prepared(models: dict, name: str) -> tuple[torch.nn.Module, torch.fx.GraphModule, torch.Tensor]:
    if name not in models:
        net, x = network(name), photos(SIZES[name])
        models[name] = (net, from_module(net, x), x)
    return models[name]


def zennit_relevance(net: torch.nn.Module, name: str, comp: str, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    from zennit import composites
    from zennit.attribution import Gradient
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    canonizers = {"vgg16": [], "vgg16_bn": [VGGCanonizer()], "resnet18": [ResNetCanonizer()]}[name]
    kwargs = {"low": -3.0, "high": 3.0} if comp == "EpsilonGammaBox" else {}
    with Gradient(net, getattr(composites, comp)(canonizers=canonizers, **kwargs)) as attributor:
        _, relevance = attributor(x.clone(), attr_output=lambda out: torch.eye(out.shape[1])[target] * out)
    return relevance


@pytest.mark.parametrize("comp", COMPOSITES)
@pytest.mark.parametrize("name", list(SIZES))
def test_matches_zennit(models: dict, name: str, comp: str) -> None:
    net, graph, x = prepared(models, name)
    target = torch.full((len(x),), TARGET)
    ours = LRP(graph, composite(comp, Settings(low=-3.0, high=3.0)), channels_last=False)(x, target).relevance
    theirs = zennit_relevance(net, name, comp, x, target)
    error = (ours - theirs).flatten(1).abs().amax(1) / theirs.flatten(1).abs().amax(1)
    assert error.max().item() <= 1e-4, error.tolist()


def test_channels_last_changes_only_rounding(models: dict) -> None:
    """NHWC and NCHW give the same logits and layer sums up to rounding (resnet18: one max pool, early)."""
    _, graph, x = prepared(models, "resnet18")
    target = torch.full((len(x),), TARGET)
    nhwc, nchw = (LRP(graph, composite("EpsilonGammaBox"), record=["layer1", "layer4"], channels_last=layout)(x, target)
                  for layout in (True, False))
    torch.testing.assert_close(nhwc.logits, nchw.logits, rtol=1e-5, atol=1e-5)
    for name in ("layer1", "layer4"):
        torch.testing.assert_close(nhwc.recorded[name], nchw.recorded[name], rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(nhwc.relevance.flatten(1).sum(1), nchw.relevance.flatten(1).sum(1), rtol=1e-4, atol=1e-7)
