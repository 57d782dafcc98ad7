"""Permutation nulls and calibrated scores for ``analyze cka --calibrate`` and ``analyze layers``.

The null of a score m(A, B) is m(A, B[perm]) over random row permutations perm: the same
representations with the pairing of rows destroyed. The same ``permutations`` draws (seeded
by ``analyze.seed``) are used for every pair and metric; with few rows (n! - 1 <= the count
asked for) every non-identity permutation is used once instead, so the p-value is exact. The
scores of one reference against many representations come from one scoring engine
(``analyze.engines``: fast paths for CKA, unbiased CKA and mutual kNN, else one library call
per draw).

* ``calibrated_matrices``: each cell of a pairwise score matrix against its own null.
* ``calibrated_layers``: a layer x layer matrix. The best pair is the maximum over L_a x L_b
  cells, which is inflated by the selection itself; its null is the maximum over the layer
  pairs of each permuted draw (every layer of B permuted by the same perm), so the
  calibrated best score and its p-value account for having looked at every pair. The last
  pair is calibrated against its own cell's null.

Calibration: ``analyze.calibration.calibrate`` (threshold = conformal 95% quantile of the
null, p-value, calibrated score in [0, 1]).
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Mapping, Sequence

import numpy as np

from analyze.calibration import CalibrationError, calibrate, calibrate_array
from analyze.engines import build_engine

ALPHA = 0.05  # calibration level: the null's conformal (1 - ALPHA) quantile is the threshold


def exact_permutations(n: int, count: int) -> np.ndarray | None:
    """(n! - 1, n) every permutation of n rows but the identity, when there are no more than
    ``count`` of them (few rows); else None. With all of them the permutation p-value
    (1 + #{null >= observed}) / (1 + (n! - 1)) is exact: the share of all n! pairings (the
    observed one included) that score at least as high."""
    if count < 1 or n > 12 or math.factorial(n) - 1 > count:  # 12! - 1 > any count worth drawing
        return None
    return np.array([p for p in itertools.permutations(range(n)) if list(p) != list(range(n))],
                    dtype=np.int64).reshape(-1, n)


def permutations_of(n: int, count: int, seed: int) -> np.ndarray:
    """(count, n) random permutations of n rows, seeded; every non-identity permutation
    (``exact_permutations``, fewer than ``count``) when n! - 1 <= count."""
    if count < 0:
        raise CalibrationError(f"permutations must be >= 0; got {count}.")
    exact = exact_permutations(n, count)
    if exact is not None:
        return exact
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(n) for _ in range(count)]) if count else np.zeros((0, n), dtype=np.int64)


def null_scores(name: str, fn: Callable, kwargs: dict, reps: Sequence[np.ndarray], ref: np.ndarray,
                perms: np.ndarray) -> np.ndarray:
    """(P, R): fn(reps[r], ref[perm_p], **kwargs) for each permutation p and representation r."""
    if len(perms) == 0:
        return np.zeros((0, len(reps)))
    return build_engine(name, fn, kwargs, list(reps), ref).permuted(perms)


def calibrated_matrices(features: Mapping[str, np.ndarray], metrics: Mapping[str, Callable],
                        kwargs: Mapping[str, dict], scores: Mapping[str, np.ndarray], permutations: int, seed: int) -> dict[str, dict]:
    """Calibrate every cell [i, j] = m(features[i], features[j]) of each score matrix in
    ``scores`` (metric -> (e, e)) against m(features[i], features[j][perm], **kwargs[metric]).

    Returns {metric: {"calibrated", "threshold", "p_value"}: (e, e) arrays}."""
    names = list(features)
    n = next(iter(features.values())).shape[0]
    perms = permutations_of(n, permutations, seed)
    reps = [features[a] for a in names]
    out = {}
    for m, fn in metrics.items():
        null = np.stack([null_scores(m, fn, kwargs[m], reps, features[b], perms) for b in names], axis=2)  # (P, e, e)
        cal = calibrate_array(np.asarray(scores[m], dtype=float), null, alpha=ALPHA)
        out[m] = {key: cal[key] for key in ("calibrated", "threshold", "p_value")}
    return out


def calibrated_layers(name: str, fn: Callable, kwargs: dict, A: Sequence[np.ndarray], B: Sequence[np.ndarray],
                      S: np.ndarray, permutations: int, seed: int) -> dict:
    """Calibration of a layer x layer score matrix S (L_a, L_b) = [fn(A[i], B[j], **kwargs)].

    Returns {"best": calibrate(max S, null of the max).as_dict(), "last": calibrate(S[-1, -1],
    its cell's null).as_dict(), "cells": {"calibrated", "threshold", "p_value"} (L_a, L_b)
    arrays of each cell against its own null, "null_max": (P,) the maximum of each permuted draw}."""
    n = A[0].shape[0]
    perms = permutations_of(n, permutations, seed)
    null = np.stack([null_scores(name, fn, kwargs, A, b, perms) for b in B], axis=2)  # (P, L_a, L_b)
    null_max = null.reshape(len(perms), -1).max(axis=1) if len(perms) else np.zeros(0)
    cells = calibrate_array(S, null, alpha=ALPHA)
    return {"best": calibrate(float(np.nanmax(S)), null_max, alpha=ALPHA).as_dict(),
            "last": calibrate(float(S[-1, -1]), null[:, -1, -1], alpha=ALPHA).as_dict(),
            "cells": {key: cells[key] for key in ("calibrated", "threshold", "p_value")}, "null_max": null_max}
