"""The LRP engine: one plain forward over the canonized graph, then one backward sweep applying rules.

The forward keeps every node's output (what a gradient keeps too); the backward visits nodes in
reverse order and hands each node's output relevance to its rule, which returns its inputs'
relevance. A node read by several others (residual branches) sums what they send back, as
autograd sums gradients. Everything is batched; nothing loops over samples.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import fx

from ..graph.batch import in_rows
from .canonize import canonize
from .composites import Composite
from .nodes import bind, display_names, kind, layer_index, nonnegative, normalise, packet, signal, tensor_args
from .ops import LinearOp, linear_norm, linear_op
from .rules import Call, LayerRule, Pass, Rule


@dataclass
class Step:
    """One compute node with its kind, rule, graph inputs and (for linear rules) its LinearOp."""

    node: fx.Node
    kind: str
    rule: Rule
    inputs: list[fx.Node]
    op: LinearOp | None
    nonneg: bool
    positive_only: bool = False  # relevance reaches only outputs > 0 (see `_positive_only`)
    meta: dict[str, Any] = field(default_factory=dict)  # what the rule needs of the node (Call.meta)
    constant: str | None = None  # the constant that what this node does not pass on goes to (`_constant_operand`)
    conserves: bool = False  # its rule hands on exactly what reaches it: `flows` skips it (`_conserves`)
    select: tuple[int, int] | None = None  # (dim, index) of a select whose relevance is added in place (`_select`)


@dataclass
class Result:
    """Input relevance [B, ...], the logits [B, K], and relevance and outputs (activations) of named layers.

    `explained` is the target logit f_t(x) [B] relevance starts from; `constants` the relevance per input
    [B] that rules send to constant operands (a class token, positional embeddings), by constant name
    (see `_constant_operand`); `flows` (when asked for) maps each compute node's layer name to (Σ R at its
    output, Σ R it sends on to its graph inputs and constant operands), both summed over the batch
    (0-d tensors): what a node's rule loses is the difference (see `leaks`). Nodes whose rule cannot lose
    any (re-arrangements, the pass rule) are left out.
    """

    relevance: torch.Tensor
    logits: torch.Tensor
    recorded: dict[str, torch.Tensor]
    activations: dict[str, torch.Tensor] = field(default_factory=dict)
    explained: torch.Tensor | None = None
    flows: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    constants: dict[str, torch.Tensor] = field(default_factory=dict)


class UnknownLayer(ValueError):
    """A layer name that is not in the graph; the message lists close names."""


class LRP:
    """LRP for one graph and one composite, prepared once and applied to any number of batches.

    `graph` is an ATen-level GraphModule (xaicli.graph's representation); it is canonized into a new
    GraphModule, so neither it nor the model it came from changes. `record` names layers whose
    output relevance is returned as well. `channels_last` (default: on CPUs) runs 4-D tensors in NHWC,
    where oneDNN's convolutions are faster; results differ from NCHW by rounding only, which max
    pooling's winner-take-all can turn into a moved pixel where two window entries are within an ulp.
    """

    def __init__(self, graph: fx.GraphModule, composite: Composite, record: Sequence[str] = (),
                 channels_last: bool | None = None):
        self.graph = canonize(graph)
        self.constants = dict(self.graph.named_buffers())
        device = next(iter(self.constants.values())).device if self.constants else torch.device("cpu")
        self.channels_last = device.type == "cpu" if channels_last is None else channels_last
        if self.channels_last:
            self.constants = {k: _channels_last(v) for k, v in self.constants.items()}
        nodes = list(self.graph.graph.nodes)
        self.input = next(n for n in nodes if n.op == "placeholder")
        self.output = next(n for n in nodes if n.op == "output").args[0]
        self.outputs, self.members = layer_index(nodes)
        self.names = display_names(nodes)
        self.steps = self._plan(nodes, composite)
        self.record = {name: self._output_of(name) for name in record}

    def __call__(self, x: torch.Tensor, target: torch.Tensor, flows: bool = False) -> Result:
        """Relevance of `x` for the logits `target` [B], starting from R = logit at the target (0 elsewhere);
        `flows`: also each node's relevance in and out (Result.flows)."""
        return in_rows(self.graph, lambda x, target, live: self._explain(x, target, flows, live), x, target)

    def _explain(self, x: torch.Tensor, target: torch.Tensor, flows: bool, live: int) -> Result:
        """`__call__` on rows of which the first `live` are real: padding (`in_rows`) starts with no relevance."""
        if self.channels_last:
            x = _channels_last(x)
        env, calls = self._forward(x)
        logits = env[self.output]
        index = target.to(logits.device).view(-1, 1)
        explained = logits.gather(1, index)
        start = torch.zeros_like(logits).scatter_(1, index, explained)
        start[live:] = 0
        sums: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = {} if flows else None
        constants: dict[str, torch.Tensor] = {}
        relevance, found = self._backward(calls, start, sums, constants)
        # a layer no relevance reached (a branch the target does not use) has zero relevance
        recorded = {name: found[node].contiguous() if node in found else torch.zeros_like(env[node]).contiguous()
                    for name, node in self.record.items()}
        activations = {name: env[node] for name, node in self.record.items()}
        return Result((relevance if relevance is not None else torch.zeros_like(x)).contiguous(), logits, recorded,
                      activations, explained.squeeze(1), sums or {}, constants)

    def forward(self, x: torch.Tensor) -> tuple[dict[fx.Node, Any], dict[fx.Node, Call]]:
        """The forward half of `__call__` (layout included): every node's value and each rule's Call,
        for callers that run their own backward sweep over `steps` (xaicli.concepts' conditional LRP)."""
        return self._forward(_channels_last(x) if self.channels_last else x)

    def rules(self, layers: bool = False) -> list[tuple[str, str, str]]:
        """(node name, or layer name with `layers`, kind, rule name) for every compute node, in graph order."""
        return [(layer_name(s.node) if layers else s.node.name, s.kind, s.rule.name) for s in self.steps]

    def _plan(self, nodes: list[fx.Node], composite: Composite) -> list[Step]:
        by_name = self._rules_by_name(composite)
        positive = nonnegative(nodes)
        steps: list[Step] = []
        first_open = composite.first is not None
        for node in nodes:
            if node.op != "call_function":
                continue
            node_kind = kind(node)
            first = first_open and node_kind in composite.first_kinds
            first_open = first_open and not first
            rule = by_name.get(node) or composite.rule_for(node_kind, first)
            if node_kind == "norm" and isinstance(rule, LayerRule) and not linear_norm(node):
                rule = Pass()  # a normalisation NormOp does not cover (instance norm, adaptive parameters)
            inputs = tensor_args(node)
            op = (linear_op(node, node_kind, self._constant, rule.softmax_constant)
                  if isinstance(rule, LayerRule) else None)
            steps.append(Step(node, node_kind, rule, inputs, op, all(n in positive for n in inputs),
                              meta=_meta(node, node_kind), constant=self._constant_operand(node, node_kind, inputs)))
        for step in _positive_only(steps):
            step.positive_only = True
        for step in steps:
            step.conserves = _conserves(step)
            step.select = _select(step)
        return steps

    def _rules_by_name(self, composite: Composite) -> dict[fx.Node, Rule]:
        """Each named layer's rule on every node inside it that the rule applies to."""
        out: dict[fx.Node, Rule] = {}
        for name, rule in composite.by_name.items():
            members = self.members.get(normalise(name))
            if members is None:
                raise UnknownLayer(f"rules_by_name: no layer {name!r} in the model{self._close(name)}")
            fitting = [n for n in members if kind(n) in rule.kinds]
            if not fitting:
                kinds = sorted({kind(n) for n in members})
                raise ValueError(f"rules_by_name: rule {rule.name!r} applies to none of the nodes of {name!r} "
                                 f"(kinds: {', '.join(kinds)}; the rule applies to {', '.join(sorted(rule.kinds))})")
            out.update({n: rule for n in fitting})
        return out

    def _output_of(self, name: str) -> fx.Node:
        node = self.outputs.get(normalise(name))
        if node is None:
            raise UnknownLayer(f"record_layers: no layer {name!r} in the model{self._close(name)}")
        return node

    def _close(self, name: str) -> str:
        close = difflib.get_close_matches(name, self.names, n=5, cutoff=0.5)
        return f"; close names: {', '.join(close)}" if close else f"; layers include: {', '.join(self.names[:8])}, ..."

    def _constant(self, arg: Any) -> Any:
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            return self.constants[str(arg.target)]
        return arg

    def _constant_operand(self, node: fx.Node, node_kind: str, inputs: list[fx.Node]) -> str | None:
        """The name of the constant that relevance this node does not pass on to its graph inputs goes to.

        Two places drop relevance into a constant tensor that is an operand of a non-parametric op: a node
        computed from constants alone (a class token expanded to the batch: all relevance reaching it),
        and a sum or re-arrangement with a constant operand (positional embeddings added to the tokens: the
        sum rule's bias share; a constant concatenated: its slice). Such relevance is grouped by the
        constant's graph name (several joined with `+`). Weights, biases and statistics of conv, linear
        and norm layers are not meant: what those rules keep back is a loss of the node (`leaks`).
        """
        if inputs and node_kind not in ("sum", "shape"):
            return None
        values = {str(a.target): self.constants.get(str(a.target)) for a in node.all_input_nodes if a.op == "get_attr"}
        joined = "+".join(name for name, v in values.items() if isinstance(v, torch.Tensor) and v.is_floating_point())
        return joined or (None if inputs else node.name)  # no named constant: e.g. zeros made from a shape

    def _forward(self, x: torch.Tensor) -> tuple[dict[fx.Node, Any], dict[fx.Node, Call]]:
        """Every node's value, and what each float-valued node's rule needs for the backward."""
        env: dict[fx.Node, Any] = {self.input: x.detach()}
        calls: dict[fx.Node, Call] = {}
        with torch.no_grad():
            for step in self.steps:
                out, leaves, graph_out = self._run(step, env)
                env[step.node] = out
                if isinstance(out, torch.Tensor) and out.is_floating_point():
                    inputs = [env[n] for n in step.inputs]
                    op = step.op.bind(inputs) if step.op is not None else None
                    calls[step.node] = Call(inputs, out, op, step.nonneg, leaves, graph_out, step.positive_only,
                                            step.meta)
        return env, calls

    def _run(self, step: Step, env: dict[fx.Node, Any]) -> tuple[Any, list[torch.Tensor] | None, Any]:
        """One node's output; under autograd (leaves, graph output) when its rule is the gradient."""
        lookup, leaves = env, None
        if step.rule.needs_graph and step.inputs:
            leaves = [env[n].detach().requires_grad_(env[n].is_floating_point()) for n in step.inputs]
            lookup = {**env, **dict(zip(step.inputs, leaves))}
        args, kwargs = fx.node.map_arg((step.node.args, step.node.kwargs),
                                       lambda n: self._constant(n) if n.op == "get_attr" else lookup[n])
        if leaves is None:
            return step.node.target(*args, **kwargs), None, None
        with torch.enable_grad():
            graph_out = step.node.target(*args, **kwargs)
        return graph_out.detach() if isinstance(graph_out, torch.Tensor) else graph_out, leaves, graph_out

    def _backward(self, calls: dict[fx.Node, Call], start: torch.Tensor,
                  sums: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                  constants: dict[str, torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor | None, dict[fx.Node, torch.Tensor]]:
        """Rules in reverse graph order; returns the input's relevance and that of recorded nodes
        (and fills `sums`, when given, with each node's Σ R out and passed on, and `constants` with the
        relevance per input [B] sent to constant operands)."""
        relevance: dict[fx.Node, torch.Tensor] = {self.output: start}
        owned: set[fx.Node] = set()  # nodes whose relevance tensor this sweep made (safe to add into)
        wanted = set(self.record.values())
        recorded: dict[fx.Node, torch.Tensor] = {}
        for step in reversed(self.steps):
            r = relevance.pop(step.node, None)
            call = calls.pop(step.node, None)
            if r is None or call is None:
                continue
            if step.node in wanted:
                recorded[step.node] = r
            if step.select is not None:  # q, k, v = qkv.unbind(): add into qkv's relevance, no full-size copies
                parent = step.inputs[0]
                if parent not in owned:
                    held = relevance.get(parent)
                    relevance[parent] = held.clone() if held is not None else torch.zeros_like(call.inputs[0],
                                                                                               dtype=r.dtype)
                    owned.add(parent)
                relevance[parent].select(*step.select).add_(r)
                continue
            parts = list(zip(step.inputs, step.rule.relevance(call, r) if step.inputs else ()))
            kept = None  # relevance per input sent to a constant operand
            if step.constant is not None and constants is not None:
                n = start.shape[0]
                kept = _per_input(r, n, not step.inputs)
                for _, part in parts:
                    kept = kept if part is None else kept - _per_input(part, n, False)
                constants[step.constant] = constants[step.constant] + kept if step.constant in constants else kept
            if sums is not None and not step.conserves:
                sent = [part.sum() for _, part in parts if part is not None]
                sent += [kept.sum()] if kept is not None else []
                total = sent[0] if len(sent) == 1 else torch.stack(sent).sum() if sent else r.new_zeros(())
                sums[layer_name(step.node)] = (r.sum(), total)
            for node, part in parts:
                if part is None:
                    continue
                if node in relevance:
                    relevance[node] = relevance[node] + part
                    owned.add(node)
                else:
                    relevance[node] = part
                    owned.discard(node)
        return relevance.get(self.input), recorded


_RELU = {"relu", "relu6"}


def _meta(node: fx.Node, node_kind: str) -> dict[str, Any]:
    """Facts about a node its rule needs at run time: a softmax's dim, a gate's signal inputs."""
    if node_kind == "softmax":
        return {"dim": int(bind(node).get("dim", -1))}
    if node_kind == "gate":
        found = signal(node)
        return {"signal": found} if found is not None else {}
    return {}


def _positive_only(steps: list[Step]) -> list[Step]:
    """Steps whose output relevance is zero wherever their output is <= 0, known from the graph alone.

    A node's relevance vanishes where its value is 0 when every reader sends back relevance in
    proportion to the value it read: a linear rule whose terms all multiply by the input (not flat,
    w² or z^B's bounds), or a re-arrangement / max pooling / ReLU whose own relevance vanishes where
    its value is 0. A node read only by such ReLUs then has relevance only on outputs > 0, so gamma
    needs neither its negative share nor its output masks there.
    """
    by_node = {step.node: step for step in steps}
    vanishes: set[fx.Node] = set()  # relevance is 0 where the value is 0

    def relu(user: fx.Node) -> bool:  # a ReLU passing relevance on, itself with relevance only where > 0
        step = by_node.get(user)
        return (step is not None and step.kind == "activation" and step.rule.name == "pass"
                and packet(user) in _RELU and user in vanishes)

    def proportional(user: fx.Node) -> bool:
        step = by_node.get(user)
        if step is None:
            return False
        if isinstance(step.rule, LayerRule):
            return all(t.input in ("x", "x+", "x-") for share in step.rule.shares() for t in share.terms)
        routed = step.kind in ("shape", "maxpool") and step.rule.name == "gradient" and user in vanishes
        return routed or relu(user)

    found = []
    for step in reversed(steps):
        users = list(step.node.users)
        if users and all(proportional(u) for u in users):
            vanishes.add(step.node)
        if users and all(relu(u) for u in users):
            found.append(step)
    return found


def layer_name(node: fx.Node) -> str:
    """The node's layer name (xaicli.graph's `meta["layer"]`, as rules_by_name and Grad-CAM's `layer` take it)."""
    return node.meta.get("layer") or node.name


def _select(step: Step) -> tuple[int, int] | None:
    """(dim, index) of a select of one graph input under the gradient rule, whose relevance the sweep adds
    into its input's slice (the gradient's own vjp would make a full-size zero tensor per select)."""
    if packet(step.node) != "select" or step.rule.name != "gradient" or len(step.inputs) != 1:
        return None
    args = bind(step.node)
    dim, index = args.get("dim"), args.get("index")
    return (dim, index) if isinstance(dim, int) and isinstance(index, int) else None


def _conserves(step: Step) -> bool:
    """Whether a node's rule hands on exactly the relevance that reaches it: the pass rule, and the gradient
    of a re-arrangement (not of padding, which drops what reaches the pad; not with a constant operand)."""
    if step.constant is not None:
        return False
    if isinstance(step.rule, Pass):
        return True
    return step.kind == "shape" and step.rule.name == "gradient" and packet(step.node) not in ("constant_pad_nd", "pad")


def _per_input(t: torch.Tensor, n: int, exact: bool) -> torch.Tensor:
    """Σ of a relevance tensor per input [n], its first dimension the batch (or the batch folded with
    windows, batch-major; `exact`: exactly the batch, for constants whose shape need not carry it). A
    tensor without it (a constant's relevance summed over the batch by broadcasting) is split evenly."""
    first = t.shape[0] if t.ndim else 0
    if first == n or (not exact and first and first % n == 0):
        return t.reshape(n, -1).sum(1)
    return t.sum().expand(n) / n


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """NHWC layout for 4-D tensors: oneDNN's convolutions run markedly faster in it on CPUs."""
    return t.contiguous(memory_format=torch.channels_last) if t.ndim == 4 else t


def conservation(result: Result) -> torch.Tensor:
    """Relative conservation error per sample [B]: |Σ R_input − f_t(x)| / |f_t(x)| (0: all of the target
    logit reached the input; NaN where the logit is 0)."""
    if result.explained is None:
        raise ValueError("conservation needs a Result from LRP.__call__ (it records the target logit)")
    explained = result.explained.to(result.relevance.dtype)
    total = result.relevance.flatten(1).sum(1)
    return (total - explained).abs() / explained.abs()


def leaks(result: Result, share: float = 0.05) -> list[tuple[str, float]]:
    """Nodes whose rule loses (or creates) more than `share` of the explained relevance, largest first:
    (layer name, (Σ R out − Σ R in) / Σ_batch |f_t(x)|). Needs `LRP(...)(x, target, flows=True)`.

    Relevance leaves through biases and stabilisers, through non-conservative rules (AttnLRP's softmax)
    and through rules that drop an operand (a divisor); what goes to constant operands (a class token,
    positional embeddings) counts as passed on and is reported in `Result.constants` instead.
    """
    if not result.flows:
        raise ValueError("leaks needs a Result computed with flows=True")
    scale = result.explained.abs().sum() if result.explained is not None else torch.tensor(1.0)
    scale = scale.clamp(min=torch.finfo(scale.dtype).tiny)
    lost = torch.stack([(out - sent).to(scale.dtype) for out, sent in result.flows.values()]) / scale
    found = list(zip(result.flows, lost.tolist()))  # one device sync, not one per node
    return sorted([(n, v) for n, v in found if abs(v) > share], key=lambda item: -abs(item[1]))


def explain(graph: fx.GraphModule, x: torch.Tensor, target: torch.Tensor, composite: Composite,
            record: Iterable[str] = ()) -> Result:
    """One-off LRP (prepare and apply); keep an `LRP` object to explain many batches."""
    return LRP(graph, composite, tuple(record))(x, target)
