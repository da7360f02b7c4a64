"""LRP rules: small data-like classes on one mechanism (Bach et al. 2015; Montavon et al. 2019).

A rule for a linear op (conv, linear, sum, pooling) is a tuple of `Share`s. A share is a set of
`Term`s z_t = op(u_t; modified parameters) whose sum, stabilised, normalises the relevance of the
outputs it serves; each term sends back u_t ⊙ W_tᵀ(scale · R / stab(Σ z)). That is all any of
epsilon, gamma, alpha-beta, z⁺, z^B, flat and w² differ in (Zennit 0.5.1's conventions):

- stabiliser: z + ε·sign(z), with sign(0) = +1.
- gamma: outputs z > 0 share (x⁺, w+γw⁺, b+γb⁺) + (x⁻, w+γw⁻); outputs z < 0 share
  (x⁺, w+γw⁻, b+γb⁻) + (x⁻, w+γw⁺); outputs z = 0 get nothing.
- z^B: (x, w, b) − (low, w⁺, b⁺) − (high, w⁻, b⁻); low/high per channel or scalars.
- flat, w²: input ones, weights ones / w², no bias. (Zennit squares the bias in w²; we drop it,
  as the rule's definition has no bias and flat drops it too.)

`Pass` hands relevance on unchanged, `Gradient` uses the op's gradient (winner-take-all for max pooling).

AttnLRP's rules (Achtibat et al., ICML 2024): `Taylor` on softmax (Prop. 3.1), `Uniform` on products of
two graph tensors (ε-rule, half to each operand, Prop. 3.3), `StdConstant` on normalisations (σ held
constant, then the ε-rule on the linear map), and `Pass` on element-wise activations (identity rule).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .ops import NEG, P, POS, LinearOp, Mod, sum_to, factor


@dataclass
class Call:
    """One node's forward on one batch, kept for its rule's backward."""

    inputs: list[torch.Tensor]  # values of the node's graph inputs, in argument order
    output: torch.Tensor
    op: LinearOp | None = None
    nonneg: bool = False  # inputs known to be >= 0 (e.g. ReLU outputs)
    leaves: list[torch.Tensor] | None = None  # autograd leaves and output, for the gradient rule
    graph_out: torch.Tensor | None = None
    positive_only: bool = False  # relevance is known to be 0 on outputs <= 0 (e.g. read only by a ReLU)
    meta: dict[str, Any] = field(default_factory=dict)  # node facts a rule needs: softmax "dim", gate "signal"


class Rule(ABC):
    """How one node redistributes the relevance of its output onto its graph inputs."""

    name: ClassVar[str]
    kinds: ClassVar[frozenset[str]]
    needs_graph: ClassVar[bool] = False

    @abstractmethod
    def relevance(self, call: Call, r: torch.Tensor) -> list[torch.Tensor | None]:
        """Relevance of each graph input (None: none), given the relevance `r` of the output."""


@dataclass(frozen=True)
class Term:
    """z = op(input′; params′) (+ bias′): input is x, x+, x-, ones, low or high."""

    input: str
    mod: Mod
    bias: bool = True
    sign: float = 1.0


@dataclass(frozen=True)
class Share:
    """Terms normalised together; `outputs` limits it to outputs with z > 0 ("pos") or z < 0 ("neg"),
    where its denominator must have that same sign (true of gamma's shares)."""

    terms: tuple[Term, ...]
    scale: float = 1.0
    outputs: str = "all"


LINEAR_KINDS = frozenset({"conv", "linear", "sum", "pool"})


class LayerRule(Rule):
    """Rules for linear ops, evaluated by `propagate`."""

    kinds: ClassVar[frozenset[str]] = LINEAR_KINDS
    softmax_constant: ClassVar[bool] = True  # on matmul: attention weights get no relevance (CP-LRP)
    stabilizer: float

    @abstractmethod
    def shares(self) -> tuple[Share, ...]:
        """The shares this rule splits relevance into."""

    def bound(self, which: str, x: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"rule {self.name} has no {which} bound")

    def relevance(self, call: Call, r: torch.Tensor) -> list[torch.Tensor | None]:
        return propagate(self, call, r)


@dataclass(frozen=True)
class Epsilon(LayerRule):
    """LRP-ε: z + ε·sign(z) in the denominator; ε = 0 is LRP-0."""

    epsilon: float = 1e-6
    name: ClassVar[str] = "epsilon"
    kinds: ClassVar[frozenset[str]] = LINEAR_KINDS | {"matmul"}

    @property
    def stabilizer(self) -> float:  # type: ignore[override]
        return self.epsilon

    def shares(self) -> tuple[Share, ...]:
        return (Share((Term("x", P),)),)


@dataclass(frozen=True)
class Norm(LayerRule):
    """Split in proportion to contributions, ε only a stabiliser (Zennit's Norm, for sums and pooling)."""

    stabilizer: float = 1e-6
    name: ClassVar[str] = "norm"
    kinds: ClassVar[frozenset[str]] = LINEAR_KINDS | {"matmul"}

    def shares(self) -> tuple[Share, ...]:
        return (Share((Term("x", P),)),)


@dataclass(frozen=True)
class Uniform(Epsilon):
    """AttnLRP's rule for a product of two graph tensors (Prop. 3.3): the ε-rule on the bilinear
    product, half of it to each operand, attention weights included."""

    name: ClassVar[str] = "uniform"
    kinds: ClassVar[frozenset[str]] = frozenset({"matmul"})
    softmax_constant: ClassVar[bool] = False


@dataclass(frozen=True)
class StdConstant(Epsilon):
    """AttnLRP's rule for normalisations: σ held constant (the identity rule on the division by σ),
    so y = w ⊙ (x − mean x)/σ + b is linear in x and takes the ε-rule (layer, group, RMS, eval batch norm)."""

    name: ClassVar[str] = "std_constant"
    kinds: ClassVar[frozenset[str]] = frozenset({"norm"})


@dataclass(frozen=True)
class ZPlus(LayerRule):
    """z⁺: positive contributions only (α1β0), negative inputs paired with negative weights."""

    stabilizer: float = 1e-6
    name: ClassVar[str] = "z_plus"

    def shares(self) -> tuple[Share, ...]:
        return (Share((Term("x+", POS), Term("x-", NEG, bias=False))),)


@dataclass(frozen=True)
class AlphaBeta(LayerRule):
    """α·(positive share) − β·(negative share), α − β = 1."""

    alpha: float = 2.0
    beta: float = 1.0
    stabilizer: float = 1e-6
    name: ClassVar[str] = "alpha_beta"

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.beta < 0 or abs(self.alpha - self.beta - 1) > 1e-9:
            raise ValueError(f"alpha_beta needs alpha, beta >= 0 and alpha - beta = 1; got {self.alpha}, {self.beta}")

    def shares(self) -> tuple[Share, ...]:
        positive = (Term("x+", POS), Term("x-", NEG, bias=False))
        negative = (Term("x+", NEG), Term("x-", POS, bias=False))
        return Share(positive, self.alpha), Share(negative, -self.beta)


@dataclass(frozen=True)
class Gamma(LayerRule):
    """LRP-γ (generalised to negative inputs and outputs as in Zennit): favour positive contributions."""

    gamma: float = 0.25
    stabilizer: float = 1e-6
    name: ClassVar[str] = "gamma"

    def __post_init__(self) -> None:
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0; got {self.gamma}")

    def shares(self) -> tuple[Share, ...]:
        up, down = (1.0, self.gamma), (1.0 + self.gamma, -self.gamma)  # w + γw⁺, w + γw⁻
        positive = Share((Term("x+", up), Term("x-", down, bias=False)), outputs="pos")
        negative = Share((Term("x+", down), Term("x-", up, bias=False)), outputs="neg")
        return positive, negative


Bound = float | tuple[float, ...]


@dataclass(frozen=True)
class ZBox(LayerRule):
    """z^B for inputs bounded by [low, high] (scalars or one value per channel, in model input space)."""

    low: Bound = -3.0
    high: Bound = 3.0
    stabilizer: float = 1e-6
    name: ClassVar[str] = "z_box"
    kinds: ClassVar[frozenset[str]] = frozenset({"conv", "linear"})

    def __post_init__(self) -> None:
        lows, highs = _as_tuple(self.low), _as_tuple(self.high)
        if len(lows) != len(highs) and 1 not in (len(lows), len(highs)):
            raise ValueError(f"z_box low and high need the same number of values; got {self.low} and {self.high}")
        if any(lo >= hi for lo, hi in zip(lows * len(highs) if len(lows) == 1 else lows,
                                          highs * len(lows) if len(highs) == 1 else highs)):
            raise ValueError(f"z_box needs low < high; got low={self.low}, high={self.high}")

    def shares(self) -> tuple[Share, ...]:
        return (Share((Term("x", P), Term("low", POS, sign=-1.0), Term("high", NEG, sign=-1.0))),)

    def bound(self, which: str, x: torch.Tensor) -> torch.Tensor:
        values = _as_tuple(self.low if which == "low" else self.high)
        if len(values) == 1:
            return x.new_full((1, *x.shape[1:]), values[0])
        if x.ndim < 2 or x.shape[1] != len(values):
            raise ValueError(f"z_box {which} has {len(values)} values but the layer input has shape {tuple(x.shape)}")
        t = torch.tensor(values, dtype=x.dtype, device=x.device).reshape(1, -1, *[1] * (x.ndim - 2))
        return t.expand(1, *x.shape[1:])


def _as_tuple(value: Bound) -> tuple[float, ...]:
    return tuple(float(v) for v in value) if isinstance(value, (tuple, list)) else (float(value),)


@dataclass(frozen=True)
class Flat(LayerRule):
    """Uniform split over each output's receptive field (Lapuschkin et al. 2019)."""

    stabilizer: float = 1e-6
    name: ClassVar[str] = "flat"

    def shares(self) -> tuple[Share, ...]:
        return (Share((Term("ones", "ones", bias=False),)),)


@dataclass(frozen=True)
class WSquare(LayerRule):
    """w²: split in proportion to squared weights (Montavon et al. 2017)."""

    stabilizer: float = 1e-6
    name: ClassVar[str] = "w_square"
    kinds: ClassVar[frozenset[str]] = frozenset({"conv", "linear"})

    def shares(self) -> tuple[Share, ...]:
        return (Share((Term("ones", "square", bias=False),)),)


@dataclass(frozen=True)
class Pass(Rule):
    """Relevance passes unchanged to the input of the output's shape (split evenly if several: AttnLRP's
    uniform rule for element-wise products). A division's divisor is held constant: only the inputs
    in `meta["signal"]` receive relevance. Broadcast inputs get their share summed to their shape."""

    name: ClassVar[str] = "pass"
    kinds: ClassVar[frozenset[str]] = frozenset({"activation", "norm", "gate"})

    def relevance(self, call: Call, r: torch.Tensor) -> list[torch.Tensor | None]:
        signal = call.meta.get("signal")
        candidates = list(range(len(call.inputs))) if signal is None else list(signal)
        full = [i for i in candidates if call.inputs[i].shape == r.shape] or candidates
        share = r / len(full) if len(full) > 1 else r
        return [sum_to(share, call.inputs[i].shape) if i in full else None for i in range(len(call.inputs))]


@dataclass(frozen=True)
class Taylor(Rule):
    """AttnLRP's softmax rule (Prop. 3.1): the softmax linearised at its input x, the rest a bias:
    R_in = x ⊙ (R − s ⊙ Σ_dim R) along the softmax's dim. Inputs at −∞ (masked positions) get 0.
    Σ R_in = Σ x_i R_i − (Σ s_i x_i)·Σ R_i: what differs from Σ R stays with the linearisation's bias."""

    name: ClassVar[str] = "taylor"
    kinds: ClassVar[frozenset[str]] = frozenset({"softmax"})

    def relevance(self, call: Call, r: torch.Tensor) -> list[torch.Tensor | None]:
        x = call.inputs[0]
        s = call.output.to(r.dtype)
        dim = call.meta.get("dim", -1)
        dim = dim - call.output.ndim if dim >= 0 else dim  # from the end: r may carry leading concept dims
        x = torch.nan_to_num(x.to(r.dtype), nan=math.nan, posinf=math.inf, neginf=0.0)  # one pass: −∞ -> 0
        return [torch.addcmul(r, s, r.sum(dim, keepdim=True), value=-1).mul_(x)]


@dataclass(frozen=True)
class Gradient(Rule):
    """The op's own vector-Jacobian product: winner-take-all for max pooling, exact for re-arrangements."""

    name: ClassVar[str] = "gradient"
    kinds: ClassVar[frozenset[str]] = frozenset(
        {"conv", "linear", "sum", "pool", "maxpool", "activation", "norm", "softmax", "gate", "matmul", "shape",
         "other"})
    needs_graph: ClassVar[bool] = True

    def relevance(self, call: Call, r: torch.Tensor) -> list[torch.Tensor | None]:
        leaves = call.leaves or []
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        if not wanted or call.graph_out is None or not call.graph_out.requires_grad:
            return [None] * len(leaves)
        grads = iter(torch.autograd.grad(call.graph_out, wanted, r, allow_unused=True))
        return [next(grads) if leaf.requires_grad else None for leaf in leaves]


def stabilize(z: torch.Tensor, epsilon: float, sign: int = 0) -> torch.Tensor:
    """z + ε·sign(z), with sign(0) = +1, so no denominator is zero; `sign` is z's sign where known."""
    if sign:
        return z + sign * epsilon
    # copysign gives -ε at z = -0.0 (Zennit: +ε); a -0.0 sum has only zero contributions, so nothing moves
    # (an expanded ε: copysign broadcasting a 0-d tensor runs ~2.5x slower on CPU)
    return torch.copysign(z.new_tensor(epsilon).expand_as(z), z).add_(z)


def propagate(rule: LayerRule, call: Call, r: torch.Tensor) -> list[torch.Tensor | None]:
    """Relevance of a linear op's inputs under `rule`.

    One vjp per distinct (input, parameters, factor) — factors such as α live in cached weights, not
    in extra passes over activations — and one product with each distinct input.
    """
    ctx = _Terms(rule, call)
    grads: dict[tuple[str, Mod, float], torch.Tensor] = {}
    masks = _Masks(call.output)
    for share in rule.shares():
        if share.outputs != "all" and call.positive_only:
            if share.outputs == "neg":
                continue
            serves = None  # r is 0 wherever z <= 0 already
        else:
            serves = masks.serves(share.outputs)
        terms = [(ctx.resolve(t.input), t) for t in share.terms]
        terms = [(name, t) for name, t in terms if name is not None]
        zs = [ctx.z(name, t.mod, t.bias) if t.sign == 1.0 else t.sign * ctx.z(name, t.mod, t.bias) for name, t in terms]
        den = _sum(sorted(zs, key=lambda z: z.numel()))  # one-sample constant terms (z^B's bounds) first
        s = _divide(r, den, rule.stabilizer, _sign(ctx, terms, share), share.outputs, serves)
        for name, t in terms:
            key = (name, t.mod, share.scale * t.sign)
            grads[key] = grads[key] + s if key in grads else s
    return _products(ctx, call, grads)


class _Masks:
    """The outputs a share serves (z > 0 for "pos", z < 0 for "neg") as 0/1 floats, each computed once.

    Float arithmetic, not bool masks: masked_fill / where / bool reductions run 10-30x slower than
    an elementwise product on CPUs.
    """

    def __init__(self, z: torch.Tensor):
        self.z = z
        self.cache: dict[str, torch.Tensor] = {}

    def serves(self, outputs: str) -> torch.Tensor | None:
        if outputs == "all":
            return None
        if outputs not in self.cache:
            sign = self.z.sign()
            self.cache[outputs] = sign.clamp_(min=0) if outputs == "pos" else sign.clamp_(max=0).neg_()
        return self.cache[outputs]


def _products(ctx: "_Terms", call: Call, grads: dict[tuple[str, Mod, float], torch.Tensor]
              ) -> list[torch.Tensor | None]:
    """Σ over keys of input′ ⊙ W′ᵀ(factor·s): vjps of one s batched, summed per input′, one product each."""
    by_g: dict[int, list[tuple[str, Mod, float]]] = {}
    for key, g in grads.items():
        by_g.setdefault(id(g), []).append(key)
    by_input: dict[str, list[torch.Tensor | None]] = {}
    for keys in by_g.values():
        vjps = call.op.vjp_many(grads[keys[0]], [(m, k) for _, m, k in keys], call.inputs)  # type: ignore[union-attr]
        for (name, _, _), vs in zip(keys, vjps):
            acc = by_input.setdefault(name, [None] * len(call.inputs))
            for i, v in enumerate(vs):
                acc[i] = v if acc[i] is None else acc[i] + v
    out: list[torch.Tensor | None] = [None] * len(call.inputs)
    for name, vs in by_input.items():
        us = ctx.inputs(name, full=True)
        for i, v in enumerate(vs):
            part = v if us is None or v is None else v * us[i]
            out[i] = part if out[i] is None else out[i] + part
    return out


def _divide(r: torch.Tensor, den: torch.Tensor, epsilon: float, sign: int, outputs: str,
            serves: torch.Tensor | None) -> torch.Tensor:
    """r / stab(den) on the outputs a share serves, 0 on the others (`serves`: their 0/1 indicator,
    None when r is 0 there already); with ε = 0 (LRP-0) outputs with z = 0 pass nothing on."""
    if outputs == "all":
        if not epsilon:
            return torch.where(den == 0, 0.0, r / den)
        stable = stabilize(den, epsilon, sign)  # a new tensor: divide into it
        return torch.div(r, stable, out=stable) if _reusable(stable, r) else r / stable
    # served outputs have denominators of the share's sign (see _sign); clamping leaves them as they
    # are and keeps the others finite, where r or `serves` is 0
    tiny = epsilon or torch.finfo(den.dtype).tiny
    stable = den.clamp(min=0).add_(tiny) if sign > 0 else den.clamp(max=0).sub_(tiny)
    s = torch.div(r, stable, out=stable) if _reusable(stable, r) else r / stable
    return s.mul_(serves) if serves is not None else s


def _reusable(buffer: torch.Tensor, r: torch.Tensor) -> bool:
    """Whether r / buffer can be written into `buffer`: same shape, and no autograd graph (out= has none)."""
    return buffer.shape == r.shape and not (buffer.requires_grad or r.requires_grad)


def _sign(ctx: "_Terms", terms: list[tuple[str, Term]], share: Share) -> int:
    """The sign of a share's denominator wherever it is used (0 when it depends on the input).

    A share limited to outputs z > 0 (z < 0) has positive (negative) denominators there, as
    gamma's do: its added terms only push further away from zero.
    """
    if share.outputs != "all":
        return 1 if share.outputs == "pos" else -1
    signs = {ctx.sign(name, t.mod) * int(t.sign) for name, t in terms}
    return signs.pop() if len(signs) == 1 else 0


def _sum(values: Any) -> torch.Tensor:
    total = None
    for v in values:
        total = v if total is None else total + v
    return total  # type: ignore[return-value]


class _Terms:
    """Term inputs and outputs of one call, each computed once.

    z(x; a·w + c·w⁺) = a·z(x; w) + c·z(x; w⁺) reuses the forward's z(x; w): gamma, z⁺ and α-β need one
    extra convolution (w⁺) per layer, whatever their number of terms.
    """

    def __init__(self, rule: LayerRule, call: Call):
        self.rule, self.call, self.op = rule, call, call.op
        self.cache: dict[Any, Any] = {}
        self.nonneg = call.nonneg

    def resolve(self, name: str) -> str | None:
        """x⁺ is x and x⁻ vanishes for non-negative inputs (checked once per call when not known)."""
        if name not in ("x+", "x-"):
            return name
        if "nonneg" not in self.cache:
            self.cache["nonneg"] = self.nonneg or all(bool(x.amin() >= 0) for x in self.call.inputs)
        if self.cache["nonneg"]:
            return "x" if name == "x+" else None
        return name

    def sign(self, name: str, mod: Mod) -> int:
        """Sign of a term z = op(input; mod) for every input: +1, -1, or 0 when unknown."""
        inputs = {"x": 1 if self.cache.get("nonneg", self.nonneg) else 0, "x+": 1, "x-": -1, "ones": 1}.get(name, 0)
        if not self.op.parametric:  # type: ignore[union-attr]
            weights = 1 if self.op.positive and factor(mod) > 0 else 0  # type: ignore[union-attr]
        else:
            weights = {POS: 1, NEG: -1, "ones": 1, "square": 1}.get(mod, 0)
        return inputs * weights

    def inputs(self, name: str, full: bool) -> list[torch.Tensor] | None:
        """Modified inputs: batch-sized for x±, one broadcastable sample for constants (None: ones in a product)."""
        key = ("in", name, full)
        if key not in self.cache:
            xs = self.call.inputs
            if name == "x":
                value = xs
            elif name == "x+":
                value = [x.clamp(min=0) for x in xs]
            elif name == "x-":
                value = [x.clamp(max=0) for x in xs]
            elif name == "ones":
                value = None if full else [x.new_ones((1, *x.shape[1:])) for x in xs]
            else:
                value = [self.rule.bound(name, x) for x in xs]
            self.cache[key] = value
        return self.cache[key]

    def z(self, name: str, mod: Mod, bias: bool) -> torch.Tensor:
        key = ("z", name, mod, bias)
        if key not in self.cache:
            if name == "x" and isinstance(mod, tuple):
                self.cache[key] = self._z_of_x(mod, bias)
            else:
                self.cache[key] = self.op.apply(self.inputs(name, full=False), mod, bias)  # type: ignore[union-attr]
        return self.cache[key]

    def _z_of_x(self, mod: tuple[float, float], bias: bool) -> torch.Tensor:
        op, out = self.op, self.call.output
        a, c = mod
        base = out if bias else out - op.bias(P)  # type: ignore[union-attr]
        if not op.parametric:  # type: ignore[union-attr]
            return base if a + c == 1 else (a + c) * base
        if not c:
            return base if a == 1 else a * base
        pos = self._positive(bias)
        if not a:
            return pos if c == 1 else c * pos
        if a + c == 1:  # e.g. gamma's (1+γ)·w − γ·w⁺ on negative outputs: one pass
            return torch.lerp(base, pos, c)
        return torch.add(base if a == 1 else a * base, pos, alpha=c)

    def _positive(self, bias: bool) -> torch.Tensor:
        key = ("pos", bias)
        if key not in self.cache:
            self.cache[key] = self.op.apply(self.call.inputs, POS, bias)  # type: ignore[union-attr]
        return self.cache[key]


RULES: dict[str, type[Rule]] = {
    cls.name: cls for cls in (Epsilon, Norm, ZPlus, AlphaBeta, Gamma, ZBox, Flat, WSquare, Uniform, StdConstant, Taylor,
                              Pass, Gradient)
}
"""Rule classes by their spec name (`rules_by_type: {conv: gamma}`)."""
