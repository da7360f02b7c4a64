"""Reading .npz files, safely from any number of threads.

numpy parses each array's header with `ast.literal_eval`, and CPython 3.11's AST constructor keeps
its recursion depth in state shared by all threads: two threads parsing at once can fail with
"SystemError: AST constructor recursion depth mismatch" (cpython gh-106905). Every npz read of xai
goes through `read_npz`, which parses one array at a time under a lock. Pickled objects are refused.
"""
from __future__ import annotations

import threading
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np

_PARSE = threading.Lock()


def read_npz(path: Path | str, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays of an npz file by name (only `keys`, those present, when given).

    Raises what reading a broken file raises: OSError, ValueError, EOFError or zipfile.BadZipFile.
    """
    wanted = None if keys is None else set(keys)
    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            name = member[:-4] if member.endswith(".npy") else member
            if wanted is not None and name not in wanted:
                continue
            with archive.open(member) as fh, _PARSE:
                out[name] = np.lib.format.read_array(fh, allow_pickle=False)
    return out


def npz_keys(path: Path | str) -> list[str]:
    """The array names of an npz file, without reading any array."""
    with zipfile.ZipFile(path) as archive:
        return [m[:-4] if m.endswith(".npy") else m for m in archive.namelist()]
