"""LRP for attention (AttnLRP, CP-LRP; Achtibat et al., ICML 2024) and for divisions by a graph tensor:
each rule on one operation against hand-computed numbers, conservation on toy networks and a tiny ViT."""
from __future__ import annotations

import math
import re

import pytest
import timm
import torch
from torch import nn
from typer.testing import CliRunner

from xaicli.cli import app
from xaicli.graph import from_module
from xaicli.lrp import LRP, Settings, composite, conservation, leaks, parse_rules_by_type
from xaicli.lrp.nodes import has_attention, kind, signal
from xaicli.lrp.rules import Call, Taylor
from xaicli.model import InputSpec, Model
from xaicli.registry import create_registry

EXACT = Settings(epsilon=0.0, stabilizer=1e-12)  # LRP-0: hand-computed values need no stabiliser


def relevance(net: nn.Module, x: torch.Tensor, name: str, target: int = 0, settings: Settings = EXACT) -> torch.Tensor:
    """Input relevance of `net` (float64) for one target logit under composite `name`."""
    net = net.double().eval()
    x = x.double()
    lrp = LRP(from_module(net, x), composite(name, settings), channels_last=False)
    return lrp(x, torch.full((x.shape[0],), target)).relevance


# --- softmax: R_in = x ⊙ (R − s ⊙ ΣR) ------------------------------------------------------------------------

def test_softmax_rule_by_hand_with_a_masked_input() -> None:
    x = torch.tensor([[1.0, 2.0, -math.inf]], dtype=torch.float64)
    s = torch.softmax(x, -1)
    r = torch.tensor([[0.5, 1.0, 0.25]], dtype=torch.float64)
    (got,) = Taylor().relevance(Call([x], s, meta={"dim": -1}), r)
    s1, s2 = math.e / (math.e + math.e**2), math.e**2 / (math.e + math.e**2)
    want = [1.0 * (0.5 - s1 * 1.75), 2.0 * (1.0 - s2 * 1.75), 0.0]  # ΣR = 1.75; the masked input gets 0
    torch.testing.assert_close(got, torch.tensor([want], dtype=torch.float64))


def test_softmax_rule_follows_the_softmax_dim() -> None:
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]], dtype=torch.float64)
    s = torch.softmax(x, 0)
    r = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    (got,) = Taylor().relevance(Call([x], s, meta={"dim": 0}), r)
    a = 1 / (1 + math.e**2)  # softmax([1, 3])[0]
    want = [[1.0 * (1.0 - a * 4.0), 0.0], [3.0 * (3.0 - (1 - a) * 4.0), 0.0]]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))


# --- matmul: ε-rule, half to each operand (AttnLRP) or all to the values (CP-LRP) -----------------------------

class Bilinear(nn.Module):
    """[a1 a2] @ [b1 b2]ᵀ of two halves of the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, None, :2] @ x[:, 2:, None]).reshape(-1, 1)


class Attention(nn.Module):
    """softmax(x[:2]) @ x[2:]: attention weights times values."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.softmax(x[:, None, :2], -1) @ x[:, 2:, None]).reshape(-1, 1)


@pytest.mark.parametrize("name", ["AttnLRP", "CPLRP"])
def test_matmul_of_two_tensors_splits_uniformly(name: str) -> None:
    got = relevance(Bilinear(), torch.tensor([[1.0, 2.0, 3.0, 4.0]]), name)
    # z = 1·3 + 2·4 = 11; a_i·b_i/2 to each operand (no softmax operand: both composites agree)
    torch.testing.assert_close(got, torch.tensor([[1.5, 4.0, 1.5, 4.0]], dtype=torch.float64))


def test_attention_weights_get_relevance_in_attnlrp_only() -> None:
    x = torch.tensor([[0.0, math.log(3.0), 3.0, 4.0]])  # weights s = [1/4, 3/4], values [3, 4], z = 3.75
    cp = relevance(Attention(), x, "CPLRP")
    torch.testing.assert_close(cp, torch.tensor([[0.0, 0.0, 0.75, 3.0]], dtype=torch.float64))
    attn = relevance(Attention(), x, "AttnLRP")
    # values get half: [0.375, 1.5]; weights get half, [0.375, 1.5] (ΣR = 1.875), then the softmax rule
    want = [0.0, math.log(3.0) * (1.5 - 0.75 * 1.875), 0.375, 1.5]
    torch.testing.assert_close(attn, torch.tensor([want], dtype=torch.float64))


# --- layer norm: σ constant, ε-rule on w ⊙ (x − mean x)/σ + b ------------------------------------------------

