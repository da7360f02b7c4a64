"""Layer names of graph nodes, and finding a node by the name a user gives.

Every compute node carries `node.meta["layer"]`, a dotted name built from its scope (the
module path for eager/timm models, the parameter owner for TorchScript, the node-name path
for ONNX):
- a leaf scope holding exactly one compute node is named by the scope: `layer4.1.conv2`;
- otherwise scope + op: `layer4.1.add`, `blocks.0.attn.softmax`, top level `linear`;
- repeats get `_1`, `_2`: `layer4.1.relu.relu_1`.
`node.name` is the same with dots replaced by underscores (fx names are identifiers).
Asking for a module that owns several nodes (`layer4.1`, `features`) gives its last node,
i.e. the module's output.
"""
from __future__ import annotations

import difflib
from collections import Counter
from typing import Callable

import torch
from torch import fx

from ..errors import UsageError

ScopeRule = Callable[[fx.Graph], "dict[fx.Node, str]"]
SHAPE_OPS = {torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default, torch.ops.aten.sym_stride.int}


def is_compute(node: fx.Node) -> bool:
    """A tensor-valued ATen op node (not shape arithmetic)."""
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and node.target not in SHAPE_OPS


def module_scopes(graph: fx.Graph) -> dict[fx.Node, str]:
    """Innermost module path recorded by torch.export ('' at top level), or the scope an
    ONNX node annotated (meta["custom"]["xai_scope"])."""
    return {node: _module_scope(node) for node in graph.nodes if is_compute(node)}


def _module_scope(node: fx.Node) -> str:
    custom = node.meta.get("custom") or {}
    if "xai_scope" in custom:
        return custom["xai_scope"]
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    return "" if path.startswith("_empty_nn_module_stack") else path


def param_scopes(graph: fx.Graph) -> dict[fx.Node, str]:
    """Scopes when no module structure survived (TorchScript): a node reading parameters
    belongs to their owner (`layer4.1.conv2`); any other node to the block of its first
    input (`layer4.1` for the ReLU after `layer4.1.bn1`)."""
    scopes: dict[fx.Node, str] = {}
    block: dict[fx.Node, str] = {}
    for node in filter(is_compute, graph.nodes):
        owners = [a.target.rsplit(".", 1)[0] for a in node.all_input_nodes if a.op == "get_attr" and "." in a.target]
        if owners:
            scopes[node] = owners[0]
            block[node] = owners[0].rsplit(".", 1)[0] if "." in owners[0] else ""
        else:
            inputs = [block[a] for a in node.all_input_nodes if a in block]
            scopes[node] = block[node] = inputs[0] if inputs else ""
    return scopes


def assign_names(graph: fx.Graph, scope_rule: ScopeRule = module_scopes) -> fx.Graph:
    """A copy of `graph` whose compute nodes carry meta["layer"] and matching node names."""
    layers = _layer_names(graph, scope_rule(graph))
    new, env = fx.Graph(), {}
    for node in graph.nodes:
        name = layers.get(node) or (node.target.replace(".", "_") if node.op == "get_attr" else node.name)
        args = fx.map_arg(node.args, env.__getitem__)
        kwargs = fx.map_arg(node.kwargs, env.__getitem__)
        env[node] = new.create_node(node.op, node.target, args, kwargs, name=name.replace(".", "_"))
        env[node].meta = dict(node.meta)
        if node in layers:
            env[node].meta["layer"] = layers[node]
    return new


def _layer_names(graph: fx.Graph, scopes: dict[fx.Node, str]) -> dict[fx.Node, str]:
    compute = [n for n in graph.nodes if is_compute(n)]
    counts = Counter(scopes.values())
    parents = set().union(*map(_ancestors, counts)) | {""}
    seen: Counter[str] = Counter()
    names = {}
    for node in compute:
        scope = scopes.get(node, "")
        leaf = counts[scope] == 1 and scope not in parents
        base = scope if leaf else ".".join(p for p in (scope, node.target._opname) if p)
        names[node] = base if not seen[base] else f"{base}_{seen[base]}"
        seen[base] += 1
    return names


def _ancestors(scope: str) -> set[str]:
    parts = scope.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def layer_names(gm: fx.GraphModule) -> list[str]:
    """Every layer name of the graph, in execution order."""
    return [n.meta["layer"] for n in gm.graph.nodes if "layer" in n.meta]


def find_node(gm: fx.GraphModule, name: str) -> fx.Node:
    """The node a user means by `name`: an exact layer or node name, or else the output (last
    node) of the module `name` (e.g. `layer4`). UsageError with suggestions when none."""
    nodes = [n for n in gm.graph.nodes if "layer" in n.meta]
    for node in nodes:
        if name in (node.meta["layer"], node.name):
            return node
    inside = [n for n in nodes if name in _ancestors(n.meta["layer"])]
    if inside:
        return inside[-1]
    names = [n.meta["layer"] for n in nodes]
    close = difflib.get_close_matches(name, names, n=5) or names[:10]
    raise UsageError(f"the model has no layer {name!r}; did you mean one of: {', '.join(close)}")
