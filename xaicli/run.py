"""The run loop: inputs stream through one model, every method, metric and writer of a recipe.

    reader threads -> batches -> model (targets) -> methods -> metrics -> writer threads -> out/

Memory is bounded by the reader's prefetch and the writer queue, never by the number of inputs.
A failing input is recorded (errors.jsonl) and the run goes on; finished inputs are skipped on a
rerun into the same folder; SIGINT/SIGTERM stop after the current batch with every file whole.
"""
from __future__ import annotations

import json
import platform
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from . import __version__
from .data import Decoded, Failed, discover, stream
from .descriptors import Attribution, BatchOutput, InputItem, Method, MetricContext, Sink, WriterContext
from .errors import InputError, UsageError, XaiError
from .io import atomic_write_bytes, atomic_write_json
from .model import Model, check_needs
from .params import resolve
from .progress import Progress
from .recipe import Recipe, dump_recipe, from_mapping, load_recipe, validate_plugins
from .registry import Registry, default_registry
from .rng import BatchRNG, derive_seed
from .targets import Targets

WRITER_QUEUE = 4  # batches waiting for the writer threads at most
REPORT_WRITERS = ("metrics_csv", "summary", "junit")  # added to every run that computes metrics


@dataclass
class RunResult:
    """What a run did: where its files are, its manifest, failed inputs and threshold violations."""

    out_dir: Path
    manifest: dict[str, Any]
    errors: list[dict[str, str]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        """0 all good, 1 some inputs failed or a threshold was violated, 130 interrupted."""
        if self.interrupted:
            return 130
        return 1 if self.errors or self.violations else 0


def explain(
    model: str,
    inputs: str | Sequence[str],
    *,
    methods: Sequence[str] | dict[str, dict] | None = None,
    output: str | Path | None = None,
    sets: Sequence[str] = (),
    progress: Progress | None = None,
    **keys: Any,
) -> RunResult:
    """Explain `inputs` with `model`: the Python form of `xai explain`.

    `methods` is a list of method names or a recipe-style mapping; any other recipe key
    (`seed`, `batch_size`, `writers`, `metrics`, ...) can be passed as a keyword.
    """
    data: dict[str, Any] = {"model": str(model), "inputs": [inputs] if isinstance(inputs, (str, Path)) else list(inputs)}
    data["inputs"] = [str(i) for i in data["inputs"]]
    if methods is not None:
        data["methods"] = {m: {} for m in methods} if not isinstance(methods, dict) else dict(methods)
    if output is not None:
        data["output"] = str(output)
    data.update(keys)
    return run_recipe(from_mapping(data, sets=sets, registry=default_registry()), progress=progress)


def run_file(path: str | Path, sets: Sequence[str] = (), progress: Progress | None = None) -> RunResult:
    """Run a YAML recipe: the Python form of `xai run`."""
    return run_recipe(load_recipe(path, sets=sets, registry=default_registry()), progress=progress)


def pick_device(name: str) -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"device {name!r} is not a device name (auto, cpu, cuda, cuda:N): {exc}") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {name!r} requested but CUDA is not available on this machine; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def load_model(recipe: Recipe, options: dict[str, Any], registry: Registry, device: torch.device) -> Model:
    """Load the recipe's model with the claiming loader and apply input-spec overrides and labels."""
    loader = registry.loader_for(recipe.model)
    try:
        model = loader.load(recipe.model, device, **options)
    except XaiError:
        raise
    except Exception as exc:
        raise UsageError(f"model {recipe.model} could not be loaded by the {loader.name} loader: {exc}") from exc
    try:
        model.spec = model.spec.override(**(recipe.preprocess or {}))
    except (TypeError, ValueError) as exc:
        raise UsageError(f"preprocess: {exc}") from exc
    if recipe.labels:
        path = Path(recipe.labels)
        if not path.is_file():
            raise UsageError(f"labels file {path} does not exist")
        model.labels = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return model


