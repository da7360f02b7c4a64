"""An ONNX model read into plain Python for conversion: nodes with parsed attributes and a
layer scope, constants folded to tensors, Gemm/MatMul+Add with constant weights rewritten to
`Linear`, the erf form of GELU to `Gelu`, x·sigmoid(x) to `Silu`, and parameter names for the
weights."""
from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx.version_converter
import torch
from onnx import numpy_helper

from ..errors import UsageError
from .onnx_ops import MULTI_OUTPUT, OPS, SYNTHETIC, Attrs

MIN_OPSET = 13
ROLES = {  # by input index; input 0 is the data
    "Conv": (None, "weight", "bias"), "ConvTranspose": (None, "weight", "bias"), "Linear": (None, "weight", "bias"),
    "Gemm": (None, "weight", "bias"), "LayerNormalization": (None, "weight", "bias"),
    "InstanceNormalization": (None, "weight", "bias"), "PRelu": (None, "weight"),
    "BatchNormalization": (None, "weight", "bias", "running_mean", "running_var"),
}
BUFFER_ROLES = {"running_mean", "running_var"}
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")


@dataclass
class OnnxNode:
    op: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict
    scope: str
    domain: str = ""


@dataclass
class Program:
    """Everything the converter needs; `consts` holds every constant value by ONNX name."""

    nodes: list[OnnxNode]
    consts: dict[str, torch.Tensor]
    input: str
    input_shape: list[int | None]  # None where the ONNX dim is symbolic
    output: str
    opset: int
    hints: dict[str, str] = field(default_factory=dict)  # const name -> parameter name

    @property
    def fixed_batch(self) -> int | None:
        return self.input_shape[0] if self.input_shape else None

    def where(self, node: OnnxNode) -> str:
        """How messages name a node."""
        return f"ONNX op {node.op!r} (node {node.name!r}, opset {self.opset})"


def load_program(model: onnx.ModelProto | str | Path) -> Program:
    proto = _load(model)
    graph, opset = proto.graph, _opset(proto)
    consts = {init.name: _tensor(init) for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in consts]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise UsageError(f"the ONNX model must have one input and one output; it has {len(inputs)} and {len(graph.output)}")
    nodes = [_node(n) for n in graph.node]
    program = Program(nodes, consts, inputs[0].name, _dims(inputs[0]), graph.output[0].name, opset)
    _check_supported(program)
    _fold(program)
    _fuse_linear(program)
    _fuse_gelu(program)
    _fuse_silu(program)
    _prune(program)
    _unshare_weights(program)
    _scopes_from_weights(program)
    return program


# ---------------------------------------------------------------- reading

def _load(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        proto = model
    else:
        try:
            proto = onnx.load(str(model))
        except Exception as exc:
            raise UsageError(f"cannot read ONNX model {model}: {exc}") from exc
    if _opset(proto) < MIN_OPSET:
        try:
            proto = onnx.version_converter.convert_version(proto, MIN_OPSET)
        except Exception as exc:
            raise UsageError(f"ONNX opset {_opset(proto)} is older than {MIN_OPSET} and could not be upgraded: {exc}") from exc
    return proto


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), MIN_OPSET)


def _tensor(proto: onnx.TensorProto) -> torch.Tensor:
    return torch.from_numpy(numpy_helper.to_array(proto).copy())


def _dims(value: onnx.ValueInfoProto) -> list[int | None]:
    dims = value.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]


def _attr(attr: onnx.AttributeProto):
    """Attribute values as Python/numpy values (numpy, not torch: torch.export would fake them)."""
    value = onnx.helper.get_attribute_value(attr)
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value).copy()
    if isinstance(value, list):
        return [v.decode() if isinstance(v, bytes) else v for v in value]
    return value.decode() if isinstance(value, bytes) else value


def _node(proto: onnx.NodeProto) -> OnnxNode:
    attrs = {a.name: _attr(a) for a in proto.attribute}
    return OnnxNode(proto.op_type, proto.name, list(proto.input), list(proto.output), attrs, _scope(proto), proto.domain)


