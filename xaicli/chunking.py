"""Row-wise work in chunks sized against memory: `max_batch: auto`, and retries on out-of-memory.

Methods and metrics that evaluate many rows (occluded copies, path points, masked samples,
re-explained inputs) call `chunked(fn, total, max_batch, key=..., device=...)`: `fn(start, stop)`
computes rows [start, stop) and the chunks' results come back in order.

- `max_batch` an int: chunks of that many rows. `auto`: a size learned per (key, device), see below.
- An out-of-memory error (`torch.OutOfMemoryError` — CUDA's — `MemoryError`, or an error whose
  message is an allocator's: CPU "DefaultCPUAllocator: can't allocate memory", Windows' "not
  enough memory", onnxruntime's "Failed to allocate memory") halves the chunk and retries the rows
  that failed, down to one row; at one row the error propagates (the run records the input as
  failed). The halved size is kept for the key for the rest of the run, for ints as for auto.
- Sizes are multiples of ROWS (8) rows, probes included, until halving goes below 8: CPU GEMM
  kernels compute rows in blocks of 8 and the remainder with other kernels, so with 8-row-aligned
  chunks every row's result is bit-identical whatever the size (measured: rows of chunks of 1, 2 or
  5 differ from those of 64 by up to 3e-6, of 8, 16, ..., 64 by 0). On CUDA, cuDNN/cuBLAS may pick
  other kernels per batch size: results agree to float rounding, as for any change of max_batch.

`auto` probes: the first call of a key runs its first chunks at ROWS and 2·ROWS rows (results
kept, not wasted) and measures the peak memory p1, p2 each needs above what was in use before it:
- CUDA: the caching allocator's `max_memory_allocated` after `reset_peak_memory_stats`, above
  `memory_allocated` (exact: every tensor on the device goes through that allocator);
- CPU: the process's resident-set high-water mark (VmHWM) after resetting it through
  /proc/self/clear_refs, above the resident set (VmRSS) before. This sees every allocation — torch's,
  numpy's, onnxruntime's arenas — and, like the CUDA counter, nests. malloc's free pages are handed
  back (glibc's malloc_trim) before each reading, so a chunk that reuses them still shows as growth;
  it errs high when other threads allocate meanwhile and low when the chunk reuses memory held in
  other ways (a grown onnxruntime arena), which the fraction below leaves room for.
  Where it cannot be read (not Linux), auto uses FALLBACK rows.
The per-row cost is the slope (p2 − p1) / ROWS above a fixed part, or the bound max(p1/8, p2/16) when
the readings are too noisy for a slope; the size is the most rows whose predicted peak fits the
target — `fraction` (0.5) of the memory free when the probe started (CUDA: `mem_get_info` plus what
torch's cache holds unused; CPU: MemAvailable, and the cgroup's limit minus its usage when lower) or
an injected budget (`ChunkSizer(budget=...)`, env XAI_MEMORY_BUDGET in bytes, K/M/G suffixes) —
rounded down to a multiple of ROWS, at least ROWS, at most `cap` (256). A probe spans calls: a call
too short for its 2·ROWS-row chunk (a batch of 16 split 8 + 8) leaves that chunk to the key's next call.

The sizes live in a `ChunkSizer` that a run owns and makes current (`with sizer.active():`, per
thread); `sizes()` reports them ("occlusion@cuda:0": 128) for run.json. Without one, a process-wide
default sizer serves (notebooks, tests). Nested chunking (a metric re-explaining with a chunked
method) works: an inner probe folds the outer's peak reading before it resets the counter.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import re
import threading
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, TypeVar, Union

import torch

from .errors import UsageError
from .params import Param

if TYPE_CHECKING:
    from .model import Model

T = TypeVar("T")
AUTO = "auto"
MaxBatch = Union[int, Literal["auto"]]
ROWS = 8
"""Chunks are multiples of this many rows (the CPU GEMM row block), probes included."""
FALLBACK = 64
"""Rows per chunk for `auto` where memory cannot be measured."""
OOM_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory", "failed to allocate memory",
                "cublas_status_alloc_failed")
_BUDGET_ENV = "XAI_MEMORY_BUDGET"


@dataclass(frozen=True)
class MaxBatchParam(Param):
    """A `max_batch` parameter: a number of rows (≥ 1) or `auto`."""

    @property
    def type_name(self) -> str:
        return "int | auto"

    def check(self, value: Any) -> Any:
        if value == AUTO:
            return AUTO
        if isinstance(value, str):
            raise ValueError(f"expected a number of rows or {AUTO!r}; got {value!r}")
        return super().check(value)


def max_batch_param(what: str, default: MaxBatch = AUTO) -> Param:
    """The `max_batch` parameter every chunking plugin declares; `what` names a row ("occluded images")."""
    return MaxBatchParam("max_batch", (int, str), default, f"most {what} evaluated at once, or auto: sized "
                         "against free memory, halved on out-of-memory (see xaicli.chunking)", low=1)


class ChunkSizer:
    """Chunk sizes learned during one run, per "key@device"; thread-safe.

    `fraction` of free memory is the target of `auto` sizes unless `budget` (bytes, or the
    XAI_MEMORY_BUDGET variable) fixes it; `cap` bounds them.
    """

    def __init__(self, fraction: float = 0.5, cap: int = 256, budget: int | None = None):
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1]; got {fraction}")
        self.fraction, self.cap, self.budget = fraction, max(ROWS, cap), budget
        self._sizes: dict[str, int] = {}  # auto sizes, lowered by out-of-memory errors
        self._limits: dict[str, int] = {}  # sizes that ran out of memory, halved: bound ints too
        self._probes: dict[str, _Probe] = {}
        self._lock = threading.Lock()

    def sizes(self) -> dict[str, int]:
        """Every size chosen so far (after halving): {"occlusion@cpu": 128, ...}."""
        with self._lock:
            return dict(sorted(self._sizes.items()))

    @contextlib.contextmanager
    def active(self) -> Iterator["ChunkSizer"]:
        """Make this sizer the one `chunked` uses in this thread (and its context) for the block."""
        token = _current.set(self)
        try:
            yield self
        finally:
            _current.reset(token)

    def size(self, name: str, max_batch: MaxBatch) -> int | None:
        """Rows per chunk for `name`: `max_batch` below any out-of-memory limit, or the auto size if known."""
        with self._lock:
            if max_batch == AUTO:
                return self._sizes.get(name)
            return min(max_batch, self._limits.get(name, max_batch))

    def learn(self, name: str, rows: int) -> int:
        """Record the auto size of `name`."""
        with self._lock:
            self._probes.pop(name, None)
            self._sizes[name] = rows
            return rows

    def shrink(self, name: str, rows: int) -> int:
        """Record that chunks of `name` must stay at or below `rows` (after an out-of-memory error)."""
        with self._lock:
            self._probes.pop(name, None)
            self._limits[name] = min(rows, self._limits.get(name, rows))
            self._sizes[name] = min(rows, self._sizes.get(name, rows))
            return rows

    def probe(self, name: str, device: torch.device) -> "_Probe | None":
        """The probe of a key not sized yet (kept across calls until it has two readings), or None
        where peak memory or the target cannot be known."""
        with self._lock:
            if name in self._probes:
                return self._probes[name]
        if _counter(device) is None:
            return None
        target = self.target(device)
        if target is None:
            return None
        with self._lock:
            return self._probes.setdefault(name, _Probe(target, self.cap))

    def target(self, device: torch.device) -> int | None:
        """Bytes a chunk may peak at on `device`: the budget, or `fraction` of free memory (None: unknown)."""
        budget = self.budget if self.budget is not None else _env_budget()
        if budget is not None:
            return budget
        free = free_memory(device)
        return None if free is None else int(self.fraction * free)


_current: ContextVar[ChunkSizer | None] = ContextVar("xaicli_chunk_sizer", default=None)
_default = ChunkSizer()


def current_sizer() -> ChunkSizer:
    """The sizer made active in this context, or the process-wide default."""
    return _current.get() or _default


def chunked(
    fn: Callable[[int, int], T], total: int, max_batch: MaxBatch, *, key: str, device: torch.device | str,
) -> list[T]:
    """[fn(start, stop) for consecutive row ranges covering [0, total)], in chunks of `max_batch` rows or
    `auto` (see the module docstring). A call that runs out of memory is retried on halves, so `fn` must
    change the caller's state only after its last allocation (e.g. accumulate in place at its end)."""
    if max_batch != AUTO and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
        raise ValueError(f"max_batch must be a positive number of rows or {AUTO!r}; got {max_batch!r}")
    device = _canonical(torch.device(device))
    sizer = current_sizer()
    name = f"{key}@{device}"
    size = sizer.size(name, max_batch)
    probe = None
    if size is None:
        probe = sizer.probe(name, device)
        size = ROWS if probe is not None else sizer.learn(name, min(FALLBACK, sizer.cap))
    out: list[T] = []
    start = 0
    while start < total:
        stop = min(total, start + (probe.next_rows() if probe is not None else size))
        result, peak = _attempt(fn, start, stop, device, measure=probe is not None)
        if result is _OUT_OF_MEMORY:
            size, probe = sizer.shrink(name, _halve(stop - start)), None
            _release(device)
            continue
        out.append(result)
        if probe is not None:
            fitted = probe.record(stop - start, peak)
            if fitted is not None:
                size, probe = sizer.learn(name, fitted), None
        start = stop
    return out