def package_versions() -> dict[str, str]:
    names = ["xaicli", "torch", "numpy", "pillow", "onnx", "onnxruntime", "timm", "pluggy"]
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


class StopFlag:
    """Set by SIGINT/SIGTERM: the run finishes its current batch and stops. A second signal aborts."""

    def __init__(self) -> None:
        self.stopped = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stopped:
            raise KeyboardInterrupt
        self.stopped = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Writers:
    """The run's sinks behind a small thread pool; a batch's writes are queued, not awaited."""

    def __init__(self, sinks: dict[str, Sink], on_error: Callable[[list[InputItem], str, Exception], None]):
        self.sinks = sinks
        self.on_error = on_error
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="xai-writer")
        self.pending: deque[Future] = deque()

    def finished(self, item: InputItem, outputs: Sequence[str]) -> bool:
        """True when every sink has every file of this input (a resumed run skips it)."""
        paths = [p for sink in self.sinks.values() for out in outputs for p in sink.expected(item, out)]
        return bool(paths) and all(p.exists() for p in paths)

    def submit(self, batch: BatchOutput) -> None:
        while len(self.pending) >= WRITER_QUEUE:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(self._write, batch))

    def _write(self, batch: BatchOutput) -> None:
        for name, sink in self.sinks.items():
            try:
                sink.write(batch)
            except Exception as exc:  # a full disk or bad path fails these inputs, not the run
                self.on_error(batch.items, f"write ({name})", exc)

    def drain(self) -> None:
        """Wait for every queued write."""
        while self.pending:
            self.pending.popleft().result()

    def close(self, manifest: dict[str, Any]) -> None:
        self.drain()
        self.pool.shutdown(wait=True)
        for sink in self.sinks.values():
            sink.close(manifest)


