"""The ray engine: the compute step on a Ray cluster, scheduled by Ray Data.

    from_items(inputs) --map_batches(_Worker, actor pool)--> pickled BatchResult per batch --> driver

The job's inputs (path, relpath, stem) become a Ray dataset; `map_batches` hands batches of
`job.batch_size` inputs to a pool of actors, each holding one `Replica` (the model loads once per
actor; one GPU per actor when the cluster has GPUs, else one CPU). An actor decodes its inputs
itself, so the inputs must be readable at the same path on every node, and so must the model file.

Who writes (`write`): by default the actors write the per-input files (png, npz: writers with
`per_input`) themselves, into the output folder, which must then be the same path on every node (a
shared filesystem, as for the inputs), and send back only predictions, scores and failures. An
actor stages its files under `.xai/staging/<actor>/`; the driver renames them into place when it
takes the batch's result, so a file exists exactly when its input is recorded (counts, scores,
resume), and what an interrupted run staged is dropped. The driver keeps what spans the run
(resume, errors.jsonl, metrics, run.json). With `write: driver` every
array travels to the driver, which writes all files: the output folder then needs to exist only
there, but the driver encodes every file, which bounds a large cluster running cheap methods
(`bench/bench_engines.py` measures both costs). The files are the same either way: the same sinks
write them from the same arrays.

Fault tolerance is Ray Data's: actors of the pool restart after their process or node dies and the
batch they were running is retried on a live actor (`max_restarts=-1`, `max_task_retries=-1`, its
defaults for actor pools). The driver keeps a batch's results once, by input, so a retried batch is
never written twice, and files are written atomically; an input that never comes back is recorded
as failed rather than lost silently. A batch whose input kills its worker every time is retried
without end (Ray Data's default); Ctrl-C stops such a run.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..allocator import keep_heap
from ..compute import BatchResult, describe
from ..data import Failed
from ..descriptors import BatchOutput, Engine, InputItem, Sink, WriterContext
from ..errors import StorageError, UsageError
from ..hookspecs import hookimpl
from ..outdir import staging_dir
from ..params import Param
from ..plan import Plan
from . import Job, Replica

STAGE = "engine (ray)"


def run(job: Job) -> Iterator[BatchResult]:
    """Run the job on a Ray cluster (started here when `address` is unset); stops once `job.stop` is set."""
    ray = _import_ray()
    params = job.plan.engine.params
    started = _connect(ray, params["address"])
    quiet = logging.getLogger("ray.data")  # its notices (progress bars off, execution finished) are not the user's
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        if job.items:
            yield from _run(ray, job, params["actors"], params["write"] == "actors")
    finally:
        quiet.setLevel(level)
        if started:
            _settle()
            ray.shutdown()


def _settle(timeout: float = 30.0) -> None:
    """Wait for Ray Data's executor and block-fetching threads to end. A thread that touches Ray after
    ray.shutdown() makes Ray end the whole process with status 1 ("the core worker has already been
    shutdown"), e.g. when a run stops early on a loaded machine, where the executor's own 2 s join runs out."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if type(thread).__name__ == "StreamingExecutor" or thread.name == "iter_threaded":
            thread.join(max(0.0, deadline - time.monotonic()))


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 - the data extra (pyarrow) is what map_batches needs
    except ImportError:
        raise UsageError("the ray engine needs Ray: pip install 'xaicli[ray]'") from None
    return ray


def _connect(ray: Any, address: str | None) -> bool:
    """Join the cluster at `address`, or start a local Ray; True when this call connected (and so disconnects)."""
    if ray.is_initialized():
        return False
    try:
        if address is None:
            ray.init(include_dashboard=False, logging_level="WARNING")
        else:
            ray.init(address=address, logging_level="WARNING")
    except Exception as exc:  # ConnectionError, ValueError for a bad address, RuntimeError when the cluster is gone
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise UsageError(f"engine.address: cannot connect to {where}: {_first_line(exc)}") from exc
    return True


def _run(ray: Any, job: Job, actors: int | None, actors_write: bool) -> Iterator[BatchResult]:
    """Stream the job's inputs through the actor pool; yield each batch's results once."""
    gpu = _wants_gpu(job.plan, ray.cluster_resources())
    size = job.batch_size
    rows = [{"path": str(item.path), "relpath": item.relpath, "stem": item.stem,
             "todo": "" if item.todo is None else json.dumps(list(item.todo))} for item in job.items]
    data = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // size)))
    data = data.map_batches(
        _Worker, fn_constructor_kwargs={"plan": job.plan, "gpu": gpu,
                                        "staging": str(staging_dir(job.out_dir)) if actors_write and job.out_dir else None},
        batch_size=size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors or _pool_size(ray.cluster_resources(), gpu)),
        **({"num_gpus": 1} if gpu else {"num_cpus": 1}),
    )
    data.context.enable_progress_bars = False  # the run shows its own progress
    data.context.print_on_execution_start = False
    seen: set[str] = set()
    results = iter(data.iter_rows())
    try:
        for row in _rows(results):
            if row["storage"]:  # an actor's write hit a full or read-only disk: the run stops, a rerun resumes
                raise StorageError(row["storage"])
            result: BatchResult = pickle.loads(row["result"])
            inputs = {item.relpath for item in result.items}
            if seen.isdisjoint(inputs):  # a retried batch that also came back earlier is kept once
                seen.update(inputs)
                yield result
            if job.stop.is_set():
                return
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()
    lost = [item for item in job.items if item.relpath not in seen]
    if lost:
        yield BatchResult(lost, failures=[Failed(item, STAGE, "no result came back from the Ray cluster") for item in lost])


