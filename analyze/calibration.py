"""Calibrated similarity scores (Groeger, Wen & Brbic 2026, "the Aristotelian view").

A raw similarity score (CKA, mutual kNN, ...) has no fixed meaning across models: its chance
level moves with width, depth and the number of rows. Calibration measures a score against a
null distribution of the same metric on the same data with the pairing destroyed (rows of one
side permuted), and rescales what lies above the null's upper quantile to [0, 1].

For an observed score s and K null scores n_1..n_K (all from one metric on one set of rows):

    threshold  = the ceil((1 - alpha)(K + 1))-th smallest of the K + 1 values {s, n_1, ..., n_K}
    p_value    = (1 + #{n_k >= s}) / (K + 1)
    calibrated = clip((s - threshold) / (max_value - threshold), 0, 1)   (0 if threshold >= max_value)

``threshold`` is the conformal (1 - alpha) quantile: under the null (s exchangeable with the
n_k) P(s > threshold) <= alpha, so a calibrated score > 0 is a level-alpha rejection of "no
relation" and the p-value is the matching permutation p-value. ``calibrated`` is 0 for
anything at or below chance and 1 only for the maximal score, and it is comparable across
models because the chance level has been removed. ``max_value`` is the metric's largest
possible value (1 for every metric in ``analyze.metrics.METRICS``).

Ties count against the observed score: a null value equal to s counts in the p-value, and the
order statistic is taken over the tied values as they are (so with every value equal the
threshold is s and the calibrated score is 0).

No null (K = 0) gives NaN threshold, p-value and calibrated score: there is nothing to
calibrate against.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.errors import PipelineError

DEFAULT_ALPHA = 0.05  # the null's upper quantile is its (1 - alpha) conformal quantile
RANK_SLACK = 1e-9  # (1 - alpha)(K + 1) is computed in floating point: 0.95 * 20 must give rank 19, not 20


class CalibrationError(PipelineError, ValueError):
    """Arguments calibration cannot use (alpha outside (0, 1), NaN scores, mismatched shapes)."""


@dataclass(frozen=True)
class Calibration:
    """One calibrated score: the raw ``score``, the null's conformal ``threshold``, the
    permutation ``p_value`` and the ``calibrated`` score in [0, 1] (see the module docstring)."""

    score: float
    threshold: float
    p_value: float
    calibrated: float

    def as_dict(self) -> dict:
        return asdict(self)


def threshold_rank(n_null: int, alpha: float = DEFAULT_ALPHA) -> int:
    """The 1-based rank ceil((1 - alpha)(K + 1)) of the threshold among K + 1 values."""
    if not 0 < alpha < 1:
        raise CalibrationError(f"alpha must lie in (0, 1); got {alpha!r}.")
    return max(1, min(n_null + 1, math.ceil((1 - alpha) * (n_null + 1) - RANK_SLACK)))


def calibrate_array(observed, null, alpha: float = DEFAULT_ALPHA,
                    max_value: float = 1.0) -> dict[str, np.ndarray]:
    """Vectorised ``calibrate``: observed (...) and null (K, ...) -> {"score", "threshold",
    "p_value", "calibrated"}, each an array of observed's shape (one calibration per entry,
    entry-wise over the K null draws)."""
    obs = np.asarray(observed, dtype=np.float64)
    nul = np.asarray(null, dtype=np.float64)
    if nul.shape[1:] != obs.shape:
        raise CalibrationError(f"null must have shape (K, *observed.shape) = (K, {', '.join(map(str, obs.shape))}); "
                               f"got {nul.shape}.")
    if np.isnan(obs).any() or np.isnan(nul).any():
        raise CalibrationError("observed and null scores must not be NaN; drop failed draws before calibrating.")
    k = nul.shape[0]
    if k == 0:
        nan = np.full(obs.shape, np.nan)
        return {"score": obs, "threshold": nan, "p_value": nan.copy(), "calibrated": nan.copy()}
    values = np.sort(np.concatenate([obs[None], nul]), axis=0)  # (K + 1, ...)
    threshold = values[threshold_rank(k, alpha) - 1]
    p_value = (1.0 + (nul >= obs).sum(axis=0)) / (k + 1)
    room = max_value - threshold
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(room > 0, (obs - threshold) / np.where(room > 0, room, 1.0), 0.0)
    return {"score": obs, "threshold": threshold, "p_value": p_value, "calibrated": np.clip(scaled, 0.0, 1.0)}


def calibrate(observed: float, null, alpha: float = DEFAULT_ALPHA, max_value: float = 1.0) -> Calibration:
    """Calibrate one observed score against K null scores (1-d sequence); see the module docstring.

    >>> calibrate(0.5, [0.1, 0.2, 0.3], alpha=0.25).threshold   # ceil(0.75 * 4) = 3rd of {0.1, 0.2, 0.3, 0.5}
    0.3
    """
    nul = np.asarray(null, dtype=np.float64)
    if nul.ndim != 1:
        raise CalibrationError(f"null must be a 1-d sequence of K scores; got shape {nul.shape}.")
    out = calibrate_array(float(observed), nul, alpha, max_value)
    return Calibration(*(float(out[key]) for key in ("score", "threshold", "p_value", "calibrated")))
