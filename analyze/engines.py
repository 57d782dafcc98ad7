"""Scoring engines: one metric scored for several representations against one reference, on
many row resamples and many permutations at once (what ``analyze platonic`` and the
calibrated ``analyze layers`` need).

An engine is built for R representations ``reps`` (each (n, d_r)) and a reference ``ref``
(n, d_ref), rows paired, and scores every representation against the reference:

    resample(rows)   rows (B, m) row indices, the same for every representation -> (B, R)
    permuted(perms)  perms (P, n) permutations of the reference's rows           -> (P, R)

``build_engine`` returns the fast path for a metric when there is one, after checking it
against the library metric on ``CHECK_ROWS`` rows, else the generic engine (one library call
per draw and representation). Fast paths:

* ``cka`` / ``unbiased_cka``: each representation's (n, n) Gram matrix is computed once; a
  bootstrap resample is a count vector, so a batch of resamples is a few (B, n) x (n, n)
  matrix products, and a permutation gathers the reference's Gram (O(n^2) per draw instead of
  O(n d^2)). Memory: R + 1 Grams, so the largest n is set by ``GRAM_BUDGET_BYTES``.
* ``mutual_knn``: each row's sorted neighbour list is computed once (memory O(n k)); a
  subsample keeps the first k kept neighbours, a permutation relabels the reference's lists.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, NamedTuple

import numpy as np
import torch

from similarity.kernels import as_features
from similarity.metrics import ranking_units, stable_topk

log = logging.getLogger(__name__)

GRAM_BUDGET_BYTES = 5 * 4096**2 * 8  # the CKA fast path's (n, n) float64 Grams, all R + 1 together (640 MiB)
FAST_TOLERANCE = 1e-6  # a fast path must reproduce the library metric to this absolute error ...
CHECK_ROWS = 128  # ... on this many rows, checked before each use


class Generic:
    """Calls the library metric once per draw and representation: reps (R arrays (n, d_r)), ref (n, d_ref)."""

    def __init__(self, fn: Callable, kwargs: dict, reps: list[np.ndarray], ref: np.ndarray):
        self.fn, self.kwargs, self.reps, self.ref = fn, kwargs, reps, ref

    def resample(self, rows: np.ndarray) -> np.ndarray:
        out = [[self.fn(A[r], self.ref[r], **self.kwargs) for A in self.reps] for r in rows]
        return np.array(out, dtype=float).reshape(-1, len(self.reps))

    def permuted(self, perms: np.ndarray) -> np.ndarray:
        out = [[self.fn(A, self.ref[p], **self.kwargs) for A in self.reps] for p in perms]
        return np.array(out, dtype=float).reshape(-1, len(self.reps))


def _gram(X: np.ndarray) -> np.ndarray:
    """(n, d) -> (n, n) float64 Gram matrix of the column-centred features."""
    Z = np.asarray(X, dtype=np.float64)
    Z = Z - Z.mean(axis=0, keepdims=True)
    return Z @ Z.T


def _song(trace, total_k, total_l, cross, m: int):
    """Song et al. 2012 eq. 5 from its terms, for kernels K~, L~ with zeroed diagonals:
    trace = tr(K~L~), totals = 1'K~1 and 1'L~1, cross = 1'K~L~1 = (K~1).(L~1); m rows."""
    return (trace + total_k * total_l / ((m - 1) * (m - 2)) - 2 * cross / (m - 2)) / (m * (m - 3))


def _ratio(kl, kk, ll) -> np.ndarray:
    """kl / sqrt(kk ll) elementwise, 0.0 where kk ll <= 0 (as similarity.metrics does)."""
    kl, prod = np.asarray(kl, dtype=float), np.asarray(kk * ll, dtype=float)
    return np.where(prod > 0, kl / np.sqrt(np.where(prod > 0, prod, 1.0)), 0.0)


