"""The local engine: every device of this machine, one model replica per device.

Decoding is shared: reader threads stream the inputs in order, batches go to whichever replica
is free. With one device the replica runs in the calling thread (no hand-over at all); with
several, each replica has a thread that pulls batches from a bounded queue. Results come back
in completion order; the orchestration sorts what it records by input order.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator

from ..compute import BatchResult
from ..data import stream
from ..descriptors import Engine
from ..hookspecs import hookimpl
from . import Job, Replica, batches, split

_DONE = object()


def run(job: Job) -> Iterator[BatchResult]:
    """Run the job on `job.devices`; stops taking new batches once `job.stop` is set."""
    replicas = [Replica(job.plan, device, job.model if i == 0 else None, job.sizer) for i, device in enumerate(job.devices)]
    spec = replicas[0].model.spec
    size = job.batch_size
    decoded = stream(job.items, spec, workers=job.plan.recipe.workers, prefetch=max(64, 4 * size), limits=job.limits)
    try:
        if len(replicas) == 1:
            yield from _inline(replicas[0], batches(decoded, size), job)
        else:
            yield from _threaded(replicas, batches(decoded, size), job)
    finally:
        decoded.close()


def _inline(replica: Replica, parts: Iterator[list], job: Job) -> Iterator[BatchResult]:
    for part in parts:
        decoded, failures = split(part)
        if failures is not None:
            yield failures
        if decoded:
            yield replica(decoded)
        if job.stop.is_set():
            return


def _threaded(replicas: list[Replica], parts: Iterator[list], job: Job) -> Iterator[BatchResult]:
    """Replicas in threads pulling from one queue of batches; results through another."""
    todo: queue.Queue = queue.Queue(maxsize=len(replicas))
    done: queue.Queue = queue.Queue()

    def work(replica: Replica) -> None:
        while (decoded := todo.get()) is not _DONE:
            try:
                done.put(replica(decoded))
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
                done.put(exc)
        done.put(_DONE)

    threads = [threading.Thread(target=work, args=(r,), name=f"xai-replica-{i}", daemon=True)
               for i, r in enumerate(replicas)]
    for thread in threads:
        thread.start()
    running = len(threads)

    def drain(block: bool) -> Iterator[BatchResult]:
        nonlocal running
        while running:
            try:
                result = done.get(block=block)
            except queue.Empty:
                return
            if result is _DONE:
                running -= 1
            elif isinstance(result, BaseException):
                raise result
            else:
                yield result

    try:
        for part in parts:
            decoded, failures = split(part)
            if failures is not None:
                yield failures
            while decoded:
                try:
                    todo.put(decoded, timeout=0.05)
                    decoded = None
                except queue.Full:
                    yield from drain(block=False)
            yield from drain(block=False)
            if job.stop.is_set():
                break
    finally:
        for _ in threads:
            todo.put(_DONE)
    yield from drain(block=True)
    for thread in threads:
        thread.join()


@hookimpl
def xai_engines() -> list[Engine]:
    return [Engine("local", "every device of this machine (--device auto | cpu | cuda:0,cuda:1 | cpu,cpu)", run)]
