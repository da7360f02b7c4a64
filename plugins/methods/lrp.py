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
(queries and keys get relevance, which CP-LRP drops) and is the paper's most faithful variant; run.json
names the composite used (`resolved.<output>.composite`).

Where relevance goes (run.json `stats.<output>`, shares of the target logit per input, mean and max):
`input_share` reaches the pixels; `constant_share:<name>` goes to a constant operand of a sum or
concatenation (a ViT's `cls_token`, `pos_embed`; xaicli.lrp.engine `_constant_operand`), `constant_share`
their total; `lost_share` is kept back by rules (biases, stabilisers, AttnLRP's softmax): the three sum
to 1. Layers losing more than `leak_share` of the logit (batch mean) get `lost_share:<layer>` (that batch
mean, over the inputs of the batches where it was above) and one stderr line per run.
"""
from __future__ import annotations

import sys
import threading
import weakref
from typing import Any

import torch
from torch import fx

from xaicli import Attribution, Method, Param, hookimpl
from xaicli.errors import UsageError
from xaicli.lrp import (COMPOSITES, LRP, KINDS, RULES, Result, Settings, UnknownLayer, composite, leaks,
                        parse_rules_by_name, parse_rules_by_type)
from xaicli.lrp.nodes import has_attention
from xaicli.lrp.options import mapping as _mapping
from xaicli.lrp.options import names as _names
from xaicli.lrp.options import settings as _settings
from xaicli.model import Model
from xaicli.rng import BatchRNG

_ENGINES: "weakref.WeakKeyDictionary[fx.GraphModule, dict[Any, LRP]]" = weakref.WeakKeyDictionary()
_PER_GRAPH = 4  # prepared engines kept per graph (one per parameter set in use)
_WARNED: "weakref.WeakKeyDictionary[LRP, set[str]]" = weakref.WeakKeyDictionary()  # leaks told this run
_WARN_LOCK = threading.Lock()


AUTO = "auto"
"""The default composite: AttnLRP on graphs with attention, EpsilonPlusFlat otherwise (`default_composite`)."""


def default_composite(graph: fx.GraphModule) -> str:
    """The composite `auto` stands for on this graph."""
    return "AttnLRP" if has_attention(graph.graph.nodes) else "EpsilonPlusFlat"


def lrp(model: Model, x: torch.Tensor, target: torch.Tensor, rng: BatchRNG, composite: str = AUTO,
        epsilon: float = 1e-6, gamma: float = 0.25, low: float | list | None = None, high: float | list | None = None,
        rules_by_type: dict | str | None = None, rules_by_name: dict | str | None = None,
        record_layers: list | str = (), leak_share: float = 0.05) -> Attribution:
    """Relevance [B,C,H,W] of the target logit; `relevance:<layer>` extras for `record_layers`; where
    relevance goes as stats (`shares`)."""
    settings = _settings(model, epsilon, gamma, low, high)
    by_type, by_name = _mapping(rules_by_type, "rules_by_type"), _mapping(rules_by_name, "rules_by_name")
    record = tuple(_names(record_layers))
    engine = _engine(model, composite, settings, by_type, by_name, record)
    result = engine(x, target, flows=leak_share > 0)
    extras = {f"relevance:{name}": value for name, value in result.recorded.items()}
    stats = conservation(result.relevance, result.recorded, result.logits, target)
    stats.update(shares(result))
    if leak_share > 0:
        stats.update(_leaks(engine, result, leak_share))
    return Attribution(result.relevance, extras, stats)


def shares(result: Result) -> dict[str, torch.Tensor]:
    """Shares of the target logit per input [B]: at the input (`input_share`), at constant operands
    (`constant_share`, and per constant `constant_share:<name>`) and kept back by rules (`lost_share`);
    they sum to 1. NaN where the logit is 0."""
    logit = result.explained.detach().double()
    scale = torch.where(logit != 0, logit, torch.full_like(logit, float("nan")))
    reached = result.relevance.detach().double().flatten(1).sum(1).to(logit.device)
    per_constant = {name: r.detach().double().to(logit.device) for name, r in sorted(result.constants.items())}
    constants = sum(per_constant.values(), torch.zeros_like(logit))
    out = {"input_share": reached / scale, "constant_share": constants / scale,
           "lost_share": (logit - reached - constants) / scale}
    out.update({f"constant_share:{name}": r / scale for name, r in per_constant.items()})
    return {k: v.cpu() for k, v in out.items()}


def _leaks(engine: LRP, result: Result, share: float) -> dict[str, torch.Tensor]:
    """`lost_share:<layer>` for layers losing more than `share` of the logit over this batch (the batch's
    share, for each of its inputs), and a stderr line the first time a node does so in a run."""
    n = result.relevance.shape[0]
    found = leaks(result, share) if result.flows else []  # flows is empty when no rule ran
    with _WARN_LOCK:
        told = _WARNED.setdefault(engine, set())
        new = [(node, value) for node, value in found if node not in told]
        told.update(node for node, _ in new)
    rules = {name: f"{rule} rule on {kind}" for name, kind, rule in engine.rules(layers=True)}
    for node, value in new:
        what = "lost" if value > 0 else "created"  # a rule may also add relevance (AttnLRP's softmax)
        print(f"lrp: relevance {what} at {node} ({100 * abs(value):.1f}% of the target logit, {rules.get(node, '')}); "
              f"run.json stats lost_share:{node}", file=sys.stderr, flush=True)
    return {f"lost_share:{node}": torch.full((n,), value, dtype=torch.float64) for node, value in found}


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
    name = resolve(graph, name)
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


def resolve(graph: fx.GraphModule, name: str) -> str:
    """The composite `name` stands for on this graph (`auto`: `default_composite`)."""
    return default_composite(graph) if name == AUTO else name


def check(model: Model, params: dict[str, Any]) -> dict[str, Any]:
    """Prepare (and cache) the engine once before any input runs: UsageError naming the parameter when
    rules_by_name or record_layers name no layer of the model (with suggestions), or a rule or bound is bad.
    Returns the composite used (run.json `resolved`); a new run warns of leaking nodes afresh."""
    settings = _settings(model, params["epsilon"], params["gamma"], params["low"], params["high"])
    by_type = _mapping(params["rules_by_type"], "rules_by_type")
    by_name = _mapping(params["rules_by_name"], "rules_by_name")
    engine = _engine(model, params["composite"], settings, by_type, by_name, tuple(_names(params["record_layers"])))
    with _WARN_LOCK:
        _WARNED.pop(engine, None)
    return {"composite": resolve(model.graph(), params["composite"])}


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
                Param("leak_share", float, 0.05,
                      "report nodes whose rule loses more than this share of the target logit (batch mean) in "
                      "run.json (stats lost_share:<layer>) and on stderr; 0: no per-layer report", low=0.0),
            ),
            needs="graph",
            check=check,
        )
    ]
