"""Settings every analysis shares: how heatmaps are read and pooled, the seed, the smallest group.

An analysis plugin lists them before its own parameters (`COMMON + (...)`) so that
`xai plugins show NAME` prints them and `--set analysis.KEY=VALUE` validates them.
"""
from __future__ import annotations

from ..params import Param
from ..render import REDUCTIONS
from .heatmaps import NORMALISATIONS

COMMON = (
    Param("size", (int, list), 32, "heatmaps are area-pooled to size x size, or to h x w given a pair, before the analysis",
          low=1, high=1024, length=None),
    Param("reduce", str, "sum", "how relevance channels become one value per pixel", choices=REDUCTIONS),
    Param("normalise", str, "max_abs", "per-heatmap scaling after pooling: divide by max |R|, by sum |R|, or none",
          choices=NORMALISATIONS),
    Param("seed", int, 0, "seed of every random step (eigensolver start, k-means, subsamples, t-SNE, UMAP)"),
    Param("min_group", int, 5, "classes with fewer inputs than this are not analysed (listed as skipped)", low=3),
    Param("workers", int, 4, "threads reading npz files and searching neighbours", low=1, high=256),
)
COMMON_NAMES = tuple(p.name for p in COMMON)


def pooled_size(value: int | list[int]) -> tuple[int, int]:
    """(h, w) of the `size` setting; a list must have two entries."""
    if isinstance(value, int):
        return value, value
    if len(value) != 2:
        raise ValueError(f"size: expected N or [h, w]; got {value!r}")
    return int(value[0]), int(value[1])
