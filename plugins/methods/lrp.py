"""LRP (Bach et al. 2015) with Zennit's composites, on the model's ATen graph (eager, TorchScript, ONNX).

Convention (Zennit's attributor with `attr_output = one_hot(target) * logits`): relevance starts as
the target logit f_t(x) at the target (0 elsewhere), so the heatmap sums to about f_t(x) where the
rules conserve; divide by the logit for Zennit's default one-hot start. One forward and one modified
backward per batch; the prepared engine is cached per model graph and parameters.

z^B bounds (`low`/`high`, EpsilonGammaBox's first layer) default to the model's true input box:
pixel values 0 and 1 mapped through the model's mean/std, per channel. Numbers given instead are
in normalised input space (Zennit's examples use -3/3 style bounds), scalars or one per channel.

Transformers: `AttnLRP` and `CPLRP` (Achtibat et al., ICML 2024; rule tables in xaicli.lrp.composites).
The default composite `auto` is AttnLRP for a graph with attention (a softmax feeding a product of two
graph tensors) and EpsilonPlusFlat otherwise: AttnLRP also propagates through the attention weights
(queries and keys get relevance, which CP-LRP drops) and is the paper's most faithful variant.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import fx

from xaicli import Attribution, Method, Param, hookimpl
from xaicli.errors import UsageError
from xaicli.lrp import (COMPOSITES, LRP, KINDS, RULES, Settings, UnknownLayer, composite, parse_rules_by_name,
                        parse_rules_by_type)
from xaicli.lrp.nodes import has_attention
from xaicli.lrp.options import mapping as _mapping
from xaicli.lrp.options import names as _names
from xaicli.lrp.options import settings as _settings
from xaicli.model import Model
from xaicli.rng import BatchRNG

_ENGINES: "weakref.WeakKeyDictionary[fx.GraphModule, dict[Any, LRP]]" = weakref.WeakKeyDictionary()
_PER_GRAPH = 4  # prepared engines kept per graph (one per parameter set in use)


AUTO = "auto"
"""The default composite: AttnLRP on graphs with attention, EpsilonPlusFlat otherwise (`default_composite`)."""


def default_composite(graph: fx.GraphModule) -> str:
    """The composite `auto` stands for on this graph."""
    return "AttnLRP" if has_attention(graph.graph.nodes) else "EpsilonPlusFlat"


def lrp(model: Model, x: torch.Tensor, target: torch.Tensor, rng: BatchRNG, composite: str = AUTO,
        epsilon: float = 1e-6, gamma: float = 0.25, low: float | list | None = None, high: float | list | None = None,
        rules_by_type: dict | str | None = None, rules_by_name: dict | str | None = None,
        record_layers: list | str = ()) -> Attribution:
    """Relevance [B,C,H,W] of the target logit; `relevance:<layer>` extras for `record_layers`."""
    settings = _settings(model, epsilon, gamma, low, high)
    by_type, by_name = _mapping(rules_by_type, "rules_by_type"), _mapping(rules_by_name, "rules_by_name")
    record = tuple(_names(record_layers))
    engine = _engine(model, composite, settings, by_type, by_name, record)
    result = engine(x, target)
    extras = {f"relevance:{name}": value for name, value in result.recorded.items()}
    return Attribution(result.relevance, extras, conservation(result.relevance, result.recorded, result.logits, target))


def conservation(relevance: torch.Tensor, recorded: dict[str, torch.Tensor], logits: torch.Tensor,
                 target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per input, |Σ R − f_t(x)| / |f_t(x)| of the input relevance (`conservation_error`) and of each
    recorded layer's (`conservation_error:<layer>`): relevance starts as the target logit, so 0 means
    every rule on the way conserved it (biases, epsilon and constant operands absorb the rest).
    NaN where the logit is 0; the run reports mean and max over inputs in run.json (`stats`)."""
    logit = logits.detach().double().gather(1, target.to(logits.device).view(-1, 1))[:, 0]
    scale = torch.where(logit != 0, logit.abs(), torch.full_like(logit, float("nan")))

    def error(r: torch.Tensor) -> torch.Tensor:
        return ((r.detach().double().flatten(1).sum(1).to(logit.device) - logit).abs() / scale).cpu()

    return {"conservation_error": error(relevance),
            **{f"conservation_error:{name}": error(r) for name, r in recorded.items()}}


def _engine(model: Model, name: str, settings: Settings, by_type: dict[str, str], by_name: dict[str, str],
            record: tuple[str, ...]) -> LRP:
    graph = model.graph()
    if name == AUTO:
        name = default_composite(graph)
    key = (name, settings, repr(sorted(by_type.items())), repr(sorted(by_name.items())), record)
    engines = _ENGINES.setdefault(graph, {})
    if key not in engines:
        try:
            chosen = composite(name, settings).override(parse_rules_by_type(by_type, settings),
                                                        parse_rules_by_name(by_name, settings))
            engine = LRP(graph, chosen, record)
        except (UnknownLayer, ValueError) as exc:
            raise UsageError(f"lrp: {exc}") from None
        if len(engines) >= _PER_GRAPH:
            engines.pop(next(iter(engines)))
        engines[key] = engine
    return engines[key]


def check(model: Model, params: dict[str, Any]) -> None:
    """Prepare (and cache) the engine once before any input runs: UsageError naming the parameter when
    rules_by_name or record_layers name no layer of the model (with suggestions), or a rule or bound is bad."""
    settings = _settings(model, params["epsilon"], params["gamma"], params["low"], params["high"])
    by_type = _mapping(params["rules_by_type"], "rules_by_type")
    by_name = _mapping(params["rules_by_name"], "rules_by_name")
    _engine(model, params["composite"], settings, by_type, by_name, tuple(_names(params["record_layers"])))


@hookimpl
def xai_methods() -> list[Method]:
    kinds = ", ".join(KINDS)
    rules = ", ".join(RULES)
    return [
        Method(
            "lrp",
            "layer-wise relevance propagation with Zennit's composites, on the model graph",
            lrp,
            (
                Param("composite", str, AUTO,
                      "rule set: Zennit's names, or AttnLRP / CPLRP for transformers (Achtibat et al. 2024); "
                      "auto: AttnLRP when the graph has attention (a softmax feeding a matmul), else EpsilonPlusFlat",
                      choices=(AUTO, *COMPOSITES)),
                Param("epsilon", float, 1e-6,
                      "epsilon of the epsilon rule (dense layers; AttnLRP/CPLRP: also conv, matmul, norm)", low=0.0),
                Param("gamma", float, 0.25, "gamma of the gamma rule (EpsilonGammaBox convolutions)", low=0.0),
                Param("low", (float, list), None,
                      "z-box lower bound, normalised input space, scalar or per channel (default: pixel 0 normalised)"),
                Param("high", (float, list), None,
                      "z-box upper bound, normalised input space, scalar or per channel (default: pixel 1 normalised)"),
                Param("rules_by_type", (dict, str), None,
                      f"rule per layer type, e.g. {{conv: gamma:0.25, linear: epsilon, matmul: uniform}}; "
                      f"types: {kinds}; rules: {rules}"),
                Param("rules_by_name", (dict, str), None,
                      "rule per layer name, e.g. {features.0: flat}; applies inside that layer"),
                Param("record_layers", (list, str), [],
                      "layers whose output relevance is saved as extras 'relevance:<name>'"),
            ),
            needs="graph",
            check=check,
        )
    ]
