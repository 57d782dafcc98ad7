"""Representation-alignment metrics with one signature: ``metric(X, Y, **params) -> float``.

X: (n, d1) and Y: (n, d2), numpy arrays or torch tensors, rows paired (row i of X and row i of
Y describe the same sample; join by sample id and drop duplicate rows first: duplicates are
each other's nearest neighbours and inflate the kNN scores). ``METRICS`` maps names to metrics
and ``get_metric(name)`` looks one up.

Computation: float64 torch on ``device`` ("auto" = CUDA when present, else CPU), in float64 on
every device so CPU and GPU agree to ~1e-12 and the fast paths can be tested against the
dense definitions (float32 would be faster, most on consumer GPUs, but is not offered).
Nothing builds an n x n matrix (``kernel_cka`` takes precomputed kernels, for small n):

* linear CKA (biased and unbiased), CCA, SVCCA, Procrustes work in feature space, O(n d^2);
* RBF CKA and the kNN metrics stream b x b tiles of the upper triangle of the n x n kernel /
  cosine-similarity matrix (b = ``block_rows``, default sqrt(kernels.BLOCK_ELEMENTS) = 4096),
  O(n^2 d) time and O(b^2 + n k) memory.

Sources: CKA and HSIC: Kornblith et al. 2019; unbiased HSIC: Song et al. 2012, eq. 5; kNN
metrics and CKNNA: Huh et al. 2024 ("The Platonic Representation Hypothesis"); SVCCA: Raghu et
al. 2017.
"""

from __future__ import annotations

import math
import operator
from functools import partial
from typing import Callable, NamedTuple

import numpy as np
import scipy.sparse
import torch
import torch.nn.functional as F

from pipeline.errors import did_you_mean
from pipeline.runtime import resolve_device
from similarity.kernel_alignment import kernel_alignment
from similarity.kernels import (BLOCK_ELEMENTS, MetricError, ScaledSqDist, as_features, centered, resolve_sigma,
                                sq_row_norms, tile_size, upper_tiles)

DEFAULT_K = 10  # neighbours per sample for the kNN metrics (Huh et al. 2024)
RANK_GRID_BITS = 26  # kNN rankings use unit rows rounded to multiples of 2^-26: exact dot products (ranking_units)
DEFAULT_SVCCA_DIM = 10  # top singular directions kept per side by svcca (Raghu et al. 2017)
KERNELS = ("linear", "rbf")  # kernels accepted by cka()


