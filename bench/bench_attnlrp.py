"""AttnLRP speed: images/s of xai's AttnLRP vs a plain input gradient and vs LXT 2.1 (same model,
batch, threads), in one process, printing ratios.

    make lxt-oracle && .venv-lxt/bin/python bench/bench_attnlrp.py      # with LXT
    .venv/bin/python bench/bench_attnlrp.py --models vit_tiny_patch16_224   # without LXT (its columns say n/a)

Random-init timm models at 224², batch 8, random normal inputs. Rounds are interleaved (every
candidate once per round, after a warm-up round) and the median is reported, so load from other
processes hits all candidates alike. xai's engine is prepared once (as the lrp plugin caches it).
The process keeps its heap as the `xai` command does (`xaicli.allocator`), for every candidate alike;
`--system-malloc` measures with glibc's defaults instead.

LXT's efficient path maps only torchvision's ViT (CP-LRP) and HF language models; for timm ViTs the
comparison is LXT's own AttnLRP pieces in a custom patch map, as LXT documents for new models
(`timm_patches` in tests/oracles/lxt_oracle.py, checked against xai in tests/test_lxt_parity.py):
the identity rule on GELU, σ constant in LayerNorm, query/key gradients ÷4 and value ÷2 around
torch's scaled_dot_product_attention, zennit's Epsilon on every nn.Linear / nn.Conv2d through
`monkey_patch_zennit` — the rules of xai's `AttnLRP` composite (up to its ε = 1e-6 stabilisers on
sums, norms and products). The patches are class-level, so they are set only while LXT's candidate
runs, on its own copy of the model.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Callable

import timm
import torch
from torch import nn

from xaicli.allocator import keep_heap
from xaicli.graph import from_module
from xaicli.lrp import LRP, composite
from xaicli.model import InputSpec, Model, input_gradient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "oracles"))  # LXT's patches for timm
from bench_lrp import measure  # noqa: E402  (median of interleaved rounds)

SETUPS = {"vit_tiny_patch16_224": 8, "deit_small_patch16_224": 8}
Run = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def lxt_available() -> bool:
    try:
        import lxt.efficient  # noqa: F401
    except ImportError:
        return False
    return True


def lxt_call(net: nn.Module) -> Run:
    """LXT's Gradient×Input AttnLRP on a copy of `net` (zennit's composite registered once, as LXT's examples do)."""
    from lxt.efficient import monkey_patch_zennit
    from zennit.core import BasicHook

    from lxt_oracle import epsilon_composite, timm_patches

    if BasicHook.forward.__module__ != "lxt.efficient.zennit_patches":
        monkey_patch_zennit()
    copied = copy.deepcopy(net)
    epsilon_composite(1e-6).register(copied)

    def run(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x = x.clone().requires_grad_(True)
        with timm_patches(copied):
            copied(x).gather(1, target.view(-1, 1)).sum().backward()
        return x * x.grad

    return run


def candidates(name: str, x: torch.Tensor, with_lxt: bool) -> dict[str, Run]:
    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False).eval().requires_grad_(False)
    model = Model(name, InputSpec(), torch.device("cpu"), module=net)
    engine = LRP(from_module(net, x), composite("AttnLRP"))
    runs: dict[str, Run] = {
        "gradient": lambda x, t: input_gradient(model, x, t)[0],
        "xai AttnLRP": lambda x, t: engine(x, t).relevance,
    }
    if with_lxt:
        runs["LXT AttnLRP"] = lxt_call(net)
    return runs


def report(name: str, batch: int, seconds: dict[str, float]) -> None:
    rate = {key: batch / s for key, s in seconds.items()}
    grad, ours, theirs = rate["gradient"], rate["xai AttnLRP"], rate.get("LXT AttnLRP")
    lxt = f"{theirs:9.2f}" if theirs else f"{'n/a':>9s}"
    ratio = f"{ours / theirs:8.2f}" if theirs else f"{'n/a':>8s}"
    lxt_grad = f"{theirs / grad:9.2f}" if theirs else f"{'n/a':>9s}"
    print(f"{name:24s} {batch:5d} {grad:9.2f} {ours:9.2f} {lxt} {ours / grad:9.2f} {lxt_grad} {ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--system-malloc", action="store_true", help="glibc's default thresholds, not the xai command's")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    heap = "system malloc" if args.system_malloc else f"xai's heap settings: {'on' if keep_heap() else 'unavailable'}"
    with_lxt = lxt_available()
    print(f"torch {torch.__version__}, {args.threads} threads, {args.size}x{args.size}, median of {args.repeats} "
          f"rounds, {heap}; LXT: {'lxt 2.1 (patch map for timm, see docstring)' if with_lxt else 'not importable (n/a)'}")
    print(f"{'model':24s} {'batch':>5s} {'grad/s':>9s} {'xai/s':>9s} {'LXT/s':>9s} {'xai/grad':>9s} {'LXT/grad':>9s} "
          f"{'xai/LXT':>8s}   (images/s)")
    gen = torch.Generator().manual_seed(0)
    for name in args.models:
        x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
        target = torch.arange(args.batch) % 1000
        report(name, args.batch, measure(candidates(name, x, with_lxt), x, target, args.repeats))


if __name__ == "__main__":
    main()
