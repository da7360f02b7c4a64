"""Concept Relevance Propagation (CRP, Achtibat et al. 2023): one conditional LRP heatmap per concept.

A concept is a channel of `layer` (default: the last convolution). `concepts: top:K` takes, per
input, the K channels with the highest score (`mode`: the sum of the channel's relevance, or its
largest value); a list takes those channels for every input. `condition: LAYER:CHANNEL` first
restricts relevance to one channel of a layer above (a two-layer condition: sub-concepts).
Relevance that bypasses a conditioned layer through a shortcut is dropped there (zennit-crp's
`exclude_parallel=True`, its default); `parallel: true` keeps it.
Rules, composites and their options are those of `lrp` (same engine and graph, so eager,
TorchScript and ONNX models alike); relevance starts at the target logit, as for `lrp`.

Outputs per input: `relevance` [K, C, H, W] (the conditional heatmaps, concept order), extras
`concepts` [K] (channel indices) and `concept_relevance` [K] (each concept's share of the layer's
total relevance: signed, all channels of a layer sum to 1). The png writer draws the K heatmaps as a
grid labelled with index and share. One forward and one batched backward per batch: see
xaicli.concepts.conditional.
"""
from __future__ import annotations

from typing import Any

import torch

from xaicli import Attribution, Method, Param, hookimpl
from xaicli.chunking import MaxBatch, max_batch_param
from xaicli.concepts.conditional import MODES, channel_scores, shares
from xaicli.concepts.engines import Rules, crp_engine, parse_condition, scores_engine
from xaicli.errors import UsageError
from xaicli.lrp import COMPOSITES, KINDS
from xaicli.model import Model
from xaicli.rng import BatchRNG


def crp(model: Model, x: torch.Tensor, target: torch.Tensor, rng: BatchRNG, layer: str | int | None = None,
        concepts: str | list = "top:8", mode: str = "relevance", condition: str | int | None = None, parallel: bool = False,
        composite: str = "EpsilonPlusFlat", epsilon: float = 1e-6, gamma: float = 0.25,
        low: float | list | None = None, high: float | list | None = None, rules_by_type: dict | str | None = None,
        rules_by_name: dict | str | None = None, max_batch: MaxBatch = "auto") -> Attribution:
    """Conditional heatmaps [B, K, C, H, W] with extras `concepts` and `concept_relevance` [B, K]."""
    rules = Rules(composite, epsilon, gamma, low, high, rules_by_type, rules_by_name)
    engine = crp_engine(model, None if layer is None else str(layer), condition, rules, parallel)
    count, chosen = parse_concepts(concepts)

    def choose(layer_relevance: torch.Tensor) -> torch.Tensor:
        channels = layer_relevance.shape[1 if layer_relevance.ndim != 3 else -1]
        if chosen is not None:
            bad = [c for c in chosen if c >= channels]
            if bad:
                raise ValueError(f"crp concepts: channel {bad[0]} is out of range: layer has {channels} channels")
            return torch.tensor(chosen).expand(len(layer_relevance), -1)
        scores = channel_scores(layer_relevance, mode)
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        return order[:, : min(count, channels)]

    result = engine(x, target, choose, max_batch, key="crp")
    share = shares(result.layer_relevance).gather(1, result.concepts.to(result.layer_relevance.device))
    return Attribution(result.relevance, {"concepts": result.concepts.long().cpu(),
                                          "concept_relevance": share.float().cpu()})


def parse_concepts(value: str | list) -> tuple[int, list[int] | None]:
    """`top:K` -> (K, None); a list of channel indices (or "3,7,9") -> (len, list)."""
    if isinstance(value, str) and value.strip().startswith("top:"):
        text = value.strip()[4:]
        if not text.isdigit() or int(text) < 1:
            raise UsageError(f"crp concepts: expected top:K with K >= 1 or a list of channels; got {value!r}")
        return int(text), None
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        channels = [int(str(v).strip()) for v in items if str(v).strip()]
    except ValueError:
        raise UsageError(f"crp concepts: expected top:K or channel indices such as [3, 7]; got {value!r}") from None
    if not channels or any(c < 0 for c in channels):
        raise UsageError(f"crp concepts: expected top:K or channel indices >= 0; got {value!r}")
    return len(channels), channels


