"""Running top-N per channel: the N inputs with the highest score for each of C channels.

Memory is C·N entries whatever the number of inputs; updates are vectorised over a batch. Ties
break by input name (ascending), so the result depends only on the set of inputs seen, not on
their order, batches or shards: merging two TopN gives the TopN of the union.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TopN:
    """Per channel, the best `n` (score, name, class) seen so far, best first."""

    scores: np.ndarray  # [C, n] float64, -inf where empty
    names: np.ndarray  # [C, n] unicode, "" where empty
    classes: np.ndarray  # [C, n] int64, -1 where empty

    @classmethod
    def empty(cls, channels: int, n: int) -> "TopN":
        return cls(np.full((channels, n), -np.inf), np.full((channels, n), "", dtype="<U1"),
                   np.full((channels, n), -1, dtype=np.int64))

    @property
    def n(self) -> int:
        return self.scores.shape[1]

    def update(self, scores: np.ndarray, names: list[str], classes: np.ndarray) -> "TopN":
        """Fold in a batch: scores [B, C] of inputs `names` [B] with classes [B]."""
        if len(names) == 0:
            return self
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape[1] != self.scores.shape[0]:
            raise ValueError(f"expected scores for {self.scores.shape[0]} channels, got {scores.shape[1]}")
        channels = self.scores.shape[0]
        new_names = np.broadcast_to(np.asarray(names, dtype=np.str_), (channels, len(names)))
        new_classes = np.broadcast_to(np.asarray(classes, dtype=np.int64), (channels, len(names)))
        return self._keep(np.concatenate([self.scores, scores.T], 1), np.concatenate([self.names, new_names], 1),
                          np.concatenate([self.classes, new_classes], 1))

    def merge(self, other: "TopN") -> "TopN":
        """The top-N of both (same channels and n)."""
        if other.scores.shape != self.scores.shape:
            raise ValueError(f"cannot merge top-N tables of shapes {self.scores.shape} and {other.scores.shape}")
        return self._keep(np.concatenate([self.scores, other.scores], 1), np.concatenate([self.names, other.names], 1),
                          np.concatenate([self.classes, other.classes], 1))

    def _keep(self, scores: np.ndarray, names: np.ndarray, classes: np.ndarray) -> "TopN":
        # an input may come twice (a shard merged with itself, a resumed batch): keep it once
        order = np.lexsort((names, -scores), axis=1)
        scores, names, classes = (np.take_along_axis(a, order, 1) for a in (scores, names, classes))
        duplicate = np.zeros(names.shape, bool)
        duplicate[:, 1:] = (names[:, 1:] == names[:, :-1]) & (names[:, 1:] != "")
        if duplicate.any():
            scores, names = np.where(duplicate, -np.inf, scores), np.where(duplicate, "", names)
            classes = np.where(duplicate, -1, classes)
            order = np.lexsort((names, -scores), axis=1)
            scores, names, classes = (np.take_along_axis(a, order, 1) for a in (scores, names, classes))
        n = self.n
        return TopN(scores[:, :n].copy(), names[:, :n].copy(), classes[:, :n].copy())

    def entries(self, channel: int) -> list[tuple[float, str, int]]:
        """(score, name, class) of a channel, best first, without empty slots."""
        return [(float(s), str(m), int(c)) for s, m, c in zip(self.scores[channel], self.names[channel],
                                                               self.classes[channel]) if m and np.isfinite(s)]
