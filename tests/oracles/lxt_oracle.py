"""LXT 2.1 as a test oracle: input relevance of torchvision VisionTransformers, run in `.venv-lxt`.

Run by the LXT environment's python (`make lxt-oracle` builds it), never imported by xai:

    .venv-lxt/bin/python tests/oracles/lxt_oracle.py REQUEST.pt RESULT.pt

REQUEST.pt (torch.save) holds {"cases": [case, ...]}; each case is a dict with
    name        a key for the result
    config      torchvision.models.VisionTransformer keyword arguments, or
    timm        instead of config: {"name": ..., **kwargs} for timm.create_model (pretrained=False)
    state       the model's state_dict
    x, target   input [B,3,H,W] and target classes [B] (x's dtype is the dtype LXT runs in)
    variant     "cp" (LXT's published torchvision path, `lxt.efficient.models.vit_torch.cp_LRP`) or
                "attn" (the same with LXT's AttnLRP attention wrapper, see `attn_lrp_attention`)
    epsilon     the zennit Epsilon rule's epsilon on every nn.Conv2d and nn.Linear module
    conversion  optional: the stabiliser of LXT's Gradient×Input conversions (default: LXT's 1e-10)
RESULT.pt holds {name: relevance [B,3,H,W], name + "/logits": logits [B,K]}.

Rule set (LXT's Gradient×Input framework, Arras et al. 2025): nn.Conv2d / nn.Linear modules get zennit's
Epsilon through `monkey_patch_zennit`; GELU the identity rule (`identity_rule_implicit`: gradient
gelu(x)/(x + 1e-10)); LayerNorm its input-centred linear map with the standard deviation
sqrt(var + eps) detached (`layer_norm_forward`); residual sums, the class token and the positional
embedding the plain gradient (proportional split, constants absorb their share). Inside
nn.MultiheadAttention the in/out projections are functional `F.linear` calls that zennit's module
hooks never see, so they get the plain gradient: LRP-0. CP-LRP detaches query and key (softmax
weights constant). LXT maps no AttnLRP for torchvision; "attn" builds it from LXT's own pieces as
LXT's LLaMA/Qwen path does (`wrap_attention_forward` around transformers' eager attention): query
and key gradients divided by 4, value by 2 (uniform rule on both matrix products), softmax by its
plain gradient (Prop. 3.1: its Taylor expansion at the input under Gradient×Input).

timm ViTs (no LXT map; "attn" only) get the same pieces through `timm_patches`, as LXT documents
custom patch maps for new models: `layer_norm_forward` on every LayerNorm class (timm's own
subclass included), the identity rule on GELU, and timm's Attention with query/key gradients ÷4 and
value ÷2 before torch's scaled_dot_product_attention. timm calls its qkv/proj as modules, so zennit's
Epsilon reaches every linear layer there (xai: `epsilon` on all linear and conv nodes).

LXT converts relevance to Gradient×Input form by dividing by a module's input or output plus 1e-10
(`zennit_patches.backward`'s `stabilize(original_input, 1e-10)`, `identity_rule_implicit`'s epsilon):
an absolute offset, whatever the dtype, that moves float64 relevance by about 1e-9 relative. A case's
"conversion" replaces both constants, so float64 runs can check the rules themselves.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import VisionTransformer, vision_transformer
from zennit.composites import LayerMapComposite
from zennit.rules import Epsilon

import lxt.efficient.zennit_patches as zennit_patches
from lxt.efficient import monkey_patch, monkey_patch_zennit
from lxt.efficient.patches import cp_multi_head_attention_forward, layer_norm_forward, non_linear_forward
from lxt.efficient.rules import divide_gradient, identity_rule_implicit_fn

LXT_CONVERSION = 1e-10
_stabilize = zennit_patches.stabilize


def set_conversion(value: float) -> None:
    """Use `value` where LXT's Gradient×Input conversions add their 1e-10 (module docstring)."""
    def stabilize(x: torch.Tensor, epsilon: float = 1e-6, **kwargs: object) -> torch.Tensor:
        return _stabilize(x, epsilon=value if epsilon == LXT_CONVERSION else epsilon, **kwargs)

    identity_rule_implicit_fn.forward.__defaults__ = (value,)
    zennit_patches.stabilize = stabilize


