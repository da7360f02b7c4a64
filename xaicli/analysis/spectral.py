"""The spectral embedding of SpRAy (Lapuschkin et al. 2019) on a sparse nearest-neighbour graph.

Same construction as CoRelAy's default `SpectralEmbedding` pipeline, with one deliberate change:
CoRelAy computes the dense N x N euclidean distance matrix (`SciPyPDist`) and keeps each row's k
nearest (`SparseKNN`); we ask scikit-learn's `NearestNeighbors` for the k nearest directly, so
memory stays O(N k) (100,000 heatmaps need 40 GB as a dense matrix, ~20 MB as this graph). The
graph is the same (exact neighbours; only ties between equidistant points may resolve differently).

- affinity: A = (K + K^T) / 2, K the k-NN connectivity (1 for each of a row's k nearest, self excluded);
- normalised adjacency M = D^-1/2 A D^-1/2 (CoRelAy's `SymmetricNormalLaplacian` returns this M);
- eigenvalues reported are those of the normalised Laplacian L = I - M, ascending (0 first):
  CoRelAy's `EigenDecomposition` also returns 1 - eig(M), in eigsh's order (descending);
- we take the top of M's spectrum (`which="LA"`, the smallest of L) where CoRelAy asks eigsh for
  the largest magnitude (`which="LM"`); the two agree unless M has eigenvalues near -1 (almost
  bipartite graphs), where "LM" would mix in the top of L's spectrum;
- eigenvectors are row-normalised (each input's embedding has unit length), as CoRelAy's
  `normalize=True` does, the Ng-Jordan-Weiss spectral clustering step.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import eigsh
from sklearn.neighbors import NearestNeighbors

DENSE_BELOW = 200  # groups smaller than this use a dense eigendecomposition (eigsh needs k < N)


def knn_affinity(rows: np.ndarray, k: int, workers: int = 1) -> sp.csr_matrix:
    """The symmetric k-NN affinity (K + K^T) / 2 of the rows (k capped at N - 1)."""
    n = len(rows)
    k = max(1, min(k, n - 1))
    nn = NearestNeighbors(n_neighbors=k, n_jobs=workers).fit(rows)
    graph = nn.kneighbors_graph(mode="connectivity").astype(np.float64)
    return ((graph + graph.T) * 0.5).tocsr()


def normalised_adjacency(affinity: sp.csr_matrix) -> sp.csr_matrix:
    """D^-1/2 A D^-1/2 (every node of a k-NN graph has a neighbour, so D > 0)."""
    degree = np.asarray(affinity.sum(axis=1)).ravel()
    scale = sp.diags(1.0 / np.sqrt(np.where(degree > 0, degree, 1.0)))
    return (scale @ affinity @ scale).tocsr()


def embed(affinity: sp.csr_matrix, n_eig: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(eigenvalues of L ascending [n], row-normalised eigenvectors [N, n]) with n = min(n_eig, N - 1)."""
    m = normalised_adjacency(affinity)
    n = m.shape[0]
    count = max(1, min(n_eig, n - 1))
    if n < DENSE_BELOW:
        values, vectors = np.linalg.eigh(m.toarray())
        values, vectors = values[-count:], vectors[:, -count:]
    else:
        v0 = np.random.default_rng(seed).uniform(-1.0, 1.0, n)
        values, vectors = eigsh(m, k=count, which="LA", v0=v0)
    laplacian = 1.0 - values
    order = np.argsort(laplacian, kind="stable")
    vectors = vectors[:, order]
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return laplacian[order], vectors / np.where(norms > 0, norms, 1.0)


def eigengap(eigenvalues: np.ndarray, max_clusters: int = 10) -> int:
    """The number of clusters the largest gap among the first `max_clusters` + 1 eigenvalues of L
    suggests: k where lambda_k - lambda_(k-1) is largest (1 when the first gap is)."""
    values = np.sort(np.asarray(eigenvalues, dtype=np.float64))[: max_clusters + 1]
    if len(values) < 2:
        return 1
    return int(np.argmax(np.diff(values))) + 1
