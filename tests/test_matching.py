"""Training-free matching and retrieval (analyze/matching.py): seeded quadratic assignment,
local-CKA retrieval against the dense definition, ASIF relative representations."""

import numpy as np
import pytest
from scipy.stats import ortho_group

from analyze.matching import (centred_kernel, local_cka_scores, match_experiment, matching_accuracy,
                              relative_representation, relative_scores, retrieval_from_scores, seeded_match)
from analyze.metrics import kernel_cka


def rotated(n=60, d=8, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    return X, X @ ortho_group.rvs(d, random_state=seed + 1) + noise * rng.standard_normal((n, d))


# ----------------------------------------------------------------------------- seeded matching
def test_seeded_match_recovers_a_known_permutation_at_low_noise():
    X, Z = rotated(noise=0.05)
    rng = np.random.default_rng(3)
    order = rng.permutation(len(X))  # Y row j holds sample order[j]
    truth = np.argsort(order)
    seeds = np.stack([np.arange(6), truth[:6]], axis=1)
    perm = seeded_match(X, Z[order], seeds)
    assert (perm[seeds[:, 0]] == seeds[:, 1]).all()  # the known pairs stay fixed
    assert matching_accuracy(perm, truth, seeds)["accuracy"] == 1.0


@pytest.mark.parametrize("noise", [0.01, 0.2])
def test_match_experiment_near_perfect_at_low_noise(noise):
    X, Z = rotated(noise=noise, seed=2)
    res = match_experiment(X, Z, n_seeds=6, seed=1)
    assert res["accuracy"] >= 0.95 and res["chance"] == pytest.approx(1 / 54) and res["seeds"] == 6


def test_match_experiment_near_chance_on_pure_noise():
    rng = np.random.default_rng(5)
    accs = [match_experiment(rng.standard_normal((60, 8)), rng.standard_normal((60, 8)), 6, seed=s)["accuracy"]
            for s in range(5)]
    assert np.mean(accs) < 0.1  # chance is 1/54 = 0.019


def test_seeded_match_rejects_bad_seeds_and_shapes():
    X, Y = rotated(n=10)
    with pytest.raises(ValueError, match="distinct"):
        seeded_match(X, Y, [[0, 1], [0, 2]])
    with pytest.raises(ValueError, match="same number of rows"):
        seeded_match(X, Y[:-1], [[0, 0]])


def test_centred_kernel_is_hkh():
    X, _ = rotated(n=12, d=3)
    H = np.eye(12) - 1 / 12
    np.testing.assert_allclose(centred_kernel(X), H @ X @ X.T @ H, atol=1e-10)
    Z = X / np.linalg.norm(X, axis=1, keepdims=True)
    np.testing.assert_allclose(centred_kernel(X, "cosine"), H @ Z @ Z.T @ H, atol=1e-10)


# ----------------------------------------------------------------------------- local CKA
@pytest.mark.parametrize("kernel", ["linear", "cosine"])
def test_local_cka_equals_dense_cka_of_base_plus_one(kernel):
    rng = np.random.default_rng(0)
    Bx, By = rng.standard_normal((15, 4)), rng.standard_normal((15, 3))
    Q, C = rng.standard_normal((5, 4)), rng.standard_normal((6, 3))
    S = local_cka_scores(Bx, By, Q, C, kernel)
    norm = (lambda A: A / np.linalg.norm(A, axis=1, keepdims=True)) if kernel == "cosine" else (lambda A: A)
    for q in range(5):
        for c in range(6):
            X, Y = norm(np.vstack([Bx, Q[q:q + 1]])), norm(np.vstack([By, C[c:c + 1]]))
            assert S[q, c] == pytest.approx(kernel_cka(X @ X.T, Y @ Y.T), abs=1e-10)


def test_local_cka_retrieves_the_matching_caption():
    # Captions are a rotation of the images: the true caption completes the base set perfectly
    # (CKA 1), every other caption does worse, so R@1 is 1 both ways.
    X, Y = rotated(n=30, d=5, noise=0.0)
    base, query = np.arange(20), np.arange(20, 30)
    S = local_cka_scores(X[base], Y[base], X[query], Y[query])
    np.testing.assert_allclose(np.diag(S), 1.0, atol=1e-10)
    res = retrieval_from_scores(S, np.arange(10))
    assert res["i2t_R@1"] == 1.0 and res["t2i_R@1"] == 1.0 and res["rsum"] == 600.0


# ----------------------------------------------------------------------------- ASIF
def test_relative_representation_by_hand():
    anchors = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    Z = np.array([[3.0, 4.0]])  # cosines 0.6, 0.8, -0.6
    full = relative_representation(Z, anchors, k=3, p=1).toarray()
    np.testing.assert_allclose(full, [[0.6, 0.8, 0.0]])  # negatives dropped, row normalised
    top1 = relative_representation(Z, anchors, k=1, p=2).toarray()
    np.testing.assert_allclose(top1, [[0.0, 1.0, 0.0]])
    squared = relative_representation(np.vstack([Z, -Z]), anchors, k=2, p=2, block=1).toarray()
    # squares 0.36, 0.64 renormalised; -Z has one positive cosine (0.6 with the third anchor)
    np.testing.assert_allclose(squared, [[0.36 / np.hypot(0.36, 0.64), 0.64 / np.hypot(0.36, 0.64), 0.0],
                                         [0.0, 0.0, 1.0]], atol=1e-12)


def test_relative_scores_match_paired_anchors():
    X, Y = rotated(n=40, d=6, noise=0.01, seed=4)  # Y is X rotated: anchor similarities agree
    S = relative_scores(X[30:], Y[30:], X[:30], Y[:30], k=10, p=4)
    assert (S.argmax(axis=1) == np.arange(10)).all()
    with pytest.raises(ValueError, match="paired"):
        relative_scores(X, Y, X[:5], Y[:4])
