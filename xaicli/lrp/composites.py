"""Composites: which rule each node gets, as data (Zennit's names and layer maps).

A composite maps node kinds (nodes.KINDS) to rules, with an optional rule for the first conv/linear
node in graph order (Zennit's first-layer map). Users refine it with `rules_by_type` (kind -> rule)
and `rules_by_name` (layer name -> rule, for every node inside that layer that the rule applies to).
Precedence: by name, then the first-layer rule, then by type (user's, then the composite's).
Rule specs are strings: "epsilon", "epsilon:0.1", "gamma:0.25", "alpha_beta:2,1", "z_plus",
"z_box:-3,3", "flat", "w_square", "norm", "pass", "gradient", and for transformers "uniform"/"uniform:ε"
(matmul), "std_constant"/"std_constant:ε" (norm), "taylor" (softmax); without numbers they take the
composite's epsilon, gamma, low/high and stabiliser.

Zennit's composites map activation/norm -> pass, sum/pool -> norm, maxpool -> gradient, linear ->
epsilon (Zennit's base map). Beyond Zennit, which has no rule for functional ops: gates (x·sigmoid(...),
squeeze-excitation) pass relevance to the signal, divisions by a graph tensor to the numerator,
products of two same-shaped graph tensors half to each, and attention products treat the softmax
weights as constants (norm rule on the values); softmax keeps the gradient.

The transformer composites (Achtibat et al., ICML 2024), no first-layer rule (the patch embedding
takes conv/linear's epsilon):

    kind        AttnLRP                  CPLRP (LXT's torchvision-ViT map)
    conv        epsilon                  epsilon
    linear      epsilon                  epsilon
    matmul      uniform (ε, ½ each,      epsilon (softmax weights constant,
                incl. attention weights) all to the values; else ½ each)
    softmax     taylor                   taylor (reached only off attention)
    norm        std_constant (σ const)   std_constant
    activation  pass (identity)          pass
    gate        pass                     pass
    sum, pool   norm                     norm
    maxpool     gradient                 gradient
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from ..suggest import did_you_mean
from .nodes import KINDS
from .rules import (RULES, AlphaBeta, Bound, Epsilon, Flat, Gamma, Gradient, Norm, Pass, Rule, StdConstant, Taylor,
                    Uniform, WSquare, ZBox, ZPlus)

COMPOSITES = ("EpsilonPlus", "EpsilonPlusFlat", "EpsilonAlpha2Beta1", "EpsilonAlpha2Beta1Flat", "EpsilonGammaBox",
              "AttnLRP", "CPLRP")
TRANSFORMER_COMPOSITES = ("AttnLRP", "CPLRP")


@dataclass(frozen=True)
class Settings:
    """The numbers rules take when a spec does not give them."""

    epsilon: float = 1e-6
    gamma: float = 0.25
    low: Bound = -3.0
    high: Bound = 3.0
    stabilizer: float = 1e-6

    def __post_init__(self) -> None:
        if self.epsilon < 0 or self.stabilizer <= 0:
            raise ValueError(f"epsilon must be >= 0 and the stabiliser > 0; got {self.epsilon}, {self.stabilizer}")
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0; got {self.gamma}")
        ZBox(self.low, self.high)


@dataclass(frozen=True)
class Composite:
    """Rules by node kind, an optional first-layer rule, and per-layer-name overrides."""

    name: str
    by_kind: Mapping[str, Rule]
    first: Rule | None = None
    first_kinds: tuple[str, ...] = ("conv", "linear")
    by_name: Mapping[str, Rule] = field(default_factory=dict)

    def rule_for(self, kind: str, first: bool) -> Rule:
        """The rule of a node of `kind` (by name is resolved by the engine, which knows the names)."""
        if first and self.first is not None and kind in self.first_kinds:
            return self.first
        return self.by_kind.get(kind, Gradient())

    def override(self, by_type: Mapping[str, Rule] | None = None, by_name: Mapping[str, Rule] | None = None
                 ) -> "Composite":
        """A copy with some kinds' and some layers' rules replaced."""
        return replace(self, by_kind={**self.by_kind, **(by_type or {})}, by_name={**self.by_name, **(by_name or {})})


def composite(name: str, settings: Settings | None = None) -> Composite:
    """A composite by name (COMPOSITES: Zennit's, AttnLRP, CPLRP), with `settings`' numbers."""
    s = settings or Settings()
    if name not in COMPOSITES:
        raise ValueError(f"unknown composite {name!r}{did_you_mean(name, COMPOSITES)}; known: {', '.join(COMPOSITES)}")
    base: dict[str, Rule] = {
        "activation": Pass(), "norm": Pass(), "gate": Pass(), "sum": Norm(s.stabilizer), "pool": Norm(s.stabilizer),
        "maxpool": Gradient(), "linear": Epsilon(s.epsilon), "matmul": Norm(s.stabilizer), "softmax": Gradient(),
    }
    if name in TRANSFORMER_COMPOSITES:
        matmul: Rule = Uniform(s.epsilon) if name == "AttnLRP" else Epsilon(s.epsilon)
        return Composite(name, {**base, "conv": Epsilon(s.epsilon), "norm": StdConstant(s.epsilon), "matmul": matmul,
                                "softmax": Taylor()})
    conv: Rule = {"EpsilonPlus": ZPlus(s.stabilizer), "EpsilonPlusFlat": ZPlus(s.stabilizer),
                  "EpsilonGammaBox": Gamma(s.gamma, s.stabilizer)}.get(name, AlphaBeta(2.0, 1.0, s.stabilizer))
    if name.endswith("Flat"):
        return Composite(name, {**base, "conv": conv}, first=Flat(s.stabilizer))
    if name == "EpsilonGammaBox":
        return Composite(name, {**base, "conv": conv}, first=ZBox(s.low, s.high, s.stabilizer), first_kinds=("conv",))
    return Composite(name, {**base, "conv": conv})


def parse_rule(spec: Any, settings: Settings | None = None) -> Rule:
    """A rule from its spec string (module docstring); ValueError says what is wrong and what is allowed."""
    s = settings or Settings()
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a rule is a string such as 'epsilon' or 'gamma:0.25'; got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if name not in RULES:
        raise ValueError(f"unknown rule {name!r}{did_you_mean(name, RULES)}; rules: {', '.join(RULES)}")
    numbers = _numbers(spec, rest)
    expected = {"epsilon": 1, "gamma": 1, "alpha_beta": 2, "z_box": 2, "norm": 1, "uniform": 1,
                "std_constant": 1}.get(name, 0)
    if numbers and len(numbers) != expected:
        usage = {"epsilon": "epsilon:0.1", "gamma": "gamma:0.25", "alpha_beta": "alpha_beta:2,1",
                 "z_box": "z_box:-3,3", "norm": "norm:1e-6", "uniform": "uniform:1e-6",
                 "std_constant": "std_constant:1e-6"}.get(name)
        hint = f"e.g. {usage}" if usage else "it takes no numbers"
        raise ValueError(f"rule {spec!r}: {name} takes {expected} number(s), got {len(numbers)}; {hint}")
    return _build(name, numbers, s)


def _numbers(spec: str, rest: str) -> list[float]:
    if not rest.strip():
        return []
    try:
        return [float(part) for part in rest.split(",")]
    except ValueError:
        raise ValueError(f"rule {spec!r}: numbers after ':' must be separated by commas, e.g. alpha_beta:2,1") from None


def _build(name: str, n: list[float], s: Settings) -> Rule:
    try:
        if name == "epsilon":
            return Epsilon(n[0] if n else s.epsilon)
        if name == "gamma":
            return Gamma(n[0] if n else s.gamma, s.stabilizer)
        if name == "alpha_beta":
            return AlphaBeta(n[0], n[1], s.stabilizer) if n else AlphaBeta(2.0, 1.0, s.stabilizer)
        if name == "z_box":
            return ZBox(n[0], n[1], s.stabilizer) if n else ZBox(s.low, s.high, s.stabilizer)
        if name == "norm":
            return Norm(n[0] if n else s.stabilizer)
        if name in ("uniform", "std_constant"):
            epsilon = n[0] if n else s.epsilon
            if epsilon < 0:
                raise ValueError(f"epsilon must be >= 0; got {epsilon}")
            return Uniform(epsilon) if name == "uniform" else StdConstant(epsilon)
    except ValueError as exc:
        raise ValueError(f"rule {name}: {exc}") from None
    simple: dict[str, Rule] = {"z_plus": ZPlus(s.stabilizer), "flat": Flat(s.stabilizer),
                               "w_square": WSquare(s.stabilizer), "pass": Pass(), "gradient": Gradient(),
                               "taylor": Taylor()}
    return simple[name]


def parse_rules_by_type(mapping: Mapping[str, Any], settings: Settings | None = None) -> dict[str, Rule]:
    """`{conv: gamma, linear: epsilon}` -> rules, checking kinds and that each rule fits its kind."""
    out: dict[str, Rule] = {}
    for key, spec in mapping.items():
        if key not in KINDS:
            raise ValueError(f"rules_by_type: unknown layer type {key!r}{did_you_mean(str(key), KINDS)}; "
                             f"types: {', '.join(KINDS)}")
        rule = parse_rule(spec, settings)
        if key not in rule.kinds:
            allowed = ", ".join(n for n, cls in RULES.items() if key in cls.kinds)
            raise ValueError(f"rules_by_type: rule {rule.name!r} does not apply to {key} layers; allowed: {allowed}")
        out[key] = rule
    return out


def parse_rules_by_name(mapping: Mapping[str, Any], settings: Settings | None = None) -> dict[str, Rule]:
    """`{"features.0": flat}` -> rules (names are checked against the graph by the engine)."""
    return {str(key): parse_rule(spec, settings) for key, spec in mapping.items()}
