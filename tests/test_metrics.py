"""Tests for similarity.metrics and similarity.kernels (re-exported as analyze.metrics, analyze.kernels).

The fast (feature-space / blockwise) paths are checked against literal dense n x n
implementations written here, independently of the library's shared sufficient statistics.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.spatial.distance import pdist

from similarity import kernels, metrics
from similarity.kernels import (cosine_kernel, linear_kernel, median_pairwise_distance,
                                polynomial_kernel, rbf_kernel)
from similarity.metrics import METRICS, cka, get_metric, kernel_cka, nearest_neighbours

KNN_METRICS = ["mutual_knn", "cycle_knn", "lcs_knn", "edit_distance_knn", "cknna"]


def data(n=60, d1=12, d2=9, seed=0, noise=1.0):
    """Paired (n, d1), (n, d2) with shared structure plus noise."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d1))
    Y = X @ rng.standard_normal((d1, d2)) + noise * rng.standard_normal((n, d2))
    return X, Y


# ----------------------------------------------------------------------------- dense references
def naive_hsic(K, L, unbiased):
    """Literal formulas: tr(KHLH)/(n-1)^2, or Song et al. 2012 eq. 5."""
    n = len(K)
    if not unbiased:
        H = np.eye(n) - np.ones((n, n)) / n
        return np.trace(K @ H @ L @ H) / (n - 1) ** 2
    Kt, Lt = K - np.diag(np.diag(K)), L - np.diag(np.diag(L))
    one = np.ones(n)
    return (np.trace(Kt @ Lt) + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * one @ Kt @ Lt @ one) / (n * (n - 3))


def naive_cka(K, L, unbiased=False):
    return naive_hsic(K, L, unbiased) / math.sqrt(naive_hsic(K, K, unbiased) * naive_hsic(L, L, unbiased))


def naive_rbf(X, sigma):
    D = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    return np.exp(-D / (2 * sigma**2))


def naive_knn(X, k):
    """Full argsort of cosine similarity with the diagonal pushed to the end."""
    Z = X / np.linalg.norm(X, axis=1, keepdims=True)
    S = Z @ Z.T
    np.fill_diagonal(S, -np.inf)
    return np.argsort(-S, axis=1, kind="stable")[:, :k], S