def attn_lrp_attention(self: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       *args: object, **kwargs: object) -> tuple[torch.Tensor, None]:
    """torchvision's self-attention (batch_first, q = k = v) in transformers' eager form under LXT's AttnLRP wrapper."""
    batch, tokens, dim = query.shape
    heads = self.num_heads
    q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(batch, tokens, heads, dim // heads).transpose(1, 2) for t in (q, k, v))
    q, k, v = divide_gradient(q, 4), divide_gradient(k, 4), divide_gradient(v, 2)
    scores = torch.matmul(q, k.transpose(2, 3)) * (dim // heads) ** -0.5
    weights = torch.softmax(scores, dim=-1)
    out = torch.matmul(weights, v).transpose(1, 2).reshape(batch, tokens, dim)
    return F.linear(out, self.out_proj.weight, self.out_proj.bias), None


ATTENTION = {"cp": cp_multi_head_attention_forward, "attn": attn_lrp_attention}


def timm_attention(self: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                   is_causal: bool = False) -> torch.Tensor:
    """timm's Attention.forward (fused path) under LXT's AttnLRP attention wrapper."""
    if getattr(self, "gate", None) is not None or attn_mask is not None or is_causal:
        raise NotImplementedError("the LXT patch for timm covers plain ViT attention (no gate, mask or causality)")
    batch, tokens, _ = x.shape
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = divide_gradient(q, 4), divide_gradient(k, 4), divide_gradient(v, 2)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, self.attn_dim)
    return self.proj(self.norm(out))


@contextlib.contextmanager
def timm_patches(net: nn.Module) -> Iterator[None]:
    """LXT's AttnLRP patches for the timm ViT `net`, set on the classes and restored afterwards."""
    from timm.models.vision_transformer import Attention

    norms = {type(m) for m in net.modules() if isinstance(m, nn.LayerNorm)}
    patches = {Attention: timm_attention, **{cls: layer_norm_forward for cls in norms}}
    if nn.GELU.forward is not non_linear_forward:  # torchvision's cp_LRP map may have patched it already
        patches[nn.GELU] = non_linear_forward
    saved = {cls: cls.__dict__.get("forward") for cls in patches}
    if nn.GELU in patches:
        nn.GELU.original_forward = nn.GELU.forward
    for cls, forward in patches.items():
        cls.forward = forward
    try:
        yield
    finally:
        for cls, forward in saved.items():
            if forward is None:
                del cls.forward  # it was inherited
            else:
                cls.forward = forward


def epsilon_composite(epsilon: float) -> LayerMapComposite:
    """zennit's Epsilon on every nn.Conv2d and nn.Linear module."""
    rule = Epsilon(epsilon=epsilon)
    return LayerMapComposite([(nn.Conv2d, rule), (nn.Linear, rule)])


def build(case: dict, dtype: torch.dtype) -> tuple[nn.Module, contextlib.AbstractContextManager]:
    """The case's model with its weights, and the patches its variant needs while it runs."""
    if "timm" in case:
        import timm

        kwargs = dict(case["timm"])
        model = timm.create_model(kwargs.pop("name"), pretrained=False, **kwargs)
        patches: contextlib.AbstractContextManager = timm_patches(model)
    else:
        nn.MultiheadAttention.forward = ATTENTION[case["variant"]]
        model, patches = VisionTransformer(**case["config"]), contextlib.nullcontext()
    model = model.to(dtype).eval()
    model.load_state_dict(case["state"])
    return model.requires_grad_(False), patches


def relevance(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """LXT's input relevance (x ⊙ ∂, started at the target logit) and the logits for one case."""
    set_conversion(case.get("conversion", LXT_CONVERSION))
    x = case["x"].clone()
    model, patches = build(case, x.dtype)
    composite = epsilon_composite(case["epsilon"])
    composite.register(model)
    try:
        with patches:
            x.requires_grad_(True)
            logits = model(x)
            logits.gather(1, case["target"].view(-1, 1)).sum().backward()
    finally:
        composite.remove()
    return (x * x.grad).detach(), logits.detach()


def main(request: Path, result: Path) -> None:
    monkey_patch(vision_transformer)  # cp_LRP: GELU, LayerNorm, MultiheadAttention (originals kept)
    monkey_patch_zennit()
    out: dict[str, torch.Tensor] = {}
    for case in torch.load(request, weights_only=False)["cases"]:
        out[case["name"]], out[case["name"] + "/logits"] = relevance(case)
    torch.save(out, result)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: lxt_oracle.py REQUEST.pt RESULT.pt")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
