"""The compute step: a batch of decoded inputs + a loaded model + the plan -> every method's and
metric's outputs. No I/O: what it needs from files (masks, an earlier run's arrays) comes in the
`Batch`; what it produces goes back in a `BatchResult` for the writers. Engines schedule it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .data import Decoded, Failed
from .descriptors import Attribution, BatchOutput, InputItem, Method, MetricContext
from .errors import InputError
from .model import Model
from .plan import Call, Plan
from .rng import BatchRNG, derive_seed
from .targets import Targets


@dataclass
class Reused:
    """An earlier run's relevance and targets for one method output of a batch (--from)."""

    relevance: torch.Tensor  # [B, C, H, W]
    target: torch.Tensor  # [B]
    errors: list[InputError | None]


@dataclass
class Batch:
    """Decoded inputs of one batch and what was read for them (masks, reused arrays)."""

    decoded: list[Decoded]
    masks: torch.Tensor | None = None  # [B, 1, H, W] bool
    errors: list[InputError | None] = field(default_factory=list)  # per input, found while reading
    reused: dict[str, Reused] = field(default_factory=dict)

    @property
    def items(self) -> list[InputItem]:
        return [d.item for d in self.decoded]


@dataclass
class BatchResult:
    """What the compute step made of a batch: outputs for the writers and failed inputs."""

    items: list[InputItem]
    outputs: list[BatchOutput] = field(default_factory=list)
    failures: list[Failed] = field(default_factory=list)
    chunks: dict[str, int] = field(default_factory=dict)  # chunk sizes its replica has chosen so far
    written: tuple[str, ...] = ()  # writers whose files the engine's worker staged (see xaicli.writing.Writers.adopt)
    staged: str | None = None  # the folder the worker staged them in, laid out like the output folder

    @property
    def failed(self) -> int:
        return len({f.item.relpath for f in self.failures})

    @property
    def done(self) -> int:
        return len(self.items) - self.failed


def compute(model: Model, plan: Plan, targets: Targets, batch: Batch) -> BatchResult:
    """Targets, every method and metric of the plan on one batch."""
    result = BatchResult(batch.items)
    x = torch.stack([d.x for d in batch.decoded]).to(model.device)
    try:
        logits = model.keep_forward(x) if plan.reuse_forward else model.predict(x)
    except Exception as exc:
        _fail_all(result, batch.items, "forward", exc)
        return result
    try:
        _explain(model, plan, targets, batch, x, logits, result)
    finally:
        model.release()
    return result


def _explain(model: Model, plan: Plan, targets: Targets, batch: Batch, x: torch.Tensor, logits: torch.Tensor,
             result: BatchResult) -> None:
    target, errors = targets.resolve(batch.items, logits)
    if batch.errors:
        errors = [a or b for a, b in zip(errors, batch.errors)]
    for item, error in zip(batch.items, errors):
        if error is not None:
            result.failures.append(Failed(item, error.stage, str(error)))
    keep = [i for i, e in enumerate(errors) if e is None]
    if not keep:
        return
    decoded, masks = batch.decoded, batch.masks
    if len(keep) < len(decoded):
        decoded, x, logits, target = [decoded[i] for i in keep], x[keep], logits[keep], target[keep]
        masks = masks[keep] if masks is not None else None
    items = [d.item for d in decoded]
    target = target.to(model.device)
    seeds = BatchRNG([derive_seed(plan.recipe.seed, item.relpath) for item in items])
    whole = _Part(x, logits, target, seeds, decoded, masks, list(range(len(items))))
    for out, call in plan.methods.items():
        rows = [i for i, item in enumerate(items) if item.todo is None or out in item.todo]
        if rows:  # a resumed input that has this output already is left out of it
            output = _method_output(model, plan, call, out, whole.pick(rows), batch, keep, result)
            if output is not None:
                result.outputs.append(output)