def lcs(a, b):
    dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            dp[i][j] = dp[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(dp[i - 1][j], dp[i][j - 1])
    return dp[-1][-1]


def levenshtein(a, b):
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
        prev = cur
    return prev[-1]


def naive_knn_metrics(X, Y, k):
    nx, Sx = naive_knn(X, k)
    ny, Sy = naive_knn(Y, k)
    n = len(X)
    mutual = np.mean([len(set(nx[i]) & set(ny[i])) / k for i in range(n)])
    cycle = np.mean([any(i in nx[j] for j in ny[i]) for i in range(n)])
    lcs_v = np.mean([lcs(list(nx[i]), list(ny[i])) for i in range(n)]) / k
    edit = 1 - np.mean([levenshtein(list(nx[i]), list(ny[i])) for i in range(n)]) / k
    # CKNNA, Huh et al.'s dense form: unbiased HSIC of the kernels masked to (mutual) kNN.
    Mx, My = np.zeros((n, n)), np.zeros((n, n))
    np.put_along_axis(Mx, nx, 1.0, axis=1)
    np.put_along_axis(My, ny, 1.0, axis=1)
    np.fill_diagonal(Sx, 1.0)
    np.fill_diagonal(Sy, 1.0)

    def h(A, B):  # their hsic_unbiased: sum(A~ * B~') + ... - 2 sum(A~ B~)/(n-2), non-symmetric
        At, Bt = A - np.diag(np.diag(A)), B - np.diag(np.diag(B))
        return ((At * Bt.T).sum() + At.sum() * Bt.sum() / ((n - 1) * (n - 2))
                - 2 * (At @ Bt).sum() / (n - 2)) / (n * (n - 3))

    M = Mx * My
    cknna_v = h(M * Sx, M * Sy) / math.sqrt(h(Mx * Sx, Mx * Sx) * h(My * Sy, My * Sy))
    return dict(mutual_knn=mutual, cycle_knn=cycle, lcs_knn=lcs_v, edit_distance_knn=edit,
                cknna=cknna_v)


# ----------------------------------------------------------------------------- hand-worked values
def test_linear_cka_by_hand():
    # x = (1,2,3,4), y = (1,2,3,5): centred xc = (-1.5,-0.5,0.5,1.5), yc = (-1.75,-0.75,0.25,2.25).
    # For 1-D features linear CKA = (xc.yc)^2 / (|xc|^2 |yc|^2) = 6.5^2 / (5 * 8.75) = 169/175.
    x, y = np.array([[1.0], [2], [3], [4]]), np.array([[1.0], [2], [3], [5]])
    assert cka(x, y) == pytest.approx(169 / 175, abs=1e-12)


def test_unbiased_cka_by_hand():
    # K = x x', L = y y' with diagonals zeroed (K~, L~), n = 4, so n(n-3) = 4:
    #   tr(K~L~) = (sum x y)^2 - sum x^2 y^2 = 34^2 - 498 = 658
    #   1'K~1 = (sum x)^2 - sum x^2 = 100 - 30 = 70,  1'L~1 = 121 - 39 = 82
    #   K~1 = x (10 - x) = (9,16,21,24),  L~1 = y (11 - y) = (10,18,24,30),  1'K~L~1 = 1602
    #   HSIC(K,L) = (658 + 70*82/6 - 2*1602/2) / 4 = 19/6; likewise HSIC(K,K) = 13/6, HSIC(L,L) = 14/3
    #   CKA = (19/6) / sqrt(13/6 * 14/3) = 19 / sqrt(364)
    x, y = np.array([[1.0], [2], [3], [4]]), np.array([[1.0], [2], [3], [5]])
    assert cka(x, y, unbiased=True) == pytest.approx(19 / math.sqrt(364), abs=1e-12)


def test_knn_metrics_by_hand():
    # Angles (degrees) X: 0, 5.7, 90, 84.3 -> nearest neighbour (k=1): 0->1, 1->0, 2->3, 3->2.
    # Angles Y: 0, 5.7, 90, 11.3 -> 0->1, 1->3 (5.6 deg beats 5.7), 2->3, 3->1.
    # mutual: rows 0 and 2 agree -> 0.5. cycle (i -> N_Y(i)=j -> is i in N_X(j)?):
    # 0->1->{0} yes, 1->3->{2} no, 2->3->{2} yes, 3->1->{0} no -> 0.5.
    X = np.array([[1, 0], [1, 0.1], [0, 1], [0.1, 1]])
    Y = np.array([[1, 0], [1, 0.1], [0, 1], [1, 0.2]])
    assert metrics.mutual_knn(X, Y, k=1) == 0.5
    assert metrics.cycle_knn(X, Y, k=1) == 0.5
    assert metrics.lcs_knn(X, Y, k=1) == 0.5
    assert metrics.edit_distance_knn(X, Y, k=1) == 0.5


@pytest.mark.parametrize("a, b, lcs_len, dist", [
    ("flaw", "lawn", 3, 2), ("abcd", "acbd", 3, 2), ("abcd", "abcd", 4, 0), ("abcd", "efgh", 0, 4),
])
def test_sequence_dp(a, b, lcs_len, dist):
    A, B = np.array([[ord(c) for c in a]]), np.array([[ord(c) for c in b]])
    assert metrics._sequence_dp(A, B, edit=False)[0] == lcs_len == lcs(a, b)
    assert metrics._sequence_dp(A, B, edit=True)[0] == dist == levenshtein(a, b)


def test_sequence_dp_random_rows():
    rng = np.random.default_rng(1)
    A, B = rng.integers(0, 6, (50, 7)), rng.integers(0, 6, (50, 7))
    assert list(metrics._sequence_dp(A, B, edit=False)) == [lcs(a, b) for a, b in zip(A, B)]
    assert list(metrics._sequence_dp(A, B, edit=True)) == [levenshtein(a, b) for a, b in zip(A, B)]


# ----------------------------------------------------------------------------- fast == naive
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("shape", [(40, 5, 7), (30, 50, 3)])  # d < n and d > n
def test_linear_cka_feature_space_equals_naive(unbiased, shape):
    X, Y = data(*shape)
    X += 3.0  # non-zero means: the feature-space path centres, the naive one uses raw K = X X'
    expected = naive_cka(X @ X.T, Y @ Y.T, unbiased)
    assert cka(X, Y, unbiased=unbiased) == pytest.approx(expected, abs=1e-8)
    assert kernel_cka(linear_kernel(X), linear_kernel(Y), unbiased) == pytest.approx(expected, abs=1e-8)


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("sigma", [None, 2.5])
@pytest.mark.parametrize("block_rows", [7, 16, None])
def test_rbf_cka_blockwise_equals_naive(unbiased, sigma, block_rows):
    X, Y = data(45, 6, 4, seed=2)
    sx = np.median(pdist(X)) if sigma is None else sigma
    sy = np.median(pdist(Y)) if sigma is None else sigma
    expected = naive_cka(naive_rbf(X, sx), naive_rbf(Y, sy), unbiased)
    got = cka(X, Y, kernel="rbf", unbiased=unbiased, sigma=sigma, block_rows=block_rows)
    assert got == pytest.approx(expected, abs=1e-8)


@pytest.mark.parametrize("n", [2, 3, 10, 41])
@pytest.mark.parametrize("block_rows", [1, 4, None])
def test_median_pairwise_distance_exact(n, block_rows):
    X = np.random.default_rng(n).standard_normal((n, 3)) * 5 + 7
    assert median_pairwise_distance(X, block_rows=block_rows) == pytest.approx(np.median(pdist(X)), rel=1e-12)


def test_median_pairwise_distance_with_ties():
    X = np.repeat(np.eye(3), [5, 1, 1], axis=0)  # 10 zero distances out of 21
    assert median_pairwise_distance(X, block_rows=2) == pytest.approx(np.median(pdist(X)))


@pytest.mark.parametrize("block_rows", [1, 5, 16, None])
def test_knn_blockwise_equals_argsort(block_rows):
    X, _ = data(50, 8, 3, seed=3)
    idx, sim = nearest_neighbours(X, k=6, block_rows=block_rows)
    ref, S = naive_knn(X, 6)
    np.testing.assert_array_equal(idx.cpu().numpy(), ref)
    np.testing.assert_allclose(sim.cpu().numpy(), np.take_along_axis(S, ref, 1), atol=1e-12)


@pytest.mark.parametrize("name", KNN_METRICS)
@pytest.mark.parametrize("k", [1, 3, 10])
def test_knn_metrics_equal_naive(name, k):
    X, Y = data(40, 6, 5, seed=4, noise=2.0)
    assert METRICS[name](X, Y, k=k, block_rows=9) == pytest.approx(naive_knn_metrics(X, Y, k)[name], abs=1e-10)


# ----------------------------------------------------------------------------- properties
@pytest.mark.parametrize("kwargs", [{}, {"unbiased": True}, {"kernel": "rbf"},
                                    {"kernel": "rbf", "unbiased": True}])
def test_cka_self_is_one(kwargs):
    X, _ = data()
    assert cka(X, X, **kwargs) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("unbiased", [False, True])
def test_linear_cka_invariances(unbiased):
    X, Y = data(seed=5)
    rng = np.random.default_rng(6)
    Q, _ = np.linalg.qr(rng.standard_normal((X.shape[1], X.shape[1])))
    base = cka(X, Y, unbiased=unbiased)
    assert cka(X @ Q, Y, unbiased=unbiased) == pytest.approx(base, abs=1e-10)
    assert cka(X, 7.5 * Y, unbiased=unbiased) == pytest.approx(base, abs=1e-10)
    assert cka(0.01 * X @ Q, Y - 4.0, unbiased=unbiased) == pytest.approx(base, abs=1e-10)
    A = np.diag(np.linspace(0.1, 10, X.shape[1])) @ rng.standard_normal((X.shape[1], X.shape[1]))
    assert abs(cka(X @ A, Y, unbiased=unbiased) - base) > 1e-3  # general invertible map: not invariant


def test_independent_data_chance_levels():
    rng = np.random.default_rng(7)
    n, k = 400, 10
    X, Y = rng.standard_normal((n, 30)), rng.standard_normal((n, 30))
    assert metrics.mutual_knn(X, Y, k=k) == pytest.approx(k / (n - 1), abs=0.01)
    assert abs(cka(X, Y, unbiased=True)) < 0.01  # unbiased: ~0 for independent data
    assert cka(X, Y) > 0.05  # biased: ~d/n-ish, clearly positive


@pytest.mark.parametrize("name", ["mutual_knn", "lcs_knn", "edit_distance_knn", "cknna"])
def test_knn_metrics_self_is_one(name):
    X, _ = data()
    assert METRICS[name](X, X) == pytest.approx(1.0, abs=1e-12)


def test_cca_family_against_references():
    X, Y = data(200, 6, 4, seed=8)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    # CCA by whitening: singular values of Cxx^-1/2 Cxy Cyy^-1/2.
    W = lambda A: np.linalg.inv(scipy.linalg.sqrtm(A.T @ A)).real
    rho = np.linalg.svd(W(Xc) @ Xc.T @ Yc @ W(Yc), compute_uv=False)
    assert metrics.cca(X, Y) == pytest.approx(rho.mean(), abs=1e-10)
    # SVCCA = CCA of the top-dim principal-component scores of each side.
    pcs = lambda A, r: A @ np.linalg.svd(A, full_matrices=False)[2][:r].T
    assert metrics.svcca(X, Y, dim=3) == pytest.approx(metrics.cca(pcs(Xc, 3), pcs(Yc, 3)), abs=1e-10)
    # Procrustes: 1 - min_R ||Xn - Yn R||^2 / 2 with Y zero-padded to X's width.
    Xn, Yn = Xc / np.linalg.norm(Xc), np.pad(Yc, ((0, 0), (0, 2))) / np.linalg.norm(Yc)
    R, _ = scipy.linalg.orthogonal_procrustes(Yn, Xn)
    assert metrics.procrustes(X, Y) == pytest.approx(1 - np.linalg.norm(Xn - Yn @ R) ** 2 / 2, abs=1e-10)


def test_cca_rank_deficient_is_finite():
    rng = np.random.default_rng(9)
    X = rng.standard_normal((50, 3)) @ rng.standard_normal((3, 8))  # rank 3 in 8 columns
    Y = np.hstack([X[:, :2], np.ones((50, 2))])  # two constant columns
    for f in (metrics.cca, metrics.svcca, metrics.procrustes):
        v = f(X, Y)
        assert math.isfinite(v) and 0 <= v <= 1
    assert metrics.cca(X, X) == pytest.approx(1.0, abs=1e-10)


def test_constant_representation_gives_zero():
    X, _ = data()
    C = np.ones((len(X), 3))
    assert cka(X, C) == 0.0 and cka(X, C, unbiased=True) == 0.0
    assert metrics.procrustes(X, C) == 0.0 and metrics.cca(X, C) == 0.0


def test_inputs_numpy_torch_int_float32_agree():
    X, Y = data(seed=10)
    ref = cka(X, Y)
    assert cka(torch.from_numpy(X), torch.from_numpy(Y)) == pytest.approx(ref, abs=1e-12)
    assert cka(torch.from_numpy(X).float().requires_grad_(), Y) == pytest.approx(ref, abs=1e-5)
    assert math.isfinite(cka(np.arange(20).reshape(10, 2) ** 2, Y[:10]))


@pytest.mark.parametrize("name", sorted(METRICS))
def test_registry_sweep(name):
    X, Y = data(50, 8, 6, seed=11)
    f = get_metric(name)
    v = f(X, Y)
    assert isinstance(v, float) and math.isfinite(v)
    assert -1.0 <= v <= 1.0 + 1e-12
    assert f(X, Y) == v  # deterministic


def test_registry_names():
    required = {"cka", "unbiased_cka", "rbf_cka", "mutual_knn", "cycle_knn", "lcs_knn",
                "edit_distance_knn", "cknna", "svcca", "cca", "procrustes"}
    assert required <= set(METRICS)


# ----------------------------------------------------------------------------- kernel builders
def test_kernel_builders():
    X, _ = data(20, 4, 2, seed=12)
    for K in (linear_kernel(X), cosine_kernel(X), polynomial_kernel(X), rbf_kernel(X)):
        assert K.shape == (20, 20) and np.allclose(K, K.T)
    np.testing.assert_allclose(linear_kernel(X), X @ X.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(cosine_kernel(X)), 1.0, atol=1e-12)
    np.testing.assert_allclose(polynomial_kernel(X, degree=2, gamma=0.5, coef0=2),
                               (0.5 * X @ X.T + 2) ** 2, atol=1e-10)
    np.testing.assert_allclose(polynomial_kernel(X), (X @ X.T / 4 + 1) ** 3, atol=1e-10)
    np.testing.assert_allclose(rbf_kernel(X), naive_rbf(X, np.median(pdist(X))), atol=1e-12)
    np.testing.assert_allclose(rbf_kernel(X, sigma=0.7), naive_rbf(X, 0.7), atol=1e-12)


def test_kernel_builder_refuses_large_n(monkeypatch):
    monkeypatch.setattr(kernels, "KERNEL_MAX_ROWS", 10)
    with pytest.raises(ValueError, match="blockwise"):
        linear_kernel(np.zeros((11, 2)))


# ----------------------------------------------------------------------------- errors
X0, Y0 = data(20, 3, 3)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_error_row_mismatch(name):
    with pytest.raises(ValueError, match="same number of rows"):
        METRICS[name](X0, Y0[:-1])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ["cka", "rbf_cka", "mutual_knn", "svcca"])
