"""The output folder: checked before any work, held by one run at a time, swept of temporaries.

`check_output_dir` turns every way a folder cannot take outputs (a file in its place or above it,
no write permission, a read-only or full file system, /proc or /sys) into one UsageError line,
before a run starts; `prepare_output_dir` then creates it. `OutputLock` keeps a second run out.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from .errors import UsageError
from .io import TEMP_SUFFIX, storage_errors

KERNEL_FOLDERS = (Path("/proc"), Path("/sys"))
FIXED_FOLDERS = ("heatmaps", "arrays", ".xai")  # the run's own subfolders: none may lead outside
STATE = ".xai"  # the run's bookkeeping: lock, output records


def check_output_dir(path: Path, inputs: Sequence[str | Path] = ()) -> None:
    """Raise UsageError (one line: the path and the cause) if `path` cannot be an output folder.

    Writes and removes one small probe file in `path`, or in its nearest existing ancestor:
    that is what finds read-only and full file systems, and folders root cannot write either.
    """
    shown = str(path)
    path = Path(os.path.abspath(path))
    real = Path(os.path.realpath(path))
    for kernel in KERNEL_FOLDERS:
        if real == kernel or kernel in real.parents:
            raise UsageError(f"output folder {shown} is under {kernel}, a kernel file system; choose another --output")
    existing = path
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        what = "a broken symbolic link" if not existing.exists() else "a file" if existing.is_file() else "not a folder"
        if existing == path:
            raise UsageError(f"output folder {shown} is {what}")
        raise UsageError(f"output folder {shown} cannot be created: {existing} is {what}")
    for given in inputs:
        if existing == path and Path(given).is_dir() and os.path.samefile(given, path):
            raise UsageError(f"output folder {shown} is also an input folder; choose another --output")
    _probe(existing, shown)


def _probe(folder: Path, shown: str) -> None:
    where = "" if str(folder) == os.path.abspath(shown) else f" ({folder})"
    if not os.access(folder, os.W_OK | os.X_OK):
        cause = "read-only file system" if _read_only(folder) else "permission denied"
        raise UsageError(f"output folder {shown} is not writable: {cause}{where}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".xai-probe.", suffix=TEMP_SUFFIX, dir=folder)
        try:
            os.write(fd, b"xai")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        cause = os.strerror(exc.errno) if exc.errno else str(exc)
        raise UsageError(f"output folder {shown} is not writable: {cause.lower()}{where}") from None


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def prepare_output_dir(path: Path, inputs: Sequence[str | Path] = ()) -> Path:
    """Check `path` (see check_output_dir), create it, and refuse fixed subfolders that lead outside it."""
    check_output_dir(path, inputs)
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"output folder {path} cannot be created: {os.strerror(exc.errno or 0).lower()}") from None
    real_root = Path(os.path.realpath(path))
    for name in FIXED_FOLDERS:
        sub = Path(path) / name
        real = Path(os.path.realpath(sub))
        if os.path.lexists(sub) and real != real_root and real_root not in real.parents:
            raise UsageError(f"output folder {path}: {name} leads outside it (to {real}); remove that link or choose another --output")
    return Path(path)


class OutputLock:
    """Holds `<out>/.xai/lock` for one run (flock, released by the kernel even when the run is killed).

    A second run into the same folder gets UsageError naming the holder's pid. File systems that
    do not support locks run unlocked.
    """

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / STATE / "lock"
        self.fd: int | None = None

    def __enter__(self) -> "OutputLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise UsageError(f"output folder {self.out_dir}: cannot open its lock file {self.path}: "
                             f"{os.strerror(exc.errno or 0).lower()}") from None
        try:
            self._acquire(fd)
            with storage_errors(self.path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def _acquire(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UsageError(f"output folder {self.out_dir} is in use by another xai run (pid {holder}); "
                             "wait for it to finish or choose another --output") from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock; the file stays (unlinking it would race a waiting run)
            self.fd = None


def staging_dir(out_dir: Path) -> Path:
    """Where engine workers stage the files of a batch until the run takes its results (`.xai/staging`)."""
    return out_dir / ".xai" / "staging"


def remove_temporaries(out_dir: Path) -> int:
    """Delete temporary files (`*.xai.tmp`) and staged files that killed or interrupted runs left in
    `out_dir`; call it holding the lock."""
    shutil.rmtree(staging_dir(out_dir), ignore_errors=True)
    removed = 0
    for folder, _, files in os.walk(out_dir):
        for name in files:
            if name.endswith(TEMP_SUFFIX):
                try:
                    os.unlink(os.path.join(folder, name))
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed
