"""Prepared engines of the concept methods, cached per model graph and options (canonizing a graph
and planning its rules is done once, not per batch): `crp_engine` (conditional LRP at a layer) and
`scores_engine` (plain LRP recording layers, for the atlas's per-input vectors)."""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from torch import fx

from ..errors import UsageError
from ..lrp import LRP, UnknownLayer, composite, parse_rules_by_name, parse_rules_by_type
from ..lrp.options import mapping, names, settings
from .conditional import ConditionalLRP, default_layer

_CACHE: "weakref.WeakKeyDictionary[fx.GraphModule, dict[Any, Any]]" = weakref.WeakKeyDictionary()
_PER_GRAPH = 4  # prepared engines kept per graph and method


@dataclass(frozen=True)
class Rules:
    """The rule options every concept method takes (those of `lrp`)."""

    composite: str = "EpsilonPlusFlat"
    epsilon: float = 1e-6
    gamma: float = 0.25
    low: Any = None
    high: Any = None
    rules_by_type: Any = None
    rules_by_name: Any = None

    @classmethod
    def of(cls, params: dict[str, Any]) -> "Rules":
        return cls(**{k: params[k] for k in cls.__dataclass_fields__ if k in params})

    def key(self) -> str:
        return repr(sorted((k, repr(v)) for k, v in self.__dict__.items()))


def parse_condition(value: str | int | None) -> tuple[str, int] | None:
    """`LAYER:CHANNEL` -> (layer, channel)."""
    if value is None or not str(value).strip():
        return None
    if isinstance(value, int):
        raise UsageError(f"crp condition: expected LAYER:CHANNEL, got the number {value} (YAML reads digits:digits as a "
                         "number; quote it, e.g. --set \"methods.crp.condition='8:46'\")")
    name, _, channel = str(value).strip().rpartition(":")
    if not name or not channel.strip().isdigit():
        raise UsageError(f"crp condition: expected LAYER:CHANNEL such as features.28:12; got {value!r}")
    return name, int(channel)


def crp_engine(model: Any, layer: str | None, condition: str | int | None, rules: Rules,
               parallel: bool = False) -> ConditionalLRP:
    """The ConditionalLRP for a layer (None: the last convolution) and an optional upper condition;
    UsageError naming the parameter for unknown layers (with close names) or bad rules."""
    restrict = parse_condition(condition)
    key = ("crp", layer, restrict, parallel, rules.key())

    def make(graph: fx.GraphModule) -> ConditionalLRP:
        return ConditionalLRP(graph, _composite(model, rules, "crp"), layer, restrict, channels_last=model.channels_last,
                              parallel=parallel)

    return _cached(model, key, make, "crp")


def scores_engine(model: Any, layers: list | str, rules: Rules) -> LRP:
    """LRP recording `layers` (default: the last convolution) for their channel scores."""
    wanted = tuple(names(layers))
    key = ("scores", wanted, rules.key())

    def make(graph: fx.GraphModule) -> LRP:
        chosen = _composite(model, rules, "concept_scores")
        return LRP(graph, chosen, wanted or (default_layer(LRP(graph, chosen)),), channels_last=model.channels_last)

    try:
        return _cached(model, key, make, "concept_scores")
    except UsageError as exc:
        raise UsageError(str(exc).replace("record_layers:", "layers:")) from None


def _composite(model: Any, rules: Rules, method: str) -> Any:
    s = settings(model, rules.epsilon, rules.gamma, rules.low, rules.high, method)
    by_type = parse_rules_by_type(mapping(rules.rules_by_type, "rules_by_type", method), s)
    by_name = parse_rules_by_name(mapping(rules.rules_by_name, "rules_by_name", method), s)
    return composite(rules.composite, s).override(by_type, by_name)


def _cached(model: Any, key: tuple, make: Any, method: str) -> Any:
    graph = model.graph()
    engines = _CACHE.setdefault(graph, {})
    if key not in engines:
        try:
            engine = make(graph)
        except (UnknownLayer, ValueError) as exc:
            raise UsageError(f"{method}: {exc}") from None
        same = [k for k in engines if k[0] == key[0]]
        if len(same) >= _PER_GRAPH:
            engines.pop(same[0])
        engines[key] = engine
    return engines[key]
