"""Figures of a stress part, checks shared by the parts, and the final table."""
from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .launch import Outcome

COLUMNS = {"traceback": "tracebacks", "hang": "hangs", "unaccounted": "unaccounted", "mismatch": "mismatches"}
EXAMPLES = 4  # examples printed per failure kind


@dataclass
class Tally:
    """What one part ran and what failed: every failure has a kind, the case and a detail."""

    part: str
    cases: int = 0
    counts: Counter = field(default_factory=Counter)  # failure kind -> number of failures
    failing: set = field(default_factory=set)  # cases with at least one failure
    examples: dict = field(default_factory=lambda: defaultdict(list))
    notes: Counter = field(default_factory=Counter)  # figures that are reported, not failures

    def fail(self, kind: str, case: str, detail: str = "") -> None:
        self.counts[kind] += 1
        self.failing.add(case)
        if len(self.examples[kind]) < EXAMPLES:
            self.examples[kind].append(f"{case}: {detail}" if detail else case)

    def column(self, name: str) -> int:
        return sum(n for kind, n in self.counts.items() if COLUMNS.get(kind) == name)

    def check_run(self, case: str, outcome: Outcome, codes: tuple[int, ...], limit: str) -> None:
        """The checks every `xai` run gets: no traceback, no hang, no memory kill, an expected exit code."""
        if outcome.hang:
            self.fail("hang", case, f"still running after {outcome.wall:.0f}s (limit {limit}); killed")
        elif outcome.memory_killed:
            self.fail("memory", case, f"resident memory above the watchdog cap ({outcome.maxrss / 2**30:.1f} GiB); killed")
        elif outcome.rc not in codes:
            self.fail("exit code", case, f"exit {outcome.rc}, expected {'/'.join(map(str, codes))}: {last_line(outcome.log)}")
        if outcome.traceback:
            self.fail("traceback", case, traceback_line(outcome.log))


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "(no output)"


def traceback_line(text: str) -> str:
    """The exception line closing a traceback (the last non-frame line), for examples."""
    lines = [line.strip(" │╰╯─") for line in text.splitlines()]
    picked = [line for line in lines if line and ("Error" in line or "Exception" in line or "Interrupt" in line)]
    return (picked[-1] if picked else last_line(text))[:200]


def npz_problem(path: Path) -> str | None:
    """Why an npz output is unusable (unreadable, or NaN/Inf relevance or logit), else None."""
    try:
        with np.load(path, allow_pickle=False) as data:
            for key in ("relevance", "logit"):
                if key in data.files and not np.isfinite(data[key]).all():
                    return f"{key} holds NaN/Inf"
    except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
        return f"unreadable npz ({type(exc).__name__}: {exc})"
    return None


def tree(root: Path) -> dict[str, Path]:
    """Every plain file under `root` by its path relative to `root` (names kept byte-exact via fsdecode)."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            files[path.relative_to(root).as_posix()] = path
    return files


def errors_lines(out: Path) -> list[dict]:
    """errors.jsonl of an output folder as dicts (missing file: no lines)."""
    path = out / "errors.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(errors="surrogateescape").splitlines() if line.strip()]


def print_table(tallies: list[Tally], wall: float) -> bool:
    """Print the figures and every failure kind with examples; True when nothing failed."""
    head = f"{'part':<9} {'cases':>6} {'tracebacks':>10} {'hangs':>6} {'unaccounted':>11} {'mismatches':>10} {'failures':>9}"
    print("\n" + head)
    print("-" * len(head))
    for t in tallies:
        print(f"{t.part:<9} {t.cases:>6} {t.column('tracebacks'):>10} {t.column('hangs'):>6} "
              f"{t.column('unaccounted'):>11} {t.column('mismatches'):>10} {len(t.failing):>9}")
    print(f"(failures = failing cases; wall time {wall:.0f}s)")
    for t in tallies:
        for kind, n in sorted(t.counts.items()):
            print(f"\n[{t.part}] {kind}: {n}")
            for example in t.examples[kind]:
                print(f"    {example}")
        if t.notes:
            print(f"\n[{t.part}] notes: " + ", ".join(f"{k} {v}" for k, v in sorted(t.notes.items())))
    return not any(t.failing for t in tallies)
