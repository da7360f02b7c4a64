"""Where the compute step runs. An engine gets a `Job` and yields one `BatchResult` per batch.

What every engine's workers share is here: a `Replica` (one model on one device, the plan, the
targets) turns decoded inputs into results, and `read_batch` adds what a batch needs from files
(ground-truth masks, an earlier run's arrays). The orchestration (xaicli.run) writes the results.

    job = Job(plan, items, devices)     # inputs still to do, in order
    for result in engine.run(job):      # any order; engines stop early when job.stop is set
        ...
"""
from __future__ import annotations

import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from ..chunking import ChunkSizer
from ..compute import Batch, BatchResult, Reused, compute
from ..data import Decoded, DecodeLimits, Failed, decode, load_mask
from ..descriptors import InputItem
from ..errors import InputError, UsageError, XaiError
from ..model import GraphUnavailable, Model, check_needs
from ..npz import read_npz
from ..plan import Plan
from ..recipe import problems_of
from ..targets import Targets

AUTO_BATCH = 16  # inputs per batch when batch_size is auto: methods size their own chunks against memory


@dataclass
class Job:
    """What an engine runs: the plan, the inputs still to do (in input order) and the devices."""

    plan: Plan
    items: list[InputItem]
    devices: list[torch.device]
    model: Model | None = None  # the orchestration's model on devices[0]: the first replica uses it
    stop: threading.Event = field(default_factory=threading.Event)
    sizer: ChunkSizer = field(default_factory=ChunkSizer)  # chunk sizes learned per method/metric and device
    out_dir: Path | None = None  # the run's output folder (absolute), for workers that write files themselves

    @property
    def batch_size(self) -> int:
        size = self.plan.recipe.batch_size
        return AUTO_BATCH if size == "auto" else int(size)

    @property
    def limits(self) -> DecodeLimits:
        return self.plan.limits


def devices(name: str) -> list[torch.device]:
    """The devices named by `--device`: auto is every CUDA device (else the CPU); `a,b` lists replicas."""
    if name == "auto":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [torch.device(f"cuda:{i}") for i in range(count)] or [torch.device("cpu")]
    return [_device(part.strip()) for part in name.split(",")]


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"device {name!r} is not a device name (auto, cpu, cuda, cuda:N): {exc}") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {name!r} requested but CUDA is not available on this machine; use --device cpu or auto")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise UsageError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", index)
    return device


def load_model(plan: Plan, device: torch.device) -> Model:
    """The plan's model on `device`, with the recipe's input-spec overrides and labels, checked
    against what every method and metric needs."""
    recipe = plan.recipe
    if plan.module is not None:
        from ..model import model_from_module

        model = model_from_module(plan.module, device)
    else:
        loader = plan.loader
        try:
            model = loader.load(recipe.model, device, **plan.model_options)
        except XaiError:
            raise
        except Exception as exc:
            raise UsageError(f"model {recipe.model} could not be loaded by the {loader.name} loader: {describe_load(exc)}") from exc
    try:
        model.spec = model.spec.override(**(recipe.preprocess or {}))
    except (TypeError, ValueError) as exc:
        raise UsageError(f"preprocess: {exc}") from exc
    if recipe.labels:
        path = Path(recipe.labels)
        if not path.is_file():
            raise UsageError(f"labels file {path} does not exist")
        try:
            model.labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"labels file {path} cannot be read: {exc}") from exc
    check_methods(plan, model)
    for out, call in plan.metrics.items():
        check_needs(model, call.plugin.needs, f"metric {out!r} ({call.name})")
        if call.plugin.needs_masks and not recipe.masks:
            raise UsageError(f"metric {out!r} ({call.name}) needs ground-truth masks: pass --masks DIR")
    return model


def check_methods(plan: Plan, model: Model) -> None:
    """What each method needs of the model, and its own check of its parameters against the model
    (layer names, ...), before any input runs: one RecipeError naming every failing entry and line.
    A method whose graph cannot be built goes to `model.unavailable` (the run goes on without it)
    unless every method needs it: then its GraphUnavailable ends the run before any input."""
    problems = []
    for out, call in plan.methods.items():
        try:
            check_needs(model, call.plugin.needs, f"method {out!r} ({call.name})")
        except GraphUnavailable as exc:
            model.unavailable[out] = str(exc)
            continue
        if call.plugin.check is not None:
            try:
                call.resolved.update(call.plugin.check(model, call.params) or {})
            except GraphUnavailable as exc:
                model.unavailable[out] = f"method {out!r} ({call.name}): {exc}"
            except UsageError as exc:
                problems.append((f"methods.{out}", str(exc)))
    if problems:
        raise problems_of(plan.recipe, problems)
    if plan.methods and len(model.unavailable) == len(plan.methods):
        raise GraphUnavailable(next(iter(model.unavailable.values())))