def _scope(proto: onnx.NodeProto) -> str:
    """The layer a node belongs to: torch.onnx's dynamo exporter records module paths in
    metadata; its TorchScript exporter names nodes /layer1/layer1.0/conv1/Conv; other tools'
    node names are used as they are."""
    meta = {p.key: p.value for p in proto.metadata_props}
    if "pkg.torch.onnx.name_scopes" in meta:
        scopes = ast.literal_eval(meta["pkg.torch.onnx.name_scopes"])[:-1]
        scopes = [s for s in scopes if s and not s.startswith("_empty_nn_module_stack")]
        return scopes[-1] if scopes else ""
    if not proto.name.startswith("/"):
        return proto.name
    path: list[str] = []
    for part in proto.name.strip("/").split("/")[:-1]:  # a Sequential's children read 'layer1.0'
        overlap = next((k for k in range(len(path), 0, -1) if part.startswith(".".join(path[-k:]) + ".")), 0)
        path = path[: len(path) - overlap] + part.split(".")
    return ".".join(path)


def _scopes_from_weights(program: Program) -> None:
    """A layer op whose weight keeps its module name (`layer1.0.conv1.weight`) belongs to that
    module, whatever scope the exporter recorded (BatchNorm fused into a conv records the BN)."""
    for node in program.nodes:
        weight = node.inputs[1] if node.op in ROLES and len(node.inputs) > 1 else ""
        if weight in program.consts and IDENTIFIER.match(weight) and weight.endswith(".weight"):
            node.scope = weight[: -len(".weight")]


def _unshare_weights(program: Program) -> None:
    """Exporters merge equal initializers (fresh LayerNorm weights are all ones); every layer
    gets its own copy back, so that changing one layer's weights changes only that layer."""
    uses: dict[str, list[tuple[OnnxNode, int]]] = {}
    for node in program.nodes:
        for i, name in enumerate(node.inputs):
            if 0 < i < len(ROLES.get(node.op, ())) and name in program.consts:
                uses.setdefault(name, []).append((node, i))
    for name, users in uses.items():
        owner = next((u for u in users if name == f"{u[0].scope}.{ROLES[u[0].op][u[1]]}"), users[0])
        for node, i in users:
            if (node, i) != owner:
                node.inputs[i] = _new_const(program, name, program.consts[name].clone(), None)


def _check_supported(program: Program) -> None:
    for node in program.nodes:
        if node.op != "Constant" and (node.domain not in ("", "ai.onnx") or node.op not in OPS or node.op in SYNTHETIC):
            domain = f" in domain {node.domain!r}" if node.domain not in ("", "ai.onnx") else ""
            raise UsageError(
                f"{program.where(node)}{domain} is not supported by xai's ONNX→torch converter; "
                f"supported: {', '.join(sorted(set(OPS) - SYNTHETIC))}"
            )


def run_node(program: Program, node: OnnxNode, values: list, batch=None) -> list:
    """Outputs of one node (UsageError naming the node when its form is not supported)."""
    attrs = Attrs(node.attrs)
    attrs.fixed_batch, attrs.batch = program.fixed_batch, batch
    try:
        extra = {"outputs": len(node.outputs)} if node.op in MULTI_OUTPUT else {}
        out = OPS[node.op](attrs, *values, **extra)
    except UsageError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]  # torch's symbolic-shape errors run to many lines
        raise UsageError(f"{program.where(node)} could not be converted: {type(exc).__name__}: {first}") from exc
    return list(out) if isinstance(out, tuple) else [out]


# ---------------------------------------------------------------- rewrites

def _fold(program: Program) -> None:
    """Evaluate every node whose inputs are all constants (weights transposed or reshaped by
    the exporter, shape arithmetic on constants); keep the rest."""
    rest = []
    for node in program.nodes:
        if node.op == "Constant":
            program.consts[node.outputs[0]] = _constant(node)
        elif all(not name or name in program.consts for name in node.inputs) and not _to_batch(program, node):
            values = [program.consts[name] if name else None for name in node.inputs]
            for name, value in zip(node.outputs, run_node(program, node, values)):
                program.consts[name] = _as_tensor(value)
        else:
            rest.append(node)
    program.nodes = rest


def _to_batch(program: Program, node: OnnxNode) -> bool:
    """In a fixed-batch export, expanding a constant to the batch (a class token) must stay an op."""
    return node.op == "Expand" and program.fixed_batch is not None


def _constant(node: OnnxNode) -> torch.Tensor:
    for key, value in node.attrs.items():
        if key == "value":
            return torch.from_numpy(value)
        if key in ("value_float", "value_int", "value_floats", "value_ints"):
            return torch.tensor(value)
    raise UsageError(f"Constant node {node.name!r} holds an unsupported kind of value: {sorted(node.attrs)}")


