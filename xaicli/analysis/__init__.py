"""Dataset-wide analysis of a run's heatmaps (`xai analyze`): SpRAy and other analysis plugins.

`analyze(run_dir, ...)` reads `arrays/<output>/*.npz`, runs an analysis plugin per method output
and class, and writes `analysis.json`, `clusters.csv`, `analysis.h5` and `means/` (see store.py).
"""
from __future__ import annotations

from typing import Any


def analyze(*args: Any, **kwargs: Any) -> Any:
    """Analyse a run folder; see `xaicli.analysis.pipeline.analyze`."""
    from .pipeline import analyze as _analyze

    return _analyze(*args, **kwargs)


__all__ = ["analyze"]
