"""Parity with LXT 2.1 (the AttnLRP authors' library, the test oracle) on torchvision's and timm's ViT.

LXT runs in its own environment (`make lxt-oracle` builds `.venv-lxt`; tests/oracles/lxt_oracle.py),
so these tests skip when it is absent. Rule set of LXT's published torchvision path
(`lxt.efficient.models.vit_torch.cp_LRP` + `monkey_patch_zennit`, Gradient×Input): zennit's Epsilon
on nn.Conv2d / nn.Linear modules (patch embedding, MLPs, head); the identity rule on GELU; LayerNorm
with σ = sqrt(var + eps) held constant; softmax weights held constant (CP-LRP); everything else its
plain gradient, which is LRP-0 on the attention's in/out projections (functional `F.linear` inside
nn.MultiheadAttention, invisible to zennit's module hooks) and an unstabilised proportional split on
residual sums. LXT maps no AttnLRP for torchvision; the oracle builds it from LXT's own pieces as its
LLaMA path does (query/key gradients ÷4, value ÷2, softmax by its gradient = Prop. 3.1).

Rule for rule, then: xai's `CPLRP` / `AttnLRP` with ε = TINY wherever LXT has a plain gradient
(attention projections, matmul, norm, sums) and `epsilon:EPS` by layer name on the modules zennit
hooks. LXT's Gradient×Input conversions add an absolute 1e-10 to divisors (zennit hooks' module
inputs, the GELU identity rule), which alone moves float64 relevance by ~1e-9 relative (measured:
7e-9 with LXT as published, 1.5e-15 with those two constants at 1e-300). So: float32 against LXT as
published (≤ 1e-4), float64 as published (≤ 1e-8), float64 with the conversion constants at 1e-300
(≤ 1e-12: the rules themselves).

timm's ViT has no LXT map; the oracle applies LXT's AttnLRP pieces through a custom patch map
(`timm_patches`, the one bench/bench_attnlrp.py times), with zennit's Epsilon on every linear layer
(timm calls qkv/proj as modules): xai's `AttnLRP` with `epsilon:EPS` on all linear and conv nodes.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import timm
import torch
from torchvision.models import VisionTransformer

from xaicli.graph import from_module
from xaicli.lrp import LRP, Composite, Settings, composite
from xaicli.lrp.rules import Epsilon

ROOT = Path(__file__).resolve().parents[1]
ORACLE_PYTHON = ROOT / ".venv-lxt" / "bin" / "python"
ORACLE = ROOT / "tests" / "oracles" / "lxt_oracle.py"
pytestmark = pytest.mark.skipif(not ORACLE_PYTHON.exists(),
                                reason="LXT oracle environment .venv-lxt is absent; build it with `make lxt-oracle`")

SMALL = {"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64,
         "num_classes": 10}
VIT_B_16 = {"image_size": 224, "patch_size": 16, "num_layers": 12, "num_heads": 12, "hidden_dim": 768,
            "mlp_dim": 3072, "num_classes": 1000}
TIMM = {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 2, "num_classes": 10}
EPS = 0.01  # zennit Epsilon on conv/linear modules: large enough that a misplaced rule shows
TINY = 1e-20  # where LXT takes the plain gradient (no stabiliser)
EXACT = 1e-300  # LXT's Gradient×Input conversion stabiliser for the "exact" float64 runs (1e-10 published)
SETUPS = {"float32": (torch.float32, None, 1e-4), "float64": (torch.float64, None, 1e-8),
          "float64-exact": (torch.float64, EXACT, 1e-12)}  # dtype, LXT conversion constant, tolerance
VARIANTS = {"cp": "CPLRP", "attn": "AttnLRP"}


def vit(config: dict, seed: int) -> VisionTransformer:
    """A seeded VisionTransformer with every parameter random (torchvision zero-inits head and class token)."""
    torch.manual_seed(seed)
    net = VisionTransformer(**config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        net.heads.head.weight.normal_(0.0, config["hidden_dim"] ** -0.5, generator=gen)
        net.heads.head.bias.normal_(0.0, 0.1, generator=gen)
        net.class_token.normal_(0.0, 0.5, generator=gen)
        for norm in (m for m in net.modules() if isinstance(m, torch.nn.LayerNorm)):
            norm.weight.copy_(1.0 + 0.2 * torch.randn(norm.weight.shape, generator=gen))
            norm.bias.normal_(0.0, 0.1, generator=gen)
    return net.requires_grad_(False)


def timm_vit(seed: int) -> torch.nn.Module:
    """timm's vit_tiny cut down (TIMM), seeded, with a random head and class token (timm zero-inits the head)."""
    torch.manual_seed(seed)
    kwargs = dict(TIMM)
    net = timm.create_model(kwargs.pop("name"), pretrained=False, **kwargs).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        net.head.weight.normal_(0.0, 0.2, generator=gen)
        net.cls_token.normal_(0.0, 0.5, generator=gen)
    return net.requires_grad_(False)


def xai_composite(variant: str, config: dict) -> Composite:
    """xai's composite with LXT's rule placement (module docstring)."""
    modules = ["conv_proj", "heads"] + [f"encoder.layers.encoder_layer_{i}.mlp" for i in range(config["num_layers"])]
    base = composite(VARIANTS[variant], Settings(epsilon=TINY, stabilizer=TINY))
    return base.override(by_name={name: Epsilon(EPS) for name in modules})


