"""Clusterings and 2-D views of an embedding: scikit-learn's implementations, seeded.

Every function returns one row per input. Methods whose cost grows faster than N log N on large
groups (DBSCAN and HDBSCAN keep every neighbourhood, t-SNE and UMAP optimise every point) are fitted
on a seeded subsample of at most `max_points` inputs; each other input then takes the label (or the
2-D position) of its nearest fitted neighbour in the embedding. Ward's agglomerative clustering
runs on a k-NN graph as connectivity (and on a subsample above `max_points` too), so it never
builds an N x N matrix either.
"""
from __future__ import annotations

import tempfile
import warnings
from typing import Callable, Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.cluster import DBSCAN, HDBSCAN, AgglomerativeClustering, KMeans
from sklearn.manifold import TSNE
from sklearn.neighbors import NearestNeighbors


def kmeans(embedding: np.ndarray, k: int, seed: int, n_init: int = 10) -> np.ndarray:
    """k-means (k-means++ initialisation, `n_init` restarts) with random_state=seed."""
    return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(embedding).astype(np.int64)


def agglomerative(embedding: np.ndarray, ks: Sequence[int], connectivity: sp.spmatrix, max_points: int,
                  seed: int) -> dict[int, np.ndarray]:
    """Ward clusterings of the embedding for each k, constrained to a k-NN graph, cut from one tree
    (joblib-cached between the ks). Above `max_points` rows the tree is built on a seeded subsample
    (its own k-NN graph in the embedding, as many neighbours as `connectivity` has per row)."""
    picked = subsample(len(embedding), max_points, seed)
    x = embedding if picked is None else embedding[picked]
    if picked is not None:
        per_row = max(1, int(round(connectivity.nnz / max(1, connectivity.shape[0]))))
        connectivity = NearestNeighbors(n_neighbors=min(per_row, len(x) - 1)).fit(x).kneighbors_graph(mode="connectivity")
    out: dict[int, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="xai-ward-") as cache, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*connected components.*")  # sklearn joins them itself
        for k in ks:
            model = AgglomerativeClustering(n_clusters=k, linkage="ward", connectivity=connectivity,
                                            compute_full_tree=True, memory=cache)
            out[k] = _extend(embedding, picked, model.fit_predict(x).astype(np.int64))
    return out


def subsample(n: int, max_points: int, seed: int) -> np.ndarray | None:
    """Sorted indices of a seeded subsample of `max_points` of n, or None when n fits."""
    if n <= max_points:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def _extend(embedding: np.ndarray, picked: np.ndarray | None, fitted: np.ndarray) -> np.ndarray:
    """Values for every row: `fitted` for the subsample, the nearest fitted row's for the others."""
    if picked is None:
        return fitted
    nearest = NearestNeighbors(n_neighbors=1).fit(embedding[picked]).kneighbors(embedding, return_distance=False)[:, 0]
    out = fitted[nearest]
    out[picked] = fitted
    return out


def on_subsample(embedding: np.ndarray, fit: Callable[[np.ndarray], np.ndarray], max_points: int, seed: int) -> np.ndarray:
    """`fit` on at most `max_points` rows, extended to all rows by nearest fitted neighbour."""
    picked = subsample(len(embedding), max_points, seed)
    fitted = fit(embedding if picked is None else embedding[picked])
    return _extend(embedding, picked, fitted)


def dbscan(embedding: np.ndarray, eps: float, min_samples: int, max_points: int, seed: int) -> np.ndarray:
    return on_subsample(embedding, lambda x: DBSCAN(eps=eps, min_samples=min_samples).fit_predict(x).astype(np.int64),
                        max_points, seed)


def hdbscan(embedding: np.ndarray, min_cluster_size: int, max_points: int, seed: int) -> np.ndarray:
    def fit(x: np.ndarray) -> np.ndarray:
        size = max(2, min(min_cluster_size, len(x)))
        return HDBSCAN(min_cluster_size=size, copy=True).fit_predict(x).astype(np.int64)

    return on_subsample(embedding, fit, max_points, seed)


def tsne(embedding: np.ndarray, perplexity: float, max_points: int, seed: int) -> np.ndarray:
    """Barnes-Hut t-SNE to 2-D (perplexity capped below a third of the points)."""
    def fit(x: np.ndarray) -> np.ndarray:
        p = float(min(perplexity, max(1.0, (len(x) - 1) / 3.0)))
        return TSNE(n_components=2, perplexity=p, init="pca", random_state=seed,
                    method="barnes_hut" if len(x) > 300 else "exact").fit_transform(x).astype(np.float32)

    return on_subsample(embedding, fit, max_points, seed)


def umap_view(embedding: np.ndarray, max_points: int, seed: int) -> np.ndarray | None:
    """UMAP to 2-D when umap-learn is installed, else None."""
    try:
        import umap  # type: ignore[import-not-found]
    except ImportError:
        return None

    def fit(x: np.ndarray) -> np.ndarray:
        neighbours = max(2, min(15, len(x) - 1))
        return umap.UMAP(n_components=2, n_neighbors=neighbours, random_state=seed).fit_transform(x).astype(np.float32)

    return on_subsample(embedding, fit, max_points, seed)


def prototypes(rows: np.ndarray, labels: np.ndarray, chunk: int = 8192) -> dict[int, tuple[int, np.ndarray]]:
    """Per cluster (noise -1 excluded): (index of the member closest to the mean heatmap, the mean).
    Members are read `chunk` rows at a time, so no copy of a large cluster is made."""
    out: dict[int, tuple[int, np.ndarray]] = {}
    for c in np.unique(labels):
        if c < 0:
            continue
        members = np.flatnonzero(labels == c)
        parts = [members[i:i + chunk] for i in range(0, len(members), chunk)]
        mean = sum((rows[p].sum(axis=0, dtype=np.float64) for p in parts), np.zeros(rows.shape[1])) / len(members)
        best, best_distance = int(members[0]), np.inf
        for p in parts:
            distance = ((rows[p] - mean) ** 2).sum(axis=1)
            i = int(np.argmin(distance))
            if distance[i] < best_distance:
                best, best_distance = int(p[i]), float(distance[i])
        out[int(c)] = (best, mean.astype(np.float32))
    return out
