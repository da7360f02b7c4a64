"""CRP parity with a masked-Zennit oracle (must-show 1) on torchvision vgg16 and resnet18 and real photos.

Oracle: zennit-crp pins zennit<=0.4.6 and cannot be installed next to zennit 0.5.1 (our LRP
oracle), so the oracle is written here the way zennit-crp's CondAttribution works: a Zennit
composite on the torchvision model, a forward hook on each conditioned module (registered after
the composite's, so it holds the output Zennit's rule hooks read), and the backward run as
CondAttribution runs it — restarted at each conditioned output with its relevance masked to the
condition's channel (exclude_parallel=True, its default), or with the masks as gradient hooks
(exclude_parallel=False). One attribution per concept; relevance starts at one_hot(target) * logits,
as in zennit-crp. (Checked once by hand against zennit-crp 0.6.0 itself, on zennit 0.4.6 in a
separate environment: the same cases agree to <= 1.1e-5 relative, see bench/bench_crp.py.) Photos, models (random init) and NCHW layout as in
test_lrp_parity; two-layer conditions use the upper layer's most relevant channel (random nets
leave many channels without relevance).
"""
from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch

from test_lrp_parity import network, photos
from xaicli.concepts.conditional import ConditionalLRP, channel_scores
from xaicli.graph import from_module
from xaicli.lrp import LRP, Settings, composite

TARGET = 3


def oracle(net: torch.nn.Module, name: str, comp: str, x: torch.Tensor, target: torch.Tensor,
           conditions: list[tuple[str, int]], parallel: bool = False) -> torch.Tensor:
    """Zennit with each conditioned module's output relevance masked to one channel (`conditions`
    from the output side down). Without `parallel`, as zennit-crp's exclude_parallel=True: the
    backward restarts at each conditioned output, so relevance bypassing it (shortcuts) is dropped."""
    from zennit import composites
    from zennit.torchvision import ResNetCanonizer

    modules = dict(net.named_modules())
    kwargs = {"low": -3.0, "high": 3.0} if comp == "EpsilonGammaBox" else {}
    canonizers = [ResNetCanonizer()] if name.startswith("resnet") else []
    outputs: dict[str, torch.Tensor] = {}
    keeps = {}
    with getattr(composites, comp)(canonizers=canonizers, **kwargs).context(net) as modified, ExitStack() as hooks:
        for layer, channel in conditions:
            def capture(module, inputs, output, layer=layer, channel=channel):
                keeps[layer] = torch.zeros_like(output)
                keeps[layer][:, channel] = 1
                outputs[layer] = output
                if parallel:
                    output.register_hook(lambda grad: grad * keeps[layer])
            hooks.callback(modules[layer].register_forward_hook(capture).remove)
        x = x.clone().requires_grad_(True)
        out = modified(x)
        wrt, grad = out, torch.eye(out.shape[1], dtype=out.dtype)[target] * out
        if not parallel:
            for layer, _ in conditions:
                (relevance,) = torch.autograd.grad(wrt, outputs[layer], grad, retain_graph=True)
                wrt, grad = outputs[layer], relevance * keeps[layer]
        (relevance,) = torch.autograd.grad(wrt, x, grad)
    return relevance


def lively(graph: torch.fx.GraphModule, x: torch.Tensor, target: torch.Tensor, layer: str) -> int:
    """The channel of `layer` with the most relevance in every input (random nets leave many channels dead)."""
    recorded = LRP(graph, composite("EpsilonPlusFlat"), record=[layer], channels_last=False)(x, target).recorded[layer]
    return int(channel_scores(recorded, "relevance").abs().amin(0).argmax())


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    scale = theirs.flatten(1).abs().amax(1).clamp_min(1e-30)
    return ((ours - theirs).flatten(1).abs().amax(1) / scale).max().item()


@pytest.fixture(scope="module")
def models() -> dict:
    return {}


def prepared(models: dict, name: str, size: int, dtype: torch.dtype = torch.float32):
    key = (name, dtype)
    if key not in models:
        net, x = network(name).to(dtype), photos(size).to(dtype)
        models[key] = (net, from_module(net, x), x)
    return models[key]


CASES = [  # model, input size, layer, channels, upper condition (layer, None: its most relevant channel), composite,
    # keep relevance bypassing the layers (parallel)
    ("vgg16", 64, "features.28", [3, 411], None, "EpsilonPlusFlat", False),
    ("vgg16", 64, "features.20", [0, 300], None, "EpsilonGammaBox", False),
    ("vgg16", 64, "features.20", [5, 250], ("features.28", None), "EpsilonPlusFlat", False),
    ("resnet18", 64, "layer3.1.conv1", [2, 200], None, "EpsilonPlusFlat", False),
    ("resnet18", 64, "layer3.1.conv1", [2, 200], None, "EpsilonPlusFlat", True),
    ("resnet18", 64, "layer4.0", [11, 300], None, "EpsilonGammaBox", False),
    ("resnet18", 64, "layer3.0.conv2", [7, 99], ("layer4.1.conv1", None), "EpsilonAlpha2Beta1", False),
    ("resnet18", 64, "layer3.0.conv2", [7, 99], ("layer4.1.conv1", None), "EpsilonPlusFlat", True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[2]}{'-cond' if c[4] else ''}-{c[5]}"
                                                     f"{'-parallel' if c[6] else ''}")
def test_matches_masked_zennit(models: dict, case: tuple) -> None:
    name, size, layer, channels, upper, comp, parallel = case
    net, graph, x = prepared(models, name, size)
    target = torch.full((len(x),), TARGET)
    if upper:
        upper = (upper[0], lively(graph, x, target, upper[0]))
    engine = ConditionalLRP(graph, composite(comp, Settings(low=-3.0, high=3.0)), layer, upper, channels_last=False,
                            parallel=parallel)
    result = engine(x, target, lambda r: torch.tensor(channels).expand(len(r), -1))
    assert result.relevance.shape == (len(x), len(channels), *x.shape[1:])
    for k, channel in enumerate(channels):
        conditions = ([upper] if upper else []) + [(layer, channel)]
        theirs = oracle(net, name, comp, x, target, conditions, parallel)
        assert theirs.abs().amax() > 0
        error = relative_error(result.relevance[:, k], theirs)
        assert error <= 1e-4, (layer, channel, error)


def test_float64_matches_to_1e_10(models: dict) -> None:
    net, graph, x = prepared(models, "vgg16", 32, torch.float64)
    target = torch.full((len(x),), TARGET)
    upper = lively(graph, x, target, "features.28")
    engine = ConditionalLRP(graph, composite("EpsilonPlusFlat"), "features.20", ("features.28", upper), channels_last=False)
    result = engine(x, target, lambda r: torch.tensor([1, 42]).expand(len(r), -1))
    for k, channel in enumerate((1, 42)):
        theirs = oracle(net, "vgg16", "EpsilonPlusFlat", x, target, [("features.28", upper), ("features.20", channel)])
        assert relative_error(result.relevance[:, k], theirs) <= 1e-10
