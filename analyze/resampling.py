"""The resampling and decision rules of the Platonic test (``analyze.platonic``): the row draws,
the intervals, the verdict, and the small-sample rules that keep a verdict from resting on a
degenerate interval. Definitions of the intervals: ``analyze.platonic``'s module docstring.

Small samples (``small_sample``), each checked for every metric:

* fewer than ``MIN_ROWS`` joined rows: the verdict is "too few rows" (never supported or not
  supported): with a handful of rows every resampled score is nearly the same (3 rows give
  zero-width intervals) and only n! pairings exist for the null;
* a difference interval from fewer than ``MIN_BOOTSTRAP`` bootstrap resamples (the percentile
  intervals; the jackknife interval of the CKAs uses all n leave-one-out rows instead): the
  verdict is "inconclusive", as 2.5% tails need at least 1 / 0.025 = 40 draws to exist;
* the null: with n! - 1 <= ``analyze.permutations`` every other pairing is scored once
  (``_draws``), so the p-value is exact (3 rows: p >= 1/6, so never below 0.05);
* intervals are clipped to what the metric can take (``similarity.metrics.value_range``:
  [0, 1], or [-1, 1] for the unbiased estimators; a difference of two scores to [lo - hi,
  hi - lo]); ``clipped`` in platonic.json lists those that were.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Callable

import numpy as np

from analyze.nulls import exact_permutations

ALPHA = 0.05  # significance level: 95% intervals, and p <= ALPHA to beat the null
SUBSAMPLE_FRACTION = 0.8  # kNN metrics: rows kept per subsample (m-out-of-n, without replacement)
MIN_ROWS = 10  # fewer joined rows than this: verdict "too few rows"
MIN_BOOTSTRAP = 40  # fewer resamples than this cannot place a 95% percentile interval's tails: "inconclusive"
TOO_FEW_ROWS = "too few rows"  # the verdict below MIN_ROWS


def interval(theta: np.ndarray, draws: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Re-centred percentile interval: theta (...,) and draws (B, ...) -> (lo, hi); NaN when B = 0."""
    theta = np.asarray(theta, dtype=float)
    if len(draws) == 0:
        return np.full(theta.shape, np.nan), np.full(theta.shape, np.nan)
    shifted = theta + scale * (draws - draws.mean(axis=0))
    lo, hi = np.percentile(shifted, [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)], axis=0)
    return lo, hi


def jackknife_interval(theta: np.ndarray, jack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normal interval theta +- z SE with the jackknife standard error: theta (...,) and the n
    leave-one-out values jack (n, ...); SE^2 = (n - 1)/n sum_i (jack_i - mean)^2."""
    n = jack.shape[0]
    se = np.sqrt((n - 1) / n * ((jack - jack.mean(axis=0)) ** 2).sum(axis=0))
    z = NormalDist().inv_cdf(1 - ALPHA / 2)
    return np.asarray(theta) - z * se, np.asarray(theta) + z * se


def _null_summary(null: np.ndarray, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(95th percentile, mean) of the null draws (P, R) per representation; NaN when P = 0."""
    if len(null) == 0:
        return np.full(shape, np.nan), np.full(shape, np.nan)
    return np.percentile(null, 100 * (1 - ALPHA), axis=0), null.mean(axis=0)


def _deltas(scores: np.ndarray) -> np.ndarray:
    """(..., >= 4) term scores -> (..., 2) deltas: after_side - mean(before_image, before_text)."""
    before = (scores[..., 0] + scores[..., 1]) / 2
    return np.stack([scores[..., 2] - before, scores[..., 3] - before], axis=-1)


def verdict(delta_lo: float, delta_hi: float, p_after: float) -> tuple[str, str]:
    """(verdict, reason): supported | not supported | inconclusive; see analyze.platonic's docstring.
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




def _draws(n: int, bootstrap: int, permutations: int, seed: int, m_sub: int):
    """Row draws made up front, in a fixed order, for every metric: bootstrap rows (B, n),
    subsample rows (B, m_sub) sorted, permutations (P, n): every non-identity permutation when
    there are no more than ``permutations`` of them (``nulls.exact_permutations``: an exact p-value)."""
    rng = np.random.default_rng(seed)
    boot_rows = rng.integers(0, n, size=(bootstrap, n))
    sub_rows = np.sort(rng.random((bootstrap, n)).argsort(axis=1)[:, :m_sub], axis=1)
    perms = np.stack([rng.permutation(n) for _ in range(permutations)]) if permutations else np.zeros((0, n), int)
    exact = exact_permutations(n, permutations)
    return boot_rows, sub_rows, (perms if exact is None else exact)




def _resampling(knn: bool, subsample: bool, n: int, m_sub: int, scale: float) -> str:
    """How the interval of one metric was resampled, in words (for platonic.json)."""
    if subsample:
        return f"subsampling without replacement, {m_sub} of {n} rows, spread scaled by sqrt(m/(n-m)) = {scale:.2f}"
    if knn:
        return (f"bootstrap, {n} rows with replacement; neighbours among the other distinct drawn rows, "
                f"each row counted as often as drawn")
    return f"bootstrap, {n} rows with replacement"



def small_sample(n: int, bootstrap: int, percentile_difference: bool) -> tuple[str, str] | None:
    """(verdict, reason) that replaces the interval-based verdict of one metric when the sample is
    too small to support one (module docstring), else None. percentile_difference: the deltas'
    intervals are percentiles of the bootstrap draws (not the jackknife normal interval)."""
    if n < MIN_ROWS:
        return TOO_FEW_ROWS, (f"n = {n} rows, below the minimum of {MIN_ROWS} for resampled intervals and a null that "
                              f"can reject (analyze.platonic: MIN_ROWS)")
    if percentile_difference and 0 < bootstrap < MIN_BOOTSTRAP:
        return "inconclusive", (f"the 95% CI comes from {bootstrap} resamples, too few for its 2.5% tails (at least "
                                f"{MIN_BOOTSTRAP}: raise --set analyze.bootstrap=N)")
    return None


def clipper(lo: float, hi: float, clipped: list[str], what: str) -> Callable:
    """A wrapper for an interval function (theta, draws) -> (lo, hi) that clips its bounds to
    [lo, hi] and appends ``what`` to ``clipped`` when a finite bound lay outside."""
    def wrap(fn: Callable) -> Callable:
        def clip(theta, draws):
            a, b = fn(theta, draws)
            a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
            ca, cb = np.clip(a, lo, hi), np.clip(b, lo, hi)
            if np.any(np.isfinite(a) & (ca != a)) or np.any(np.isfinite(b) & (cb != b)):
                if what not in clipped:
                    clipped.append(what)
            return ca, cb
        return clip
    return wrap
