"""The Platonic alignment test (``analyze platonic``): after training, are the aligned
representations closer to a reference model's kernel than the frozen encoders were?

For each metric m (rows joined by image id, one row per image; X: image encoder, Y: text
encoder, R_X = ``<image>@<run>`` and R_Y = ``<text>@<run>`` the adapters' outputs, ref: the
reference model), four terms:

    before_image = m(X, ref)    before_text = m(Y, ref)
    after_image  = m(R_X, ref)  after_text  = m(R_Y, ref)

and, per side s in {image, text}, the quantity the design asks about:

    delta_s = after_s - (before_image + before_text) / 2

Uncertainty
-----------
* Resampling, the SAME rows for every term (so the delta's interval is paired):
  - metrics without a neighbour count k (CKA, CCA, ...): the ordinary bootstrap, n rows drawn
    with replacement;
  - kNN metrics (those with a ``k`` parameter): a duplicated row would be its copy's nearest
    neighbour and inflate the score, so they use subsampling WITHOUT replacement of
    m = ``SUBSAMPLE_FRACTION`` x n rows (the delete-d jackknife of Shao & Wu 1989, d = n - m);
    the spread of the subsample scores is scaled by sqrt(m / d) to the spread of an n-row
    estimate.
* Interval: the 2.5th and 97.5th percentiles of theta + s (theta_b - mean_b theta_b), i.e. the
  resampling distribution re-centred on the full-sample estimate theta (s = 1 for the
  bootstrap, sqrt(m/d) for subsamples). Re-centring removes the shift that resampling itself
  causes (duplicates raise CKA a little; fewer rows change every kNN score), which is not
  uncertainty about theta.
* Null: the reference's rows permuted relative to the other representation (the pairing
  shuffled), the same permutations for every term; p = (1 + #{null >= observed}) / (1 + draws).

Verdict, per metric and side, at ``ALPHA`` = 0.05:
  supported      the delta's 95% interval lies above 0 AND the after-score beats its
                 shuffled-pairing null (p <= ALPHA);
  not supported  the delta's 95% interval lies below 0 (alignment to the reference fell);
  inconclusive   anything else (the interval contains 0, or the after-score is not above chance).
No correction is made for testing several metrics and both sides.

Speed: CKA, unbiased CKA and mutual kNN have fast paths that precompute, once, each
representation's (n, n) Gram matrix (CKA) or sorted neighbour lists (mutual kNN) and reuse
them for every resample and permutation (O(n^2) per draw instead of O(n d^2) or O(n^2 d);
the CKA bootstrap is a few batched matrix products);
before each use a fast path is checked against the library metric on ``CHECK_ROWS`` rows.
Other metrics call the library once per draw.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Mapping, NamedTuple

import numpy as np
import torch

from analyze import plots
from analyze.compare import (AnalyzeError, accepts_k, check_k, check_paired, header, kernel_figure, load_joined,
                             metric_kwargs, output_dir, resolve_metrics, write_csv)
from pipeline.cache import CacheError, find_entry
from pipeline.config import PipelineConfig
from pipeline.runs import aligned_name, run_name
from pipeline.runtime import write_json
from similarity.kernels import as_features
from similarity.metrics import ranking_units, stable_topk

log = logging.getLogger(__name__)

ALPHA = 0.05  # significance level: 95% intervals, and p <= ALPHA to beat the null
SUBSAMPLE_FRACTION = 0.8  # kNN metrics: rows kept per subsample (m-out-of-n, without replacement)
GRAM_MAX_ROWS = 4096  # the CKA fast path holds five (n, n) float64 Grams (5 x 128 MiB at this n)
FAST_TOLERANCE = 1e-6  # a fast path must reproduce the library metric to this absolute error ...
CHECK_ROWS = 128  # ... on this many rows, checked before each use
SLOW_WARNING_S = 60.0  # warn (with the estimate) when a metric without a fast path will take longer, seconds
TERMS = ("before_image", "before_text", "after_image", "after_text")
SIDES = ("image", "text")
TERM_COLORS = {"before_image": "#9ecae1", "before_text": "#fdae6b", "after_image": "#3182bd", "after_text": "#e6550d"}


# ----------------------------------------------------------------------------- scoring engines
# An engine scores the four terms of one metric on many draws at once:
#   resample(rows)  rows (B, m) row indices, the same for every representation -> (B, 4)
#   permuted(perms) perms (P, n) permutations of the reference's rows            -> (P, 4)
class _Generic:
    """Calls the library metric once per draw and term: reps (4 arrays (n, d_t)), ref (n, d_ref)."""

    def __init__(self, fn: Callable, kwargs: dict, reps: list[np.ndarray], ref: np.ndarray):
        self.fn, self.kwargs, self.reps, self.ref = fn, kwargs, reps, ref

    def resample(self, rows: np.ndarray) -> np.ndarray:
        return np.array([[self.fn(A[r], self.ref[r], **self.kwargs) for A in self.reps] for r in rows]).reshape(-1, 4)

    def permuted(self, perms: np.ndarray) -> np.ndarray:
        return np.array([[self.fn(A, self.ref[p], **self.kwargs) for A in self.reps] for p in perms]).reshape(-1, 4)


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
    (duplicated rows included). Permutations gather the reference's Gram once per draw."""

    def __init__(self, reps: list[np.ndarray], ref: np.ndarray, unbiased: bool):
        self.unbiased = unbiased
        self.grams = np.stack([_gram(A) for A in (*reps, ref)])  # (5, n, n); index 4 = the reference
        self.diags = [G.diagonal().copy() for G in self.grams]
        self.rows = [G.sum(axis=1) - d for G, d in zip(self.grams, self.diags)]  # zero-diagonal row sums
        n = ref.shape[0]
        selfs = self._hsic(np.ones((1, n)), n, [(t, t) for t in range(5)])  # for the permutation path
        self.self_hsic = np.array([h[0] for h in selfs[:4]])
        self.ref_hsic = float(selfs[4][0])

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
        n, m = self.grams[4].shape[0], rows.shape[1]
        W = np.stack([np.bincount(r, minlength=n) for r in rows]).astype(np.float64)  # (B, n) counts
        h = self._hsic(W, m, [(t, 4) for t in range(4)] + [(t, t) for t in range(5)])
        return np.stack([_ratio(h[t], h[4 + t], h[8]) for t in range(4)], axis=1)

    def permuted(self, perms: np.ndarray) -> np.ndarray:
        flat = self.grams[:4].reshape(4, -1)  # a view: <K_t, L> for all four t is one product
        out = []
        for p in perms:
            L = self.grams[4].take(p, axis=0).take(p, axis=1)  # centring commutes with permuting
            if self.unbiased:  # with L's diagonal zeroed, tr(K~ L~) = sum(K * L~)
                np.fill_diagonal(L, 0.0)
                rl = self.rows[4][p]
                h = _song(flat @ L.ravel(), np.array([r.sum() for r in self.rows[:4]]), rl.sum(),
                          np.array([r @ rl for r in self.rows[:4]]), len(p))
            else:
                h = flat @ L.ravel()
            out.append(_ratio(h, self.self_hsic, self.ref_hsic))
        return np.array(out).reshape(-1, 4)


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

    A subsample (rows sorted, as every caller draws them) keeps, for every kept row, the first k
    kept rows of its list: a sorted subset keeps the tie order, so these are exactly the library's
    neighbours (rows whose list has fewer than k kept entries are recomputed). A permutation
    relabels the reference's lists: the neighbours of row i in ref[perm] are perm^-1 of those of
    perm[i]. Ties are then broken by the NEW positions, so for reference rows whose k-th
    similarity recurs beyond the k-th place (duplicate rows) the whole tie group is kept and the
    members with the lowest new positions are chosen per permutation (``_tied``)."""

    BLOCK = 1024  # rows of the similarity matrix held at once while building the lists

    def __init__(self, reps: list[np.ndarray], ref: np.ndarray, k: int):
        n = ref.shape[0]
        self.k, self.width = k, min(n - 1, 4 * k + 32)
        self.units = [ranking_units(as_features(A)) for A in (*reps, ref)]  # the library's exact ranking
        self.lists = [self._lists(Z)[0] for Z in self.units[:4]]  # (n, width) each
        ref_lists, self.ties = self._lists(self.units[4], ties=True)
        self.lists.append(ref_lists)  # index 4 = the reference

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
        pad = lambda g, w: np.pad(g, (0, w - len(g)), constant_values=-1)  # noqa: E731
        return np.concatenate(out), (np.array([r for r, _, _ in groups]), np.stack([pad(a, self.k) for _, a, _ in groups]),
                                     np.stack([pad(t, width) for _, _, t in groups]),
                                     np.array([self.k - len(a) for _, a, _ in groups]))

    def _within(self, t: int, rows: np.ndarray, kept: np.ndarray) -> np.ndarray:
        """(m, k) neighbours (original row ids) of each kept row among the kept rows (sorted)."""
        L = self.lists[t][rows]
        ok = kept[L]
        take = ok & (np.cumsum(ok, axis=1) <= self.k)
        short = take.sum(axis=1) < self.k
        out = np.empty((len(rows), self.k), dtype=np.int64)
        out[~short] = L[~short][take[~short]].reshape(-1, self.k)
        if short.any():  # rare: recompute these rows against all kept rows
            Z, idx = self.units[t], torch.as_tensor(rows, device=self.units[t].device)
            S = Z[idx[torch.as_tensor(short, device=Z.device)]] @ Z[idx].T
            S[torch.arange(S.shape[0], device=Z.device), torch.as_tensor(np.flatnonzero(short), device=Z.device)] = -math.inf
            out[short] = rows[stable_topk(S, self.k)[1].cpu().numpy()]
        return out

    def resample(self, rows: np.ndarray) -> np.ndarray:
        out = []
        for r in rows:
            kept = np.zeros(self.units[0].shape[0], dtype=bool)
            kept[r] = True
            ref = self._within(4, r, kept)
            out.append([_mutual(self._within(t, r, kept), ref) for t in range(4)])
        return np.array(out).reshape(-1, 4)

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
            ref = inverse[mine[4][p]]
            if self.ties is not None:
                ref[inverse[self.ties[0]]] = self._tied(inverse)
            out.append([_mutual(mine[t], ref) for t in range(4)])
        return np.array(out).reshape(-1, 4)


class FastPath(NamedTuple):
    """build(reps, ref, k) -> engine; max_rows: largest n it is used for (None = any)."""

    build: Callable
    max_rows: int | None


FAST_PATHS: dict[str, FastPath] = {  # metric name -> fast engine, checked against the library before use
    "cka": FastPath(lambda reps, ref, k: _LinearCKA(reps, ref, unbiased=False), GRAM_MAX_ROWS),
    "unbiased_cka": FastPath(lambda reps, ref, k: _LinearCKA(reps, ref, unbiased=True), GRAM_MAX_ROWS),
    "mutual_knn": FastPath(lambda reps, ref, k: _MutualKnn(reps, ref, k), None),  # memory O(n k)
}


def _engine(name: str, fn: Callable, kwargs: dict, reps: list[np.ndarray], ref: np.ndarray, use_fast: bool):
    """The fast path for ``name`` when there is one (after checking it against the library
    metric on the first ``CHECK_ROWS`` rows), else the generic engine."""
    n, fast = ref.shape[0], FAST_PATHS.get(name)
    if use_fast and fast and (fast.max_rows is None or n <= fast.max_rows):
        engine = fast.build(reps, ref, kwargs.get("k"))
        rows = np.arange(min(n, CHECK_ROWS))
        want = [fn(A[rows], ref[rows], **kwargs) for A in reps]
        got = engine.resample(rows[None])[0]
        if np.allclose(got, want, rtol=0, atol=FAST_TOLERANCE):
            return engine
        log.warning("fast path for %s disagrees with similarity.metrics (%s vs %s); using the library metric",
                    name, got, want)
    elif use_fast and fast:
        log.warning("n=%d > %d rows: %s uses the slow path (one library call per draw); "
                    "subsample with --max-rows %d (or --set analyze.max_rows=%d)", n, fast.max_rows, name,
                    fast.max_rows, fast.max_rows)
    return _Generic(fn, kwargs, reps, ref)


# ----------------------------------------------------------------------------- statistics
def _interval(theta: np.ndarray, draws: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Re-centred percentile interval: theta (...,) and draws (B, ...) -> (lo, hi); NaN when B = 0."""
    if len(draws) == 0:
        return np.full(theta.shape, np.nan), np.full(theta.shape, np.nan)
    shifted = theta + scale * (draws - draws.mean(axis=0))
    lo, hi = np.percentile(shifted, [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)], axis=0)
    return lo, hi