def test_error_non_finite(name, bad):
    X = X0.copy()
    X[4, 1] = bad
    with pytest.raises(ValueError, match="NaN or inf .* row 4"):
        METRICS[name](X, Y0)


@pytest.mark.parametrize("shape", [(20,), (20, 3, 1), ()])
def test_error_not_2d(shape):
    with pytest.raises(ValueError, match="2-D"):
        cka(np.zeros(shape), Y0)


def test_error_unbiased_needs_four_rows():
    with pytest.raises(ValueError, match="n >= 4"):
        cka(X0[:3], Y0[:3], unbiased=True)
    with pytest.raises(ValueError, match="n >= 4"):
        metrics.cknna(X0[:3], Y0[:3], k=1)
    assert math.isfinite(cka(X0[:3], Y0[:3]))  # the biased estimator is fine with n = 3


@pytest.mark.parametrize("name", KNN_METRICS)
@pytest.mark.parametrize("k", [20, 25, 0])
def test_error_bad_k(name, k):
    with pytest.raises(ValueError, match=f"k={k} must satisfy"):
        METRICS[name](X0, Y0, k=k)


def test_error_unknown_names():
    with pytest.raises(ValueError, match="Did you mean: cka"):
        get_metric("ckaa")
    with pytest.raises(ValueError, match="mutual_knn"):
        get_metric("mutual-knn")
    with pytest.raises(ValueError, match="Did you mean: rbf"):
        cka(X0, Y0, kernel="rbff")
    with pytest.raises(ValueError, match="only to kernel='rbf'"):
        cka(X0, Y0, sigma=1.0)
    with pytest.raises(ValueError, match="sigma must be"):
        cka(X0, Y0, kernel="rbf", sigma=-1.0)
    with pytest.raises(ValueError, match="median pairwise distance is 0"):
        cka(np.ones((10, 2)), Y0[:10], kernel="rbf")


def test_old_import_paths_reexport_the_same_objects():
    import analyze.kernels
    import analyze.metrics

    assert analyze.metrics.get_metric is get_metric and analyze.metrics.METRICS is METRICS
    assert analyze.metrics.cka is cka and analyze.kernels.rbf_kernel is rbf_kernel


def test_metric_errors_are_pipeline_errors():
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="Did you mean: cka"):
        get_metric("ckaa")
    with pytest.raises(PipelineError, match="n >= 4"):
        cka(X0[:3], Y0[:3], unbiased=True)
