"""LRP on the model graph: canonization, rules, composites and the engine.

    from xaicli.lrp import LRP, composite, Settings
    lrp = LRP(graph, composite("EpsilonPlusFlat", Settings(epsilon=1e-6)), record=["features.28"])
    result = lrp(x, target)        # result.relevance [B,C,H,W], result.logits, result.recorded

`graph` is an ATen-level torch.fx GraphModule (see xaicli.graph). LRP starts from R = f_t(x) at the
target logit (0 elsewhere) — Zennit's attributor with `attr_output = one_hot(t) * logits` — so the
input relevance sums to about f_t(x) where the rules conserve.
"""
from .canonize import canonize
from .composites import COMPOSITES, Composite, Settings, composite, parse_rule, parse_rules_by_name, parse_rules_by_type
from .engine import LRP, Result, UnknownLayer, conservation, explain, leaks
from .nodes import KINDS
from .rules import RULES

__all__ = [
    "COMPOSITES", "KINDS", "LRP", "RULES", "Composite", "Result", "Settings", "UnknownLayer", "canonize", "composite",
    "conservation", "explain", "leaks", "parse_rule", "parse_rules_by_name", "parse_rules_by_type",
]