class Run:
    """One execution of a validated recipe."""

    def __init__(self, recipe: Recipe, registry: Registry, progress: Progress):
        self.recipe = recipe
        self.registry = registry
        self.progress = progress
        self.resolved = validate_plugins(recipe, registry)
        self.previous = _previous_run(Path(recipe.from_run)) if recipe.from_run else None
        methods = self.resolved["methods"]
        if self.previous is not None:
            methods = _reused_methods(self.previous, methods, Path(recipe.from_run))
        self.methods: dict[str, tuple[Method, dict[str, Any]]] = {
            out: (registry.method(p["method"]), {k: v for k, v in p.items() if k != "method"})
            for out, p in methods.items()
        }
        self.reuse_forward = self.previous is None and any(m.reuses_forward for m, _ in self.methods.values())
        self.metrics = {
            out: (registry.metric(p["metric"]), {k: v for k, v in p.items() if k != "metric"})
            for out, p in self.resolved.get("metrics", {}).items()
        }
        if self.metrics:  # an evaluation always reports its scores
            for name in REPORT_WRITERS:
                self.resolved["writers"].setdefault(name, resolve(registry.writer(name).params, {}))
        if not self.methods and not recipe.from_run:
            raise UsageError("no methods to run: add one with -m METHOD (list them with `xai plugins`)")
        self.errors: list[dict[str, str]] = []
        self.lock = threading.Lock()
        self.counts = {"done": 0, "skipped": 0, "failed": 0}
        self.timings = {"load": 0.0, "loop": 0.0, "compute": 0.0, "total": 0.0}
        self.scores: list[tuple[str, str, str, float]] = []

    # -- errors -------------------------------------------------------------------------
    def fail(self, item: InputItem, stage: str, cause: str) -> None:
        with self.lock:
            self.errors.append({"path": str(item.path), "input": item.relpath, "stage": stage, "cause": cause})

    def fail_items(self, items: list[InputItem], stage: str, exc: Exception) -> None:
        for item in items:
            self.fail(item, stage, _describe(exc))

    # -- setup --------------------------------------------------------------------------
    def prepare(self) -> tuple[Model, list[InputItem], Writers, Targets]:
        t0 = time.perf_counter()
        device = pick_device(self.recipe.device)
        model = load_model(self.recipe, self.resolved.get("model_options", {}), self.registry, device)
        for out, (method, _) in self.methods.items():
            check_needs(model, method.needs, f"method {out!r} ({method.name})")
        for out, (metric, _) in self.metrics.items():
            check_needs(model, metric.needs, f"metric {out!r} ({metric.name})")
            if metric.needs_masks and not self.recipe.masks:
                raise UsageError(f"metric {out!r} ({metric.name}) needs ground-truth masks: pass --masks DIR")
        items = discover(self.recipe.inputs)
        out_dir = Path(self.recipe.output)
        out_dir.mkdir(parents=True, exist_ok=True)
        ctx = WriterContext(out_dir=out_dir, labels=model.labels, spec=model.spec)
        sinks = {name: self.registry.writer(name).open(ctx, **params) for name, params in self.resolved["writers"].items()}
        writers = Writers(sinks, self.fail_items)
        targets = Targets(self.recipe.target, model.labels)
        self.timings["load"] = time.perf_counter() - t0
        return model, items, writers, targets

    # -- the loop -----------------------------------------------------------------------
    def execute(self) -> RunResult:
        t0 = time.perf_counter()
        model, items, writers, targets = self.prepare()
        outputs = list(self.methods)
        todo = items if self.recipe.overwrite else [i for i in items if not writers.finished(i, outputs)]
        self.counts["skipped"] = len(items) - len(todo)
        self.progress.start(len(todo), self.counts["skipped"])
        interrupted = False
        t_loop = time.perf_counter()
        with StopFlag() as stop:
            try:
                for batch in self.batches(todo, model):
                    self.process(model, batch, targets, writers)
                    if stop.stopped:
                        interrupted = True
                        break
            except KeyboardInterrupt:
                interrupted = True
            finally:
                self.progress.close()
        writers.drain()
        self.timings["loop"] = time.perf_counter() - t_loop
        self.timings["total"] = time.perf_counter() - t0
        manifest = self.manifest(model, len(items), interrupted)
        writers.close(manifest)
        violations = self.check_thresholds(manifest)
        out_dir = Path(self.recipe.output)
        self.write_errors(out_dir)
        atomic_write_json(out_dir / "run.json", manifest)
        return RunResult(out_dir, manifest, self.errors, violations, interrupted)

    def batches(self, items: list[InputItem], model: Model) -> Iterator[list[Decoded]]:
        """Decoded inputs grouped by batch size; decode failures are recorded on the way."""
        batch: list[Decoded] = []
        decoded = stream(items, model.spec, workers=self.recipe.workers, prefetch=max(64, 4 * self.recipe.batch_size))
        try:
            for result in decoded:
                if isinstance(result, Failed):
                    self.fail(result.item, result.stage, result.cause)
                    self.progress.advance(0, 1)
                    continue
                batch.append(result)
                if len(batch) == self.recipe.batch_size:
                    yield batch
                    batch = []
            if batch:
                yield batch
        finally:
            decoded.close()

    def process(self, model: Model, batch: list[Decoded], targets: Targets, writers: Writers) -> None:
        """Targets, every method and metric, and the writes of one batch."""
        t0 = time.perf_counter()
        n = len(batch)
        x = torch.stack([d.x for d in batch]).to(model.device)
        try:
            logits = model.keep_forward(x) if self.reuse_forward else model.predict(x)
        except Exception as exc:
            self.fail_items([d.item for d in batch], "forward", exc)
            self.progress.advance(0, n)
            return
        try:
            self.explain_batch(model, batch, x, logits, targets, writers)
        finally:
            model.release()
        self.timings["compute"] += time.perf_counter() - t0

    def explain_batch(
        self, model: Model, batch: list[Decoded], x: torch.Tensor, logits: torch.Tensor, targets: Targets,
        writers: Writers,
    ) -> None:
        """Resolve targets, run methods and metrics on the inputs that have one, submit the writes."""
        n = len(batch)
        target, errors = targets.resolve([d.item for d in batch], logits)
        masks = None
        if self.recipe.masks:
            masks, mask_errors = self.load_masks(batch, model)
            errors = [a or b for a, b in zip(errors, mask_errors)]
        for d, error in zip(batch, errors):
            if error is not None:
                self.fail(d.item, error.stage, str(error))
        keep = [i for i, e in enumerate(errors) if e is None]
        if not keep:
            self.progress.advance(0, n)
            return
        if len(keep) < n:
            batch, x, logits, target = [batch[i] for i in keep], x[keep], logits[keep], target[keep]
            masks = masks[keep] if masks is not None else None
        items = [d.item for d in batch]
        target = target.to(model.device)
        seeds = BatchRNG([derive_seed(self.recipe.seed, item.relpath) for item in items])
        failed: set[int] = set()
        results: list[BatchOutput] = []
        for out, (method, params) in self.methods.items():
            rng = seeds.child(out)
            if self.previous is not None:
                attribution, bad, method_target = self.load_method(out, items, x, target)
            else:
                (attribution, bad), method_target = self.run_method(model, method, params, x, target, rng, items), target
            failed |= bad
            if attribution is None:
                continue
            output = _output(out, method.name, params, batch, x, logits, method_target, attribution)
            output.scores = self.run_metrics(
                model, x, method_target, attribution.relevance, method, params, rng, items, out, masks
            )
            results.append(output)
        for output in results:
            output = _drop(output, failed) if failed else output
            if output.items:
                writers.submit(output)
        self.counts["done"] += len(items) - len(failed)
        self.progress.advance(len(items) - len(failed), n - len(items) + len(failed))

    def run_method(
        self, model: Model, method: Method, params: dict[str, Any], x: torch.Tensor, target: torch.Tensor,
        rng: BatchRNG, items: list[InputItem],
    ) -> tuple[Attribution | None, set[int]]:
        """Explain a batch; if the batch fails, explain its inputs one by one to find the bad ones."""
        try:
            return method.explain(model, x, target, rng, **params), set()
        except Exception as exc:
            if len(items) == 1:
                self.fail(items[0], f"explain ({method.name})", _describe(exc))
                return None, {0}
        parts, bad = [], set()
        for i in range(len(items)):
            try:
                parts.append(method.explain(model, x[i : i + 1], target[i : i + 1], rng[i : i + 1], **params))
            except Exception as exc:
                self.fail(items[i], f"explain ({method.name})", _describe(exc))
                bad.add(i)
                parts.append(None)
        good = [p for p in parts if p is not None]
        if not good:
            return None, bad
        relevance = torch.zeros_like(x)
        index = [i for i, p in enumerate(parts) if p is not None]
        relevance[index] = torch.cat([p.relevance for p in good])
        extras = {}
        for key in good[0].extras:
            rows = [_numpy(p.extras[key]) for p in good]
            full = np.zeros((len(items),) + rows[0].shape[1:], rows[0].dtype)
            full[index] = np.concatenate(rows)
            extras[key] = full
        return Attribution(relevance, extras), bad

    def load_method(
        self, out: str, items: list[InputItem], x: torch.Tensor, target: torch.Tensor
    ) -> tuple[Attribution | None, set[int], torch.Tensor]:
        """Relevance and target of an earlier run's arrays instead of explaining again (--from)."""
        folder = Path(self.recipe.from_run) / "arrays" / out
        relevance, bad = torch.zeros_like(x), set()
        target = target.clone()
        for i, item in enumerate(items):
            path = folder / f"{item.stem}.npz"
            try:
                with np.load(path, allow_pickle=False) as npz:
                    r = torch.from_numpy(npz["relevance"]).to(x.device)
                    if r.shape != x.shape[1:]:
                        raise InputError(f"relevance shape {tuple(r.shape)} in {path} does not match the input {tuple(x.shape[1:])}")
                    relevance[i], target[i] = r, int(npz["target"])
            except (OSError, KeyError, ValueError, InputError) as exc:
                self.fail(item, f"from ({out})", f"{path}: {_describe(exc)}")
                bad.add(i)
        return Attribution(relevance), bad, target

    def run_metrics(
        self, model: Model, x: torch.Tensor, target: torch.Tensor, relevance: torch.Tensor, method: Method,
        params: dict[str, Any], rng: BatchRNG, items: list[InputItem], out: str, masks: torch.Tensor | None,
    ) -> dict[str, np.ndarray]:
        """Score one method's relevance on a batch with every metric of the recipe."""
        scores: dict[str, np.ndarray] = {}
        for name, (metric, metric_params) in self.metrics.items():
            metric_rng = rng.child(f"metric:{name}")
            ctx = MetricContext(explain=_reexplainer(method, params, model, metric_rng), masks=masks, rng=metric_rng)
            try:
                values = metric.score(model, x, target, relevance.detach(), ctx, **metric_params)
            except Exception as exc:
                self.fail_items(items, f"metric ({name} on {out})", exc)
                values = torch.full((len(items),), float("nan"))
            scores[name] = _numpy(values).astype(np.float64)
            for key, detail in ctx.details.items():
                scores[f"{name}/{key}"] = _numpy(detail).astype(np.float64)
        with self.lock:
            for name, values in scores.items():
                self.scores.extend((item.relpath, out, name, float(v)) for item, v in zip(items, values))
        return scores

    def load_masks(self, batch: list[Decoded], model: Model) -> tuple[torch.Tensor, list[InputError | None]]:
        """Ground-truth masks [B,1,H,W] of a batch; an input without a readable mask gets an error."""
        from .data import load_mask

        masks, errors = [], []
        for d in batch:
            try:
                masks.append(load_mask(Path(self.recipe.masks), d.item, model.spec))
                errors.append(None)
            except InputError as exc:
                masks.append(torch.zeros((1, *model.spec.size), dtype=torch.bool))
                errors.append(InputError(f"mask: {exc}", stage="mask"))
        return torch.stack(masks).to(model.device), errors

    # -- results ------------------------------------------------------------------------
    def manifest(self, model: Model, n_inputs: int, interrupted: bool) -> dict[str, Any]:
        self.counts["failed"] = len({e["path"] for e in self.errors})
        elapsed = self.timings["loop"]
        return {
            "xai": __version__,
            "recipe": self.resolved_recipe(),
            "seed": self.recipe.seed,
            "model": {"spec": self.recipe.model, "digest": model.digest, "device": str(model.device),
                      "input": {"size": list(model.spec.size), "channels": model.spec.channels,
                                "mean": list(model.spec.mean), "std": list(model.spec.std),
                                "interpolation": model.spec.interpolation, "crop_pct": model.spec.crop_pct}},
            "versions": package_versions(),
            "inputs": n_inputs,
            "counts": dict(self.counts),
            "interrupted": interrupted,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "throughput": round(self.counts["done"] / elapsed, 3) if elapsed > 0 else 0.0,  # images/s, model loading excluded
            "metrics": {name: {"metric": m.name, "higher_is_better": m.higher_is_better, "family": m.family}
                        for name, (m, _) in self.metrics.items()},
            "thresholds": self.recipe.thresholds or {},
            "scores": self.scores,
        }

    def resolved_recipe(self) -> dict[str, Any]:
        import yaml

        data = yaml.safe_load(dump_recipe(self.recipe))
        data["methods"] = self.resolved["methods"]
        data["writers"] = self.resolved["writers"]
        if self.resolved.get("metrics"):
            data["metrics"] = self.resolved["metrics"]
        return data

    def check_thresholds(self, manifest: dict[str, Any]) -> list[str]:
        if not self.recipe.thresholds:
            return []
        from .summary import check_thresholds, summarize

        summary = summarize(self.scores, {n: m.higher_is_better for n, (m, _) in self.metrics.items()})
        return [v.reason for v in check_thresholds(summary, self.recipe.thresholds, list(self.methods))]

    def write_errors(self, out_dir: Path) -> None:
        text = "".join(json.dumps(e) + "\n" for e in self.errors)
        atomic_write_bytes(out_dir / "errors.jsonl", text.encode())


