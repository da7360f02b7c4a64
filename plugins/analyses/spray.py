"""The `spray` analysis: Spectral Relevance Analysis (Lapuschkin et al. 2019), CoRelAy's pipeline.

Per method output and class: a k-nearest-neighbour graph of the heatmaps, its spectral embedding
(normalised Laplacian eigenvectors, row-normalised; see xaicli.analysis.spectral for how it matches
CoRelAy and where it differs), the eigengap's suggested number of clusters, clusterings of the
embedding and 2-D views. As in Ng-Jordan-Weiss spectral clustering, a clustering into k clusters
(k-means for each k of `clusters`) runs on the first k eigenvectors (CoRelAy's KMeans with
`index` set to those columns; on all 32 the ~30 uninformative ones drown the structure); Ward's
tree is built once on the first max(`clusters`) and cut at each k; DBSCAN and HDBSCAN run on as
many as the eigengap suggests (at least 2), the 2-D views (t-SNE; UMAP when umap-learn is
installed) on the first `max_clusters`. The graph and embedding, and the t-SNE view, are cached: a rerun
with other clustering settings reuses them.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from xaicli import Analysis, AnalysisOutput, Param, hookimpl
from xaicli.analysis import clustering, spectral
from xaicli.analysis.settings import COMMON
from xaicli.descriptors import AnalysisGroup

PARAMS = COMMON + (
    Param("neighbors", int, 10, "k of the k-nearest-neighbour affinity graph (capped at group size - 1)", low=1),
    Param("eigenvalues", int, 32, "eigenvectors of the normalised Laplacian in the embedding", low=2),
    Param("max_clusters", int, 10, "largest number of clusters the eigengap may suggest", low=1),
    Param("clusters", list, [2, 3, 4, 5, 6, 7, 8, 9, 10], "k of the k-means and Ward (agglomerative) clusterings",
          item=int, low=2),
    Param("n_init", int, 10, "k-means restarts (k-means++ initialisation, seeded)", low=1),
    Param("dbscan_eps", float, 0.5, "DBSCAN neighbourhood radius in the embedding (rows have unit length)", low=0.0),
    Param("dbscan_min_samples", int, 5, "DBSCAN core-point neighbourhood size", low=1),
    Param("hdbscan_min_cluster_size", int, 5, "HDBSCAN's smallest cluster", low=2),
    Param("density_max", int, 10000, "DBSCAN, HDBSCAN and Ward fit a seeded subsample of this many inputs; the "
          "others take their nearest fitted neighbour's label", low=10),
    Param("tsne", bool, True, "compute the 2-D t-SNE view"),
    Param("perplexity", float, 30.0, "t-SNE perplexity (capped at a third of the group)", low=1.0),
    Param("umap", bool, True, "compute the 2-D UMAP view when umap-learn is installed"),
    Param("views_max", int, 5000, "t-SNE/UMAP fit a seeded subsample of this many inputs; the others sit at their "
          "nearest fitted neighbour", low=10),
)


def _graph(group: AnalysisGroup, neighbors: int, eigenvalues: int, workers: int) -> dict[str, np.ndarray]:
    affinity = spectral.knn_affinity(group.heatmaps, neighbors, workers)
    values, vectors = spectral.embed(affinity, eigenvalues, group.seed)
    return {"eigenvalues": values, "embedding": vectors.astype(np.float32), "data": affinity.data,
            "indices": affinity.indices, "indptr": affinity.indptr}


def spray(group: AnalysisGroup, *, neighbors: int, eigenvalues: int, max_clusters: int, clusters: list[int],
          n_init: int, dbscan_eps: float, dbscan_min_samples: int, hdbscan_min_cluster_size: int, density_max: int,
          tsne: bool, perplexity: float, umap: bool, views_max: int, workers: int, **common: object) -> AnalysisOutput:
    """SpRAy on one group; `common` holds the shared preprocessing settings (used by xai analyze)."""
    settings = {"neighbors": neighbors, "eigenvalues": eigenvalues}
    stored = group.cached("spectral", settings, lambda: _graph(group, neighbors, eigenvalues, workers))
    n = len(group.inputs)
    affinity = sp.csr_matrix((stored["data"], stored["indices"], stored["indptr"]), shape=(n, n))
    embedding, values = stored["embedding"], stored["eigenvalues"]
    gap = spectral.eigengap(values, max_clusters)
    ks = sorted({k for k in clusters if k < n})
    labels: dict[str, np.ndarray] = {}
    for k in ks:
        labels[f"kmeans-{k}"] = clustering.kmeans(embedding[:, :k], k, group.seed, n_init)
    ward = embedding[:, :max(ks, default=2)]
    for k, found in clustering.agglomerative(ward, ks, affinity, density_max, group.seed).items():
        labels[f"agglomerative-{k}"] = found
    dense = embedding[:, :max(2, gap)]
    labels["dbscan"] = clustering.dbscan(dense, dbscan_eps, dbscan_min_samples, density_max, group.seed)
    labels["hdbscan"] = clustering.hdbscan(dense, hdbscan_min_cluster_size, density_max, group.seed)
    views: dict[str, np.ndarray] = {}
    shown = embedding[:, :max(2, max_clusters)]
    if tsne:
        view = {"perplexity": perplexity, "views_max": views_max, "columns": shown.shape[1], **settings}
        views["tsne"] = group.cached("tsne", view, lambda: {
            "xy": clustering.tsne(shown, perplexity, views_max, group.seed)})["xy"]
    if umap:
        found = clustering.umap_view(shown, views_max, group.seed)
        if found is not None:
            views["umap"] = found
    suggested = f"kmeans-{gap}" if f"kmeans-{gap}" in labels else next(iter(labels), "")
    return AnalysisOutput(embeddings={"spectral": embedding}, clusterings=labels, views=views, eigenvalues=values,
                          eigengap=gap, suggested=suggested)


@hookimpl
def xai_analyses() -> list[Analysis]:
    return [Analysis("spray", "Spectral Relevance Analysis: k-NN graph, spectral embedding, eigengap, "
                     "k-means/Ward/DBSCAN/HDBSCAN clusterings, t-SNE view", spray, PARAMS)]