# ----------------------------------------------------------------------------- validation
def _pair(X, Y, device="auto", min_rows: int = 2, why: str = "",
          names: tuple[str, str] = ("X", "Y")) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a paired pair of representations: (n, d1), (n, d2) float64 on one device."""
    dev = resolve_device(device)
    X, Y = as_features(X, names[0], dev), as_features(Y, names[1], dev)
    if X.shape[0] != Y.shape[0]:
        raise MetricError(
            f"{names[0]} and {names[1]} must have the same number of rows (paired samples); got"
            f" {X.shape[0]} and {Y.shape[0]}. Join the two representations by sample id first.")
    if X.shape[0] < min_rows:
        raise MetricError(f"{why or 'this metric'} needs n >= {min_rows} samples; got n={X.shape[0]}")
    return X, Y


def _check_k(k, n: int) -> int:
    try:
        k = operator.index(k)
    except TypeError:
        raise MetricError(f"k must be an integer; got {k!r}") from None
    if not 1 <= k < n:
        raise MetricError(
            f"k={k} must satisfy 1 <= k < n={n}: each sample has only n-1 = {n - 1} neighbours"
            f" (self excluded); use k <= {n - 1}.")
    return k


# ----------------------------------------------------------------------------- HSIC / CKA core
class _GramSums(NamedTuple):
    """Sufficient statistics of a symmetric kernel pair (K, L), both (n, n), for both HSIC
    estimators: sums of K*L, K*K, L*L over all (i, j), row sums (n,) and diagonals (n,)."""

    kl: torch.Tensor
    kk: torch.Tensor
    ll: torch.Tensor
    row_k: torch.Tensor
    row_l: torch.Tensor
    diag_k: torch.Tensor
    diag_l: torch.Tensor


def _song_hsic(trace, total_a, total_b, a1_dot_b1, n: int):
    """Song et al. 2012 eq. 5 from its terms, for kernels A~, B~ with zero diagonals:
    [tr(A~B~) + (1'A~1)(1'B~1)/((n-1)(n-2)) - 2/(n-2) 1'A~B~1] / (n(n-3)),
    given trace = tr(A~B~), totals 1'A~1 and 1'B~1, and a1_dot_b1 = 1'A~B~1."""
    return (trace + total_a * total_b / ((n - 1) * (n - 2)) - 2 * a1_dot_b1 / (n - 2)) / (n * (n - 3))


def _hsic(cross, row_a, row_b, diag_a, diag_b, unbiased: bool):
    """HSIC of symmetric kernels A, B given sum(A*B), row sums and diagonals.

    Biased (Kornblith et al.): tr(A H B H) / (n-1)^2 with H = I - 11'/n, and
    tr(AHBH) = sum(A*B) - 2/n ra.rb + (1'ra)(1'rb)/n^2 for row sums ra, rb.
    Unbiased: Song's estimator on A~ = A - diag(A): tr(A~B~) = sum(A*B) - da.db, the row
    sums of A~ are ra - da, and 1'A~B~1 = (A~1).(B~1) because A~ is symmetric.
    """
    n = row_a.shape[0]
    if not unbiased:
        return (cross - 2 * (row_a @ row_b) / n + row_a.sum() * row_b.sum() / n**2) / (n - 1) ** 2
    ra, rb = row_a - diag_a, row_b - diag_b
    return _song_hsic(cross - diag_a @ diag_b, ra.sum(), rb.sum(), ra @ rb, n)


def _normalised(h_kl, h_kk, h_ll) -> float:
    """HSIC(K,L) / sqrt(HSIC(K,K) HSIC(L,L)); 0.0 when the product of the self-HSICs is <= 0
    (a constant representation, or a negative unbiased estimate on degenerate data)."""
    denom = float(h_kk) * float(h_ll)
    return float(h_kl) / math.sqrt(denom) if denom > 0 else 0.0


def _cka_from_sums(s: _GramSums, unbiased: bool) -> float:
    return _normalised(_hsic(s.kl, s.row_k, s.row_l, s.diag_k, s.diag_l, unbiased),
                       _hsic(s.kk, s.row_k, s.row_k, s.diag_k, s.diag_k, unbiased),
                       _hsic(s.ll, s.row_l, s.row_l, s.diag_l, s.diag_l, unbiased))


def _linear_sums(X: torch.Tensor, Y: torch.Tensor) -> _GramSums:
    """Gram sums of K = Xc Xc', L = Yc Yc' in feature space, O(n d^2), no n x n matrix.

    Both HSIC estimators are invariant to centring the features (biased: H is idempotent;
    unbiased: Song's U-statistic is invariant to shifting the feature map), so the columns are
    centred first. Then sum(K*L) = ||Xc'Yc||_F^2, the row sums of K vanish, diag(K) = ||xc_i||^2.
    """
    X, Y = centered(X), centered(Y)
    zeros = X.new_zeros(X.shape[0])

    def sq_frob(A, B):
        return torch.linalg.matrix_norm(A.T @ B) ** 2

    return _GramSums(sq_frob(X, Y), sq_frob(X, X), sq_frob(Y, Y), zeros, zeros,
                     sq_row_norms(X), sq_row_norms(Y))


def _rbf_sums(X: torch.Tensor, Y: torch.Tensor, sigma_x: float, sigma_y: float, b: int) -> _GramSums:
    """Gram sums of the RBF kernels of X and Y in one pass over b x b upper-triangle tiles;
    peak memory a few b x b tiles. An off-diagonal tile counts twice (it stands for its
    transpose too) and adds its column sums to the rows of J."""
    n = X.shape[0]
    dist_x = ScaledSqDist(centered(X), -0.5 / sigma_x**2)
    dist_y = ScaledSqDist(centered(Y), -0.5 / sigma_y**2)
    sums, row_k, row_l = X.new_zeros(3), X.new_zeros(n), X.new_zeros(n)
    for I, J in upper_tiles(n, b):
        K, L = dist_x.tile(I, J).exp_().view(-1), dist_y.tile(I, J).exp_().view(-1)
        sums += (1.0 if I == J else 2.0) * torch.stack([K @ L, K @ K, L @ L])
        K, L = K.view(I.stop - I.start, -1), L.view(I.stop - I.start, -1)
        row_k[I] += K.sum(dim=1)
        row_l[I] += L.sum(dim=1)
        if I != J:
            row_k[J] += K.sum(dim=0)
            row_l[J] += L.sum(dim=0)
    ones = X.new_ones(n)
    return _GramSums(*sums, row_k, row_l, ones, ones)


def cka(X, Y, kernel: str = "linear", unbiased: bool = False, sigma: float | None = None, *,
        device: str = "auto", block_rows: int | None = None) -> float:
    """Centered kernel alignment HSIC(K,L) / sqrt(HSIC(K,K) HSIC(L,L)) (Kornblith et al. 2019).

    X: (n, d1), Y: (n, d2), rows paired. ``kernel``: "linear" (K = X X') or "rbf"
    (K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2))). ``unbiased``: Song et al. 2012 eq. 5 HSIC
    (diagonals zeroed; needs n >= 4; unbiased CKA can be slightly negative for unrelated
    representations) instead of the biased tr(KHLH)/(n-1)^2. ``sigma`` (rbf only): a fixed
    bandwidth for both sides, or None = each side's own median pairwise Euclidean distance
    (``kernels.median_pairwise_distance``; factor 1, where Kornblith et al. used fractions).
    Returns 0.0 when a self-HSIC is 0 (a constant representation) or the product of the
    self-HSICs is <= 0; no epsilon is added. Linear: O(n d^2) in feature space; rbf:
    blockwise, O(n^2 d) time, tiles of ``block_rows`` x ``block_rows``.
    """
    if kernel not in KERNELS:
        raise MetricError(f"unknown kernel {kernel!r}; choose from {KERNELS}.{did_you_mean(kernel, KERNELS)}")
    if sigma is not None and kernel != "rbf":
        raise MetricError(f"sigma={sigma!r} applies only to kernel='rbf'; got kernel={kernel!r}")
    X, Y = _pair(X, Y, device, 4 if unbiased else 2, "unbiased HSIC" if unbiased else "CKA")
    if kernel == "linear":
        return _cka_from_sums(_linear_sums(X, Y), unbiased)
    b = tile_size(block_rows)
    sums = _rbf_sums(X, Y, resolve_sigma(X, sigma, b), resolve_sigma(Y, sigma, b), b)
    return _cka_from_sums(sums, unbiased)


def kernel_cka(K, L, unbiased: bool = False) -> float:
    """CKA from precomputed symmetric kernels K, L: (n, n) each (e.g. ``kernels.rbf_kernel``).
    Same estimators and zero guard as ``cka``; O(n^2) memory, so for small n only."""
    K, L = _pair(K, L, "cpu", 4 if unbiased else 2, "unbiased HSIC" if unbiased else "CKA", ("K", "L"))
    for name, A in (("K", K), ("L", L)):
        if A.shape[0] != A.shape[1] or not torch.allclose(A, A.T, rtol=1e-10, atol=1e-12):
            raise MetricError(f"{name} must be a symmetric (n, n) kernel matrix; got shape {tuple(A.shape)}")
    sums = _GramSums((K * L).sum(), (K * K).sum(), (L * L).sum(), K.sum(dim=1), L.sum(dim=1),
                     K.diagonal(), L.diagonal())
    return _cka_from_sums(sums, unbiased)


# ----------------------------------------------------------------------------- nearest neighbours
def stable_topk(S: torch.Tensor, k: int, index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row of S (r, c): (values (r, k), column ids (r, k)), largest
    first, and among EQUAL values the lower id first. This tie rule is the one every kNN metric
    uses (torch.topk alone leaves the order of ties unspecified, and duplicate rows, e.g. of
    repeated captions, tie exactly), so neighbour lists restricted to a sorted subset of rows
    stay exact, which the fast paths in analyze.platonic rely on.

    index: (r, c) ids of S's entries (a few candidates each, e.g. two merged lists: sorted fully);
    None = the column positions (a wide tile: torch.topk, then exact ids for rows whose k-th value
    also occurs outside the chosen k)."""
    if index is not None:  # a narrow candidate list: sort by id, then stably by value
        index, order = index.sort(dim=1)
        v, order = S.gather(1, order).sort(dim=1, descending=True, stable=True)
        return v[:, :k], index.gather(1, order)[:, :k]
    v, i = S.topk(k, dim=1)
    kth = v[:, -1:]
    ambiguous = torch.nonzero((S == kth).sum(dim=1) > (v == kth).sum(dim=1)).flatten()
    if ambiguous.numel():  # the k-th value ties with entries left out: take the lowest column ids
        Sa, ka = S[ambiguous], kth[ambiguous]
        equal = Sa == ka
        need = k - (Sa > ka).sum(dim=1, keepdim=True)
        take = (Sa > ka) | (equal & (equal.cumsum(dim=1) <= need))
        i[ambiguous] = torch.nonzero(take)[:, 1].view(-1, k)  # row-major: ascending ids per row
        v[ambiguous] = Sa.gather(1, i[ambiguous])
    return stable_topk(v, k, i)


def ranking_units(X: torch.Tensor) -> torch.Tensor:
    """(n, d) float64 -> the rows scaled to unit length (an all-zero row stays zero) and rounded
    to multiples of 2^-RANK_GRID_BITS: the vectors whose dot products rank neighbours.

    Every dot product of two such rows is EXACT in float64: each product of components is a
    multiple of 2^-52 and every partial sum is below 2 in magnitude (Cauchy-Schwarz), so it fits
    the 53-bit significand. The ranking is therefore the same whatever the order of summation
    (tile shape, BLAS kernel, device), and equal similarities, as of duplicate rows, are exactly
    equal, so ``stable_topk``'s index rule decides between them. (Plain float64 products of
    identical rows differ in the last bit with their position in a matrix product.) The
    rounding moves a cosine by about 1e-8 (at most sqrt(d) 2^-26), below the float32 precision
    of stored features; reported similarities come from the unrounded rows."""
    scale = 2.0 ** RANK_GRID_BITS
    return torch.round(F.normalize(X, dim=1) * scale) / scale


def _row_dots(Z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(n, k) dot products Z[i] . Z[idx[i, j]] for Z (n, d), in row blocks of bounded memory."""
    rows = max(1, BLOCK_ELEMENTS // max(1, idx.shape[1] * Z.shape[1]))
    return torch.cat([(Z[s:s + rows, None, :] * Z[idx[s:s + rows]]).sum(dim=2)
                      for s in range(0, Z.shape[0], rows)])


def _knn(X: torch.Tensor, k: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise top-k of cosine similarity, self excluded: indices (n, k) int64 and
    similarities (n, k), most similar first, ties to the lower index (ranked by the exact
    products of ``ranking_units``, chosen by ``stable_topk``). Visits each b x b upper-triangle
    tile of the similarity matrix once and merges its row- and column-wise top-k into running
    (n, k) lists, so the cost is n^2 d / 2 multiply-adds and memory O(b^2 + n k)."""
    Z = ranking_units(X)
    n = Z.shape[0]
    best_v = Z.new_full((n, k), -math.inf)
    best_i = torch.full((n, k), n, dtype=torch.long, device=Z.device)  # placeholders sort after every real id

    def merge(rows: slice, S: torch.Tensor, col0: int) -> None:
        v, i = stable_topk(S, min(k, S.shape[1]))
        v, i = torch.cat([best_v[rows], v], dim=1), torch.cat([best_i[rows], i + col0], dim=1)
        best_v[rows], best_i[rows] = stable_topk(v, k, i)

    for I, J in upper_tiles(n, b):
        S = Z[I] @ Z[J].T
        if I == J:
            S.fill_diagonal_(-math.inf)
        merge(I, S, J.start)
        if I != J:
            merge(J, S.T, I.start)
    return best_i, _row_dots(F.normalize(X, dim=1), best_i)  # an all-zero row: similarity 0 to every row


def nearest_neighbours(X, k: int = DEFAULT_K, *, device: str = "auto",
                       block_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k nearest neighbours by cosine similarity, self excluded (Huh et al. 2024).
    X: (n, d) -> (indices (n, k) int64, cosine similarities (n, k) float64), most similar
    first; equal similarities (duplicate rows) in index order (``stable_topk``). Blockwise:
    never holds more than a few ``block_rows`` x ``block_rows`` tiles."""
    X = as_features(X, device=device)
    return _knn(X, _check_k(k, X.shape[0]), tile_size(block_rows))


def _neighbour_pair(X, Y, k, device, block_rows, min_rows: int = 2):
    X, Y = _pair(X, Y, device, min_rows)
    k, b = _check_k(k, X.shape[0]), tile_size(block_rows)
    return _knn(X, k, b), _knn(Y, k, b)


def mutual_knn(X, Y, k: int = DEFAULT_K, *, device: str = "auto", block_rows: int | None = None) -> float:
    """Mean over samples i of |N_X(i) & N_Y(i)| / k, N = k nearest neighbours by cosine
    similarity, self excluded. 1 for identical neighbourhoods; chance level ~ k/(n-1)."""
    (ix, _), (iy, _) = _neighbour_pair(X, Y, k, device, block_rows)
    return float((ix[:, :, None] == iy[:, None, :]).any(dim=2).sum(dim=1).double().mean() / ix.shape[1])


def cycle_knn(X, Y, k: int = DEFAULT_K, *, device: str = "auto", block_rows: int | None = None) -> float:
    """Fraction of samples i that some Y-neighbour j of i has among its X-neighbours, i.e.
    i -> N_Y(i) -> N_X(j) cycles back to i (Huh et al.'s ``cycle_knn(A=X, B=Y)``). Not
    symmetric in X and Y."""
    (ix, _), (iy, _) = _neighbour_pair(X, Y, k, device, block_rows)
    back = ix[iy]  # (n, k, k): X-neighbours of each Y-neighbour
    i = torch.arange(ix.shape[0], device=ix.device)[:, None, None]
    return float((back == i).flatten(1).any(dim=1).double().mean())


def _sequence_dp(a: np.ndarray, b: np.ndarray, edit: bool) -> np.ndarray:
    """Row-wise longest-common-subsequence length (edit=False) or Levenshtein distance
    (edit=True, unit costs) of the sequences a[r] and b[r]. a, b: (n, k) -> (n,) int64.
    The O(k^2) dynamic programme runs once, vectorised over the n rows."""
    n, k = a.shape
    a, b = a.T, b.T  # (k, n): contiguous rows per sequence position
    start = np.arange(k + 1) if edit else np.zeros(k + 1, dtype=np.int64)
    prev = np.repeat(start[:, None], n, axis=1)  # dp row i-1, shape (k+1, n)
    for i in range(1, k + 1):
        cur = np.empty_like(prev)
        cur[0] = i if edit else 0
        for j in range(1, k + 1):
            match = a[i - 1] == b[j - 1]
            if edit:
                cur[j] = np.minimum(np.minimum(prev[j], cur[j - 1]) + 1, prev[j - 1] + ~match)
            else:
                cur[j] = np.where(match, prev[j - 1] + 1, np.maximum(prev[j], cur[j - 1]))
        prev = cur
    return prev[k]


def lcs_knn(X, Y, k: int = DEFAULT_K, *, device: str = "auto", block_rows: int | None = None) -> float:
    """Mean over i of LCS(N_X(i), N_Y(i)) / k, with the neighbour lists ordered by similarity
    (Huh et al. report the raw LCS length; here it is divided by k so that identical = 1)."""
    (ix, _), (iy, _) = _neighbour_pair(X, Y, k, device, block_rows)
    return float(_sequence_dp(ix.cpu().numpy(), iy.cpu().numpy(), edit=False).mean() / ix.shape[1])


def edit_distance_knn(X, Y, k: int = DEFAULT_K, *, device: str = "auto",
                      block_rows: int | None = None) -> float:
    """1 - mean over i of Levenshtein(N_X(i), N_Y(i)) / k on the ordered neighbour lists
    (Huh et al. 2024); identical = 1, disjoint lists = 0."""
    (ix, _), (iy, _) = _neighbour_pair(X, Y, k, device, block_rows)
    return float(1.0 - _sequence_dp(ix.cpu().numpy(), iy.cpu().numpy(), edit=True).mean() / ix.shape[1])


def _sparse_kernel(rows, cols, vals, n: int) -> scipy.sparse.csr_matrix:
    return scipy.sparse.csr_matrix((vals, (rows, cols)), shape=(n, n))


def _sparse_hsic(A: scipy.sparse.csr_matrix, B: scipy.sparse.csr_matrix) -> float:
    """Song's unbiased HSIC of sparse, possibly non-symmetric (n, n) kernels with zero
    diagonal, exactly as Huh et al. apply it: tr(AB) = sum(A * B'), 1'AB1 = (1'A).(B1)."""
    col_a, row_b = np.asarray(A.sum(axis=0)).ravel(), np.asarray(B.sum(axis=1)).ravel()
    return _song_hsic(A.multiply(B.T).sum(), A.sum(), B.sum(), col_a @ row_b, A.shape[0])


def cknna(X, Y, k: int = DEFAULT_K, *, device: str = "auto", block_rows: int | None = None) -> float:
    """CKNNA (Huh et al. 2024): CKA restricted to mutual nearest neighbours.

    With K, L the cosine kernels of X and Y (Huh et al. L2-normalise features before every
    metric) and M_ij = 1 iff j is among the k nearest neighbours of i in both X and Y (self
    excluded), CKNNA = h(M*K, M*L) / sqrt(h(Mx*K, Mx*K) h(My*L, My*L)), where h is Song's
    unbiased HSIC and Mx, My are the kNN masks of X and Y alone (their reference code).
    The masked kernels have <= k entries per row and are handled as sparse matrices. They
    are not symmetric, so 1'AB1 != 1'BA1 and CKNNA is not exactly symmetric in X and Y (as
    in the reference). Returns 0.0 when the product of the self terms is <= 0. Needs n >= 4.
    """
    (ix, vx), (iy, vy) = _neighbour_pair(X, Y, k, device, block_rows, min_rows=4)
    ix, vx, iy, vy = (t.cpu().numpy() for t in (ix, vx, iy, vy))
    n, k = ix.shape
    r = np.repeat(np.arange(n), k)
    Kx = _sparse_kernel(r, ix.ravel(), vx.ravel(), n)
    Ly = _sparse_kernel(r, iy.ravel(), vy.ravel(), n)
    i, a, b = np.nonzero(ix[:, :, None] == iy[:, None, :])  # mutual: ix[i, a] == iy[i, b]
    Km = _sparse_kernel(i, ix[i, a], vx[i, a], n)
    Lm = _sparse_kernel(i, iy[i, b], vy[i, b], n)
    return _normalised(_sparse_hsic(Km, Lm), _sparse_hsic(Kx, Kx), _sparse_hsic(Ly, Ly))


# ----------------------------------------------------------------------------- CCA family
def _basis(X: torch.Tensor, max_dim: int | None = None) -> torch.Tensor:
    """Orthonormal basis (n, r) of the column space of the centred X, leading singular
    directions first; r = numerical rank (singular values > s_max * max(n, d) * eps, as
    numpy.linalg.matrix_rank), capped at ``max_dim``. Rank reduction is the guard against
    rank-deficient inputs."""
    U, S, _ = torch.linalg.svd(centered(X), full_matrices=False)
    r = int((S > S[0] * max(X.shape) * torch.finfo(S.dtype).eps).sum()) if S[0] > 0 else 0
    return U[:, : r if max_dim is None else min(r, max_dim)]


def _mean_canonical_correlation(X: torch.Tensor, Y: torch.Tensor, max_dim: int | None = None) -> float:
    """Canonical correlations of X and Y are the singular values of Ux'Uy for orthonormal
    bases Ux, Uy of their centred column spaces; returns their mean (min(rx, ry) values)."""
    Ux, Uy = _basis(X, max_dim), _basis(Y, max_dim)
    if Ux.shape[1] == 0 or Uy.shape[1] == 0:
        return 0.0
    return float(torch.linalg.svdvals(Ux.T @ Uy).clamp(max=1.0).mean())


def cca(X, Y, *, device: str = "auto") -> float:
    """Mean canonical correlation between X: (n, d1) and Y: (n, d2), after centring and
    reducing each side to its numerical rank. In [0, 1]. Meaningful only for n >> d1 + d2:
    when rank(X) + rank(Y) > n - 1 some correlations are 1 by construction."""
    return _mean_canonical_correlation(*_pair(X, Y, device, 2, "CCA"))


def svcca(X, Y, dim: int = DEFAULT_SVCCA_DIM, *, device: str = "auto") -> float:
    """SVCCA (Raghu et al. 2017): centre each side, keep its top ``dim`` singular directions
    (fewer if its rank is lower), return the mean canonical correlation of the reduced
    representations. In [0, 1]. (Huh et al. additionally divide each feature by its std.)"""
    try:
        dim = operator.index(dim)
    except TypeError:
        raise MetricError(f"dim must be a positive integer; got {dim!r}") from None
    if dim < 1:
        raise MetricError(f"dim must be a positive integer; got {dim}")
    return _mean_canonical_correlation(*_pair(X, Y, device, 2, "SVCCA"), max_dim=dim)


def procrustes(X, Y, *, device: str = "auto") -> float:
    """Orthogonal Procrustes similarity ||Xn' Yn||_* (nuclear norm), where Xn, Yn are the
    column-centred X, Y divided by their Frobenius norms (zero-padding the narrower side to
    equal width leaves it unchanged). In [0, 1]; the Procrustes distance
    min_Q ||Xn - Yn Q||_F^2 over orthogonal Q equals 2 - 2 * similarity. 0.0 if a side is
    constant."""
    X, Y = (centered(A) for A in _pair(X, Y, device, 2, "Procrustes"))
    nx, ny = torch.linalg.matrix_norm(X), torch.linalg.matrix_norm(Y)
    if nx == 0 or ny == 0:
        return 0.0
    return min(1.0, float(torch.linalg.svdvals(X.T @ Y).sum() / (nx * ny)))


# ----------------------------------------------------------------------------- registry
METRICS: dict[str, Callable[..., float]] = {
    "cka": partial(cka, kernel="linear", unbiased=False),
    "unbiased_cka": partial(cka, kernel="linear", unbiased=True),
    "rbf_cka": partial(cka, kernel="rbf", unbiased=False),
    "unbiased_rbf_cka": partial(cka, kernel="rbf", unbiased=True),
    "mutual_knn": mutual_knn,
    "cycle_knn": cycle_knn,
    "lcs_knn": lcs_knn,
    "edit_distance_knn": edit_distance_knn,
    "cknna": cknna,
    "svcca": svcca,
    "cca": cca,
    "procrustes": procrustes,
    "kernel_alignment": kernel_alignment,  # uncentred <K,L>_F / (||K||_F ||L||_F), Cristianini et al. 2002
}


SIGNED = ("unbiased_cka", "unbiased_rbf_cka", "cknna")  # unbiased-HSIC estimators: can be negative


def value_range(name: str) -> tuple[float, float]:
    """(lowest, highest) value metric ``name`` can take: (-1, 1) for the unbiased-HSIC
    estimators in ``SIGNED``, (0, 1) for every other metric in ``METRICS``."""
    return (-1.0, 1.0) if name in SIGNED else (0.0, 1.0)


def get_metric(name: str) -> Callable[..., float]:
    """The metric registered as ``name``; MetricError (a ValueError) naming close matches otherwise."""
    try:
        return METRICS[name]
    except (KeyError, TypeError):
        raise MetricError(
            f"unknown metric {name!r}; available: {', '.join(METRICS)}.{did_you_mean(name, METRICS)}"
        ) from None
