"""The LRP engine on whole graphs: canonization, conservation, names, isolation from the user's model."""
from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

from xaicli.graph import from_module
from xaicli.lrp import COMPOSITES, LRP, Settings, UnknownLayer, canonize, composite, parse_rules_by_name
from xaicli.model import InputSpec, Model
from xaicli.registry import create_registry


def batch_norm(n: int, gen: torch.Generator, dims: int = 2) -> nn.Module:
    """A BatchNorm with non-trivial statistics and affine parameters (so folding is really tested)."""
    bn = (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(n)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(n, generator=gen) * 0.3)
        bn.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
        bn.weight.copy_(torch.rand(n, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(n, generator=gen) * 0.3)
    return bn


class Folds(nn.Module):
    """BatchNorm after grouped, depthwise, transposed convs and a linear layer, plus one with nothing to fold into."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.pre = batch_norm(3, gen)
        self.conv, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), batch_norm(8, gen)
        self.depthwise, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), batch_norm(8, gen)
        self.grouped, self.bn3 = nn.Conv2d(8, 12, 1, groups=4), batch_norm(12, gen)
        self.up, self.bn4 = nn.ConvTranspose2d(12, 6, 2, stride=2, groups=2), batch_norm(6, gen)
        self.fc, self.bn5 = nn.Linear(6, 5), batch_norm(5, gen, dims=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv(self.pre(x))))
        x = torch.relu(self.bn2(self.depthwise(x)))
        x = torch.relu(self.bn3(self.grouped(x)))
        x = torch.relu(self.bn4(self.up(x)))
        return self.bn5(self.fc(x.mean((2, 3))))


def test_canonize_folds_batch_norm_into_any_conv_and_linear() -> None:
    torch.manual_seed(0)
    net, x = Folds().eval(), torch.randn(3, 3, 8, 8)
    canonical = canonize(from_module(net, x))
    ops = [n.target.__name__ for n in canonical.graph.nodes if n.op == "call_function"]
    assert ops.count("batch_norm.default") == 1  # only `pre`, which follows no conv/linear
    torch.testing.assert_close(canonical(x), net(x), rtol=1e-5, atol=1e-5)


def test_zennit_parity_with_grouped_and_depthwise_convolutions() -> None:
    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonGammaBox

    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), batch_norm(8, gen), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8), batch_norm(8, gen), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, padding=1, groups=2), batch_norm(16, gen), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 4)).eval()
    for bn in net.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.eps = 0.0  # Zennit's merge leaves each BatchNorm as x/sqrt(1+eps); eps=0 makes both forms equal
    x, target = torch.randn(3, 3, 12, 12), torch.tensor([0, 1, 2])
    ours = LRP(from_module(net, x), composite("EpsilonGammaBox"))(x, target).relevance
    with Gradient(net, EpsilonGammaBox(low=-3.0, high=3.0, canonizers=[SequentialMergeBatchNorm()])) as attributor:
        _, theirs = attributor(x, attr_output=lambda out: torch.eye(4)[target] * out)
    error = (ours - theirs).flatten(1).abs().amax(1) / theirs.flatten(1).abs().amax(1)
    assert error.max() < 1e-5


class BiasFree(nn.Module):
    """No biases: conv, ReLU, max pooling, a residual sum, a concatenation, average pooling, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.c3 = nn.Conv2d(8, 4, 1, bias=False)
        self.fc = nn.Linear(48, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)
        b = torch.relu(self.c2(a)) + a
        c = torch.cat([b, torch.relu(self.c3(b))], dim=1)
        return self.fc(nn.functional.avg_pool2d(c, 2).flatten(1))


@pytest.fixture(scope="module")
def bias_free() -> tuple[nn.Module, torch.Tensor, torch.fx.GraphModule]:
    torch.manual_seed(0)
    net, x = BiasFree().eval(), torch.randn(4, 3, 8, 8)
    return net, x, from_module(net, x)


@pytest.mark.parametrize("name", COMPOSITES)
def test_conservation_on_a_bias_free_network(bias_free, name: str) -> None:
    net, x, graph = bias_free
    logits = net(x).detach()
    target = logits.argmax(1)
    settings = Settings(epsilon=1e-9, stabilizer=1e-9)
    result = LRP(graph, composite(name, settings), record=["c1", "add", "cat", "fc"])(x, target)  # graph cuts
    want = logits.gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(result.relevance.flatten(1).sum(1), want, rtol=1e-5, atol=1e-7)
    for layer, relevance in result.recorded.items():
        torch.testing.assert_close(relevance.flatten(1).sum(1), want, rtol=1e-5, atol=1e-7, msg=layer)


def test_lrp_leaves_the_users_model_unchanged() -> None:
    torch.manual_seed(0)
    net, x = Folds().eval(), torch.randn(2, 3, 8, 8)
    before = {k: (id(v), v.detach().clone()) for k, v in [*net.named_parameters(), *net.named_buffers()]}
    out_before = net(x).detach()
    model = Model("folds", InputSpec(size=(8, 8)), torch.device("cpu"), module=net)
    graph_before = {k: v.detach().clone() for k, v in model.graph().state_dict().items()}
    method = create_registry().method("lrp")
    for name in COMPOSITES:
        method.explain(model, x, torch.tensor([0, 1]), None, composite=name)
    for key, value in [*net.named_parameters(), *net.named_buffers()]:
        assert id(value) == before[key][0] and torch.equal(value, before[key][1]), key
    assert torch.equal(net(x), out_before)
    assert all(torch.equal(v, graph_before[k]) for k, v in model.graph().state_dict().items())


def test_record_layers_by_module_path_and_folded_names() -> None:
    torch.manual_seed(0)
    net, x = Folds().eval(), torch.randn(2, 3, 8, 8)
    lrp = LRP(from_module(net, x), composite("EpsilonPlusFlat"), record=["bn2", "depthwise", "fc"])
    result = lrp(x, torch.tensor([0, 1]))
    # bn2 was folded into `depthwise`: both names mean the output of the folded layer
    assert torch.equal(result.recorded["bn2"], result.recorded["depthwise"])
    assert result.recorded["bn2"].shape == (2, 8, 8, 8) and result.recorded["fc"].shape == (2, 5)
    with pytest.raises(UnknownLayer, match="no layer 'depthwsie'.*close names: depthwise"):
        LRP(lrp.graph, composite("EpsilonPlusFlat"), record=["depthwsie"])


def test_rules_by_name_apply_inside_a_module() -> None:
    net = torchvision.models.resnet18(weights=None).eval()
    graph = from_module(net, torch.randn(2, 3, 32, 32))
    chosen = composite("EpsilonGammaBox").override(by_name=parse_rules_by_name({"layer2": "epsilon", "fc": "gamma"}))
    rules = {name: rule for name, _, rule in LRP(graph, chosen).rules()}
    assert rules["conv1"] == "z_box" and rules["layer1_0_conv1"] == "gamma"
    assert {rules[n] for n in rules if n.startswith("layer2_") and "conv" in n} == {"epsilon"}
    assert rules["layer2_0_downsample_0"] == "epsilon" and rules["fc"] == "gamma"
    with pytest.raises(ValueError, match="rule 'pass' applies to none of the nodes of 'fc'"):
        LRP(graph, composite("EpsilonPlus").override(by_name=parse_rules_by_name({"fc": "pass"})))


def realistic_batch_norms(net: nn.Module) -> nn.Module:
    """Random-init torchvision nets have BN stats that shrink activations to ~1e-10; use milder ones."""
    gen = torch.Generator().manual_seed(1)
    for bn in net.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) * 0.3 + 0.3)
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen) * 0.05)
    return net


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0"])
def test_grouped_depthwise_and_gated_architectures(name: str) -> None:
    torch.manual_seed(0)
    net = realistic_batch_norms(getattr(torchvision.models, name)(weights=None).eval())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    lrp = LRP(from_module(net, x), composite("EpsilonGammaBox"))
    result = lrp(x, torch.tensor([1, 2]))
    logits = net(x).detach()
    torch.testing.assert_close(result.logits, logits, rtol=1e-4, atol=1e-5 * logits.abs().max().item())
    assert result.relevance.shape == x.shape and bool(result.relevance.isfinite().all())
    assert bool((result.relevance.flatten(1).abs().amax(1) > 0).all())
    kinds = {kind for _, kind, _ in lrp.rules()}
    assert {"conv", "gate", "sum", "pool", "activation"} <= kinds


