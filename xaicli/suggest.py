"""'Did you mean' suggestions for unknown names."""
from __future__ import annotations

import difflib
from typing import Iterable

MAX_SUGGESTED = 20
"""Unknown names of one mapping that get a suggestion: errors show the first ones, and difflib
costs ~50 µs a name (20,000 unknown keys would take a second)."""


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """Return ' (did you mean X?)' for the closest known name, or ''."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