@dataclass
class _Part:
    """The inputs of a batch one method output runs on; `rows` index them in the batch."""

    x: torch.Tensor
    logits: torch.Tensor
    target: torch.Tensor
    rng: BatchRNG
    decoded: list[Decoded]
    masks: torch.Tensor | None
    rows: list[int]

    @property
    def items(self) -> list[InputItem]:
        return [d.item for d in self.decoded]

    def pick(self, index: list[int]) -> "_Part":
        """These inputs (by position in this part); all of them: this very part (the forward the
        run kept for the batch is matched by the identity of x)."""
        if len(index) == len(self.rows):
            return self
        return _Part(self.x[index], self.logits[index], self.target[index], self.rng[index],
                     [self.decoded[i] for i in index], None if self.masks is None else self.masks[index],
                     [self.rows[i] for i in index])


def _method_output(model: Model, plan: Plan, call: Call, out: str, part: _Part, batch: Batch, keep: list[int],
                   result: BatchResult) -> BatchOutput | None:
    """One method output with its metrics on the inputs it succeeded on; a failure (in errors.jsonl,
    its stage naming the method) leaves the other methods' outputs of that input alone."""
    part = dataclasses.replace(part, rng=part.rng.child(out))
    if out in batch.reused:
        attribution, bad, target = _reused(batch.reused[out], [keep[r] for r in part.rows], part.items, result, out)
    else:
        (attribution, bad), target = _run_method(model, call, part.x, part.target, part.rng, part.items, result), part.target
    if attribution is None:
        return None
    if bad:
        good = [i for i in range(len(part.rows)) if i not in bad]
        if not good:
            return None
        part, target = part.pick(good), target[good]
        attribution = Attribution(attribution.relevance[good], {k: v[good] for k, v in attribution.extras.items()},
                                  {k: v[good] for k, v in attribution.stats.items()})
    output = _output(call, part.decoded, part.x, part.logits, target, attribution)
    output.scores = _run_metrics(model, plan, part.x, target, attribution.relevance, call, part.rng, part.items,
                                 part.masks, result)
    return output


def _run_method(
    model: Model, call: Call, x: torch.Tensor, target: torch.Tensor, rng: BatchRNG, items: list[InputItem],
    result: BatchResult,
) -> tuple[Attribution | None, set[int]]:
    """Explain a batch; if the batch fails, explain its inputs one by one to find the bad ones."""
    method: Method = call.plugin
    stage = f"explain ({method.name})"
    try:
        return method.explain(model, x, target, rng, **call.params), set()
    except Exception as exc:
        if len(items) == 1:
            result.failures.append(Failed(items[0], stage, describe(exc)))
            return None, {0}
    parts: list[Attribution | None] = []
    for i in range(len(items)):
        try:
            parts.append(method.explain(model, x[i : i + 1], target[i : i + 1], rng[i : i + 1], **call.params))
        except Exception as exc:
            result.failures.append(Failed(items[i], stage, describe(exc)))
            parts.append(None)
    index = [i for i, p in enumerate(parts) if p is not None]
    if not index:
        return None, set(range(len(items)))
    good = [parts[i] for i in index]
    relevance = torch.zeros_like(x)
    relevance[index] = torch.cat([p.relevance for p in good])
    extras = {key: _rows([numpy(p.extras[key]) for p in good], index, len(items)) for key in good[0].extras}
    # a stat some inputs lack (LRP's per-node leaks, reported where over a threshold) is NaN there: the run skips it
    stats = {key: _rows([numpy(p.stats[key]) if key in p.stats else np.full(len(p.relevance), np.nan) for p in good],
                        index, len(items)) for key in dict.fromkeys(k for p in good for k in p.stats)}
    return Attribution(relevance, extras, stats), set(range(len(items))) - set(index)


def _rows(rows: list[np.ndarray], index: list[int], n: int) -> np.ndarray:
    """Per-input arrays of the inputs at `index`, placed in a batch of n (zeros elsewhere)."""
    full = np.zeros((n,) + rows[0].shape[1:], rows[0].dtype)
    full[index] = np.concatenate(rows)
    return full


