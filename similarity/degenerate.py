"""Representations for which a similarity score is not a measurement.

* ``is_constant``: every row the same (up to ``CONSTANT_TOL`` relative to the features' size).
  Every kernel is then constant: CKA is 0/0 (``metrics.cka`` returns 0), and every kNN list is
  the lowest-index rows, the same in any representation.
* ``knn_tie_share``: the share of rows whose k nearest neighbours are chosen by the index tie
  rule, because the k-th and the (k+1)-th most similar other rows are exactly as similar
  (on ``metrics.ranking_units``'s exact grid). When most rows are like that (``KNN_TIE_SHARE``)
  the kNN graph is decided by ties, not by the representation: two such representations get
  mutual kNN near 1 from picking the same lowest indices (constant features give exactly 1).

``degenerate(X, k)`` combines them into a reason (or None); ``analyze`` warns and marks the
affected scores (``analyze cka``: NaN with the reason; ``analyze platonic``: verdict
"inconclusive" with the reason).
"""

from __future__ import annotations

import torch

from similarity.kernels import as_features, centered, tile_size
from similarity.metrics import _knn, _row_dots, ranking_units

CONSTANT_TOL = 1e-6  # ||X - column means||_F <= this * ||X||_F: constant rows
KNN_TIE_SHARE = 0.5  # a kNN graph is decided by ties when more than this share of rows is


def is_constant(X, *, device: str = "auto") -> bool:
    """True when the rows of X (n, d) are all equal, up to CONSTANT_TOL of its Frobenius norm
    (all-zero X included)."""
    X = as_features(X, device=device)
    return bool(torch.linalg.matrix_norm(centered(X)) <= CONSTANT_TOL * torch.linalg.matrix_norm(X))


def knn_tie_share(X, k: int, *, device: str = "auto", block_rows: int | None = None) -> float:
    """Share of the n rows of X whose k-th and (k+1)-th most similar other rows (cosine, exact
    grid) are equally similar, so that the index tie rule picks the k-th neighbour; 0.0 when
    k >= n - 1 (every other row is a neighbour)."""
    X = as_features(X, device=device)
    n = X.shape[0]
    if k + 1 > n - 1:
        return 0.0
    idx, _ = _knn(X, k + 1, tile_size(block_rows))
    sims = _row_dots(ranking_units(X), idx[:, k - 1:k + 1])  # exact products of the grid rows
    return float((sims[:, 0] == sims[:, 1]).double().mean())


def degenerate(X, k: int | None = None) -> str | None:
    """Why scores of X mean nothing, or None: constant features (any metric), or, with ``k`` (a
    kNN metric), a kNN graph decided by ties in more than KNN_TIE_SHARE of the rows."""
    if is_constant(X):
        return "constant features (every row the same)"
    if k is not None:
        share = knn_tie_share(X, k)
        if share > KNN_TIE_SHARE:
            return f"its {k}-NN graph is decided by ties in {share:.0%} of the rows (the lowest-index rule picks them)"
    return None