def _null(point: np.ndarray, null: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(p-value, 95th percentile, mean) of the null draws (P, 4) per term; NaN when P = 0.
    p = (1 + #{null >= observed}) / (1 + P)."""
    if len(null) == 0:
        return (np.full(point.shape, np.nan),) * 3
    return ((1 + (null >= point).sum(axis=0)) / (1 + len(null)), np.percentile(null, 100 * (1 - ALPHA), axis=0),
            null.mean(axis=0))


def _deltas(scores: np.ndarray) -> np.ndarray:
    """(..., 4) term scores -> (..., 2) deltas: after_side - mean(before_image, before_text)."""
    before = (scores[..., 0] + scores[..., 1]) / 2
    return np.stack([scores[..., 2] - before, scores[..., 3] - before], axis=-1)


def verdict(delta_lo: float, delta_hi: float, p_after: float) -> tuple[str, str]:
    """(verdict, reason): supported | not supported | inconclusive; see the module docstring.
    NaN inputs (no resamples or no permutations) give inconclusive."""
    if not all(math.isfinite(x) for x in (delta_lo, delta_hi, p_after)):
        return "inconclusive", "no confidence interval or null (bootstrap or permutations set to 0)"
    if delta_hi < 0:
        return "not supported", "the 95% CI of the difference lies below 0: alignment to the reference fell"
    if delta_lo > 0 and p_after <= ALPHA:
        return "supported", "the 95% CI of the difference excludes 0 and the after-score beats the shuffled-pairing null"
    if delta_lo <= 0:
        return "inconclusive", "the 95% CI of the difference contains 0"
    return "inconclusive", f"the after-score does not beat the shuffled-pairing null (p = {p_after:.3g} > {ALPHA})"


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3f}"


def sentence(metric: str, side: str, r: Mapping) -> str:
    """One plain sentence for one metric and side (used by the CLI and the report)."""
    t, d = r["terms"], r["delta"][side]
    after = t[f"after_{side}"]
    before = (t["before_image"]["score"] + t["before_text"]["score"]) / 2
    return (f"{metric}, {side} side: {d['verdict']}. Alignment to the reference went from {before:.3f} "
            f"(mean of before-image {_fmt(t['before_image']['score'])} [{_fmt(t['before_image']['ci_lo'])}, "
            f"{_fmt(t['before_image']['ci_hi'])}] and before-text {_fmt(t['before_text']['score'])} "
            f"[{_fmt(t['before_text']['ci_lo'])}, {_fmt(t['before_text']['ci_hi'])}]) to {after['score']:.3f} "
            f"[{_fmt(after['ci_lo'])}, {_fmt(after['ci_hi'])}]; difference {d['delta']:+.3f} "
            f"(95% CI {_fmt(d['ci_lo'])} to {_fmt(d['ci_hi'])}); the shuffled-pairing null's 95th percentile is "
            f"{_fmt(after['null_q95'])} (p = {_fmt(after['p_value'])}): {d['reason']}. "
            f"Against the {side} encoder alone before training ({_fmt(t[f'before_{side}']['score'])}) "
            f"the aligned {side} embedding moved by {after['score'] - t[f'before_{side}']['score']:+.3f}.")


def hypothesis_test(X: np.ndarray, Y: np.ndarray, RX: np.ndarray, RY: np.ndarray, ref: np.ndarray,
                    metrics: Mapping[str, Callable], k: int, bootstrap: int, permutations: int,
                    seed: int = 0, use_fast: bool = True) -> dict:
    """The test on paired features (rows joined by sample id).

    X: (n, d_x) image encoder, Y: (n, d_y) text encoder, RX: (n, e) and RY: (n, e) the
    aligned image / text embeddings, ref: (n, d_ref) the reference. metrics: {name: metric}.
    bootstrap / permutations: number of draws (0 skips the interval / null). Returns
    {metric: {"terms": {term: {score, ci_lo, ci_hi, null_mean, null_q95, p_value}},
    "delta": {side: {delta, ci_lo, ci_hi, verdict, reason}}, "resampling", "seconds"}}.
    """
    reps = [X, Y, RX, RY]
    n = check_paired({"image": X, "text": Y, "image aligned": RX, "text aligned": RY, "reference": ref})
    if bootstrap < 0 or permutations < 0:
        raise AnalyzeError(f"--bootstrap ({bootstrap}) and --permutations ({permutations}) must be >= 0 "
                           f"(0 skips the intervals / the null); set them with --set analyze.bootstrap=N "
                           f"and --set analyze.permutations=N.")
    m_sub = int(round(SUBSAMPLE_FRACTION * n))
    check_k(metrics, k, m_sub if bootstrap else n, f"rows in each {SUBSAMPLE_FRACTION:.0%} subsample")
    rng = np.random.default_rng(seed)  # draws are made up front, in a fixed order, for every metric
    boot_rows = rng.integers(0, n, size=(bootstrap, n))
    sub_rows = np.sort(rng.random((bootstrap, n)).argsort(axis=1)[:, :m_sub], axis=1)
    perms = np.stack([rng.permutation(n) for _ in range(permutations)]) if permutations else np.zeros((0, n), int)
    out = {}
    for name, fn in metrics.items():
        t0 = time.perf_counter()
        kwargs = metric_kwargs(fn, k)
        engine = _engine(name, fn, kwargs, reps, ref, use_fast)
        t1 = time.perf_counter()
        point = engine.resample(np.arange(n)[None])[0]  # the full-sample estimates
        eta = (time.perf_counter() - t1) * (bootstrap + permutations)
        if isinstance(engine, _Generic) and eta > SLOW_WARNING_S:
            log.warning("%s has no fast path: about %.0f s for %d resamples + %d permutations at n=%d; lower "
                        "--bootstrap/--permutations or --max-rows for a quicker answer", name, eta, bootstrap,
                        permutations, n)
        knn = accepts_k(fn)
        rows, scale = (sub_rows, math.sqrt(m_sub / max(1, n - m_sub))) if knn else (boot_rows, 1.0)
        boot = engine.resample(rows) if bootstrap else np.zeros((0, 4))
        null = engine.permuted(perms) if permutations else np.zeros((0, 4))
        lo, hi = _interval(point, boot, scale)
        delta = _deltas(point)
        dlo, dhi = _interval(delta, _deltas(boot), scale)
        pval, q95, null_mean = _null(point, null)
        res = {"terms": {}, "delta": {}, "engine": type(engine).__name__.lstrip("_"), "k": k if knn else None,
               "resampling": (f"subsampling without replacement, {m_sub} of {n} rows, spread scaled by "
                              f"sqrt(m/(n-m)) = {scale:.2f}") if knn else f"bootstrap, {n} rows with replacement"}
        for t, term in enumerate(TERMS):
            res["terms"][term] = {"score": point[t], "ci_lo": lo[t], "ci_hi": hi[t], "null_mean": null_mean[t],
                                  "null_q95": q95[t], "p_value": pval[t]}
        for s, side in enumerate(SIDES):
            v, why = verdict(dlo[s], dhi[s], pval[2 + s])
            res["delta"][side] = {"delta": delta[s], "ci_lo": dlo[s], "ci_hi": dhi[s], "verdict": v, "reason": why}
        res["seconds"] = time.perf_counter() - t0
        out[name] = res
    return out


def headline(results: Mapping[str, Mapping]) -> str:
    """The one-line overall verdict over every metric and side."""
    verdicts = {(m, s): r["delta"][s]["verdict"] for m, r in results.items() for s in SIDES}
    n_sup = sum(v == "supported" for v in verdicts.values())
    n_not = sum(v == "not supported" for v in verdicts.values())
    overall = ("supported" if n_sup == len(verdicts) else "partly supported" if n_sup else
               "not supported" if n_not else "inconclusive")
    detail = "; ".join(f"{m}: image {r['delta']['image']['verdict']}, text {r['delta']['text']['verdict']}"
                       for m, r in results.items())
    return f"Platonic hypothesis {overall} ({n_sup} of {len(verdicts)} metric x side tests supported): {detail}."


# ----------------------------------------------------------------------------- the command
def platonic_test(cfg: PipelineConfig, run: str | None = None, kernels: bool = True) -> dict:
    """``analyze platonic``: the hypothesis test for one fit-adapters run.

    Entries (split ``analyze.split``): ``train.image``, ``train.text``, ``analyze.reference``
    and the run's aligned ``<image>@<run>``, ``<text>@<run>``; run = ``run`` or
    ``train.name`` or fit-adapters' default name. Writes ``runs/<run>/platonic.json``,
    ``platonic.csv``, ``platonic.png`` (bars with 95% CIs and the null's 95th percentile)
    and, with ``kernels``, ``kernels.png``. Returns the JSON document plus ``out``."""
    a, tc = cfg.analyze, cfg.train
    run = run_name(tc, run)
    ri, rt = aligned_name(tc.image, run), aligned_name(tc.text, run)
    names = [tc.image, tc.text, ri, rt, a.reference]
    if a.reference in (tc.image, tc.text):
        log.warning("the reference %r is also the %s encoder: its before-score is trivially 1",
                    a.reference, "image" if a.reference == tc.image else "text")
    for name in (ri, rt):
        try:
            find_entry(cfg.data.cache, cfg.data.dataset, a.split, name)
        except CacheError as exc:
            raise CacheError(f"{exc} The aligned entries of run {run!r} are written by `fit-adapters --image "
                             f"{tc.image} --text {tc.text} --name {run}`; pass --run to pick another run.") from None
    joined = load_joined(cfg, names)
    metrics = resolve_metrics(a.metrics)
    F = joined.features
    t0 = time.perf_counter()
    results = hypothesis_test(F[tc.image], F[tc.text], F[ri], F[rt], F[a.reference], metrics, a.k,
                              a.bootstrap, a.permutations, a.seed)
    seconds = time.perf_counter() - t0
    out = output_dir(cfg, "runs", run)
    doc = {**header(cfg, "platonic"), "run": run, "n": joined.n, "bootstrap": a.bootstrap,
           "permutations": a.permutations, "alpha": ALPHA,
           "entries": {"image": tc.image, "text": tc.text, "image_aligned": ri, "text_aligned": rt,
                       "reference": a.reference},
           "results": results, "headline": headline(results),
           "sentences": {m: {s: sentence(m, s, r) for s in SIDES} for m, r in results.items()},
           "seconds": seconds, "figures": {}}
    rows = []
    for m, r in results.items():
        for term, t in r["terms"].items():
            rows.append({"metric": m, "term": term, **t})
        for side, d in r["delta"].items():
            rows.append({"metric": m, "term": f"delta_{side}", "score": d["delta"], "ci_lo": d["ci_lo"],
                         "ci_hi": d["ci_hi"], "verdict": d["verdict"]})
    groups = {m: [{"label": term.replace("_", " "), "value": t["score"], "lo": t["ci_lo"], "hi": t["ci_hi"],
                   "null_q95": t["null_q95"], "color": TERM_COLORS[term]} for term, t in r["terms"].items()]
              for m, r in results.items()}
    doc["figures"]["bars"] = plots.grouped_bars(
        groups, f"Alignment to {a.reference} before/after run {run} (n={joined.n}; bars: 95% CI; "
                f"dashes: shuffled-pairing null, 95th pct)", out / "platonic.png").name
    if kernels:
        panels = {f"K_X ({tc.image})": F[tc.image], f"K_Y ({tc.text})": F[tc.text], f"K_repr image ({ri})": F[ri],
                  f"K_repr text ({rt})": F[rt], f"K_ref ({a.reference})": F[a.reference]}
        doc["figures"]["kernels"] = kernel_figure(panels, f"K_ref ({a.reference})", a.kernel_rows, a.seed,
                                                  out / "kernels.png").name
    write_json(out / "platonic.json", doc)
    write_csv(out / "platonic.csv", rows)
    return {**doc, "out": out}