def test_vision_transformer_runs_without_model_specific_code() -> None:
    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    lrp = LRP(from_module(net, x), composite("EpsilonPlusFlat"))
    result = lrp(x, torch.tensor([1, 2]))
    torch.testing.assert_close(result.logits, net(x).detach(), rtol=1e-4, atol=1e-5)
    assert bool(result.relevance.isfinite().all()) and bool((result.relevance.abs().amax((1, 2, 3)) > 0).all())
    rules = {(kind, rule) for _, kind, rule in lrp.rules()}
    assert {("matmul", "norm"), ("norm", "pass"), ("linear", "epsilon"), ("conv", "flat")} <= rules


def test_layers_read_only_by_relus_skip_gamma_negative_share_with_the_same_result() -> None:
    """A node read only by ReLUs gets relevance only where it is > 0 (every later rule multiplies by
    its input), so gamma skips its negative share there; a residual branch's last conv is read by a
    sum, can carry relevance where it is negative, and keeps it."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    graph = from_module(net, x)
    engine = LRP(graph, composite("EpsilonGammaBox", Settings(low=-3.0, high=3.0)))
    flagged = {step.node.name for step in engine.steps if step.positive_only}
    assert {"conv1", "layer1_0_conv1", "layer4_1_conv1"} <= flagged
    assert not flagged & {"layer1_0_conv2", "layer2_0_downsample_0", "fc"}
    plain = LRP(graph, composite("EpsilonGammaBox", Settings(low=-3.0, high=3.0)))
    for step in plain.steps:
        step.positive_only = False
    t = torch.tensor([3, 7])
    ours, full = engine(x, t).relevance, plain(x, t).relevance
    assert ((ours - full).abs().max() / full.abs().max()).item() <= 1e-6