class _LinearCKA:
    """Linear CKA (biased, or unbiased HSIC) from precomputed (n, n) Gram matrices.

    A bootstrap resample is a count vector w (n,) (row i drawn w_i times), and every HSIC term
    of the resampled data is a quadratic form in w, e.g. sum(K_b * L_b) = w'(K*L)w and
    (K_b 1)_a = (K w)_i for the position a holding row i. A batch of B resamples is then a few
    (B, n) x (n, n) matrix products, exactly equal to the metric on the resampled features
    (duplicated rows included). ``jackknife`` gives all n leave-one-out scores in O(n^2) per
    pair. Permutations gather the reference's Gram once per draw."""

    def __init__(self, reps: list[np.ndarray], ref: np.ndarray, unbiased: bool):
        self.unbiased = unbiased
        self.R = R = len(reps)
        self.grams = np.stack([_gram(A) for A in (*reps, ref)])  # (R + 1, n, n); index R = the reference
        self.diags = [G.diagonal().copy() for G in self.grams]
        self.rows = [G.sum(axis=1) - d for G, d in zip(self.grams, self.diags)]  # zero-diagonal row sums
        n = ref.shape[0]
        selfs = self._hsic(np.ones((1, n)), n, [(t, t) for t in range(R + 1)])  # for the permutation path
        self.self_hsic = np.array([h[0] for h in selfs[:R]])
        self.ref_hsic = float(selfs[R][0])

    def _hsic(self, W: np.ndarray, m: int, pairs: list[tuple[int, int]]) -> list[np.ndarray]:
        """HSIC (up to a common factor) of each Gram pair on each resample: W (B, n) counts
        summing to m -> one (B,) array per pair."""
        G, d = self.grams, self.diags
        U = {t: W @ G[t] for t in {t for pair in pairs for t in pair}}  # (B, n): (K w)_i
        out = []
        for a, b in pairs:
            KL = ((W @ (G[a] * G[b])) * W).sum(axis=1)  # w'(K*L)w = sum(K_b * L_b)
            if not self.unbiased:  # tr(K H L H) = sum(K*L) - 2/m 1'KL1 + (1'K1)(1'L1)/m^2
                tk, tl = (U[a] * W).sum(axis=1), (U[b] * W).sum(axis=1)
                out.append(KL - 2 / m * (W * U[a] * U[b]).sum(axis=1) + tk * tl / m**2)
            else:  # Song's terms of the resampled kernels with zeroed diagonals
                ra, rb = U[a] - d[a], U[b] - d[b]
                out.append(_song(KL - W @ (d[a] * d[b]), (W * ra).sum(axis=1), (W * rb).sum(axis=1),
                                 (W * ra * rb).sum(axis=1), m))
        return out

    def resample(self, rows: np.ndarray) -> np.ndarray:
        R, n, m = self.R, self.grams[0].shape[0], rows.shape[1]
        W = np.stack([np.bincount(r, minlength=n) for r in rows]).astype(np.float64)  # (B, n) counts
        h = self._hsic(W, m, [(t, R) for t in range(R)] + [(t, t) for t in range(R + 1)])
        return np.stack([_ratio(h[t], h[R + t], h[2 * R]) for t in range(R)], axis=1)

    def jackknife(self) -> np.ndarray:
        """(n, R) leave-one-out scores (row i: every representation scored without row i), each
        HSIC term in closed form from the full Grams, O(n^2) per Gram pair (no (n, n) x (n, n)
        product); equal to ``resample`` of the n leave-one-out row sets."""
        R = self.R
        h = [self._hsic_loo(a, b) for a, b in [(t, R) for t in range(R)] + [(t, t) for t in range(R + 1)]]
        return np.stack([_ratio(h[t], h[R + t], h[2 * R]) for t in range(R)], axis=1)

    def _hsic_loo(self, a: int, b: int) -> np.ndarray:
        """(n,) the ``_hsic`` term of Grams a, b for the count vectors w = 1 - e_i, all i at once:
        w'Mw = 1'M1 - 2 (M1)_i + M_ii, and (G w)_j = r_j - G_ij for row sums r."""
        Ga, Gb, da, db = self.grams[a], self.grams[b], self.diags[a], self.diags[b]
        m = Ga.shape[0] - 1
        M1 = np.einsum("ij,ij->i", Ga, Gb)  # (K*L) 1
        KL = M1.sum() - 2 * M1 + da * db
        ra, rb = Ga.sum(axis=1), Gb.sum(axis=1)
        tk, tl = ra.sum() - 2 * ra + da, rb.sum() - 2 * rb + db
        pa, pb = (ra - da, rb - db) if self.unbiased else (ra, rb)
        cross = pa @ pb - Gb @ pa - Ga @ pb + M1 - (pa - da) * (pb - db)  # sum_{j != i} (p_j - G_ij)(q_j - H_ij)
        if not self.unbiased:
            return KL - 2 / m * cross + tk * tl / m**2
        return _song(KL - ((da * db).sum() - da * db), tk - (da.sum() - da), tl - (db.sum() - db), cross, m)

    def permuted(self, perms: np.ndarray) -> np.ndarray:
        R = self.R
        flat = self.grams[:R].reshape(R, -1)  # a view: <K_t, L> for every t is one product
        out = []
        for p in perms:
            L = self.grams[R].take(p, axis=0).take(p, axis=1)  # centring commutes with permuting
            if self.unbiased:  # with L's diagonal zeroed, tr(K~ L~) = sum(K * L~)
                np.fill_diagonal(L, 0.0)
                rl = self.rows[R][p]
                h = _song(flat @ L.ravel(), np.array([r.sum() for r in self.rows[:R]]), rl.sum(),
                          np.array([r @ rl for r in self.rows[:R]]), len(p))
            else:
                h = flat @ L.ravel()
            out.append(_ratio(h, self.self_hsic, self.ref_hsic))
        return np.array(out).reshape(-1, R)