def _as_tensor(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.tensor(value)


def _users(program: Program) -> dict[str, list[OnnxNode]]:
    users: dict[str, list[OnnxNode]] = {}
    for node in program.nodes:
        for name in node.inputs:
            users.setdefault(name, []).append(node)
    return users


def _sole_user(users: dict, name: str, op: str) -> OnnxNode | None:
    found = users.get(name, [])
    return found[0] if len(found) == 1 and found[0].op == op and name != "" else None


def _other(node: OnnxNode, name: str) -> str:
    return node.inputs[1] if node.inputs[0] == name else node.inputs[0]


def _new_const(program: Program, base: str, value: torch.Tensor, hint: str | None) -> str:
    name = f"{base}__xai"
    while name in program.consts:
        name += "_"
    program.consts[name] = value
    if hint:
        program.hints[name] = hint
    return name


def _fuse_linear(program: Program) -> None:
    """Gemm, and MatMul with a constant 2-D weight (plus an Add of a constant bias), become
    `Linear(x, W[out, in], b)` so that they read as torch's linear layers."""
    users, drop = _users(program), set()
    for i, node in enumerate(program.nodes):
        if node.op == "Gemm":
            program.nodes[i] = _gemm_as_linear(program, node) or node
        elif node.op == "MatMul" and _const_rank(program, node.inputs[1]) == 2:
            weight = program.consts[node.inputs[1]].t().contiguous()
            w = _new_const(program, node.inputs[1], weight, _role_name(node.scope, "weight"))
            add = _sole_user(users, node.outputs[0], "Add")
            bias = add and _bias(program, _other(add, node.outputs[0]), weight.shape[0])
            if bias:
                drop.add(id(add))
            outputs = add.outputs if bias else node.outputs
            program.nodes[i] = OnnxNode("Linear", node.name, [node.inputs[0], w, bias or ""], outputs, {}, node.scope)
    program.nodes = [n for n in program.nodes if id(n) not in drop]


def _gemm_as_linear(program: Program, node: OnnxNode) -> OnnxNode | None:
    a = node.attrs
    if a.get("transA", 0) or _const_rank(program, node.inputs[1]) != 2:
        return None
    weight = program.consts[node.inputs[1]]
    weight = (weight if a.get("transB", 0) else weight.t()).contiguous() * a.get("alpha", 1.0)
    c = node.inputs[2] if len(node.inputs) > 2 else ""
    bias = ""
    if c:
        bias = _bias(program, c, weight.shape[0], a.get("beta", 1.0))
        if not bias:
            return None
    hint = node.inputs[1] if a.get("transB", 0) and a.get("alpha", 1.0) == 1.0 and IDENTIFIER.match(node.inputs[1]) else None
    w = _new_const(program, node.inputs[1], weight, hint or _role_name(node.scope, "weight"))
    return OnnxNode("Linear", node.name, [node.inputs[0], w, bias], node.outputs, {}, node.scope)


def _bias(program: Program, name: str, size: int, scale: float = 1.0) -> str:
    """A constant usable as a linear bias of `size` (shape [size] or [1, size]), else ''."""
    value = program.consts.get(name)
    if value is None or not value.is_floating_point() or value.numel() != size or value.shape[-1] != size:
        return ""
    if value.dim() == 1 and scale == 1.0:
        return name
    hint = name if IDENTIFIER.match(name) else None
    return _new_const(program, name, value.reshape(size) * scale, hint)


def _const_rank(program: Program, name: str) -> int:
    value = program.consts.get(name)
    return value.dim() if value is not None and value.is_floating_point() else -1


def _fuse_gelu(program: Program) -> None:
    """0.5·x·(1 + erf(x/√2)), the exporters' spelling of exact GELU, becomes `Gelu(x)`."""
    users = _users(program)
    for erf in [n for n in program.nodes if n.op == "Erf"]:
        match = _gelu_match(program, users, erf)
        if match:
            x, last = match
            _replace_node(program, last, OnnxNode("Gelu", last.name, [x], last.outputs, {}, erf.scope))


def _gelu_match(program: Program, users: dict, erf: OnnxNode) -> tuple[str, OnnxNode] | None:
    producer = {out: n for n in program.nodes for out in n.outputs}
    scaled = producer.get(erf.inputs[0])
    if scaled is None or scaled.op not in ("Div", "Mul") or not users.get(erf.inputs[0]) == [erf]:
        return None
    x, c = scaled.inputs
    want = math.sqrt(2) if scaled.op == "Div" else 1 / math.sqrt(2)
    if not _is_scalar(program, c, want):
        return None
    one = _sole_user(users, erf.outputs[0], "Add")
    if one is None or not _is_scalar(program, _other(one, erf.outputs[0]), 1.0):
        return None
    return _gelu_tail(program, users, x, one.outputs[0])


def _gelu_tail(program: Program, users: dict, x: str, gate: str) -> tuple[str, OnnxNode] | None:
    """The two multiplications by x and 0.5, in any of the orders exporters write them."""
    mul = _sole_user(users, gate, "Mul")
    if mul is None:
        return None
    other = _other(mul, gate)
    half = _sole_user(users, mul.outputs[0], "Mul")
    if other == x and half and _is_scalar(program, _other(half, mul.outputs[0]), 0.5):
        return x, half  # (x·gate)·0.5
    if _is_scalar(program, other, 0.5) and half and _other(half, mul.outputs[0]) == x:
        return x, half  # x·(gate·0.5)
    producer = next((n for n in program.nodes if other in n.outputs), None)
    if producer is not None and producer.op == "Mul" and x in producer.inputs and users.get(other) == [mul]:
        if _is_scalar(program, _other(producer, x), 0.5):
            return x, mul  # (x·0.5)·gate
    return None


def _fuse_silu(program: Program) -> None:
    """x·sigmoid(x) (how exporters write SiLU/Swish) becomes `Silu(x)`."""
    users = _users(program)
    for node in [n for n in program.nodes if n.op == "Sigmoid"]:
        mul = _sole_user(users, node.outputs[0], "Mul")
        if mul is not None and _other(mul, node.outputs[0]) == node.inputs[0]:
            _replace_node(program, mul, OnnxNode("Silu", mul.name, [node.inputs[0]], mul.outputs, {}, node.scope))


def _replace_node(program: Program, old: OnnxNode, new: OnnxNode) -> None:
    program.nodes[next(i for i, n in enumerate(program.nodes) if n is old)] = new


def _is_scalar(program: Program, name: str, value: float) -> bool:
    t = program.consts.get(name)
    return t is not None and t.numel() == 1 and math.isclose(float(t.reshape(-1)[0]), value, rel_tol=1e-4)


def _prune(program: Program) -> None:
    """Drop nodes none of whose outputs is used (left behind by the rewrites)."""
    needed = {program.output}
    kept = []
    for node in reversed(program.nodes):
        if any(out in needed for out in node.outputs):
            kept.append(node)
            needed.update(name for name in node.inputs if name)
    program.nodes = kept[::-1]


# ---------------------------------------------------------------- parameter names

def _role_name(scope: str, role: str) -> str | None:
    return f"{scope}.{role}" if scope and IDENTIFIER.match(scope) else None


def parameter_names(program: Program) -> dict[str, tuple[str, bool]]:
    """const name -> (attribute path, is_buffer) for the constants the graph reads as layer
    state: float tensors with more than one value, and any input of a layer op (weights,
    biases, running statistics). A weight is named `scope.role` (conv1.weight) unless the
    exporter kept a meaningful name; other tensors keep their ONNX name when it is an identifier."""
    names: dict[str, tuple[str, bool]] = {}
    used: set[str] = set()
    for node in program.nodes:
        roles = ROLES.get(node.op, ())
        for i, name in enumerate(node.inputs):
            value = program.consts.get(name)
            role = roles[i] if i < len(roles) else None
            if value is None or name in names or not (role or (value.is_floating_point() and value.numel() > 1)):
                continue
            path = _unique(_candidate(program, name, node.scope, role, len(names)), used)
            used.add(path)
            names[name] = (path, role in BUFFER_ROLES)
    return names


def _candidate(program: Program, name: str, scope: str, role: str | None, index: int) -> str:
    if name in program.hints:
        return program.hints[name]
    if role and IDENTIFIER.match(name) and name.endswith("." + role):
        return name
    if role and _role_name(scope, role):
        return _role_name(scope, role)
    return name if IDENTIFIER.match(name) else f"const_{index}"


RESERVED = set(dir(torch.nn.Module))


def _unique(path: str, used: set[str]) -> str:
    """`path`, changed until it neither repeats, nests inside or around a used path, nor
    shadows an nn.Module attribute: flattened first, then suffixed."""
    def clashes(p: str) -> bool:
        nested = any(u.startswith(p + ".") or p.startswith(u + ".") for u in used)
        return p in used or nested or p.split(".")[0] in RESERVED

    if clashes(path):
        path = path.replace(".", "_")
    while clashes(path):
        path += "_"
    return path
