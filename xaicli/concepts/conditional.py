"""Conditional LRP (CRP, Achtibat et al. 2023) on the LRP engine's graph: one heatmap per concept.

A concept is a channel of a layer. Its conditional heatmap is LRP with the relevance at that layer
zeroed on every other channel (zennit-crp's `CondAttribution` masks the layer output's gradient the
same way). Optionally a channel of a layer above restricts the relevance first (a two-layer
condition: the sub-concepts of an upper concept).

Cost: the forward and the sweep from the output down to the layer run once per batch on the B
inputs; below the layer the sweep carries a stacked relevance [K, B, ...] (concepts × inputs) in
one pass, chunked over concepts against memory (xaicli.chunking). The rules' denominators depend
on the activations only, so each is computed once per input and broadcast over the K concepts:
what a concept adds is one transposed op (vjp) per layer, not a forward and a backward.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch
from torch import fx

from ..chunking import MaxBatch, chunked
from ..graph.batch import in_rows
from ..lrp import LRP, Composite, UnknownLayer
from ..lrp.engine import Step
from ..lrp.nodes import normalise
from ..lrp.ops import LinearOp, MatmulOp, Mod
from ..lrp.rules import Call, LayerRule

MODES = ("relevance", "max")
"""How a channel's relevance map becomes one score: its sum, or its largest value."""


@dataclass
class CRPResult:
    """Conditional heatmaps [B, K, ...input], the concepts [B, K], the layer's relevance [B, C, ...]
    (under the upper condition, if any), its activation, and the logits [B, classes]."""

    relevance: torch.Tensor
    concepts: torch.Tensor
    layer_relevance: torch.Tensor
    activation: torch.Tensor
    logits: torch.Tensor


Chooser = Callable[[torch.Tensor], torch.Tensor]
"""Layer relevance [B, C, ...] -> concept indices [B, K] (the same K for every input)."""


def channel_axis(t: torch.Tensor) -> int:
    """Where a layer's channels are: dim 1 of feature maps [B, C, ...] and vectors [B, C]; the last
    dim of token sequences [B, N, D] (transformers)."""
    return -1 if t.ndim == 3 else 1


def channel_scores(t: torch.Tensor, mode: str = "relevance") -> torch.Tensor:
    """[B, C]: per channel, the sum (`relevance`) or the largest value (`max`) of a layer tensor."""
    per = t.movedim(channel_axis(t), 1).flatten(2) if t.ndim > 2 else t.unsqueeze(2)
    return per.sum(2) if mode == "relevance" else per.amax(2)


def shares(layer_relevance: torch.Tensor) -> torch.Tensor:
    """[B, C]: each channel's relevance over the layer's total (signed; all channels sum to 1; 0 where the total is 0)."""
    sums = channel_scores(layer_relevance.double(), "relevance")
    total = sums.sum(1, keepdim=True)
    return torch.where(total == 0, torch.zeros_like(sums), sums / torch.where(total == 0, 1.0, total))


