"""Running `xai` under watch: a time limit, a memory watchdog, its peak memory, all in one thread.

Two ways to start it, one outcome shape:
- `exec`: a real `xai` process (fork + exec of the console script), what a user runs.
- `warm`: a fork of this process after `warm_up()` imported xaicli, torch and every plugin; the
  child calls the console script's `main()` with its own argv, stdout/stderr, working folder,
  rlimits and default signal handlers, and ends like an interpreter does (non-daemon threads
  joined, atexit handlers run). It is a real process that receives real signals; what it skips
  is the ~2-15 s import, which is what makes hundreds of cases fit in minutes on two cores.

Work is a set of generators stepped by `run_all` (no threads in this process: forking a
process with threads risks children inheriting held locks). A generator yields while it waits.
"""
from __future__ import annotations

import atexit
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Generator, Iterable

XAI = Path(sys.executable).with_name("xai")
RSS_CAP = 8 << 30  # a child above this resident size is killed (the machine is shared)
TICK = 0.02

Task = Generator[None, None, None]
_live: dict[int, "Proc"] = {}


def warm_up() -> str | None:
    """Import what every `xai` run imports, so warm children start at once; the error text if that fails."""
    try:
        import torch  # noqa: F401
        from importlib.metadata import entry_points

        import xaicli.cli  # noqa: F401

        for ep in entry_points(group="xaicli"):
            ep.load()
    except Exception as exc:  # the children will show the same failure in their own output
        return f"{type(exc).__name__}: {exc}"
    return None


def has_traceback(text: str) -> bool:
    """True when a Python (or rich) traceback reached the output."""
    return "Traceback" in text


@dataclass
class Job:
    """One `xai` invocation: its arguments (after `xai`), folder, log file and limits."""

    args: list[str]
    cwd: Path
    log: Path  # stdout and stderr together
    timeout: float
    warm: bool = True
    address_space: int | None = None  # RLIMIT_AS in bytes above this process's current size
    cpu_timeout: float | None = None  # CPU seconds: catches a busy hang whatever the machine's load


@dataclass
class Outcome:
    """How a run ended: exit code (negative: killed by that signal), time, peak memory, log text."""

    rc: int
    wall: float
    maxrss: int  # bytes
    hang: bool
    memory_killed: bool
    log: str

    @property
    def traceback(self) -> bool:
        return has_traceback(self.log)


class Proc:
    """A started `xai` child: poll it, signal it, read its outcome once it ended."""

    def __init__(self, job: Job):
        self.job = job
        job.log.parent.mkdir(parents=True, exist_ok=True)
        job.cwd.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        limit = None if job.address_space is None else _vm_size() + job.address_space
        self.t0 = time.monotonic()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the child never returns
            _child(job, limit)
        _live[self.pid] = self
        self.outcome: Outcome | None = None
        self.hang = self.memory_killed = False
        self.peak = 0

    def running(self) -> bool:
        """Reap the child if it ended; enforce the time limit and the memory watchdog."""
        if self.outcome is not None:
            return False
        pid, status, usage = os.wait4(self.pid, os.WNOHANG)
        if pid == 0:
            self._watch()
            return True
        del _live[self.pid]
        rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        log = self.job.log.read_bytes().decode("utf-8", "replace")
        self.outcome = Outcome(rc, time.monotonic() - self.t0, max(usage.ru_maxrss * 1024, self.peak),
                               self.hang, self.memory_killed, log)
        return False

    def _watch(self) -> None:
        rss = _rss(self.pid)
        self.peak = max(self.peak, rss)
        if rss > RSS_CAP and not self.memory_killed:
            self.memory_killed = True
            self.kill(signal.SIGKILL)
        elif not self.hang and (time.monotonic() - self.t0 > self.job.timeout
                                or (self.job.cpu_timeout is not None and _cpu(self.pid) > self.job.cpu_timeout)):
            self.hang = True
            self.kill(signal.SIGKILL)

    def kill(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self) -> Generator[None, None, Outcome]:
        """`outcome = yield from proc.wait()` inside a task."""
        while self.running():
            yield
        assert self.outcome is not None
        return self.outcome


def run(job: Job) -> Generator[None, None, Outcome]:
    """Start a job and wait for it: `outcome = yield from run(job)`."""
    return (yield from Proc(job).wait())


def sleep(seconds: float) -> Generator[None, None, None]:
    """Wait inside a task without blocking the others."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        yield


def run_all(tasks: Iterable[Task], parallel: int) -> None:
    """Step every task to its end, at most `parallel` at a time."""
    pending = iter(tasks)
    active: list[Task] = []
    while True:
        while len(active) < parallel:
            task = next(pending, None)
            if task is None:
                break
            active.append(task)
        if not active:
            return
        for task in list(active):
            try:
                next(task)
            except StopIteration:
                active.remove(task)
        time.sleep(TICK)


def _kill_live() -> None:
    for proc in list(_live.values()):
        proc.kill(signal.SIGKILL)


atexit.register(_kill_live)


def _vm_size() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def _cpu(pid: int) -> float:
    """User + system CPU seconds of a running process (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _child(job: Job, limit: int | None) -> None:
    """In the forked child: set up like a fresh process, then exec `xai` or call its main()."""
    code = 1
    _live.clear()  # the parent's other children are not this child's to kill at its exit
    try:
        os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the stress runner, not every child
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        fd = os.open(job.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.chdir(job.cwd)
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        if not job.warm:
            os.execv(XAI, [str(XAI), *job.args])
        code = _call_main(job.args)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _call_main(args: list[str]) -> int:
    """`xai ARGS` in this process, ended the way the interpreter ends a script."""
    import atexit as _atexit
    import threading

    sys.argv = [str(XAI), *args]
    code = 0
    try:
        from xaicli.cli import main

        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        code = -signal.SIGINT  # Python dies by SIGINT after an uncaught KeyboardInterrupt
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    threading._shutdown()  # what interpreter exit does: join non-daemon threads (a hang shows here)
    _atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code
