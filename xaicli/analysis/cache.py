"""The embedding cache: expensive steps (graph, eigenvectors, t-SNE) stored under `cache/<digest>.npz`.

The digest covers the step's name, its settings, the seed and the group's pooled heatmaps byte for
byte, so a rerun with other clustering settings reuses the embedding, and any change to the
heatmaps or to the embedding's own settings computes it again. An unreadable cache file is
recomputed and replaced.
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..descriptors import AnalysisGroup
from ..io import atomic_write
from ..npz import read_npz

FOLDER = "cache"


class EmbeddingCache:
    """Cached results of one analysis folder (`root`)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.folder = self.root / FOLDER

    def bind(self, group: AnalysisGroup) -> Callable[[str, dict[str, Any], Callable[[], dict[str, np.ndarray]]], dict[str, np.ndarray]]:
        """The `cached` function of `group` (see AnalysisGroup); logs each step's reuse in `group.cache_log`."""
        rows = np.ascontiguousarray(group.heatmaps)
        base = hashlib.sha256()
        base.update(f"{rows.shape}|{rows.dtype}|{group.shape}|{group.seed}|".encode())
        base.update(memoryview(rows).cast("B"))

        def cached(name: str, settings: dict[str, Any], compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
            digest = base.copy()
            digest.update(f"{name}|{json.dumps(settings, sort_keys=True, default=str)}".encode())
            path = self.folder / f"{name}-{digest.hexdigest()[:32]}.npz"
            stored = self._load(path)
            group.cache_log.append((name, stored is not None))
            if stored is not None:
                return stored
            arrays = {k: np.asarray(v) for k, v in compute().items()}
            atomic_write(path, lambda fh: np.savez(fh, **arrays), root=self.root)
            return arrays

        return cached

    @staticmethod
    def _load(path: Path) -> dict[str, np.ndarray] | None:
        if not path.is_file():
            return None
        try:
            return read_npz(path)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            return None
