"""Atomic file writes: a file appears complete under its name, or not at all.

Writes into an output folder pass its `root`: folders are created level by level and a folder
that leads outside the root (a symbolic link) is refused, so no write wanders out of the folder.
Storage failures (disk full, quota, read-only, I/O error) become `StorageError`, which stops a run.
"""
from __future__ import annotations

import errno
import io
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import InputError, StorageError

TEMP_SUFFIX = ".xai.tmp"  # every temporary file xai makes ends so (a locked run sweeps leftovers of killed runs)
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})


@contextmanager
def storage_errors(path: Path) -> Iterator[None]:
    """Raise StorageError, naming `path`, for an OSError that says the storage itself failed."""
    try:
        yield
    except OSError as exc:
        if exc.errno in STORAGE_ERRNOS:
            raise StorageError(f"cannot write {path}: {os.strerror(exc.errno)}", str(path), exc.errno) from exc
        raise


def make_folders(root: Path, folder: Path) -> None:
    """Create `root`, then `folder` inside it level by level; refuse a level that resolves outside `root`."""
    try:
        rel = Path(os.path.relpath(folder, root))
    except ValueError:  # another drive (Windows)
        rel = Path("..")
    if rel.parts[:1] == ("..",) or rel.is_absolute():
        raise InputError(f"{folder} is not inside the output folder {root}; not written", stage="write")
    with storage_errors(root):
        Path(root).mkdir(parents=True, exist_ok=True)  # the root itself may be reached through links
    real_root = Path(os.path.realpath(root))
    current = Path(root)
    for part in rel.parts if rel != Path(".") else ():
        current = current / part
        with storage_errors(current):
            try:
                current.mkdir()
            except FileExistsError:
                pass
        real = Path(os.path.realpath(current))
        if real != real_root and real_root not in real.parents:
            raise InputError(f"{current} leads outside the output folder (to {real}); not written", stage="write")


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], None], root: Path | None = None) -> None:
    """Write through `write(fileobj)` to a temporary file beside `path`, then rename it into place.

    With `root` (the output folder), missing folders are made with `make_folders`. On any failure
    the temporary file is removed; storage failures raise StorageError.
    """
    path = Path(path)
    if root is None:
        with storage_errors(path.parent):
            path.parent.mkdir(parents=True, exist_ok=True)
    else:
        make_folders(Path(root), path.parent)
    with storage_errors(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise


def atomic_write_bytes(path: Path, data: bytes, root: Path | None = None) -> None:
    atomic_write(path, lambda fh: fh.write(data), root)


def atomic_write_json(path: Path, obj: Any, root: Path | None = None) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode(), root)