def predict_rows(
    model: "Model", inputs: torch.Tensor | Callable[[int, int], torch.Tensor], max_batch: MaxBatch, *,
    key: str = "forward", total: int | None = None,
) -> torch.Tensor:
    """Logits without gradients [total, classes] of the rows of a tensor, or of rows built lazily by
    `inputs(start, stop)` (`total` of them; at most one chunk of them exists at a time)."""
    make = inputs if callable(inputs) else lambda start, stop: inputs[start:stop]
    count = len(inputs) if total is None else total

    @torch.no_grad()
    def forward(start: int, stop: int) -> torch.Tensor:
        return model(make(start, stop))

    return torch.cat(chunked(forward, count, max_batch, key=key, device=model.device))


def fit_size(points: list[tuple[int, int]], target: int, cap: int) -> int:
    """Rows per chunk from two probe points (rows, peak bytes): the most whose predicted peak
    fixed + slope·rows fits `target`, a multiple of ROWS in [ROWS, cap]; FALLBACK if nothing was measured."""
    (n1, p1), (n2, p2) = sorted(points)
    slope = (p2 - p1) / (n2 - n1) if p2 > p1 else max(p1 / n1, p2 / n2)
    if slope <= 0:
        return min(FALLBACK, cap)
    fixed = max(0.0, p2 - slope * n2)
    rows = int((target - fixed) // slope)
    return max(ROWS, min(cap, rows // ROWS * ROWS))


def is_out_of_memory(exc: BaseException) -> bool:
    """True for the allocators' out-of-memory errors (torch CUDA and CPU, Python, onnxruntime)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, Exception) and any(message in text for message in OOM_MESSAGES)


class _Probe:
    """Peak readings of an `auto` key's first chunks (ROWS rows, then 2·ROWS), against the target
    taken when the first began. A call too short for the second chunk leaves it to the next call."""

    def __init__(self, target: int, cap: int):
        self.target, self.cap = target, cap
        self.peaks: dict[int, int] = {}  # rows -> highest peak read for chunks of that many rows
        self._lock = threading.Lock()

    def next_rows(self) -> int:
        return 2 * ROWS if self.peaks else ROWS

    def record(self, rows: int, peak: int | None) -> int | None:
        """Add a chunk's reading; the fitted size once chunks of two lengths were read."""
        assert peak is not None
        with self._lock:
            self.peaks[rows] = max(peak, self.peaks.get(rows, 0))
            if len(self.peaks) < 2:
                return None
            low, high = min(self.peaks), max(self.peaks)
            return fit_size([(low, self.peaks[low]), (high, self.peaks[high])], self.target, self.cap)


_OUT_OF_MEMORY = object()


def _attempt(fn: Callable[[int, int], T], start: int, stop: int, device: torch.device, measure: bool
             ) -> tuple[Any, int | None]:
    """(fn(start, stop), its peak bytes if `measure`), or _OUT_OF_MEMORY for a chunk of more than one row
    that ran out of memory (the exception, and with it the chunk's tensors, is dropped on return)."""
    reading = _PEAKS.open(device) if measure else None
    peak = None
    try:
        result = fn(start, stop)
    except Exception as exc:
        if stop - start == 1 or not is_out_of_memory(exc):
            raise
        return _OUT_OF_MEMORY, None
    finally:
        if reading is not None:
            peak = _PEAKS.close(reading)
    return result, peak


def _halve(rows: int) -> int:
    """Half of a failed chunk: a multiple of ROWS while it can be, then down to 1."""
    half = rows // 2
    return half // ROWS * ROWS if half >= ROWS else max(1, half)


def _release(device: torch.device) -> None:
    """Return what a failed chunk held: collect its cycles and, on CUDA, empty torch's cache."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _canonical(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


# Peak memory ------------------------------------------------------------------------------------


class _CudaCounter:
    """The CUDA caching allocator's counters of one device."""

    def __init__(self, device: torch.device):
        self.device = device

    def in_use(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def reset(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)


class _ResidentCounter:
    """The process's resident set (VmRSS) and its high-water mark (VmHWM), reset through clear_refs (Linux)."""

    status = Path("/proc/self/status")
    clear_refs = Path("/proc/self/clear_refs")

    def in_use(self) -> int:
        return self._read("VmRSS")

    def peak(self) -> int:
        return self._read("VmHWM")

    def reset(self) -> None:
        """Hand malloc's free pages back first, so that a chunk reusing them shows as growth."""
        _malloc_trim()
        self.clear_refs.write_text("5")  # "5": reset the peak RSS to the current RSS (Linux ≥ 4.0)

    def _read(self, field: str) -> int:
        match = re.search(rf"^{field}:\s+(\d+) kB", self.status.read_text(), re.MULTILINE)
        if match is None:
            raise OSError(f"{self.status} has no {field}")
        return int(match.group(1)) * 1024

    def works(self) -> bool:
        try:
            self.reset()
            return self.peak() >= 0 and self.in_use() >= 0
        except OSError:
            return False


def _malloc_trim() -> None:
    """glibc's malloc_trim(0): free pages of every arena back to the system (no-op elsewhere)."""
    global _trim
    if _trim is None:
        try:
            _trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _trim = False
    if _trim:
        _trim(0)


_trim: Any = None
_RESIDENT = _ResidentCounter()
_resident_works: bool | None = None


def _counter(device: torch.device) -> _CudaCounter | _ResidentCounter | None:
    """What measures peak memory on `device`, or None."""
    global _resident_works
    if device.type == "cuda":
        return _CudaCounter(device)
    if device.type == "cpu":
        if _resident_works is None:
            _resident_works = _RESIDENT.works()
        return _RESIDENT if _resident_works else None
    return None


@dataclass(eq=False)
class _Reading:
    device: torch.device
    base: int
    peak: int


class _Peaks:
    """Open peak readings. Counters are process- (CPU) or device-wide (CUDA), so before one is reset
    for a new reading, its value is folded into the readings still open on that device (nesting,
    threads): a reading never misses a peak, and at worst counts other work's memory too."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: list[_Reading] = []

    def open(self, device: torch.device) -> _Reading:
        counter = _counter(device)
        assert counter is not None
        with self._lock:
            now = counter.peak()
            for reading in self._open:
                if reading.device == device:
                    reading.peak = max(reading.peak, now)
            counter.reset()
            base = counter.in_use()
            reading = _Reading(device, base, base)
            self._open.append(reading)
            return reading

    def close(self, reading: _Reading) -> int:
        """Bytes the reading's work needed above what was in use when it opened."""
        counter = _counter(reading.device)
        assert counter is not None
        with self._lock:
            self._open.remove(reading)
            return max(0, max(reading.peak, counter.peak()) - reading.base)


_PEAKS = _Peaks()


# Free memory ------------------------------------------------------------------------------------

CGROUP = Path("/sys/fs/cgroup")
MEMINFO = Path("/proc/meminfo")


def free_memory(device: torch.device) -> int | None:
    """Bytes that work on `device` can still allocate, or None where unknown.

    CUDA: free device memory plus what torch's caching allocator holds unused. CPU: MemAvailable
    of /proc/meminfo, or the cgroup's limit minus its usage when lower (v2 memory.max/current, v1
    memory.limit_in_bytes/usage_in_bytes, which counts page cache: errs low)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    known = [v for v in (_meminfo_available(MEMINFO), cgroup_free(CGROUP)) if v is not None]
    return min(known) if known else None


def cgroup_free(root: Path) -> int | None:
    """The memory cgroup's limit minus its usage under `root`, or None without a limit."""
    for limit, usage in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        limit_bytes, usage_bytes = _read_int(root / limit), _read_int(root / usage)
        if limit_bytes is not None and usage_bytes is not None and limit_bytes < 2**60:  # v1 "unlimited": ~2**63
            return max(0, limit_bytes - usage_bytes)
    return None


def _meminfo_available(path: Path) -> int | None:
    try:
        match = re.search(r"^MemAvailable:\s+(\d+) kB", path.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _read_int(path: Path) -> int | None:
    """An integer file's value; None if missing or not a number (cgroup v2 writes "max" for no limit)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def parse_bytes(text: str) -> int:
    """Bytes of "2000000000", "512M", "1.5G" (binary multiples K, M, G, T; optional "iB"/"B")."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if match is None:
        raise ValueError(f"expected a number of bytes such as 2000000000, 512M or 1.5G; got {text!r}")
    return int(float(match.group(1)) * 1024 ** " kmgt".index(match.group(2).lower() or " "))


def _env_budget() -> int | None:
    text = os.environ.get(_BUDGET_ENV)
    if not text:
        return None
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise UsageError(f"environment variable {_BUDGET_ENV}: {exc}") from None