def _rows(results: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The dataset's rows; a failure of the cluster itself (not of an input) stops the run with its cause."""
    while True:
        try:
            row = next(results)
        except StopIteration:
            return
        except Exception as exc:  # RayError, Ray Data's UserCodeException: inputs' own errors never get here
            raise UsageError(f"the ray engine failed: {_first_line(exc)}") from exc
        yield row


def _wants_gpu(plan: Plan, resources: dict[str, float]) -> bool:
    """GPU actors when the cluster has GPUs, unless the recipe asks for the CPU."""
    device = plan.recipe.device
    if device.startswith("cuda") and not resources.get("GPU"):
        raise UsageError(f"device {device!r}: the Ray cluster has no GPUs; use --device cpu or auto")
    return bool(resources.get("GPU")) and not device.startswith("cpu")


def _pool_size(resources: dict[str, float], gpu: bool) -> int:
    """One actor per GPU of the cluster, else one per CPU."""
    return max(1, int(resources.get("GPU" if gpu else "CPU", 1)))


class _Worker:
    """A Ray Data actor: one Replica, decoding and computing the batches it is handed, and staging
    their per-input files when given the staging folder."""

    def __init__(self, plan: Plan, gpu: bool, staging: str | None):
        keep_heap()
        device = torch.device("cuda", 0) if gpu else torch.device("cpu")  # Ray sets CUDA_VISIBLE_DEVICES per actor
        self.replica = Replica(plan, device)
        self.sinks: dict[str, Sink] = {}
        self.staging = None if staging is None else Path(staging) / uuid.uuid4().hex  # this actor's own folder
        if self.staging is not None:
            model = self.replica.model
            ctx = WriterContext(out_dir=self.staging, labels=model.labels, spec=model.spec)
            self.sinks = {name: call.plugin.open(ctx, **call.params)
                          for name, call in plan.writers.items() if call.plugin.per_input}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [InputItem(Path(p), str(r), str(s), tuple(json.loads(t)) if t else None)
                 for p, r, s, t in zip(batch["path"], batch["relpath"], batch["stem"], batch["todo"])]
        decoded, failed = self.replica.decode(items)
        result = self.replica(decoded) if decoded else BatchResult([])
        whole = BatchResult(items, outputs=result.outputs, failures=failed + result.failures, chunks=result.chunks)
        storage = self._write(whole) if self.sinks else ""
        blob = pickle.dumps(whole, protocol=pickle.HIGHEST_PROTOCOL)
        return {"result": np.array([blob], dtype=object), "storage": np.array([storage], dtype=object)}

    def _write(self, result: BatchResult) -> str:
        """Write the per-input files here and drop the arrays from `result`; a write that fails fails
        its inputs. Returns the cause when the disk itself failed (the run must stop), else ''."""
        for output in result.outputs:
            for name, sink in self.sinks.items():
                try:
                    sink.write(output)
                except StorageError as exc:
                    return str(exc)
                except Exception as exc:  # a bad path fails these inputs, as the driver's writers do
                    result.failures += [Failed(item, f"write ({name})", describe(exc)) for item in output.items]
        result.written, result.staged = tuple(self.sinks), str(self.staging)
        result.outputs = [_without_arrays(output) for output in result.outputs]
        return ""


def _without_arrays(output: BatchOutput) -> BatchOutput:
    """What the driver still needs of a written batch: items, predictions and scores."""
    empty = np.empty(0, dtype=np.float32)
    return dataclasses.replace(output, inputs=empty, images=[], relevance=empty, extras={})


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


PARAMS = (
    Param("address", str, None, "the Ray cluster to join: auto (the one this machine belongs to), ray://HOST:PORT; "
                                "unset starts a local Ray for this run"),
    Param("actors", int, None, "model replicas (Ray actors); unset: one per GPU of the cluster, else one per CPU", low=1),
    Param("write", str, "actors", "who writes the per-input files: actors (into the output folder, shared by every "
                                  "node) or driver (every array travels to the driver)", choices=("actors", "driver")),
)


@hookimpl
def xai_engines() -> list[Engine]:
    return [Engine("ray", "a Ray cluster, with Ray Data: one model per actor (--set engine.address=auto|ray://HOST:PORT)",
                   run, PARAMS)]