def one_hot(concepts: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[K, B, ...] 0/1 masks selecting channel concepts[b, k] of a layer tensor `like` [B, C, ...]."""
    axis = channel_axis(like)
    channels = like.shape[axis]
    hot = torch.nn.functional.one_hot(concepts.t().long(), channels).to(like.dtype)  # [K, B, C]
    if axis == -1:
        return hot.reshape(hot.shape[0], hot.shape[1], *[1] * (like.ndim - 2), channels)
    return hot.reshape(*hot.shape, *[1] * (like.ndim - 2))


class ConditionalLRP:
    """CRP for one graph, composite and layer, prepared once and applied to any number of batches.

    `layer` None: the last convolution. `restrict` = (upper layer, channel): relevance passes only through that channel of a layer
    above `layer` first. Relevance that bypasses a conditioned layer (a shortcut around it) is dropped
    there, as zennit-crp's `exclude_parallel=True` (its default) does; `parallel=True` keeps it
    (CondAttribution with `exclude_parallel=False`: plain masks on the layers' relevance). Layer names are those of `rules_by_name`; unknown ones raise
    `UnknownLayer` with close names.
    """

    def __init__(self, graph: fx.GraphModule, composite: Composite, layer: str | None,
                 restrict: tuple[str, int] | None = None, channels_last: bool | None = None,
                 parallel: bool = False):
        self.lrp = LRP(graph, composite, channels_last=channels_last)
        self.parallel = parallel
        layer = layer or default_layer(self.lrp)
        self.layer, self.node = layer, self._node(layer, "layer")
        order = {step.node: i for i, step in enumerate(self.lrp.steps)}
        if self.node not in order:
            raise ValueError(f"layer {layer!r} is not a compute node of the model")
        self.restrict: tuple[fx.Node, int] | None = None
        if restrict:
            upper = self._node(restrict[0], "condition")
            if order.get(upper, -1) <= order[self.node]:
                raise ValueError(f"condition layer {restrict[0]!r} must lie above layer {layer!r} (closer to the "
                                 "output): relevance reaches it first")
            self.restrict = (upper, int(restrict[1]))

    def _node(self, name: str, what: str) -> fx.Node:
        node = self.lrp.outputs.get(normalise(name))
        if node is None:
            close = difflib.get_close_matches(name, self.lrp.names, n=5, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else f"layers include {', '.join(self.lrp.names[:8])}, ..."
            raise UnknownLayer(f"{what}: no layer {name!r} in the model; {hint}")
        return node

    def channels(self) -> int | None:
        """How many channels (concepts) the layer has, where the graph records its shape."""
        value = self.node.meta.get("val")
        return int(value.shape[channel_axis(value)]) if value is not None else None

    def __call__(self, x: torch.Tensor, target: torch.Tensor, choose: Chooser, max_batch: MaxBatch = "auto",
                 key: str = "crp") -> CRPResult:
        return in_rows(self.lrp.graph, lambda x, target, live: self._explain(x, target, choose, max_batch, key, live),
                       x, target)

    def _explain(self, x: torch.Tensor, target: torch.Tensor, choose: Chooser, max_batch: MaxBatch, key: str,
                 live: int) -> CRPResult:
        """`__call__` on rows of which the first `live` are real: padding (`in_rows`) starts with no relevance."""
        env, calls = self.lrp.forward(x)
        logits = env[self.lrp.output]
        index = target.to(logits.device).view(-1, 1)
        start = torch.zeros_like(logits).scatter_(1, index, logits.gather(1, index))
        start[live:] = 0
        steps = list(reversed(self.lrp.steps))
        pending, at = self._upper(steps, calls, start)
        layer_relevance = pending.pop(self.node, None)
        if not self.parallel:
            pending = {}
        if layer_relevance is None:
            layer_relevance = torch.zeros_like(env[self.node])
        concepts = choose(layer_relevance).to(layer_relevance.device)
        masks = one_hot(concepts, layer_relevance)
        x_like = env[self.lrp.input]

        def lower(begin: int, stop: int) -> torch.Tensor:
            stacked = dict(pending)
            stacked[self.node] = layer_relevance.unsqueeze(0) * masks[begin:stop]
            found = self._lower(steps[at:], calls, stacked)
            if found is None:  # no relevance reached the input
                return x_like.new_zeros((stop - begin, *x_like.shape))
            return found if found.ndim > x_like.ndim else found.expand(stop - begin, *found.shape)

        parts = chunked(lower, concepts.shape[1], max_batch, key=key, device=x_like.device) if concepts.shape[1] else []
        relevance = torch.cat(parts).transpose(0, 1) if parts else x_like.new_zeros((len(x_like), 0, *x_like.shape[1:]))
        return CRPResult(relevance.contiguous(), concepts, layer_relevance.contiguous(),
                         env[self.node].contiguous(), logits)

    def _upper(self, steps: list[Step], calls: dict[fx.Node, Call], start: torch.Tensor
               ) -> tuple[dict[fx.Node, torch.Tensor], int]:
        """Sweep from the output down to the layer (B rows); returns pending relevance and where it stopped."""
        relevance: dict[fx.Node, torch.Tensor] = {self.lrp.output: start}
        for at, step in enumerate(steps):
            if step.node is self.node:
                return relevance, at
            r = relevance.pop(step.node, None)
            call = calls.pop(step.node, None)  # the lower sweep never comes back here
            if r is None or call is None:
                continue
            if self.restrict is not None and step.node is self.restrict[0]:
                r = r * _channel_mask(r, self.restrict[1])
                if not self.parallel:
                    relevance.clear()
            for node, part in zip(step.inputs, step.rule.relevance(call, r) if step.inputs else ()):
                if part is not None:
                    relevance[node] = relevance[node] + part if node in relevance else part
        raise ValueError(f"layer {self.layer!r} was not reached by the backward sweep")

    def _lower(self, steps: list[Step], calls: dict[fx.Node, Call], relevance: dict[fx.Node, torch.Tensor]
               ) -> torch.Tensor | None:
        """Sweep from the layer to the input with stacked [K, B, ...] relevance; calls are kept for the next chunk."""
        for step in steps:
            r = relevance.pop(step.node, None)
            call = calls.get(step.node)
            if r is None or call is None:
                continue
            for node, part in zip(step.inputs, _relevance(step, call, r) if step.inputs else ()):
                if part is not None:
                    relevance[node] = relevance[node] + part if node in relevance else part
        return relevance.get(self.lrp.input)


def default_layer(lrp: LRP) -> str:
    """The last convolution's layer name: the default concept layer."""
    convs = [step.node for step in lrp.steps if step.kind == "conv"]
    if not convs:
        raise ValueError("the model has no convolution; name a `layer`")
    return str(convs[-1].meta.get("layer") or convs[-1].name)


def _channel_mask(r: torch.Tensor, channel: int) -> torch.Tensor:
    axis = channel_axis(r)
    if not 0 <= channel < r.shape[axis]:
        raise ValueError(f"condition channel {channel} is out of range: the layer has {r.shape[axis]} channels")
    shape = [1] * r.ndim
    shape[axis] = r.shape[axis]
    mask = torch.zeros(shape, dtype=r.dtype, device=r.device)
    mask.view(-1)[channel] = 1
    return mask


def _relevance(step: Step, call: Call, r: torch.Tensor) -> Sequence[torch.Tensor | None]:
    """A step's rule on relevance that may carry a leading concept dimension over the call's B rows."""
    stacked = r.ndim == call.output.ndim + 1
    if step.rule.needs_graph:
        return _gradient(call, r, stacked)
    if not stacked:
        return step.rule.relevance(call, r)
    if isinstance(step.rule, LayerRule):
        return step.rule.relevance(replace(call, op=StackedOp(call.op, r.shape[0])), r)  # type: ignore[arg-type]
    # pass-like rules read only shapes: broadcast views of the inputs
    return step.rule.relevance(replace(call, inputs=[t.expand(r.shape[0], *t.shape) for t in call.inputs]), r)


def _gradient(call: Call, r: torch.Tensor, stacked: bool) -> list[torch.Tensor | None]:
    """The gradient rule per concept slice; the node's autograd graph is kept for the next chunk."""
    leaves = call.leaves or []
    wanted = [leaf for leaf in leaves if leaf.requires_grad]
    if not wanted or call.graph_out is None or not call.graph_out.requires_grad:
        return [None] * len(leaves)
    slices = r.unbind(0) if stacked else [r]
    grads = [torch.autograd.grad(call.graph_out, wanted, s, retain_graph=True, allow_unused=True) for s in slices]
    per_leaf = iter(zip(*grads))
    out: list[torch.Tensor | None] = []
    for leaf in leaves:
        if not leaf.requires_grad:
            out.append(None)
            continue
        parts = next(per_leaf)
        if any(p is None for p in parts):
            out.append(None)
        else:
            out.append(torch.stack(parts) if stacked else parts[0])
    return out


class StackedOp(LinearOp):
    """A LinearOp whose vjps take relevance [K, B, ...] over the op's B-row inputs.

    z and biases (the rules' denominators) stay B rows, shared by the K concepts; vjps run on the
    K·B rows flattened, as one batch.
    """

    def __init__(self, inner: LinearOp, k: int):
        self.inner, self.k = inner, k
        self.parametric, self.positive = inner.parametric, inner.positive

    def apply(self, us: list[torch.Tensor], mod: Mod, bias: bool) -> torch.Tensor:
        return self.inner.apply(us, mod, bias)

    def bias(self, mod: Mod) -> torch.Tensor | float:
        return self.inner.bias(mod)

    def vjp(self, g: torch.Tensor, mod: Mod, like: list[torch.Tensor], scale: float = 1.0) -> list[torch.Tensor]:
        return self.vjp_many(g, [(mod, scale)], like)[0]

    def vjp_many(self, g: torch.Tensor, mods: list[tuple[Mod, float]], like: list[torch.Tensor]
                 ) -> list[list[torch.Tensor]]:
        k, rows = g.shape[0], g.shape[1]
        layout = _layout(like[0]) if like else torch.contiguous_format
        flat = g.reshape(k * rows, *g.shape[2:]).contiguous(memory_format=layout)
        shapes = [u.new_empty((k * u.shape[0], *u.shape[1:])) for u in like]
        shapes = [s.contiguous(memory_format=layout) if s.ndim == 4 else s for s in shapes]
        inner = self.inner
        if isinstance(inner, MatmulOp):
            inner = inner.bind([v.expand(k, *v.shape).reshape(k * v.shape[0], *v.shape[1:]) for v in inner.values])
        out = inner.vjp_many(flat, mods, shapes)
        return [[v.reshape(k, -1, *v.shape[1:]) if v is not None else None for v in vs] for vs in out]  # type: ignore[misc]


def _layout(t: torch.Tensor) -> Any:
    if t.ndim == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