def run_recipe(recipe: Recipe, registry: Registry | None = None, progress: Progress | None = None) -> RunResult:
    """Execute a recipe and return what happened; raises UsageError before any input is touched."""
    return Run(recipe, registry or default_registry(), progress or Progress()).execute()


def _previous_run(folder: Path) -> dict[str, Any]:
    """The manifest of an earlier run whose arrays are evaluated."""
    path = folder / "run.json"
    if not path.is_file():
        raise UsageError(f"--from {folder}: no run.json there; point it at the output folder of `xai explain`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"--from {folder}: run.json is not valid JSON: {exc}") from exc


def _reused_methods(previous: dict[str, Any], asked: dict[str, dict], folder: Path) -> dict[str, dict]:
    """The earlier run's methods (with their parameters), narrowed to those asked for, if any."""
    done = previous.get("recipe", {}).get("methods", {})
    missing = [name for name in asked if name not in done]
    if missing:
        raise UsageError(f"--from {folder}: the earlier run has no method output {missing[0]!r}; it has {', '.join(done)}")
    return {name: done[name] for name in (asked or done)}


def _reexplainer(method: Method, params: dict[str, Any], model: Model, rng: BatchRNG) -> Callable[..., torch.Tensor]:
    """ctx.explain for metrics: rows of x are input-major ([B, k] flattened) unless `rng` is given."""

    def reexplain(x: torch.Tensor, target: torch.Tensor, model_: Model | None = None, rng_: BatchRNG | None = None) -> torch.Tensor:
        if rng_ is None:
            k = max(1, len(x) // max(1, len(rng)))
            rng_ = BatchRNG([derive_seed(rng.seeds[r // k], "reexplain", r % k) for r in range(len(x))])
        return method.explain(model_ or model, x, target, rng_, **params).relevance

    return reexplain


def _output(
    out: str, method: str, params: dict[str, Any], batch: list[Decoded], x: torch.Tensor, logits: torch.Tensor,
    target: torch.Tensor, attribution: Attribution,
) -> BatchOutput:
    """One method's results on a batch, moved to the CPU for the writers."""
    picked = target.view(-1, 1).to(logits.device)
    return BatchOutput(
        output=out, method=method, params=params, items=[d.item for d in batch],
        inputs=x.detach().float().cpu().numpy(), images=[d.image for d in batch],
        crops=[d.crop for d in batch], resized=[d.resized for d in batch], target=target.cpu().numpy(),
        logit=logits.gather(1, picked)[:, 0].float().cpu().numpy(),
        prob=torch.softmax(logits.float(), 1).gather(1, picked)[:, 0].cpu().numpy(),
        relevance=attribution.relevance.detach().float().cpu().numpy(),
        extras={k: _numpy(v) for k, v in attribution.extras.items()},
    )


def _drop(output: BatchOutput, failed: set[int]) -> BatchOutput:
    """The batch without the inputs some method failed on (their outputs are not written)."""
    keep = [i for i in range(len(output.items)) if i not in failed]
    pick = lambda seq: [seq[i] for i in keep]  # noqa: E731
    return BatchOutput(
        output=output.output, method=output.method, params=output.params, items=pick(output.items),
        inputs=output.inputs[keep], images=pick(output.images), crops=pick(output.crops), resized=pick(output.resized),
        target=output.target[keep], logit=output.logit[keep], prob=output.prob[keep], relevance=output.relevance[keep],
        extras={k: v[keep] for k, v in output.extras.items()}, scores={k: v[keep] for k, v in output.scores.items()},
    )


def _numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _describe(exc: Exception) -> str:
    """A one-line cause for errors.jsonl."""
    if isinstance(exc, InputError):
        return str(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