def _reused(reused: Reused, keep: list[int], items: list[InputItem], result: BatchResult, out: str
            ) -> tuple[Attribution, set[int], torch.Tensor]:
    """The earlier run's arrays of the inputs kept in this batch."""
    bad = set()
    for i, k in enumerate(keep):
        if reused.errors[k] is not None:
            result.failures.append(Failed(items[i], f"from ({out})", str(reused.errors[k])))
            bad.add(i)
    return Attribution(reused.relevance[keep]), bad, reused.target[keep]


def _run_metrics(
    model: Model, plan: Plan, x: torch.Tensor, target: torch.Tensor, relevance: torch.Tensor, call: Call,
    rng: BatchRNG, items: list[InputItem], masks: torch.Tensor | None, result: BatchResult,
) -> dict[str, np.ndarray]:
    """Score one method's relevance on a batch with every metric of the plan."""
    scores: dict[str, np.ndarray] = {}
    for name, metric_call in plan.metrics.items():
        metric_rng = rng.child(f"metric:{name}")
        ctx = MetricContext(explain=_reexplainer(call, model, metric_rng), masks=masks, rng=metric_rng)
        try:
            values = metric_call.plugin.score(model, x, target, relevance.detach(), ctx, **metric_call.params)
        except Exception as exc:
            stage = f"metric ({name} on {call.output})"
            result.failures.extend(Failed(item, stage, describe(exc)) for item in items)
            values = torch.full((len(items),), float("nan"))
        scores[name] = numpy(values).astype(np.float64)
        for key, detail in ctx.details.items():
            scores[f"{name}/{key}"] = numpy(detail).astype(np.float64)
    return scores


def _reexplainer(call: Call, model: Model, rng: BatchRNG) -> Callable[..., torch.Tensor]:
    """ctx.explain for metrics: rows of x are input-major ([B, k] flattened) unless `rng` is given."""

    def reexplain(x: torch.Tensor, target: torch.Tensor, model_: Model | None = None, rng_: BatchRNG | None = None) -> torch.Tensor:
        if rng_ is None:
            k = max(1, len(x) // max(1, len(rng)))
            rng_ = BatchRNG([derive_seed(rng.seeds[r // k], "reexplain", r % k) for r in range(len(x))])
        return call.plugin.explain(model_ or model, x, target, rng_, **call.params).relevance

    return reexplain


def _output(call: Call, decoded: list[Decoded], x: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
            attribution: Attribution) -> BatchOutput:
    """One method's results on a batch, moved to the CPU for the writers."""
    picked = target.view(-1, 1).to(logits.device)
    return BatchOutput(
        output=call.output, method=call.name, params=call.params, items=[d.item for d in decoded],
        inputs=x.detach().float().cpu().numpy(), images=[d.image for d in decoded],
        crops=[d.crop for d in decoded], resized=[d.resized for d in decoded], target=target.cpu().numpy(),
        logit=logits.gather(1, picked)[:, 0].float().cpu().numpy(),
        prob=torch.softmax(logits.float(), 1).gather(1, picked)[:, 0].cpu().numpy(),
        relevance=attribution.relevance.detach().float().cpu().numpy(),
        extras={k: numpy(v) for k, v in attribution.extras.items()},
        predicted=logits.argmax(1).cpu().numpy().astype(np.int64),
        stats={k: numpy(v).astype(np.float64).reshape(len(decoded)) for k, v in attribution.stats.items()},
    )


def _fail_all(result: BatchResult, items: list[InputItem], stage: str, exc: Exception) -> None:
    result.failures.extend(Failed(item, stage, describe(exc)) for item in items)


def numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def describe(exc: BaseException) -> str:
    """A one-line cause for errors.jsonl."""
    if isinstance(exc, InputError):
        return str(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
