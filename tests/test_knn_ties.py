"""Ties in the kNN metrics: duplicate rows (repeated captions) give exactly equal
similarities. The library ranks by exact dot products (``ranking_units``) and breaks ties by
the lower index (``stable_topk``); the mutual-kNN fast path of ``analyze platonic`` must give
exactly the library's numbers on such data, and must not fall back to the slow path."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from analyze import engines, platonic
from similarity.metrics import mutual_knn, nearest_neighbours, ranking_units, stable_topk


def duplicated(rng, n: int, unique: int, d: int) -> np.ndarray:
    """(n, d) float32 rows drawn with replacement from ``unique`` distinct rows."""
    return rng.normal(size=(unique, d)).astype(np.float32)[rng.integers(0, unique, size=n)]


def lexsort_neighbours(X: np.ndarray, k: int) -> np.ndarray:
    """The definition: per row, the other rows by (similarity descending, index ascending)."""
    Z = ranking_units(torch.as_tensor(X, dtype=torch.float64)).numpy()
    S = Z @ Z.T  # exact products: the same numbers as any blocked product
    np.fill_diagonal(S, -np.inf)
    idx = np.arange(len(X))
    return np.stack([np.lexsort((idx, -S[i]))[:k] for i in range(len(X))])


def test_stable_topk_breaks_ties_by_index():
    S = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.1, 0.9], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    v, i = stable_topk(S, 3)
    assert i.tolist() == [[1, 5, 0], [0, 1, 2]] and v.tolist() == [[0.9, 0.9, 0.5], [1.0, 1.0, 1.0]]
    ids = torch.tensor([[7, 3, 9, 1]])  # candidate lists: ids, not positions
    v, i = stable_topk(torch.tensor([[0.2, 0.2, 0.3, 0.2]], dtype=torch.float64), 3, ids)
    assert i.tolist() == [[9, 1, 3]]


def test_ranking_products_are_exact_whatever_the_matrix_shape():
    rng = np.random.default_rng(0)
    Z = ranking_units(torch.as_tensor(duplicated(rng, 97, 10, 7), dtype=torch.float64))
    full = Z @ Z.T
    for rows in (slice(0, 5), slice(13, 90), slice(96, 97)):
        assert torch.equal(Z[rows] @ Z.T, full[rows])  # bit for bit
    perm = torch.as_tensor(rng.permutation(97))
    assert torch.equal((Z[perm] @ Z[perm].T), full[perm][:, perm])
    plain = torch.nn.functional.normalize(torch.as_tensor(rng.normal(size=(5, 33)), dtype=torch.float64), dim=1)
    assert (ranking_units(plain) - plain).abs().max() <= 2.0**-27 + 1e-15  # rounded to the grid, nothing more


@pytest.mark.parametrize("block_rows", [1, 5, 16, None])
def test_neighbours_of_duplicate_rows_follow_the_tie_rule(block_rows):
    X = duplicated(np.random.default_rng(1), 60, 7, 5)  # every row has ~8 exact copies
    idx, sim = nearest_neighbours(X, k=10, block_rows=block_rows)
    np.testing.assert_array_equal(idx.numpy(), lexsort_neighbours(X, 10))
    Z = X / np.linalg.norm(X, axis=1, keepdims=True)
    np.testing.assert_allclose(sim.numpy(), np.take_along_axis(Z @ Z.T, idx.numpy(), 1), atol=1e-6)


def _terms(n=150, unique=25, seed=2):
    rng = np.random.default_rng(seed)
    reps = [rng.normal(size=(n, 6)), duplicated(rng, n, unique, 9), rng.normal(size=(n, 4)),
            duplicated(rng, n, unique, 5)]
    return reps, duplicated(rng, n, unique, 8)  # a reference with duplicates too: permutation ties


def test_mutual_knn_fast_path_equals_the_library_on_duplicate_rows():
    reps, ref = _terms()
    n, k = ref.shape[0], 10
    engine = engines._MutualKnn(reps, ref, k)
    assert engine.ties is not None  # the reference's tie groups are exercised
    rng = np.random.default_rng(3)
    for rows in (np.arange(n), np.arange(40), np.sort(rng.permutation(n)[:120]), np.sort(rng.permutation(n)[:15])):
        want = [mutual_knn(A[rows], ref[rows], k=min(k, len(rows) - 1)) for A in reps]
        if len(rows) > k:
            assert engine.resample(rows[None])[0].tolist() == want  # exactly
    perms = np.stack([rng.permutation(n) for _ in range(4)])
    want = [[mutual_knn(A, ref[p], k=k) for A in reps] for p in perms]
    assert engine.permuted(perms).tolist() == want


def test_no_fallback_and_identical_test_results_on_duplicate_rows(caplog):
    reps, ref = _terms(n=100, unique=20, seed=4)
    metrics = {"mutual_knn": mutual_knn}
    with caplog.at_level(logging.WARNING, logger="analyze.engines"):
        fast = platonic.hypothesis_test(*reps, ref, metrics, k=5, bootstrap=6, permutations=6)["mutual_knn"]
    assert fast["engine"] == "MutualKnn" and "disagrees" not in caplog.text
    slow = platonic.hypothesis_test(*reps, ref, metrics, k=5, bootstrap=6, permutations=6, use_fast=False)
    assert slow["mutual_knn"]["engine"] == "Generic"
    # Scores and the permutation null agree exactly; the intervals differ by design (the fast path
    # takes distinct-neighbour bootstrap draws, the generic one subsamples: analyze.engines).
    for term, values in fast["terms"].items():
        for key in ("score", "null_mean"):
            assert slow["mutual_knn"]["terms"][term][key] == values[key], (term, key)
