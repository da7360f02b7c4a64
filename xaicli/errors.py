"""Errors users can act on. The CLI prints them without a traceback.

`UsageError` (bad flags, bad recipe, a model that does not load) ends a run with exit code 2.
`InputError` belongs to one input: it is recorded in errors.jsonl and the run goes on.
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
