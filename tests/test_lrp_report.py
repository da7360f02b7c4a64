"""Where LRP's relevance goes, in run.json: shares of the target logit at the input, at constant operands
(a ViT's class token and positional embedding) and kept back by rules; the nodes that lose more than a set
share (with one stderr line per run); and the composite `auto` stood for."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from torch import nn

import xaicli
from xaicli.compute import BatchResult, _run_method
from xaicli.descriptors import Attribution, InputItem, Method
from xaicli.graph import from_module
from xaicli.lrp import LRP, Settings, composite, leaks
from xaicli.rng import BatchRNG

from noise import noise_images

PREPROCESS = {"size": 32, "mean": [0.5], "std": [0.25]}
SHARES = ("input_share", "constant_share", "lost_share")


def tiny_vit(biases: bool = True) -> nn.Module:
    """A random 1-block ViT (32² input, 8² patches); without `biases` every bias (linear and layer norm)
    is 0. Class token and positions are drawn at unit scale, so both carry a visible share."""
    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                            embed_dim=32, num_heads=2, num_classes=10).eval()
    with torch.no_grad():
        net.cls_token.normal_()
        net.pos_embed.normal_()
        net.head.weight.mul_(10)  # logits O(1), as a trained model's are
        if not biases:
            for name, p in net.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
    return net


class Leaky(nn.Module):
    """conv-relu-linear whose classifier bias is most of each logit: the linear rule keeps it back."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(4 * 32 * 32, 3)
        with torch.no_grad():
            self.fc.weight.abs_().mul_(0.1)  # positive contributions: the bias's share lies in (0, 1)
            self.fc.bias.fill_(3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return noise_images(tmp_path_factory.mktemp("images"), 3, 32)


def run(net: nn.Module, images: Path, out: Path, **params) -> dict:
    """run.json of an lrp run over `images` in batches of 2."""
    result = xaicli.explain(net, images, output=out, preprocess=PREPROCESS, batch_size=2, methods={"lrp": params})
    assert result.exit_code == 0, result.errors
    return json.loads((out / "run.json").read_text())


@pytest.fixture(scope="module")
def vit_runs(images: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """run.json of the ViT as timm initialises it under composite auto (AttnLRP: its softmax rule loses some
    relevance), and with every bias zeroed under CP-LRP and a tiny ε (only constants absorb relevance)."""
    return {"auto": run(tiny_vit(), images, tmp_path_factory.mktemp("auto")),
            "bias_free": run(tiny_vit(biases=False), images, tmp_path_factory.mktemp("free"), composite="CPLRP",
                             epsilon=1e-9)}


def test_vit_run_reports_constant_shares(vit_runs) -> None:
    stats = vit_runs["auto"]["stats"]["lrp"]
    assert set(SHARES) <= set(stats)
    # constant operands of sums and concatenations only: the layers' biases are losses of their nodes
    assert {k for k in stats if k.startswith("constant_share:")} == {"constant_share:cls_token",
                                                                     "constant_share:pos_embed"}
    for name in (*SHARES, "constant_share:cls_token", "constant_share:pos_embed"):
        assert stats[name]["inputs"] == 3  # per input, over two batches
    assert abs(stats["constant_share:pos_embed"]["mean"]) > 1e-3
    total = stats["constant_share:cls_token"]["mean"] + stats["constant_share:pos_embed"]["mean"]
    assert stats["constant_share"]["mean"] == pytest.approx(total, abs=1e-9)
    assert sum(stats[name]["mean"] for name in SHARES) == pytest.approx(1.0, abs=1e-9)


def test_bias_free_vit_loses_nothing_but_to_constants(vit_runs) -> None:
    """With no biases and attention weights held constant, every rule conserves except where constants
    take their share: input and constant shares sum to 1 (float32 rounding: 1e-4)."""
    stats = vit_runs["bias_free"]["stats"]["lrp"]
    assert abs(stats["lost_share"]["mean"]) < 1e-4 and abs(stats["lost_share"]["max"]) < 1e-4
    assert abs(stats["constant_share:cls_token"]["mean"]) > 1e-3
    assert abs(stats["constant_share:pos_embed"]["mean"]) > 1e-3
    assert stats["input_share"]["mean"] + stats["constant_share"]["mean"] == pytest.approx(1.0, abs=1e-4)
    assert not any(k.startswith("lost_share:") for k in stats)  # no node over 5 %


def test_auto_is_recorded_as_the_composite_used(vit_runs, images: Path, tmp_path: Path) -> None:
    assert vit_runs["auto"]["resolved"]["lrp"]["composite"] == "AttnLRP"
    assert vit_runs["auto"]["recipe"]["methods"]["lrp"]["composite"] == "auto"  # what the user asked for
    assert vit_runs["bias_free"]["resolved"]["lrp"]["composite"] == "CPLRP"
    assert run(Leaky(), images, tmp_path / "cnn", leak_share=0)["resolved"]["lrp"]["composite"] == "EpsilonPlusFlat"


def test_leaking_node_is_reported_once_per_run(images: Path, tmp_path: Path, capsys) -> None:
    stats = run(Leaky(), images, tmp_path / "leaky")["stats"]["lrp"]
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lrp: relevance lost at")]
    leaked = [k for k in stats if k.startswith("lost_share:")]
    assert leaked == ["lost_share:fc"], sorted(stats)
    assert 0.5 < stats["lost_share:fc"]["mean"] < 0.95 and stats["lost_share:fc"]["inputs"] == 3
    assert stats["lost_share"]["mean"] == pytest.approx(stats["lost_share:fc"]["mean"], rel=0.05)
    assert len(lines) == 1 and lines[0].startswith("lrp: relevance lost at fc (")
    assert "epsilon rule on linear" in lines[0]
    # a second run warns again; a threshold above the loss reports nothing
    run(Leaky(), images, tmp_path / "again")
    assert sum(line.startswith("lrp: relevance lost at fc") for line in capsys.readouterr().err.splitlines()) == 1
    quiet = run(Leaky(), images, tmp_path / "quiet", leak_share=0.95)["stats"]["lrp"]
    assert not any(k.startswith("lost_share:") for k in quiet) and "lrp: relevance" not in capsys.readouterr().err


def test_engine_accounts_for_every_share_per_input() -> None:
    """Engine level, float64: logit = input + constants + Σ node losses (flows), per batch; constant
    relevance is per input (the same alone as inside a batch); constants are not counted as leaks."""
    net = tiny_vit().double()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([1, 2, 3])
    lrp = LRP(from_module(net, x), composite("AttnLRP", Settings(epsilon=1e-6)), channels_last=False)
    result = lrp(x, target, flows=True)
    assert set(result.constants) == {"cls_token", "pos_embed"}
    assert all(v.shape == (3,) for v in result.constants.values())
    lost = sum(float(out - sent) for out, sent in result.flows.values())
    kept = float(result.explained.sum() - result.relevance.sum() - sum(v.sum() for v in result.constants.values()))
    assert kept == pytest.approx(lost, rel=1e-9, abs=1e-12)
    alone = lrp(x[1:2], target[1:2])
    for name, value in result.constants.items():
        torch.testing.assert_close(alone.constants[name], value[1:2], rtol=1e-9, atol=1e-12)
    scale = float(result.explained.abs().sum())
    assert all(abs(float(v.sum())) > 1e-3 * scale for v in result.constants.values())
    found = {name for name, _ in leaks(result, 1e-3)}
    assert not found & {"expand", "add"}  # the class token's and the positions' nodes pass it on


def test_per_input_retry_keeps_stats_some_inputs_lack() -> None:
    """A batch that fails is explained input by input; a stat only some of them report (a leak over the
    threshold) is NaN for the others, which the run leaves out of its mean, instead of failing the batch."""
    def explain(model, x, target, rng) -> Attribution:
        if len(x) > 1:
            raise RuntimeError("too big")
        stats = {"lost_share": torch.ones(1)} | ({"lost_share:fc": torch.full((1,), 0.5)} if target[0] == 1 else {})
        return Attribution(x.clone(), {}, stats)

    call = SimpleNamespace(plugin=Method("leaky", "test", explain), params={})
    items = [InputItem(Path(f"{i}.png"), f"{i}.png") for i in range(3)]
    result = BatchResult(items)
    x, target = torch.zeros(3, 1, 2, 2), torch.tensor([0, 1, 2])
    attribution, bad = _run_method(None, call, x, target, BatchRNG([0, 1, 2]), items, result)
    assert not bad and not result.failures
    np.testing.assert_array_equal(attribution.stats["lost_share"], [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(attribution.stats["lost_share:fc"], [np.nan, 0.5, np.nan])