def check(model: Model, params: dict[str, Any]) -> None:
    """Prepare the engine before any input runs: UsageError for unknown layers (with close names), a bad
    condition or concept list, channels beyond the layer's."""
    layer = None if params["layer"] is None else str(params["layer"])
    engine = crp_engine(model, layer, params["condition"], Rules.of(params), params["parallel"])
    _, chosen = parse_concepts(params["concepts"])
    channels = engine.channels()
    if chosen is not None and channels is not None and max(chosen) >= channels:
        raise UsageError(f"crp concepts: channel {max(chosen)} is out of range: layer {engine.layer!r} has "
                         f"{channels} channels")
    restrict = parse_condition(params["condition"])
    upper = engine.restrict[0].meta.get("val") if engine.restrict else None
    if restrict and upper is not None and restrict[1] >= upper.shape[1 if upper.ndim != 3 else -1]:
        raise UsageError(f"crp condition: channel {restrict[1]} is out of range for layer {restrict[0]!r}")


def concept_scores(model: Model, x: torch.Tensor, target: torch.Tensor, rng: BatchRNG, layers: list | str = (),
                   composite: str = "EpsilonPlusFlat", epsilon: float = 1e-6, gamma: float = 0.25,
                   low: float | list | None = None, high: float | list | None = None,
                   rules_by_type: dict | str | None = None, rules_by_name: dict | str | None = None) -> Attribution:
    """One LRP pass; per layer the channels' relevance (sum and max) and activation (max) as extras [B, C]."""
    engine = scores_engine(model, layers, Rules(composite, epsilon, gamma, low, high, rules_by_type, rules_by_name))
    result = engine(x, target)
    extras: dict[str, Any] = {}
    for name, relevance in result.recorded.items():
        extras[f"channel_relevance:{name}"] = channel_scores(relevance, "relevance").float().cpu()
        extras[f"channel_relevance_max:{name}"] = channel_scores(relevance, "max").float().cpu()
        extras[f"channel_activation:{name}"] = channel_scores(result.activations[name], "max").float().cpu()
    return Attribution(result.relevance, extras)


def check_scores(model: Model, params: dict[str, Any]) -> None:
    """Prepare the LRP engine: UsageError naming unknown layers (with close names) or bad rules."""
    scores_engine(model, params["layers"], Rules.of(params))


RULE_PARAMS = (
    Param("composite", str, "EpsilonPlusFlat", "rule set (Zennit's names)", choices=COMPOSITES),
    Param("epsilon", float, 1e-6, "epsilon of the epsilon rule (dense layers)", low=0.0),
    Param("gamma", float, 0.25, "gamma of the gamma rule (EpsilonGammaBox convolutions)", low=0.0),
    Param("low", (float, list), None, "z-box lower bound, normalised input space (default: pixel 0 normalised)"),
    Param("high", (float, list), None, "z-box upper bound, normalised input space (default: pixel 1 normalised)"),
    Param("rules_by_type", (dict, str), None, f"rule per layer type; types: {', '.join(KINDS)}"),
    Param("rules_by_name", (dict, str), None, "rule per layer name, e.g. {features.0: flat}"),
)
PARAMS = (
    Param("layer", (str, int), None, "layer whose channels are the concepts, a name as rules_by_name uses "
          "(default: the last convolution)"),
    Param("concepts", (str, list), "top:8", "top:K (the K most relevant channels per input) or a list of channels",
          item=int),
    Param("mode", str, "relevance", "channel score for top:K: the sum of its relevance, or its largest value",
          choices=MODES),
    Param("condition", (str, int), None, "LAYER:CHANNEL of a layer above `layer`: relevance passes that channel first"),
    Param("parallel", bool, False, "keep relevance that bypasses the conditioned layers (shortcuts around them); "
          "default drops it, as zennit-crp's exclude_parallel=True"),
    *RULE_PARAMS,
    max_batch_param("concepts (each over the batch's inputs) propagated below the layer at once"),
)


@hookimpl
def xai_methods() -> list[Method]:
    return [Method("crp", "concept relevance propagation: one conditional LRP heatmap per channel concept "
                   "(Achtibat et al. 2023)", crp, PARAMS, needs="graph", check=check),
            Method("concept_scores", "per-channel relevance and activation of layers, from one LRP pass (the "
                   "per-input vectors of `xai concepts`)", concept_scores,
                   (Param("layers", (list, str), [], "layers whose channels are scored (default: the last convolution)"),
                    *RULE_PARAMS), needs="graph", check=check_scores)]
