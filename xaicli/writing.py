"""The run's writers: sinks behind a small thread pool, so encoding overlaps the next batch."""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .descriptors import BatchOutput, InputItem, Sink
from .errors import StorageError
from .io import make_folders, storage_errors

if TYPE_CHECKING:
    from .compute import BatchResult

WRITER_QUEUE = 4  # batches waiting for the writer threads at most


class Writers:
    """Every sink of a run; a batch's writes are queued, not awaited.

    `on_error(items, stage, exc)` records a sink's failure for the inputs of that batch; an
    exception it raises (a full disk: StorageError) reaches the run at the next `submit` or `drain`.
    """

    def __init__(self, sinks: dict[str, Sink], on_error: Callable[[list[InputItem], str, Exception], None],
                 out_dir: Path | None = None):
        self.sinks = sinks
        self.out_dir = out_dir
        self.on_error = on_error
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="xai-writer")
        self.pending: deque[Future] = deque()

    def finished(self, item: InputItem, outputs: Sequence[str]) -> bool:
        """True when every sink has every file of this input (a resumed run skips it)."""
        paths = [p for sink in self.sinks.values() for out in outputs for p in sink.expected(item, out)]
        return bool(paths) and all(p.exists() for p in paths)

    def adopt(self, result: "BatchResult") -> None:
        """Move the files an engine's worker staged for this batch (`result.written` sinks, under
        `result.staged`, laid out like the output folder) into place: one atomic rename each. Until
        then they are not outputs, so an interrupted run leaves no file its results did not reach."""
        if not result.written or result.staged is None or self.out_dir is None:
            return
        for output in result.outputs:
            for name in result.written:
                for item in output.items:
                    for final in self.sinks[name].expected(item, output.output):
                        staged = Path(result.staged) / final.relative_to(self.out_dir)
                        if not staged.exists():  # its write failed on the worker: a failure of the result
                            continue
                        make_folders(self.out_dir, final.parent)
                        with storage_errors(final):
                            os.replace(staged, final)

    def submit(self, batch: BatchOutput, skip: Sequence[str] = ()) -> None:
        """Queue a batch for every sink but those in `skip` (an engine's worker wrote their files)."""
        while len(self.pending) >= WRITER_QUEUE:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(self._write, batch, tuple(skip)))

    def _write(self, batch: BatchOutput, skip: tuple[str, ...]) -> None:
        for name, sink in self.sinks.items():
            if name in skip:
                continue
            try:
                sink.write(batch)
            except Exception as exc:  # a bad path fails these inputs, not the run
                self.on_error(batch.items, f"write ({name})", exc)

    def drain(self) -> None:
        """Wait for every queued write; the first storage failure is raised after all have ended."""
        first: BaseException | None = None
        while self.pending:
            try:
                self.pending.popleft().result()
            except BaseException as exc:  # noqa: BLE001
                first = first or exc
        if first is not None:
            raise first

    def close(self, manifest: dict[str, Any]) -> None:
        """Wait for the writes, then close every sink; the first storage failure is raised at the end."""
        first: StorageError | None = None
        try:
            self.drain()
        except StorageError as exc:
            first = exc
        finally:
            self.pool.shutdown(wait=True)
        for sink in self.sinks.values():
            try:
                sink.close(manifest)
            except StorageError as exc:
                first = first or exc
        if first is not None:
            raise first
