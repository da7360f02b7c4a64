"""Errors users can act on. The CLI prints them without a traceback.

`UsageError` (bad flags, bad recipe, a model that does not load) ends a run with exit code 2.
`InputError` belongs to one input: it is recorded in errors.jsonl and the run goes on.
`StorageError` (disk full, quota, read-only or failing storage under the output folder) stops the
run like an interrupt: finished outputs stay whole, a rerun resumes; exit code 3.
"""
from __future__ import annotations


class XaiError(Exception):
    """Base class of every error xai reports to a user as a message."""


class UsageError(XaiError):
    """The run cannot start: bad flags, bad recipe, unknown plugin, model that does not load."""


class InputError(XaiError):
    """One input cannot be processed; `stage` says where (read, decode, explain, write)."""

    def __init__(self, message: str, stage: str = "read"):
        super().__init__(message)
        self.stage = stage


class StorageError(XaiError):
    """Output storage failed mid-run (ENOSPC, EDQUOT, EROFS, EIO): the run stops, exit code 3."""

    def __init__(self, message: str, path: str, errno: int):
        super().__init__(message)
        self.path = path
        self.errno = errno