def _mutual(a: np.ndarray, b: np.ndarray) -> float:
    """Mean |a_i & b_i| / k for (m, k) neighbour index sets, rounded as similarity.metrics.mutual_knn
    does (an exact integer mean, then / k), so equal neighbour sets give the same float."""
    return float((a[:, :, None] == b[:, None, :]).any(axis=2).sum(axis=1).astype(np.float64).mean() / a.shape[1])


class _MutualKnn:
    """Mutual kNN from each row's precomputed neighbour list: its ``width`` most similar rows by
    cosine, self excluded, equal similarities in index order: the library's ranking
    (``similarity.metrics.ranking_units``, whose dot products are exact, so a similarity is the
    same number in any matrix product) and tie rule (``stable_topk``); computed in row blocks on
    the library's device, memory n x width.

    A resample ``rows`` (row ids, possibly repeated) keeps, for every drawn row, the first k
    distinct drawn rows of its list other than itself (rows whose list has fewer than k drawn
    entries are recomputed exactly), and averages the per-row overlaps over ``rows``, so a row
    drawn c times counts c times. Without repeats (rows sorted) this is exactly the library metric
    on the subsample; with repeats (a bootstrap draw) it is the multiplicity-weighted mutual kNN
    among the distinct drawn rows: a copy of a row is never its own neighbour (in the library
    metric on A[rows] copies are each other's nearest neighbours in every representation, which
    inflates the score). ``distinct_bootstrap`` tells hypothesis_test it can take bootstrap draws.

    A permutation relabels the reference's lists: the neighbours of row i in ref[perm] are
    perm^-1 of those of perm[i]. Ties are then broken by the NEW positions, so for reference rows
    whose k-th similarity recurs beyond the k-th place (duplicate rows) the whole tie group is
    kept and the members with the lowest new positions are chosen per permutation (``_tied``)."""

    distinct_bootstrap = True

    BLOCK = 1024  # rows of the similarity matrix held at once while building the lists

    def __init__(self, reps: list[np.ndarray], ref: np.ndarray, k: int):
        n = ref.shape[0]
        self.k, self.width = k, min(n - 1, 4 * k + 32)
        self.R = len(reps)
        self.units = [ranking_units(as_features(A)) for A in (*reps, ref)]  # index R = the reference
        self.lists = [self._lists(Z)[0] for Z in self.units[:self.R]]
        ref_lists, self.ties = self._lists(self.units[self.R], ties=True)
        self.lists.append(ref_lists)

    def _lists(self, Z: torch.Tensor, ties: bool = False) -> tuple[np.ndarray, tuple | None]:
        """(n, width) neighbour lists of unit rows Z (n, d) and, with ``ties``, the tie groups of
        rows whose k-th and (k+1)-th similarities are equal: (rows (r,), above (r, k): ids more
        similar than the k-th, padded with -1; tied (r, t): ids exactly as similar, padded with -1;
        need (r,): how many tied ids are neighbours), or None. Both from the same similarity
        block, so ties are exact."""
        out, groups = [], []
        for s in range(0, Z.shape[0], self.BLOCK):
            S = Z[s:s + self.BLOCK] @ Z.T
            S[torch.arange(S.shape[0], device=S.device), torch.arange(s, s + S.shape[0], device=S.device)] = -math.inf
            v, i = stable_topk(S, self.width)
            out.append(i.cpu().numpy())
            if ties and self.width > self.k:
                for r in torch.nonzero(v[:, self.k - 1] == v[:, self.k]).flatten().tolist():
                    kth = v[r, self.k - 1]
                    groups.append((s + r, torch.nonzero(S[r] > kth).flatten().cpu().numpy(),
                                   torch.nonzero(S[r] == kth).flatten().cpu().numpy()))
        if not groups:
            return np.concatenate(out), None
        width = max(len(t) for _, _, t in groups)

        def pad(g, w):
            return np.pad(g, (0, w - len(g)), constant_values=-1)
        return np.concatenate(out), (np.array([r for r, _, _ in groups]), np.stack([pad(a, self.k) for _, a, _ in groups]),
                                     np.stack([pad(t, width) for _, _, t in groups]),
                                     np.array([self.k - len(a) for _, a, _ in groups]))

    def _within(self, t: int, rows: np.ndarray, kept: np.ndarray) -> np.ndarray:
        """(m, k) neighbours (original row ids) of each row of ``rows`` among the other kept rows
        (kept: (n,) bool mask of the distinct drawn rows)."""
        L = self.lists[t][rows]
        ok = kept[L]
        take = ok & (np.cumsum(ok, axis=1) <= self.k)
        short = take.sum(axis=1) < self.k
        out = np.empty((len(rows), self.k), dtype=np.int64)
        out[~short] = L[~short][take[~short]].reshape(-1, self.k)
        if short.any():  # rare: recompute these rows against every distinct kept row but themselves
            Z, cols = self.units[t], np.flatnonzero(kept)
            dev = Z.device
            S = Z[torch.as_tensor(rows[short], device=dev)] @ Z[torch.as_tensor(cols, device=dev)].T
            S[torch.as_tensor(rows[short][:, None] == cols[None, :], device=dev)] = -math.inf
            out[short] = cols[stable_topk(S, self.k)[1].cpu().numpy()]
        return out

    def resample(self, rows: np.ndarray) -> np.ndarray:
        out = []
        for r in rows:
            kept = np.zeros(self.units[0].shape[0], dtype=bool)
            kept[r] = True
            ref = self._within(self.R, r, kept)
            out.append([_mutual(self._within(t, r, kept), ref) for t in range(self.R)])
        return np.array(out).reshape(-1, self.R)

    def _tied(self, inverse: np.ndarray) -> np.ndarray:
        """(r, k) neighbours, as new positions, of the tie-group rows under the permutation whose
        inverse is ``inverse``: every id above the k-th similarity, then the ``need`` tied ids
        with the lowest new positions."""
        _, above, tied, need = self.ties
        n = len(inverse)
        cand = np.concatenate([np.where(above >= 0, inverse[above], -1),
                               np.sort(np.where(tied >= 0, inverse[tied], n), axis=1)], axis=1)
        valid = np.concatenate([above >= 0, np.arange(tied.shape[1]) < need[:, None]], axis=1)
        return cand[valid].reshape(-1, self.k)

    def permuted(self, perms: np.ndarray) -> np.ndarray:
        mine = [L[:, :self.k] for L in self.lists]
        out = []
        for p in perms:
            inverse = np.empty_like(p)
            inverse[p] = np.arange(len(p))
            ref = inverse[mine[self.R][p]]
            if self.ties is not None:
                ref[inverse[self.ties[0]]] = self._tied(inverse)
            out.append([_mutual(mine[t], ref) for t in range(self.R)])
        return np.array(out).reshape(-1, self.R)