def test_layer_norm_with_constant_std_by_hand() -> None:
    norm = nn.LayerNorm(3, eps=0.0)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([2.0, 1.0, 1.0]))
        norm.bias.copy_(torch.tensor([0.0, 0.0, 0.5]))
    got = relevance(norm, torch.tensor([[1.0, 2.0, 3.0]]), "AttnLRP", target=2)
    sigma = math.sqrt(2 / 3)  # x = [1, 2, 3]: mean 2, variance 2/3
    # R_i = x_i·W_2i with W_2i = w_2·(δ_2i − 1/3)/σ; the bias 0.5 keeps its share of y_2 = 1/σ + 0.5
    want = [1.0 * (-1 / 3) / sigma, 2.0 * (-1 / 3) / sigma, 3.0 * (2 / 3) / sigma]
    torch.testing.assert_close(got, torch.tensor([want], dtype=torch.float64))
    assert [r for _, k, r in LRP(from_module(norm.float(), torch.ones(1, 3)), composite("AttnLRP")).rules()
            if k == "norm"] == ["std_constant"]


def test_group_norm_with_constant_std_conserves_without_bias() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(64, 3, bias=False))
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.zero_()
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    got = relevance(net, x, "AttnLRP", target=1).flatten(1).sum(1)
    torch.testing.assert_close(got, net(x)[:, 1].detach())


# --- division by a graph tensor: the divisor is a constant -------------------------------------------------

class Divide(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :2] / x[:, 2:3]


def test_division_by_a_graph_tensor_sends_all_relevance_to_the_numerator() -> None:
    x = torch.tensor([[2.0, 4.0, 0.5]])
    graph = from_module(Divide(), x)
    div = next(n for n in graph.graph.nodes if n.op == "call_function" and "div" in str(n.target))
    assert (kind(div), signal(div)) == ("gate", (0,))
    for name in ("EpsilonPlusFlat", "AttnLRP"):
        torch.testing.assert_close(relevance(Divide(), x, name), torch.tensor([[4.0, 0.0, 0.0]], dtype=torch.float64))


class Outer(nn.Module):
    """An element-wise product of two graph tensors that both broadcast: a[:, i]·b[j]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, :2, None] * x[:, None, 2:]).flatten(1)


def test_product_of_two_broadcast_tensors_splits_uniformly() -> None:
    # logit 0 is a_1·b_1 = 1·3: half to each factor (AttnLRP's uniform rule), summed back to its shape
    torch.testing.assert_close(relevance(Outer(), torch.tensor([[1.0, 2.0, 3.0, 4.0]]), "EpsilonPlusFlat"),
                               torch.tensor([[1.5, 0.0, 1.5, 0.0]], dtype=torch.float64))


class LinearAttention(nn.Module):
    """Bias-free: a normalisation by a graph tensor, an element-wise product of two graph tensors and a
    product of two graph matrices (efficientvit-style linear attention), no softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(12, 12, bias=False) for _ in range(3))
        self.gate = nn.Linear(12, 12, bias=False)
        self.head = nn.Linear(12, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = torch.relu(self.q(x)), torch.relu(self.k(x)), self.v(x)  # [B, 4, 12] tokens
        kv = k.transpose(1, 2) @ v
        out = (q @ kv) / (q @ k.sum(1, keepdim=True).transpose(1, 2) + 1e-3)
        out = out * torch.relu(self.gate(x))
        return self.head(out.mean(1))


@pytest.mark.parametrize("name", ["AttnLRP", "CPLRP", "EpsilonPlusFlat"])
def test_toy_network_with_a_division_conserves(name: str) -> None:
    torch.manual_seed(0)
    net, x = LinearAttention().double().eval(), torch.randn(3, 4, 12, dtype=torch.float64)
    logits = net(x).detach()
    target = logits.argmax(1)
    lrp = LRP(from_module(net, x), composite(name, Settings(epsilon=1e-12, stabilizer=1e-12)), channels_last=False)
    result = lrp(x, target, flows=True)
    torch.testing.assert_close(result.relevance.flatten(1).sum(1), logits.gather(1, target[:, None]).squeeze(1),
                               rtol=1e-5, atol=1e-8)
    assert conservation(result).max() < 1e-5 and leaks(result, 1e-5) == []


# --- rule specs -----------------------------------------------------------------------------------------------

def test_rule_specs_for_attention_kinds() -> None:
    rules = parse_rules_by_type({"softmax": "taylor", "matmul": "uniform:1e-8", "norm": "std_constant",
                                 "activation": "pass"})
    assert [r.name for r in rules.values()] == ["taylor", "uniform", "std_constant", "pass"]
    assert rules["matmul"].epsilon == 1e-8
    with pytest.raises(ValueError, match="rule 'uniform' does not apply to softmax layers; allowed: taylor, gradient"):
        parse_rules_by_type({"softmax": "uniform"})
    with pytest.raises(ValueError, match="rule 'std_constant' does not apply to linear layers"):
        parse_rules_by_type({"linear": "std_constant"})
    with pytest.raises(ValueError, match=r"unknown rule 'unifrom' \(did you mean 'uniform'\?\)"):
        parse_rules_by_type({"matmul": "unifrom"})
    with pytest.raises(ValueError, match="uniform takes 1 number"):
        parse_rules_by_type({"matmul": "uniform:1,2"})


# --- a tiny timm ViT ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vit() -> tuple[nn.Module, torch.Tensor, torch.fx.GraphModule]:
    """A random 2-block ViT (32² input, 8² patches) in float64, biases, class token and positions zeroed."""
    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                            num_classes=10).double().eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("bias") or name in ("cls_token", "pos_embed"):
                p.zero_()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    return net, x, from_module(net, x)


