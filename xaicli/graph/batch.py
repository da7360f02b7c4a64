"""Graphs with a fixed batch size, and how every consumer runs them.

torch.export keeps the batch dimension symbolic unless the model pins it to a number (`int(x.shape[0])`,
sizes computed in numpy): then the graph is exported at the example's batch B0 (`xaicli.graph.trace`)
and marks its input with it (`fixed_batch`). Consumers run such a graph through `in_rows`, which hands
their function B0 rows at a time (a short chunk padded with copies of its last row, `live` saying how
many rows are real) and keeps each chunk's own rows. A graph with a dynamic batch runs in one call.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import fx

_KEY = "fixed_batch"  # in the placeholder's meta, which graph copies (node_copy) keep


def fixed_batch(gm: fx.GraphModule) -> int | None:
    """The one batch size the graph accepts, or None when its batch is dynamic."""
    return _placeholder(gm).meta.get(_KEY)


def mark_fixed(gm: fx.GraphModule) -> None:
    """Record the batch of the input's example value when it is a plain number (a static export)."""
    placeholder = _placeholder(gm)
    value = placeholder.meta.get("val")
    rows = value.shape[0] if isinstance(value, torch.Tensor) and value.ndim else None
    if isinstance(rows, int):
        placeholder.meta[_KEY] = rows


def in_rows(gm: fx.GraphModule, fn: Callable[..., Any], x: torch.Tensor, *per_row: torch.Tensor) -> Any:
    """fn(x, *per_row, live=len(x)) on a graph with a dynamic batch; on a fixed-batch graph, in chunks
    of its batch (`in_chunks`)."""
    return in_chunks(fixed_batch(gm), fn, x, *per_row)


def in_chunks(rows: int | None, fn: Callable[..., Any], x: torch.Tensor, *per_row: torch.Tensor) -> Any:
    """fn(x, *per_row, live=len(x)) when `rows` is None. Else fn runs on each chunk of `rows` rows of x
    and of every per_row tensor (padded; `live` = its real rows), and the results (tensors, or dicts,
    tuples, lists and dataclasses of them) keep the real rows and are joined along dim 0; 0-d tensors
    (sums over a batch) are added, so fn must leave padded rows out of them. Also serves models whose
    own forward takes one batch size (`Model.fixed_batch`: ONNX files exported with a fixed batch)."""
    if rows is None:
        return fn(x, *per_row, live=len(x))
    parts = []
    for start in range(0, len(x), rows):
        stop = min(start + rows, len(x))
        args = [_padded(t[start:stop], rows) for t in (x, *per_row)]
        parts.append(_cut(fn(*args, live=stop - start), stop - start))
    return parts[0] if len(parts) == 1 else _joined(parts)


def run(gm: fx.GraphModule, x: torch.Tensor) -> torch.Tensor:
    """The graph's output for any batch."""
    return in_rows(gm, lambda rows, live: gm(rows), x)


def _placeholder(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "placeholder")


def _padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    extra = rows - len(t)
    return t if extra <= 0 else torch.cat([t, t[-1:].expand(extra, *t.shape[1:])])


def _cut(value: Any, live: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[:live] if value.ndim else value
    return _map(value, lambda v: _cut(v, live))


def _joined(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(parts).sum(0) if first.ndim == 0 else torch.cat(parts)
    if isinstance(first, dict):
        return {key: _joined([p[key] for p in parts]) for key in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_joined(list(items)) for items in zip(*parts))
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        return dataclasses.replace(first, **{f.name: _joined([getattr(p, f.name) for p in parts])
                                             for f in dataclasses.fields(first) if f.init})
    return first


def _map(value: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(value, dict):
        return {key: fn(v) for key, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(fn(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: fn(getattr(value, f.name))
                                             for f in dataclasses.fields(value) if f.init})
    return value
