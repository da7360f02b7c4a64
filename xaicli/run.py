"""Orchestration around the compute step: discovery, resume, the engine, writers, manifest.

    plan -> model (spec, digest) -> discovery -> skip finished -> engine.run(job) -> writers -> out/

Orchestration never computes; engines never write. A failing input is recorded (errors.jsonl) and
the run goes on; finished inputs are skipped on a rerun; SIGINT/SIGTERM stop after the batches in
flight with every file whole; a full disk stops the run the same way (exit code 3).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .compute import BatchResult, describe
from .data import discover, escaped
from .descriptors import InputItem, WriterContext
from .engines import Job, devices, load_model
from .errors import StorageError
from .io import atomic_write_bytes, atomic_write_json
from .manifest import manifest, threshold_violations
from .model import Model
from .outdir import OutputLock, prepare_output_dir, remove_temporaries, staging_dir
from .plan import Plan
from .provenance import check_provenance, output_record, preprocess_record, write_provenance
from .progress import Progress
from .writing import Writers


@dataclass
class RunResult:
    """What a run did: where its files are, its manifest, failed inputs and threshold violations."""

    out_dir: Path
    manifest: dict[str, Any]
    errors: list[dict[str, str]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    interrupted: bool = False
    storage_error: str | None = None

    @property
    def exit_code(self) -> int:
        """0 all good, 1 some inputs failed or a threshold was violated, 3 output storage failed, 130 interrupted."""
        if self.storage_error:
            return 3
        if self.interrupted:
            return 130
        return 1 if self.errors or self.violations else 0


class Signals:
    """SIGINT/SIGTERM set `stop`: the run finishes the batches in flight and stops. A second signal aborts."""

    def __init__(self, stop: threading.Event):
        self.stop = stop
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "Signals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt
        self.stop.set()

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Record:
    """What the run keeps of its results: failures and scores, by input order; counts."""

    def __init__(self, items: list[InputItem]):
        self.order = {item.relpath: i for i, item in enumerate(items)}
        self.errors: list[tuple[int, dict[str, str]]] = []
        self.scores: list[tuple[int, list[tuple[str, str, str, float]]]] = []
        self.counts = {"done": 0, "skipped": 0, "failed": 0}
        self.chunks: dict[str, int] = {}  # the smallest size any replica chose, per method and device
        self.failed_before: set[str] = set()  # inputs failed before the loop (a method that cannot run): never done
        self.stats: dict[str, dict[str, list[float]]] = {}  # output -> stat -> [sum, count, max] over finite values
        self.lock = threading.Lock()

    def fail(self, item: InputItem, stage: str, cause: str) -> None:
        entry = {"path": escaped(str(item.path)), "input": escaped(item.relpath), "stage": stage, "cause": escaped(cause)}
        with self.lock:
            self.errors.append((self.order.get(item.relpath, len(self.order)), entry))

    def add(self, result: BatchResult) -> None:
        for failure in result.failures:
            self.fail(failure.item, failure.stage, failure.cause)
        rows = [(item.relpath, out.output, name, float(v))
                for out in result.outputs for name, values in out.scores.items() for item, v in zip(out.items, values)]
        if rows:
            with self.lock:
                self.scores.append((min(self.order[r[0]] for r in rows), rows))
        failed = {f.item.relpath for f in result.failures} | self.failed_before
        self.counts["done"] += sum(1 for item in result.items if item.relpath not in failed)
        for key, size in result.chunks.items():
            self.chunks[key] = min(size, self.chunks.get(key, size))
        with self.lock:
            for out in result.outputs:
                for name, values in out.stats.items():
                    finite = values[np.isfinite(values)]
                    if finite.size:
                        acc = self.stats.setdefault(out.output, {}).setdefault(name, [0.0, 0, -np.inf])
                        acc[0] += float(finite.sum())
                        acc[1] += int(finite.size)
                        acc[2] = max(acc[2], float(finite.max()))

    def stat_summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """Per method output and statistic: mean and max over the inputs of this run, and their number."""
        return {out: {name: {"mean": total / count, "max": top, "inputs": count}
                      for name, (total, count, top) in sorted(stats.items())}
                for out, stats in self.stats.items()}

    def sorted_errors(self) -> list[dict[str, str]]:
        return [e for _, e in sorted(self.errors, key=lambda pair: pair[0])]

    def sorted_scores(self) -> list[tuple[str, str, str, float]]:
        return [row for _, rows in sorted(self.scores, key=lambda pair: pair[0]) for row in rows]


def run_plan(plan: Plan, progress: Progress | None = None) -> RunResult:
    """Execute a plan and return what happened; raises UsageError before any input is touched."""
    progress = progress or Progress()
    recipe, t0 = plan.recipe, time.perf_counter()
    out_dir = prepare_output_dir(Path(recipe.output), recipe.inputs)
    with OutputLock(out_dir):
        remove_temporaries(out_dir)
        targets = devices(recipe.device)
        model = load_model(plan, targets[0])
        if model.unavailable:  # the graph these methods need cannot be built: the others run
            plan = plan.without(model.unavailable)
        items = discover(recipe.inputs, exclude=[out_dir])
        record = Record(items)
        writers = _open_writers(plan, model, out_dir, record)
        todo = _todo(plan, model, out_dir, items, writers)
        _record_skipped(plan, items, writers, record)
        computed = {item.relpath for item in todo}
        record.counts["skipped"] = sum(1 for item in items if item.relpath not in computed | record.failed_before)
        job = Job(plan, todo, targets, model=model, out_dir=out_dir.resolve())
        timings = {"load": time.perf_counter() - t0}
        interrupted, storage = _loop(plan, job, writers, record, progress)
        shutil.rmtree(staging_dir(out_dir), ignore_errors=True)  # what workers staged for results never taken
        timings["loop"] = time.perf_counter() - t0 - timings["load"]
        timings["total"] = time.perf_counter() - t0
        return _finish(plan, model, out_dir, items, job, writers, record, timings, interrupted, storage)


def _todo(plan: Plan, model: Model, out_dir: Path, items: list[InputItem], writers: Writers) -> list[InputItem]:
    """The inputs to compute: all with --overwrite, else those without every output file. Outputs
    made with other parameters, model or preprocessing are refused, or with --overwrite removed first."""
    current = {out: output_record(c.name, c.params, model.digest, preprocess_record(model.spec), plan.recipe.seed)
               for out, c in plan.methods.items()}
    if plan.previous is not None:  # evaluating an earlier run's arrays writes none
        return items
    changed = check_provenance(out_dir, current, plan.recipe.overwrite)
    for out in changed:
        for item in items:
            for path in (p for sink in writers.sinks.values() for p in sink.expected(item, out)):
                path.unlink(missing_ok=True)
    write_provenance(out_dir, current)
    if plan.recipe.overwrite:
        return items
    return pending(items, plan.outputs, writers)


def pending(items: list[InputItem], outputs: list[str], writers: Writers) -> list[InputItem]:
    """The inputs missing some output's files, each with `todo` naming those outputs (a rerun after a
    method failed on an input computes only that method there; the other files stay as they are)."""
    found = []
    for item in items:
        missing = tuple(out for out in outputs if not writers.finished(item, [out]))
        if len(missing) == len(outputs):
            found.append(item)
        elif missing:
            found.append(dataclasses.replace(item, todo=missing))
    return found


def _record_skipped(plan: Plan, items: list[InputItem], writers: Writers, record: Record) -> None:
    """One errors.jsonl line per input and method output that cannot run on this model (a graph that
    cannot be built), for each input that does not hold that output from an earlier run."""
    for out, (call, cause) in plan.skipped.items():
        for item in items:
            if not writers.finished(item, [out]):
                record.fail(item, f"explain ({call.name})", cause)
                record.failed_before.add(item.relpath)


def _open_writers(plan: Plan, model: Model, out_dir: Path, record: Record) -> Writers:
    ctx = WriterContext(out_dir=out_dir, labels=model.labels, spec=model.spec)
    sinks = {name: call.plugin.open(ctx, **call.params) for name, call in plan.writers.items()}

    def on_error(items: list[InputItem], stage: str, exc: Exception) -> None:
        if isinstance(exc, StorageError):  # not the inputs' fault: the run stops, a rerun redoes them
            raise exc
        for item in items:
            record.fail(item, stage, describe(exc))

    return Writers(sinks, on_error, out_dir)


def _loop(plan: Plan, job: Job, writers: Writers, record: Record, progress: Progress) -> tuple[bool, str | None]:
    """Run the engine over the job, recording and writing each result. (interrupted, storage failure)."""
    interrupted, storage = False, None
    progress.start(len(job.items), record.counts["skipped"])
    with Signals(job.stop):
        try:
            for result in plan.engine.plugin.run(job):
                writers.adopt(result)
                record.add(result)
                for output in result.outputs:
                    writers.submit(output, skip=result.written)
                progress.advance(result.done, result.failed)
            writers.drain()
        except KeyboardInterrupt:
            job.stop.set()
        except StorageError as exc:
            job.stop.set()
            storage = str(exc)
        finally:
            progress.close()
    interrupted = job.stop.is_set()
    return interrupted, storage


def _finish(plan: Plan, model: Model, out_dir: Path, items: list[InputItem], job: Job, writers: Writers,
            record: Record, timings: dict[str, float], interrupted: bool, storage: str | None) -> RunResult:
    """Close the writers, write errors.jsonl and run.json (best effort when the disk is full)."""
    errors, scores = record.sorted_errors(), record.sorted_scores()
    record.counts["failed"] = len({e["path"] for e in errors})
    info = manifest(plan, model, inputs=len(items), counts=dict(record.counts), interrupted=interrupted,
                    timings=timings, scores=scores, devices=[str(d) for d in job.devices],
                    batch_size=job.batch_size, chunks=dict(sorted(record.chunks.items())),
                    stats=record.stat_summary())
    steps = [  # errors.jsonl first: a writer closing over the folder (the report) reads it
        lambda: atomic_write_bytes(out_dir / "errors.jsonl", "".join(json.dumps(e) + "\n" for e in errors).encode(),
                                   root=out_dir),
        lambda: writers.close(info),
        lambda: atomic_write_json(out_dir / "run.json", info, root=out_dir),
    ]
    if storage:
        info["storage_error"] = storage
    for step in steps:  # each is tried even when the disk is full: what fits is written
        try:
            step()
        except StorageError as exc:
            storage = storage or str(exc)
        except OSError as exc:
            storage = storage or f"{exc.filename or out_dir}: {exc.strerror or exc}"
    violations = threshold_violations(plan, scores)
    return RunResult(out_dir, info, errors, violations, interrupted, storage)
