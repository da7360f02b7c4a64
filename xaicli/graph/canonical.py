"""ExportedProgram -> the canonical GraphModule (see `xaicli.graph`): one input, one output,
functional ATen ops, own copies of every parameter and constant as get_attr attributes."""
from __future__ import annotations

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from ..errors import UsageError
from .naming import ScopeRule, assign_names, module_scopes
from .rewrite import functionalise, normalise


def from_exported(ep: ExportedProgram, scope_rule: ScopeRule = module_scopes) -> fx.GraphModule:
    """Lift `ep`'s state into attributes of a fresh GraphModule, make its ops functional,
    normalise the op vocabulary and name the nodes by `scope_rule` (see `naming`).
    Composite ops (conv2d, linear, batch_norm, ...) are kept as export recorded them."""
    graph, state = _lift_state(ep)
    if not functionalise(graph):  # torch's functionalisation is exact but slow: only when needed
        graph, state = _lift_state(ep.run_decompositions({}))
    normalise(graph)
    graph = assign_names(graph, scope_rule)
    gm = fx.GraphModule(state, graph, class_name="XaiGraph")
    gm.eval()
    return gm


def _lift_state(ep: ExportedProgram) -> tuple[fx.Graph, dict[str, torch.Tensor]]:
    """Copy ep.graph with lifted parameters/buffers/constants turned into get_attr nodes."""
    specs = {s.arg.name: s for s in ep.graph_signature.input_specs}
    user = [s for s in specs.values() if s.kind == InputKind.USER_INPUT]
    if len(user) != 1:
        raise UsageError(f"the model must take exactly one input tensor; its graph takes {len(user)}")
    graph, env, state = fx.Graph(), {}, {}
    for node in ep.graph.nodes:
        spec = specs.get(node.name) if node.op == "placeholder" else None
        if spec is not None and spec.kind != InputKind.USER_INPUT:
            state[spec.target] = _own_copy(_lookup(ep, spec.target))
            env[node] = graph.get_attr(spec.target)
            env[node].meta.update(node.meta)
        elif node.op == "placeholder":
            env[node] = graph.placeholder("x")
            env[node].meta.update(node.meta)
        elif node.op == "output":
            graph.output(env[_single_output(node)])
        elif node.op == "get_attr" and isinstance(getattr(ep.graph_module, node.target, None), fx.GraphModule):
            env[node] = getattr(ep.graph_module, node.target)  # the body of a wrapper op, inlined below
        elif node.op == "call_function" and node.target in _context_wrappers():
            env[node] = _inline_wrapper(graph, node, env)
        elif _getitem_of_inlined(node, env):
            env[node] = env[node.args[0]][node.args[1]]
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    return graph, state


def _context_wrappers() -> tuple:
    """Higher-order ops torch.export makes of `with torch.autocast(...)` / `torch.set_grad_enabled`
    blocks: (context args..., body GraphModule, *operands). The graph runs in float32 with the
    caller's grad mode, so their bodies are inlined (autocast's dtype switch does not apply)."""
    hop = torch.ops.higher_order
    return tuple(getattr(hop, name) for name in ("wrap_with_autocast", "wrap_with_set_grad_enabled") if hasattr(hop, name))


def _inline_wrapper(graph: fx.Graph, node: fx.Node, env: dict) -> tuple:
    """Inline a context wrapper: its arguments are context values, the body, then the operands."""
    at = next(i for i, a in enumerate(node.args) if isinstance(env.get(a) if isinstance(a, fx.Node) else None, fx.GraphModule))
    return _inline(graph, env[node.args[at]], [env[a] if isinstance(a, fx.Node) else a for a in node.args[at + 1:]])


def _getitem_of_inlined(node: fx.Node, env: dict) -> bool:
    """`outputs[i]` on the outputs of an inlined wrapper (a tuple of copied nodes)."""
    return (node.op == "call_function" and bool(node.args) and isinstance(node.args[0], fx.Node)
            and isinstance(env.get(node.args[0]), tuple))


def _inline(graph: fx.Graph, body: fx.GraphModule, operands: list) -> tuple:
    """Copy `body`'s nodes into `graph` with its placeholders bound to `operands`; its outputs."""
    env: dict[fx.Node, object] = {}
    inputs = iter(operands)
    outputs: tuple = ()
    for node in body.graph.nodes:
        if node.op == "placeholder":
            env[node] = next(inputs)
        elif node.op == "output":
            outs = node.args[0]
            outputs = tuple(env[o] if isinstance(o, fx.Node) else o for o in (outs if isinstance(outs, (list, tuple)) else [outs]))
        elif node.op == "get_attr" and isinstance(getattr(body, node.target, None), fx.GraphModule):
            env[node] = getattr(body, node.target)
        elif node.op == "call_function" and node.target in _context_wrappers():
            env[node] = _inline_wrapper(graph, node, env)
        elif _getitem_of_inlined(node, env):
            env[node] = env[node.args[0]][node.args[1]]
        elif node.op == "get_attr":
            raise UsageError(f"the model reads {node.target!r} inside an autocast or grad-mode block, which the graph cannot carry")
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    return outputs


def _lookup(ep: ExportedProgram, target: str) -> torch.Tensor:
    if target in ep.state_dict:
        return ep.state_dict[target]
    return ep.constants[target]


def _own_copy(value: torch.Tensor) -> torch.Tensor:
    """A copy that shares no storage with the user's model. Parameters stay nn.Parameters
    (requires_grad off: input gradients do not need them; flip it where weight grads are wanted)."""
    if not isinstance(value, torch.Tensor):
        raise UsageError(f"the model holds a non-tensor constant of type {type(value).__name__}, which the graph cannot carry")
    copy = value.detach().clone()
    if isinstance(value, torch.nn.Parameter):
        return torch.nn.Parameter(copy, requires_grad=False)
    return copy


def _single_output(node: fx.Node) -> fx.Node:
    outs = node.args[0]
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    if len(outs) != 1 or not isinstance(outs[0], fx.Node):
        raise UsageError(f"the model must return one logits tensor [B, K]; its graph returns {len(outs)} values")
    return outs[0]