def xai_timm_composite() -> Composite:
    """AttnLRP with LXT's rule placement on timm's ViT: zennit's Epsilon on every linear/conv, TINY elsewhere."""
    base = composite("AttnLRP", Settings(epsilon=TINY, stabilizer=TINY))
    return base.override(by_type={"linear": Epsilon(EPS), "conv": Epsilon(EPS)})


def oracle(cases: list[dict], workdir: Path, timeout: float) -> dict[str, torch.Tensor]:
    """Run LXT on `cases` (tests/oracles/lxt_oracle.py's request format) in its own environment."""
    request, result = workdir / "request.pt", workdir / "result.pt"
    torch.save({"cases": cases}, request)
    done = subprocess.run([str(ORACLE_PYTHON), str(ORACLE), str(request), str(result)], capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"LXT oracle failed ({ORACLE}):\n{done.stderr[-3000:]}"
    return torch.load(result, weights_only=False)


def case(name: str, variant: str, config: dict | None, net: torch.nn.Module, x: torch.Tensor, target: torch.Tensor,
         conversion: float | None = None) -> dict:
    """One oracle request (tests/oracles/lxt_oracle.py); `config` None: the timm model TIMM."""
    extra = {} if conversion is None else {"conversion": conversion}
    model = {"timm": TIMM} if config is None else {"config": config}
    return {"name": name, "variant": variant, **model, "state": net.state_dict(), "x": x, "target": target,
            "epsilon": EPS, **extra}


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """Per sample: max |difference| / max |LXT's relevance|."""
    return (ours - theirs).flatten(1).abs().amax(1) / theirs.flatten(1).abs().amax(1)


def inputs(size: int, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(batch, 3, size, size, generator=gen).to(dtype), torch.tensor([1, 4, 7][:batch])


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The small ViT in float32 and float64, LXT's relevance for both variants in every setup, xai's graphs."""
    cases, graphs, data = [], {}, {}
    for dtype in (torch.float32, torch.float64):
        net = vit(SMALL, seed=0).to(dtype)
        x, target = inputs(32, 3, dtype)
        graphs[dtype], data[dtype] = from_module(net, x), (x, target)
        cases += [case(f"{variant}/{setup}", variant, SMALL, net, x, target, conversion)
                  for setup, (kind, conversion, _) in SETUPS.items() if kind == dtype for variant in VARIANTS]
        net = timm_vit(seed=5).to(dtype)
        graphs[f"timm/{dtype}"] = from_module(net, x)
        cases += [case(f"timm/{setup}", "attn", None, net, x, target, conversion)
                  for setup, (kind, conversion, _) in SETUPS.items() if kind == dtype]
    return {"lxt": oracle(cases, tmp_path_factory.mktemp("lxt"), timeout=300), "graphs": graphs, "data": data}


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_small_vit_matches_lxt(small: dict, variant: str, setup: str) -> None:
    dtype, _, tolerance = SETUPS[setup]
    x, target = small["data"][dtype]
    result = LRP(small["graphs"][dtype], xai_composite(variant, SMALL), channels_last=False)(x, target)
    theirs = small["lxt"][f"{variant}/{setup}"]
    torch.testing.assert_close(result.logits, small["lxt"][f"{variant}/{setup}/logits"], rtol=1e-5, atol=1e-6)
    assert result.relevance.dtype == dtype
    error = relative_error(result.relevance, theirs)
    assert error.max().item() <= tolerance, (variant, setup, error.tolist())


@pytest.mark.parametrize("setup", ["float32", "float64-exact"])
def test_timm_vit_attnlrp_matches_lxt_patch_map(small: dict, setup: str) -> None:
    """(LXT's published 1e-10 conversion offsets move this model's float64 relevance by ~1e-7: timm's
    init leaves activations ~1e-2, so that setup is compared on torchvision's ViT only.)"""
    dtype, _, tolerance = SETUPS[setup]
    x, target = small["data"][dtype]
    result = LRP(small["graphs"][f"timm/{dtype}"], xai_timm_composite(), channels_last=False)(x, target)
    torch.testing.assert_close(result.logits, small["lxt"][f"timm/{setup}/logits"], rtol=1e-5, atol=1e-6)
    error = relative_error(result.relevance, small["lxt"][f"timm/{setup}"])
    assert error.max().item() <= tolerance, (setup, error.tolist())


def test_variants_differ(small: dict) -> None:
    """AttnLRP and CP-LRP are different explanations (else the parity above could not tell them apart),
    and LXT's published conversion constant is what separates the two float64 setups."""
    cp, attn = small["lxt"]["cp/float64-exact"], small["lxt"]["attn/float64-exact"]
    assert relative_error(attn, cp).min().item() > 1e-2
    assert relative_error(small["lxt"]["cp/float64"], cp).max().item() > 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_vit_b_16_matches_lxt(tmp_path: Path, variant: str) -> None:
    """torchvision vit_b_16's architecture at 224² (random weights, no download), float32."""
    net = vit(VIT_B_16, seed=3)
    x, target = inputs(224, 1, torch.float32)
    theirs = oracle([case("vit_b_16", variant, VIT_B_16, net, x, target)], tmp_path, timeout=600)["vit_b_16"]
    ours = LRP(from_module(net, x), xai_composite(variant, VIT_B_16), channels_last=False)(x, target).relevance
    assert relative_error(ours, theirs).max().item() <= SETUPS["float32"][2]