def describe_load(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Replica:
    """One model on one device running the compute step for the plan."""

    def __init__(self, plan: Plan, device: torch.device, model: Model | None = None, sizer: ChunkSizer | None = None):
        self.plan = plan
        self.model = model if model is not None else load_model(plan, device)
        self.targets = Targets(plan.recipe.target, self.model.labels)
        self.sizer = sizer or ChunkSizer()

    def __call__(self, decoded: list[Decoded]) -> BatchResult:
        with self.sizer.active():
            result = compute(self.model, self.plan, self.targets, read_batch(self.plan, decoded, self.model))
        result.chunks = self.sizer.sizes()
        return result

    def decode(self, items: list[InputItem]) -> tuple[list[Decoded], list[Failed]]:
        """Decode inputs here (engines whose workers read the files themselves)."""
        results = [decode(item, self.model.spec, self.plan.limits) for item in items]
        return [r for r in results if isinstance(r, Decoded)], [r for r in results if isinstance(r, Failed)]


def read_batch(plan: Plan, decoded: list[Decoded], model: Model) -> Batch:
    """A batch with its ground-truth masks and an earlier run's arrays read from disk."""
    batch = Batch(decoded)
    recipe = plan.recipe
    if recipe.masks:
        masks, errors = [], []
        for d in decoded:
            try:
                masks.append(load_mask(Path(recipe.masks), d.item, model.spec, plan.limits))
                errors.append(None)
            except InputError as exc:
                masks.append(torch.zeros((1, *model.spec.size), dtype=torch.bool))
                errors.append(InputError(f"mask: {exc}", stage="mask"))
        batch.masks, batch.errors = torch.stack(masks).to(model.device), errors
    if recipe.from_run:
        for out in plan.methods:
            batch.reused[out] = _reused_arrays(Path(recipe.from_run) / "arrays" / out, decoded, model.device)
    return batch


def _reused_arrays(folder: Path, decoded: list[Decoded], device: torch.device) -> Reused:
    """Relevance and target of each input from an earlier run's NPZ files."""
    x = torch.stack([d.x for d in decoded])
    relevance, target = torch.zeros_like(x), torch.zeros(len(decoded), dtype=torch.long)
    errors: list[InputError | None] = []
    for i, d in enumerate(decoded):
        path = folder / f"{d.item.stem}.npz"
        try:
            npz = read_npz(path, ("relevance", "target"))
            r = torch.from_numpy(npz["relevance"])
            if r.shape != x.shape[1:]:
                raise InputError(f"relevance shape {tuple(r.shape)} does not match the input {tuple(x.shape[1:])}")
            relevance[i], target[i] = r, int(npz["target"])
            errors.append(None)
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, InputError) as exc:
            errors.append(InputError(f"{path}: {describe_load(exc) if not isinstance(exc, InputError) else exc}", stage="from"))
    return Reused(relevance.to(device), target.to(device), errors)


def batches(results: Iterator[Decoded | Failed], size: int) -> Iterator[list[Decoded | Failed]]:
    """Decoded inputs grouped by `size`; a decode failure travels in the batch it was read with."""
    batch: list[Decoded | Failed] = []
    for result in results:
        batch.append(result)
        if sum(isinstance(r, Decoded) for r in batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def split(batch: list[Decoded | Failed]) -> tuple[list[Decoded], BatchResult | None]:
    """The decoded inputs of a batch, and a result holding its decode failures (None if none)."""
    failed = [r for r in batch if isinstance(r, Failed)]
    decoded = [r for r in batch if isinstance(r, Decoded)]
    return decoded, (BatchResult([f.item for f in failed], failures=failed) if failed else None)


__all__ = ["AUTO_BATCH", "Job", "Replica", "batches", "devices", "load_model", "read_batch", "split"]