def test_vit_rules_per_composite(vit) -> None:
    _, _, graph = vit
    assert has_attention(graph.graph.nodes)
    for name, matmul in (("AttnLRP", "uniform"), ("CPLRP", "epsilon")):
        rules = {(k, r) for _, k, r in LRP(graph, composite(name)).rules() if k not in ("shape", "other")}
        assert rules == {("conv", "epsilon"), ("linear", "epsilon"), ("matmul", matmul), ("softmax", "taylor"),
                         ("norm", "std_constant"), ("activation", "pass"), ("gate", "pass"), ("sum", "norm")}, name
    gamma = composite("AttnLRP").override(parse_rules_by_type({"linear": "gamma"}))
    assert {r for _, k, r in LRP(graph, gamma).rules() if k == "linear"} == {"gamma"}


def test_vit_conserves_except_at_softmax_under_attnlrp(vit) -> None:
    net, x, graph = vit
    target = torch.tensor([1, 2])
    settings = Settings(epsilon=1e-12, stabilizer=1e-12)
    cp = LRP(graph, composite("CPLRP", settings), channels_last=False)(x, target)
    assert conservation(cp).max() < 1e-6  # attention weights constant: every rule conserves
    result = LRP(graph, composite("AttnLRP", settings), channels_last=False)(x, target, flows=True)
    lost = {name: float(out - sent) for name, (out, sent) in result.flows.items()}
    softmax = sum(v for name, v in lost.items() if "softmax" in name)
    others = max(abs(v) for name, v in lost.items() if "softmax" not in name)
    scale = float(result.explained.abs().sum())
    # only the softmax rule (Prop. 3.1: linearised at its input, the rest a bias) loses relevance ...
    assert others < 1e-8 * scale
    total = float((result.explained - result.relevance.flatten(1).sum(1)).sum())
    assert abs(total - softmax) < 1e-8 * scale
    # ... and on this random ViT it loses 46-53 % of the logit (measured); a trained ViT's softmax inputs are
    # more peaked, so this random-init case is the loose end: half the logit must still reach the pixels
    assert conservation(result).max() < 0.6
    assert {name for name, _ in leaks(result, 0.05)} <= {n for n in lost if "softmax" in n}


def test_auto_composite_is_attnlrp_for_attention(vit) -> None:
    net, x, graph = vit
    method = create_registry().method("lrp")
    model = Model("vit", InputSpec(size=(32, 32)), torch.device("cpu"), module=net.float())
    xf, target = x.float(), torch.tensor([3, 4])
    auto = method.explain(model, xf, target, None, composite="auto").relevance
    attn = method.explain(model, xf, target, None, composite="AttnLRP").relevance
    torch.testing.assert_close(auto, attn)
    net.double()
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2), nn.Softmax(-1))
    assert not has_attention(from_module(cnn, torch.randn(1, 3, 4, 4)).graph.nodes)  # a softmax alone is no attention


def test_plugins_show_lrp_names_the_composites() -> None:
    result = CliRunner().invoke(app, ["plugins", "show", "lrp"], terminal_width=200)
    assert result.exit_code == 0, result.output
    words = set(re.findall(r"[\w:]+", result.output))
    for word in ("AttnLRP", "CPLRP", "auto", "attention", "EpsilonPlusFlat", "uniform", "std_constant", "taylor",
                 "softmax"):
        assert word in words, word
