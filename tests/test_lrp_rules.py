"""Each LRP rule on one layer, against numbers computed by hand (derivations in the comments).

Relevance starts as the target logit (0 elsewhere), so for a one-layer model R_out = z_t.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from xaicli.graph import from_module
from xaicli.lrp import LRP, Settings, composite, parse_rule, parse_rules_by_type
from xaicli.lrp.rules import stabilize

W = [[1.0, -2.0, 3.0], [0.5, 1.0, -1.0]]
B = [0.5, -1.0]


def dense(weight=W, bias=B) -> nn.Module:
    layer = nn.Linear(len(weight[0]), len(weight), bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        if bias is not None:
            layer.bias.copy_(torch.tensor(bias))
    return layer.eval()


def run(module: nn.Module, x: list, rule: str, kind: str = "linear", target: int = 0, **settings) -> torch.Tensor:
    x_t = torch.tensor([x, x])  # batch of two: the graph has a dynamic batch
    s = Settings(**settings)
    lrp = LRP(from_module(module, x_t), composite("EpsilonPlus", s).override(parse_rules_by_type({kind: rule}, s)))
    return lrp(x_t, torch.tensor([target, target])).relevance[0]


def close(got: torch.Tensor, want: list) -> None:
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-6)


# x = [2, 1, 1]: contributions x·w₀ = [2, -2, 3], z₀ = 3 + 0.5 = 3.5 = R_out
def test_epsilon() -> None:
    close(run(dense(), [2.0, 1.0, 1.0], "epsilon:0.5"), [1.75, -1.75, 2.625])  # [2,-2,3]·3.5/(3.5+0.5)


def test_lrp_zero_gives_contributions() -> None:
    close(run(dense(), [2.0, 1.0, 1.0], "epsilon:0"), [2.0, -2.0, 3.0])  # [2,-2,3]·3.5/3.5


def test_z_plus() -> None:
    close(run(dense(), [2.0, 1.0, 1.0], "z_plus"), [14 / 11, 0.0, 21 / 11])  # [2,0,3]·3.5/(5+b⁺ 0.5)


def test_alpha_beta() -> None:
    # 2·[2,0,3]·3.5/5.5 − 1·[0,-2,0]·3.5/(−2 + b⁻ 0)
    close(run(dense(), [2.0, 1.0, 1.0], "alpha_beta:2,1"), [28 / 11, -3.5, 42 / 11])


def test_gamma() -> None:
    # z₀ > 0: w + γw⁺ = [1.5,-2,4.5], b + γb⁺ = 0.75; [3,-2,4.5]·3.5/(5.5+0.75)
    close(run(dense(), [2.0, 1.0, 1.0], "gamma:0.5"), [1.68, -1.12, 2.52])


def test_z_box() -> None:
    # x·w − l·w⁺ − h·w⁻ with l=-1, h=2: [2+1, -2+4, 3+3] = [3,2,6] (biases cancel); [3,2,6]·3.5/11
    close(run(dense(), [2.0, 1.0, 1.0], "z_box:-1,2"), [10.5 / 11, 7 / 11, 21 / 11])


def test_z_box_per_channel_bounds() -> None:
    # l = [-1,-1,0], h = [2,3,2]: [2+1, -2+6, 3+0] = [3,4,3]; [3,4,3]·3.5/10
    s = Settings(low=(-1.0, -1.0, 0.0), high=(2.0, 3.0, 2.0))
    close(run(dense(), [2.0, 1.0, 1.0], "z_box", low=s.low, high=s.high), [1.05, 1.4, 1.05])


def test_flat() -> None:
    close(run(dense(), [2.0, 1.0, 1.0], "flat"), [3.5 / 3] * 3)


def test_w_square() -> None:
    close(run(dense(), [2.0, 1.0, 1.0], "w_square"), [0.25, 1.0, 2.25])  # [1,4,9]·3.5/14


# negative inputs, x = [2, -1, 1], w₀ = [1, 2, -3], b₀ = 0.5: z₀ = 2 - 2 - 3 + 0.5 = -2.5 = R_out
SIGNED = [[1.0, 2.0, -3.0], [0.5, 1.0, -1.0]]


def test_z_plus_pairs_negative_inputs_with_negative_weights() -> None:
    # x⁺w⁺ = [2,0,0], x⁻w⁻ = [0,0,0]: den 2 + 0.5; [2,0,0]·(−2.5)/2.5
    close(run(dense(SIGNED), [2.0, -1.0, 1.0], "z_plus"), [-2.0, 0.0, 0.0])


def test_gamma_negative_output() -> None:
    # z₀ < 0: x⁺(w+γw⁻) = [2,0,-4.5] (+b 0.5), x⁻(w+γw⁺) = [0,-3,0]: den -5; [2,-3,-4.5]·(−2.5)/(−5)
    close(run(dense(SIGNED), [2.0, -1.0, 1.0], "gamma:0.5"), [1.0, -1.5, -2.25])


def conv_row(w0: float, w1: float) -> nn.Module:
    """[a, b] -> conv kernel (1,2), zero padding 1 on the width -> [w1·a, w0·a + w1·b, w0·b]."""
    conv = nn.Conv2d(1, 1, (1, 2), padding=(0, 1), bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[w0, w1]]]]))
    return nn.Sequential(conv, nn.Flatten()).eval()


def test_flat_ignores_padding() -> None:
    # output 0 sees only `a` (its other tap is padding), output 1 sees a and b
    close(run(conv_row(2.0, 3.0), [[[1.0, 4.0]]], "flat", kind="conv", target=0).flatten(), [3.0, 0.0])
    close(run(conv_row(2.0, 3.0), [[[1.0, 4.0]]], "flat", kind="conv", target=1).flatten(), [7.0, 7.0])


def test_conv_epsilon_and_z_plus() -> None:
    # output 1 = 2·1 + (−3)·4 = −10: ε-rule gives the contributions [2, −12]·(−10)/(−10)
    close(run(conv_row(2.0, -3.0), [[[1.0, 4.0]]], "epsilon:0", kind="conv", target=1).flatten(), [2.0, -12.0])
    # z⁺: only a·2 counts: [2, 0]·(−10)/2
    close(run(conv_row(2.0, -3.0), [[[1.0, 4.0]]], "z_plus", kind="conv", target=1).flatten(), [-10.0, 0.0])


class TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = dense([[2.0]], None), dense([[3.0]], None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


def test_norm_on_a_sum_splits_by_contribution() -> None:
    x = torch.tensor([[1.0], [1.0]])
    lrp = LRP(from_module(TwoBranches().eval(), x), composite("EpsilonPlus"), record=["a", "b"])
    result = lrp(x, torch.tensor([0, 0]))
    close(result.recorded["a"][0], [2.0])  # a = 2, b = 3, R = 5: R_a = 2·5/5
    close(result.recorded["b"][0], [3.0])


def pooled(pool: nn.Module) -> nn.Module:
    return nn.Sequential(pool, nn.Flatten()).eval()


def test_norm_on_average_pooling() -> None:
    close(run(pooled(nn.AvgPool2d((1, 2))), [[[1.0, 3.0]]], "norm", kind="pool").flatten(), [0.5, 1.5])


def test_flat_on_average_pooling() -> None:
    close(run(pooled(nn.AvgPool2d((1, 2))), [[[1.0, 3.0]]], "flat", kind="pool").flatten(), [1.0, 1.0])


def test_max_pooling_is_winner_take_all() -> None:
    close(run(pooled(nn.MaxPool2d((1, 2))), [[[1.0, 3.0]]], "gradient", kind="maxpool").flatten(), [0.0, 3.0])


class Gated(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) * torch.sigmoid(x.mean(dim=1, keepdim=True))


def test_pass_through_activation_and_gate() -> None:
    # relu then gate: all relevance (the output itself) stays on the signal path, none on the gate
    x = torch.tensor([[2.0, 3.0], [2.0, 3.0]])
    out = Gated()(x)[0]
    result = LRP(from_module(Gated().eval(), x), composite("EpsilonPlus"))(x, torch.tensor([1, 1]))
    close(result.relevance[0], [0.0, out[1].item()])


class Attention(nn.Module):
    """softmax(x·xᵀ)·v(x), flattened to [B, T·D] logits."""

    def __init__(self) -> None:
        super().__init__()
        self.v = dense([[1.0, -0.5], [0.5, 2.0]], None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(x @ x.transpose(1, 2), dim=-1)
        return (weights @ self.v(x)).flatten(1)


def test_attention_weights_are_constants_for_relevance() -> None:
    # out = A·v with A = softmax(...) held constant: R_v = v ⊙ Aᵀ(R/out), nothing through q·kᵀ,
    # so a bias-free model conserves relevance down to its input
    x = torch.tensor([[[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]]] * 2)
    net = Attention().eval()
    out = net(x).detach()
    settings = Settings(epsilon=1e-9, stabilizer=1e-9)
    result = LRP(from_module(net, x), composite("EpsilonPlus", settings), record=["v"])(x, torch.tensor([4, 4]))
    weights = torch.softmax(x @ x.transpose(1, 2), dim=-1)[0]
    values = net.v(x)[0].detach()
    r_out = torch.zeros(3, 2)
    r_out[2, 0] = out[0, 4]  # flat index 4 = row 2, column 0
    close(result.recorded["v"][0].flatten(), (values * (weights.T @ (r_out / (weights @ values)))).flatten().tolist())
    torch.testing.assert_close(result.relevance[0].sum(), out[0, 4], rtol=1e-5, atol=1e-7)


def test_stabilizer_sign_of_zero_is_positive() -> None:
    z = torch.tensor([0.0, 2.0, -2.0])
    close(stabilize(z, 0.5), [0.5, 2.5, -2.5])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("gama", "did you mean 'gamma'"),
        ("gamma:x", "separated by commas"),
        ("alpha_beta:2", "alpha_beta takes 2 number(s), got 1; e.g. alpha_beta:2,1"),
        ("alpha_beta:3,1", "alpha - beta = 1"),
        ("gamma:-1", "gamma must be >= 0"),
        ("z_box:3,-3", "low < high"),
        ("flat:1", "it takes no numbers"),
        ("", "a rule is a string"),
    ],
)
def test_rule_spec_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_rule(spec)
    assert message in str(info.value)


def test_rule_specs_take_numbers_and_defaults() -> None:
    s = Settings(epsilon=0.01, gamma=0.1, low=-2.0, high=2.0)
    assert parse_rule("epsilon", s).epsilon == 0.01
    assert parse_rule("epsilon:0.5", s).epsilon == 0.5
    assert parse_rule("gamma", s).gamma == 0.1
    assert (parse_rule("alpha_beta:1,0", s).alpha, parse_rule("alpha_beta:1,0", s).beta) == (1.0, 0.0)
    assert (parse_rule("z_box", s).low, parse_rule("z_box", s).high) == (-2.0, 2.0)


def test_rules_by_type_checks_kinds_and_fit() -> None:
    with pytest.raises(ValueError, match="unknown layer type 'convv'.*did you mean 'conv'"):
        parse_rules_by_type({"convv": "gamma"})
    with pytest.raises(ValueError, match="rule 'gamma' does not apply to activation layers; allowed: pass, gradient"):
        parse_rules_by_type({"activation": "gamma"})


def test_composites_map_layers_like_zennit() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 2)).eval()
    gm = from_module(net, torch.randn(2, 3, 8, 8))
    table = {
        "EpsilonPlus": ["z_plus", "z_plus", "epsilon"],
        "EpsilonPlusFlat": ["flat", "z_plus", "epsilon"],
        "EpsilonAlpha2Beta1": ["alpha_beta", "alpha_beta", "epsilon"],
        "EpsilonAlpha2Beta1Flat": ["flat", "alpha_beta", "epsilon"],
        "EpsilonGammaBox": ["z_box", "gamma", "epsilon"],
    }
    for name, layers in table.items():
        rules = LRP(gm, composite(name)).rules()
        assert [r for _, k, r in rules if k in ("conv", "linear")] == layers, name
        assert {(k, r) for _, k, r in rules if k not in ("conv", "linear")} == {
            ("activation", "pass"), ("pool", "norm"), ("shape", "gradient")}