def gram_max_rows(n_reps: int) -> int:
    """Largest n for which the R + 1 float64 (n, n) Grams of the CKA fast path fit ``GRAM_BUDGET_BYTES``
    (4096 rows for R = 4, as before controls were added)."""
    return int(math.isqrt(GRAM_BUDGET_BYTES // (8 * (n_reps + 1))))


class FastPath(NamedTuple):
    """build(reps, ref, k) -> engine; max_rows(R): largest n it is used for with R representations
    (None = any)."""

    build: Callable
    max_rows: Callable[[int], int | None]


FAST_PATHS: dict[str, FastPath] = {  # metric name -> fast engine, checked against the library before use
    "cka": FastPath(lambda reps, ref, k: _LinearCKA(reps, ref, unbiased=False), gram_max_rows),
    "unbiased_cka": FastPath(lambda reps, ref, k: _LinearCKA(reps, ref, unbiased=True), gram_max_rows),
    "mutual_knn": FastPath(lambda reps, ref, k: _MutualKnn(reps, ref, k), lambda n_reps: None),  # memory O(n k)
}


def build_engine(name: str, fn: Callable, kwargs: dict, reps: list[np.ndarray], ref: np.ndarray,
                 use_fast: bool = True):
    """The engine scoring ``fn(rep, ref, **kwargs)`` for every rep in ``reps``: the fast path for
    ``name`` when there is one (after checking it against the library metric on the first
    ``CHECK_ROWS`` rows), else the generic engine."""
    n, fast = ref.shape[0], FAST_PATHS.get(name)
    limit = fast.max_rows(len(reps)) if fast else None
    if use_fast and fast and (limit is None or n <= limit):
        engine = fast.build(reps, ref, kwargs.get("k"))
        rows = np.arange(min(n, CHECK_ROWS))
        want = [fn(A[rows], ref[rows], **kwargs) for A in reps]
        got = engine.resample(rows[None])[0]
        if np.allclose(got, want, rtol=0, atol=FAST_TOLERANCE):
            return engine
        log.warning("fast path for %s disagrees with similarity.metrics (%s vs %s); using the library metric",
                    name, got, want)
    elif use_fast and fast:
        log.warning("n=%d > %d rows with %d representations: %s uses the slow path (one library call per draw); "
                    "subsample with --max-rows N (or --set analyze.max_rows=N)", n, limit, len(reps), name)
    return Generic(fn, kwargs, reps, ref)


def is_generic(engine) -> bool:
    """True for the engine that calls the library metric once per draw (no fast path)."""
    return isinstance(engine, Generic)
