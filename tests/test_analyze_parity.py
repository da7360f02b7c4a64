"""SpRAy parity with CoRelAy (the test oracle; never imported by the product).

Our spectral embedding differs from CoRelAy's default pipeline in two documented ways
(xaicli/analysis/spectral.py): the k-NN graph comes from a neighbour search instead of a dense
distance matrix (the same graph), and eigsh is asked for the top of the normalised adjacency's
spectrum (`which="LA"`) where CoRelAy asks for the largest magnitude (`"LM"`). The oracle is
CoRelAy's SpectralEmbedding with its defaults (SciPyPDist, SparseKNN(10, symmetric),
SymmetricNormalLaplacian, EigenDecomposition(32, normalize=True)) and `which="LA"`.
"""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from xaicli.analysis import clustering, spectral

corelay_spectral = pytest.importorskip("corelay.pipeline.spectral")
from corelay.processor.affinity import SparseKNN  # noqa: E402
from corelay.processor.clustering import KMeans as CorelayKMeans  # noqa: E402
from corelay.processor.embedding import EigenDecomposition  # noqa: E402


PLACES = ((2, 2), (8, 10), (12, 3), (1, 11), (10, 6))


def heatmaps(n: int, seed: int = 0, strategies: int = 3) -> np.ndarray:
    """Pooled 16x16 heatmaps of a few strategies (a blob at one of `strategies` places) plus noise."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(0.0, 0.15, (n, 16, 16)).astype(np.float32)
    for i in range(n):
        y, x = PLACES[i % strategies]
        rows[i, y:y + 4, x:x + 4] += 1.0
    return rows.reshape(n, -1) / np.abs(rows).reshape(n, -1).max(axis=1, keepdims=True)


def corelay_embedding(rows: np.ndarray, k: int = 10, n_eig: int = 32, which: str = "LA"):
    np.random.seed(0)  # eigsh's start vector in CoRelAy is ARPACK's default random one
    pipeline = corelay_spectral.SpectralEmbedding(
        affinity=SparseKNN(n_neighbors=k, symmetric=True),
        embedding=EigenDecomposition(n_eigval=n_eig, which=which, is_output=True))
    return pipeline(rows)


@pytest.mark.parametrize("n", [150, 600])  # the dense solver below 200 rows, eigsh above
def test_eigenvalues_match_corelay(n):
    rows = heatmaps(n)
    values, vectors = spectral.embed(spectral.knn_affinity(rows, 10), 32, seed=0)
    ref_values, ref_vectors = corelay_embedding(rows)
    # CoRelAy returns 1 - eig(M) in eigsh's order (descending); we list them ascending
    np.testing.assert_allclose(values, np.sort(ref_values), rtol=1e-5, atol=1e-9)
    assert vectors.shape == ref_vectors.shape == (n, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-6)


def test_affinity_is_corelays_sparse_knn_graph_without_a_dense_matrix():
    rows = heatmaps(300)
    ours = spectral.knn_affinity(rows, 10)
    from corelay.processor.distance import SciPyPDist

    theirs = SparseKNN(n_neighbors=10, symmetric=True)(SciPyPDist(metric="euclidean")(rows))
    assert ours.nnz <= 2 * 10 * 300  # O(N k), never N x N
    assert abs(ours - theirs).max() == 0


@pytest.mark.parametrize("k", [2, 3, 5])
def test_kmeans_gives_corelays_partition(k):
    """k-means with the same seed on the first k eigenvectors of both embeddings (spray's kmeans-k)."""
    rows = heatmaps(600, seed=1, strategies=k)
    _, vectors = spectral.embed(spectral.knn_affinity(rows, 10), 32, seed=0)
    _, ref_vectors = corelay_embedding(rows)
    ours = clustering.kmeans(vectors[:, :k], k, seed=0, n_init=10)  # what spray runs for kmeans-k
    # CoRelAy's KMeans on the same k eigenvectors: its columns come in eigsh's order, smallest of L last
    theirs = CorelayKMeans(n_clusters=k, index=(slice(None), slice(-k, None)),
                           kwargs={"random_state": 0, "n_init": 10})(ref_vectors)
    assert adjusted_rand_score(ours, theirs) == 1.0
    assert adjusted_rand_score(ours, np.arange(600) % k) == 1.0  # and it is the data's partition


def test_which_lm_is_the_documented_difference():
    """CoRelAy's default `which="LM"` may take eigenvalues of M near -1 (L near 2) into its 32;
    where it does, they are exactly the ones outside our (smallest-of-L) set."""
    rows = heatmaps(600, seed=2)
    values, _ = spectral.embed(spectral.knn_affinity(rows, 10), 32, seed=0)
    lm_values, _ = corelay_embedding(rows, which="LM")
    lm = np.sort(lm_values)
    shared = lm[lm < 1.0]  # the LM set's part from the top of M's spectrum
    np.testing.assert_allclose(shared, values[: len(shared)], rtol=1e-5, atol=1e-9)
    assert np.all(lm[len(shared):] > 1.0)  # the rest comes from M's negative end (L > 1)
