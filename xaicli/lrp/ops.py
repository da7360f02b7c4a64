"""Linear ops as LRP rules see them: z = op(inputs; modified parameters) and its input-vector product.

Every rule for conv, linear, sum and pool nodes is written once against this interface (rules.py).
A parameter modifier is `(a, c)`: p -> a·p + c·p⁺ (so p itself is (1, 0), p⁺ is (0, 1), p⁻ is (1, -1)),
or "ones" / "square". Ops without parameters (sums, pooling) have implicit positive weights, so their
p⁺ is p, p⁻ is 0, and "ones"/"square" leave them unchanged.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch
from torch import fx

from .nodes import bind, packet

aten = torch.ops.aten

Mod = Union[tuple[float, float], str]
P: Mod = (1.0, 0.0)
POS: Mod = (0.0, 1.0)
NEG: Mod = (1.0, -1.0)


def factor(mod: Mod) -> float:
    """How a modifier scales the implicit weights of an op without parameters."""
    return mod[0] + mod[1] if isinstance(mod, tuple) else 1.0


class LinearOp(ABC):
    """z = Σ_i W_i u_i + b, linear in its graph inputs u_i; subclasses say what W and b are."""

    parametric = False
    positive = False  # implicit weights and constants are all >= 0 (ops without parameters)

    @abstractmethod
    def apply(self, us: list[torch.Tensor], mod: Mod, bias: bool) -> torch.Tensor:
        """z for inputs `us` and parameters modified by `mod` (bias included when `bias`)."""

    @abstractmethod
    def vjp(self, g: torch.Tensor, mod: Mod, like: list[torch.Tensor], scale: float = 1.0) -> list[torch.Tensor]:
        """(scale·W)ᵀg per graph input (None: no relevance), for parameters modified by `mod`; `like`
        holds the inputs (their shapes)."""

    def bind(self, inputs: list[torch.Tensor]) -> "LinearOp":
        """The op for one call (ops whose weights are graph values take them here)."""
        return self

    def vjp_many(self, g: torch.Tensor, mods: list[tuple[Mod, float]], like: list[torch.Tensor]
                 ) -> list[list[torch.Tensor]]:
        """`vjp` of one g for several (modifier, scale) pairs. More than two linear modifiers (z^B's
        w, w⁺, w⁻) cost two vjps: (a·w + c·w⁺)ᵀg = a·wᵀg + c·w⁺ᵀg."""
        if self.parametric and len(mods) > 2 and all(isinstance(mod, tuple) for mod, _ in mods):
            base, positive = self.vjp_many(g, [(P, 1.0), (POS, 1.0)], like)
            return [[scale * (mod[0] * b + mod[1] * p) for b, p in zip(base, positive)]  # type: ignore[index]
                    for mod, scale in mods]
        return [self.vjp(g, mod, like, scale) for mod, scale in mods]

    def bias(self, mod: Mod) -> torch.Tensor | float:
        """The modified bias, broadcastable to z (0 when there is none)."""
        return 0.0


@dataclass
class _Params:
    """Modified weights and biases, computed once per modifier."""

    weight: torch.Tensor
    bias_: torch.Tensor | None
    cache: dict[Any, torch.Tensor | None] = field(default_factory=dict)

    def w(self, mod: Mod, scale: float = 1.0) -> torch.Tensor:
        key = ("w", mod, scale)
        if key not in self.cache:
            weight = _modify(self.weight, mod)
            self.cache[key] = weight if scale == 1.0 else scale * weight
        return self.cache[key]  # type: ignore[return-value]

    def b(self, mod: Mod) -> torch.Tensor | None:
        key = ("b", mod)
        if key not in self.cache:
            self.cache[key] = None if self.bias_ is None or not isinstance(mod, tuple) else _modify(self.bias_, mod)
        return self.cache[key]


def _modify(p: torch.Tensor, mod: Mod) -> torch.Tensor:
    if mod == "ones":
        return torch.ones_like(p)
    if mod == "square":
        return p * p
    a, c = mod  # type: ignore[misc]
    if (a, c) == (1.0, 0.0):
        return p
    out = a * p if a else torch.zeros_like(p)
    return out + c * p.clamp(min=0) if c else out


class ConvOp(LinearOp):
    """aten convolutions of any dimension, groups, stride, padding, dilation, transposed or not."""

    parametric = True

    def __init__(self, node: fx.Node, constant: Callable[[Any], Any]):
        args = bind(node)
        weight = constant(args["weight"])
        dims = weight.ndim - 2
        self.params = _Params(weight, constant(args["bias"]) if args.get("bias") is not None else None)
        self.stride = _per_dim(args.get("stride", 1), dims)
        self.dilation = _per_dim(args.get("dilation", 1), dims)
        self.transposed = packet(node).startswith("conv_transpose") or bool(args.get("transposed", False))
        self.output_padding = _per_dim(args.get("output_padding", 0), dims)
        self.groups = int(args.get("groups", 1))
        self.padding = self._padding(args.get("padding", 0), weight, dims)

    def _padding(self, padding: Any, weight: torch.Tensor, dims: int) -> list[int]:
        if padding == "valid":
            return [0] * dims
        if padding == "same":
            total = [d * (k - 1) for d, k in zip(self.dilation, weight.shape[2:])]
            if any(t % 2 for t in total):
                raise ValueError("padding='same' with an even kernel pads unevenly; LRP needs explicit padding")
            return [t // 2 for t in total]
        return _per_dim(padding, dims)

    def _conv(self, u: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return aten.convolution.default(u, w, b, self.stride, self.padding, self.dilation, self.transposed,
                                        self.output_padding, self.groups)

    def apply(self, us: list[torch.Tensor], mod: Mod, bias: bool) -> torch.Tensor:
        return self._conv(us[0], self.params.w(mod), self.params.b(mod) if bias else None)

    def vjp(self, g: torch.Tensor, mod: Mod, like: list[torch.Tensor], scale: float = 1.0) -> list[torch.Tensor]:
        if mod == "ones" and not self.transposed:
            return [self._vjp_ones(g, like[0], scale)]
        return [self._backward(g, like[0], self.params.w(mod, scale), self.groups)]

    def vjp_many(self, g: torch.Tensor, mods: list[tuple[Mod, float]], like: list[torch.Tensor]
                 ) -> list[list[torch.Tensor]]:
        """Several weights applied to one g in a single convolution (weights side by side on input channels)."""
        if self.groups != 1 or self.transposed or len(mods) != 2 or "ones" in [m for m, _ in mods]:
            return super().vjp_many(g, mods, like)
        weight = torch.cat([self.params.w(mod, scale) for mod, scale in mods], dim=1)
        x = like[0]
        stacked = x.new_empty((x.shape[0], weight.shape[1], *x.shape[2:]))
        grads = self._backward(g, stacked, weight, 1).split(x.shape[1], dim=1)
        return [[grad] for grad in grads]

    def _vjp_ones(self, g: torch.Tensor, x: torch.Tensor, scale: float) -> torch.Tensor:
        """Wᵀg for all-ones weights: every input channel of a group gets the same map (flat rule)."""
        groups, per_group = self.groups, x.shape[1] // self.groups
        summed = g.reshape(g.shape[0], groups, -1, *g.shape[2:]).sum(2)
        ones = g.new_full((groups, 1, *self.params.weight.shape[2:]), scale)
        grad = self._backward(summed, x[:, :groups], ones, groups)
        return grad.expand_as(x) if groups == 1 or per_group == 1 else grad.repeat_interleave(per_group, dim=1)

    def _backward(self, g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
        grad, _, _ = aten.convolution_backward.default(
            g, x, weight, None, self.stride, self.padding, self.dilation, self.transposed, self.output_padding,
            groups, [True, False, False])
        return grad

    def bias(self, mod: Mod) -> torch.Tensor | float:
        b = self.params.b(mod)
        return 0.0 if b is None else b.reshape(-1, *[1] * (self.params.weight.ndim - 2))


class DenseOp(LinearOp):
    """aten.linear: z = u Wᵀ + b over the last dimension."""

    parametric = True

    def __init__(self, node: fx.Node, constant: Callable[[Any], Any]):
        args = bind(node)
        self.params = _Params(constant(args["weight"]),
                              constant(args["bias"]) if args.get("bias") is not None else None)

    def apply(self, us: list[torch.Tensor], mod: Mod, bias: bool) -> torch.Tensor:
        return aten.linear.default(us[0], self.params.w(mod), self.params.b(mod) if bias else None)

    def vjp(self, g: torch.Tensor, mod: Mod, like: list[torch.Tensor], scale: float = 1.0) -> list[torch.Tensor]:
        return [g @ self.params.w(mod, scale)]

    def bias(self, mod: Mod) -> torch.Tensor | float:
        b = self.params.b(mod)
        return 0.0 if b is None else b


class SumOp(LinearOp):
    """add / sub: z = Σ_i c_i u_i + constants (the constants act as the bias)."""

    def __init__(self, node: fx.Node, constant: Callable[[Any], Any]):
        args = bind(node)
        alpha = args.get("alpha", 1)
        name = packet(node)
        first, second = args["self"], args["other"]
        signs = {"add": (1.0, alpha), "sub": (1.0, -alpha), "rsub": (-alpha, 1.0)}[name]
        self.coefs: list[float] = []
        self.const: Any = 0.0
        for operand, sign in zip((first, second), signs):
            if isinstance(operand, fx.Node) and operand.op != "get_attr":
                self.coefs.append(float(sign))
            else:
                self.const = self.const + sign * constant(operand)
        self.positive = all(c > 0 for c in self.coefs) and isinstance(self.const, float) and self.const == 0.0

    def apply(self, us: list[torch.Tensor], mod: Mod, bias: bool) -> torch.Tensor:
        z = sum(c * u for c, u in zip(self.coefs, us))
        return factor(mod) * (z + self.const if bias else z)  # type: ignore[return-value]

    def vjp(self, g: torch.Tensor, mod: Mod, like: list[torch.Tensor], scale: float = 1.0) -> list[torch.Tensor]:
        scales = [scale * factor(mod) * c for c in self.coefs]
        return [sum_to(g if k == 1.0 else k * g, u.shape) for k, u in zip(scales, like)]

    def bias(self, mod: Mod) -> torch.Tensor | float:
        return factor(mod) * self.const


class FuncOp(LinearOp):
    """Any op linear in its single graph input without parameters (pooling, mean, sum): run through autograd."""

    positive = True

    def __init__(self, node: fx.Node, constant: Callable[[Any], Any]):
        self.target = node.target
        self.args, self.kwargs = fx.node.map_arg((node.args, node.kwargs), constant)
        self.index = [i for i, a in enumerate(node.args) if isinstance(a, fx.Node) and a.op != "get_attr"][0]

    def _call(self, u: torch.Tensor) -> torch.Tensor:
        args = list(self.args)
        args[self.index] = u
        return self.target(*args, **self.kwargs)

    def apply(self, us: list[torch.Tensor], mod: Mod, bias: bool) -> torch.Tensor:
        return factor(mod) * self._call(us[0])

    def vjp(self, g: torch.Tensor, mod: Mod, like: list[torch.Tensor], scale: float = 1.0) -> list[torch.Tensor]:
        u = torch.zeros_like(like[0]).requires_grad_(True)
        k = scale * factor(mod)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(self._call(u), u, g if k == 1.0 else k * g)
        return [grad]


class MatmulOp(LinearOp):
    """a @ b of two graph tensors, linear in each. With `softmax_constant` and attention weights (a
    softmax) as one operand, that operand is held constant and gets no relevance (CP-LRP, Ali et al.
    2022); otherwise each operand gets half (the uniform rule, AttnLRP's Prop. 3.3: each alone
    explains the whole product)."""

    positive = True

    def __init__(self, node: fx.Node, constant: Callable[[Any], Any], softmax_constant: bool = True):
        from .nodes import softmax_operand

        self.gate = softmax_operand(node) if softmax_constant else None
        self.values: list[torch.Tensor] = []

    def bind(self, inputs: list[torch.Tensor]) -> "LinearOp":
        bound = MatmulOp.__new__(MatmulOp)
        bound.gate, bound.values = self.gate, inputs
        return bound

    def apply(self, us: list[torch.Tensor], mod: Mod, bias: bool) -> torch.Tensor:
        a, b = us
        return factor(mod) * (a @ b)

    def vjp(self, g: torch.Tensor, mod: Mod, like: list[torch.Tensor], scale: float = 1.0) -> list[torch.Tensor]:
        a, b = self.values
        k = scale * factor(mod) * (1.0 if self.gate is not None else 0.5)
        if k != 1.0 and g.numel() <= a.numel() + b.numel():  # scale the smaller side once
            g, k = k * g, 1.0
        to_a = None if self.gate == 0 else sum_to(_scaled(k, g @ b.transpose(-1, -2)), a.shape)
        to_b = None if self.gate == 1 else sum_to(_scaled(k, a.transpose(-1, -2) @ g), b.shape)
        return [to_a, to_b]  # type: ignore[list-item]


def _scaled(k: float, t: torch.Tensor) -> torch.Tensor:
    return t if k == 1.0 else t.mul_(k)  # t is a fresh product


NORMS = ("layer_norm", "rms_norm", "group_norm", "batch_norm")
"""Normalisations NormOp writes as linear maps (the others keep the pass rule)."""


def linear_norm(node: fx.Node) -> bool:
    """Whether NormOp covers `node`: a NORMS op whose only graph input is the normalised signal,
    with constant (or no) affine parameters and, for batch norm, running statistics in eval mode."""
    from .nodes import is_constant, tensor_args

    name = packet(node)
    if name not in NORMS or not isinstance(node.target, torch._ops.OpOverload):
        return False
    args = bind(node)
    params = [args.get(k) for k in ("weight", "bias", "running_mean", "running_var")]
    if any(p is not None and not is_constant(p) for p in params):
        return False
    if name == "batch_norm" and (args.get("training") or args.get("running_mean") is None):
        return False
    return tensor_args(node) == [args["input"]]


class NormOp(LinearOp):
    """A normalisation with its scale σ held constant (AttnLRP's identity rule on the division by σ):
    y = w ⊙ (x − mean x)/σ + b is then linear in x (layer/group norm; RMS norm has no mean; eval batch
    norm is per-channel affine). σ is computed from each call's input, as the forward does. Parameter
    modifiers act on w and b."""

    parametric = True

    def __init__(self, node: fx.Node, constant: Callable[[Any], Any]):
        args = bind(node)
        self.name = packet(node)
        self.eps = args.get("eps")
        self.groups = int(args.get("num_groups", 1))
        self.dims = len(args["normalized_shape"]) if "normalized_shape" in args else 0
        weight = constant(args["weight"]) if args.get("weight") is not None else None
        bias_ = constant(args["bias"]) if args.get("bias") is not None else None
        if self.name == "batch_norm":  # (x − μ)·w/√(v+eps) + b = a·x + (b − a·μ)
            inv = (constant(args["running_var"]) + self.eps).rsqrt()
            weight = inv if weight is None else weight * inv
            shift = -weight * constant(args["running_mean"])
            bias_ = shift if bias_ is None else bias_ + shift
        self.weight, self.bias_ = weight, bias_
        self.inv: torch.Tensor | None = None
        self.ndim = 2

    def bind(self, inputs: list[torch.Tensor]) -> "LinearOp":
        bound = NormOp.__new__(NormOp)
        bound.__dict__.update(self.__dict__)
        bound.inv, bound.ndim = self._inverse_scale(inputs[0]), inputs[0].ndim
        return bound

    def _inverse_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """1/σ of this input, broadcastable to it ([N, G, 1] for group norm), None for batch norm."""
        if self.name == "batch_norm":
            return None
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        # the forward's own kernels give 1/σ (7-25x faster than Tensor.var on CPU)
        if self.name == "group_norm":
            n, c = x.shape[:2]
            inv = torch.native_group_norm(x, None, None, n, c, x[0, 0].numel(), self.groups, eps)[2]
            return inv.unsqueeze(-1)
        dims = tuple(range(-self.dims, 0))
        if self.name == "rms_norm":
            return (x.pow(2).mean(dims, keepdim=True) + eps).rsqrt()
        return torch.native_layer_norm(x, x.shape[x.ndim - self.dims:], None, None, eps)[2]

    def _param(self, p: torch.Tensor | None) -> torch.Tensor | None:
        if p is None or self.name in ("layer_norm", "rms_norm"):
            return p
        return p.reshape(-1, *[1] * (self.ndim - 2))  # per channel (dim 1)

    def _normalise(self, u: torch.Tensor) -> torch.Tensor:
        """(u − mean u)/σ with the bound σ: the linear map before the affine weights (self-adjoint).
        `u` may hold k·B rows (k stacked copies of the batch, as conditional LRP's vjps do)."""
        if self.name == "batch_norm":
            return u
        inv = self.inv
        if inv is not None and u.shape[0] != inv.shape[0]:
            inv = inv.repeat(u.shape[0] // inv.shape[0], *[1] * (inv.ndim - 1))
        if self.name == "group_norm":
            grouped = u.reshape(u.shape[0], self.groups, -1)
            return ((grouped - grouped.mean(-1, keepdim=True)) * inv).reshape(u.shape)
        if self.name == "rms_norm":
            return u * inv
        dims = tuple(range(-self.dims, 0))
        return (u - u.mean(dims, keepdim=True)) * inv

    def _weights(self, mod: Mod, scale: float) -> torch.Tensor | float:
        """The modified affine weights (w = 1 when the norm has none), times `scale`."""
        w = self._param(self.weight)
        if w is None:
            return scale * factor(mod)
        return scale * _modify(w, mod) if scale != 1.0 else _modify(w, mod)

    def apply(self, us: list[torch.Tensor], mod: Mod, bias: bool) -> torch.Tensor:
        z = self._normalise(us[0]) * self._weights(mod, 1.0)
        return z + self.bias(mod) if bias else z

    def vjp(self, g: torch.Tensor, mod: Mod, like: list[torch.Tensor], scale: float = 1.0) -> list[torch.Tensor]:
        return [self._normalise(g * self._weights(mod, scale))]

    def bias(self, mod: Mod) -> torch.Tensor | float:
        if self.bias_ is None or not isinstance(mod, tuple):
            return 0.0
        return self._param(_modify(self.bias_, mod))  # type: ignore[return-value]


def _per_dim(value: Any, dims: int) -> list[int]:
    """An int or a list of ints (one, or one per spatial dimension) as one int per dimension."""
    values = [value] if isinstance(value, int) else list(value)
    return values * dims if len(values) == 1 else values


def sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Undo broadcasting: sum `t` down to `shape`."""
    if t.shape == shape:
        return t
    lead = t.ndim - len(shape)
    dims = tuple(range(lead)) + tuple(i + lead for i, s in enumerate(shape) if s == 1 and t.shape[i + lead] != 1)
    return t.sum(dim=dims, keepdim=True).reshape(shape) if dims else t


def linear_op(node: fx.Node, node_kind: str, constant: Callable[[Any], Any], softmax_constant: bool = True
              ) -> LinearOp:
    """The LinearOp view of a conv, linear, sum, pool, norm or matmul node; `softmax_constant`: attention
    weights of a matmul get no relevance (see MatmulOp)."""
    if node_kind == "matmul":
        return MatmulOp(node, constant, softmax_constant)
    table: dict[str, type[LinearOp]] = {"conv": ConvOp, "linear": DenseOp, "sum": SumOp, "pool": FuncOp,
                                        "norm": NormOp}
    return table[node_kind](node, constant)  # type: ignore[call-arg]
