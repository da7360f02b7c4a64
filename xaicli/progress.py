"""Progress reporting: a rich bar on a terminal, plain log lines otherwise, nothing with --quiet.

The same reporters count inputs explained (`xai explain/evaluate/run`) and heatmaps read (`xai
analyze`): `choose(quiet, task="analyze", unit="heatmaps")`.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Silent reporter; the base of the others."""

    def start(self, total: int, skipped: int) -> None: ...
    def advance(self, done: int, failed: int) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...


class LogProgress(Progress):
    """One plain line every `every` seconds and at the end (for logs and CI)."""

    def __init__(self, stream: TextIO | None = None, every: float = 5.0, task: str = "explain", unit: str = "inputs"):
        """`stream`: default the sys.stderr of the moment of each line (a notebook or test runner may replace it)."""
        self.stream, self.every, self.task, self.unit = stream, every, task, unit
        self.total = self.done = self.failed = 0
        self.t0 = self.last = time.monotonic()

    def start(self, total: int, skipped: int) -> None:
        self.total, self.t0 = total, time.monotonic()
        self.last = self.t0
        extra = f" ({skipped} already done, skipped)" if skipped else ""
        self.message(f"{self.task} {total} {self.unit}{extra}")

    def advance(self, done: int, failed: int) -> None:
        self.done += done
        self.failed += failed
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._line()

    def _line(self) -> None:
        elapsed = time.monotonic() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = self.total - self.done - self.failed
        eta = f", ETA {left / rate:.0f}s" if rate > 0 and left > 0 else ""
        self.message(f"{self.done + self.failed}/{self.total} {self.unit}, {self.failed} failed, {rate:.1f} {self.unit}/s{eta}")

    def message(self, text: str) -> None:
        print(f"xai: {text}", file=self.stream or sys.stderr, flush=True)

    def close(self) -> None:
        self._line()


class RichProgress(Progress):
    """A rich progress bar with images/s and ETA."""

    def __init__(self, task: str = "explain", unit: str = "inputs") -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as Bar

        self.console = Console(stderr=True)
        self.bar = Bar(
            TextColumn(f"[bold]{task}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:.1f} " + unit + "/s"), TextColumn("failed {task.fields[failed]}"),
            TimeRemainingColumn(), console=self.console, transient=False,
        )
        self.task = None
        self.failed = 0
        self.t0 = time.monotonic()

    def start(self, total: int, skipped: int) -> None:
        if skipped:
            self.console.print(f"{skipped} inputs already done, skipped")
        self.bar.start()
        self.t0 = time.monotonic()
        self.task = self.bar.add_task("explain", total=total, rate=0.0, failed=0)

    def advance(self, done: int, failed: int) -> None:
        self.failed += failed
        task = self.bar.tasks[0]
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        self.bar.update(self.task, advance=done + failed, rate=(task.completed + done) / elapsed, failed=self.failed)

    def message(self, text: str) -> None:
        self.console.print(text)

    def close(self) -> None:
        self.bar.stop()


def choose(quiet: bool = False, task: str = "explain", unit: str = "inputs") -> Progress:
    """Rich on a terminal, log lines otherwise, silence when quiet."""
    if quiet:
        return Progress()
    return RichProgress(task, unit) if sys.stderr.isatty() else LogProgress(task=task, unit=unit)
