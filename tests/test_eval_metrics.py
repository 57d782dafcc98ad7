"""Figures the field quotes, and the proposal's exact formulation: RSUM and median/mean ranks,
uncentred kernel alignment, VSE++ and one-directional / unnormalised InfoNCE, each against a
direct implementation or hand-computed values."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import ortho_group

from analyze.metrics import METRICS, get_metric
from pipeline.config import TrainConfig
from train.losses import info_nce, multi_info_nce, pair_loss, vsepp
from train.retrieval import SUMMARY_KEYS, ranks_from_scores, recall_at_k, retrieval_summary, summarize_ranks


# ----------------------------------------------------------------------------- RSUM and ranks
def test_retrieval_summary_by_hand():
    img = np.eye(3)
    txt = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])  # captions 1 and 2 swapped
    res = retrieval_summary(img, txt, [0, 1, 2])
    # image 0 ranks its caption first; images 1 and 2 find theirs third (1 candidate above, 1 tied at 0,
    # and ties count against the query)
    assert res["i2t_R@1"] == pytest.approx(1 / 3) and res["i2t_R@5"] == 1.0
    assert res["i2t_medr"] == 3.0 and res["i2t_meanr"] == pytest.approx(7 / 3)
    assert res["t2i_medr"] == 3.0 and res["t2i_meanr"] == pytest.approx(7 / 3)
    assert res["ties"] == pytest.approx(4 / 6) and res["collapsed"] == 0.0
    assert res["rsum"] == pytest.approx(100 * (1 / 3 + 1 + 1 + 1 / 3 + 1 + 1))
    assert set(SUMMARY_KEYS) <= set(res)
    assert {k: res[k] for k in recall_at_k(img, txt, [0, 1, 2])} == recall_at_k(img, txt, [0, 1, 2])


def test_median_rank_of_an_even_count_is_the_mean_of_the_middle_two():
    res = summarize_ranks({"i2t": torch.tensor([0, 1, 3, 9]), "t2i": torch.tensor([0, 0, 0, 0])})
    assert res["i2t_medr"] == 3.0 and res["i2t_meanr"] == 4.25 and res["t2i_medr"] == 1.0


def test_ranks_from_scores_tie_rule_and_several_captions():
    S = np.array([[0.9, 0.9, 0.1], [0.2, 0.5, 0.5]])  # texts 0, 1 -> image 0; text 2 -> image 1
    r = ranks_from_scores(S, [0, 0, 1])
    assert r["i2t"].tolist() == [0, 1]  # ties count against the query, as in recall_at_k (image 1: text 1 ties)
    assert r["t2i"].tolist() == [0, 0, 0]


def test_ranks_from_scores_equal_the_cosine_ranking():
    rng = np.random.default_rng(1)
    img, txt = rng.standard_normal((7, 4)), rng.standard_normal((14, 4))
    t2i = np.repeat(np.arange(7), 2)
    unit = lambda A: A / np.linalg.norm(A, axis=1, keepdims=True)  # noqa: E731
    full = retrieval_summary(img, txt, t2i)
    assert summarize_ranks(ranks_from_scores(unit(img) @ unit(txt).T, t2i)) == pytest.approx(
        {k: v for k, v in full.items() if k not in ("ties", "collapsed")})


# ----------------------------------------------------------------------------- kernel alignment
def dense_alignment(X, Y):
    K, L = X @ X.T, Y @ Y.T
    return (K * L).sum() / (np.linalg.norm(K) * np.linalg.norm(L))


def test_kernel_alignment_against_dense_and_by_hand():
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((30, 5)), rng.standard_normal((30, 7))
    f = get_metric("kernel_alignment")
    assert f(X, Y) == pytest.approx(dense_alignment(X, Y), abs=1e-12)
    # by hand: K = L = I gives 1; K = I against L = 11' (n = 4) gives <I, 11'> / (||I|| ||11'||) = 4 / (2 * 4)
    assert f(np.eye(4), np.eye(4)) == pytest.approx(1.0)
    assert f(np.eye(4), np.ones((4, 1))) == pytest.approx(4 / (2 * 4))  # <I, 11'> = 4, ||I|| = 2, ||11'|| = 4
    assert f(np.zeros((4, 2)), X[:4]) == 0.0


def test_kernel_alignment_invariances_and_its_lack_of_centring():
    rng = np.random.default_rng(2)
    X, Y = rng.standard_normal((40, 6)), rng.standard_normal((40, 4))
    f = METRICS["kernel_alignment"]
    v = f(X, Y)
    assert f(X @ ortho_group.rvs(6, random_state=3), Y) == pytest.approx(v, abs=1e-12)
    assert f(3.5 * X, 0.2 * Y) == pytest.approx(v, abs=1e-12)
    assert f(X + 10.0, Y + 10.0) > v + 0.3  # uncentred: a shared offset inflates it (CKA would not move)


# ----------------------------------------------------------------------------- losses
def direct_info_nce(a, b, scale, normalize, both):
    if normalize:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    n, total = a.shape[0], 0.0
    for i in range(n):
        logits = [scale * float(a[i] @ b[j]) for j in range(n)]
        total += -(logits[i] - math.log(sum(math.exp(v) for v in logits)))
        if both:
            logits = [scale * float(b[i] @ a[j]) for j in range(n)]
            total += -(logits[i] - math.log(sum(math.exp(v) for v in logits)))
    return total / n / (2 if both else 1)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("direction", ["symmetric", "image_to_text"])
def test_info_nce_variants_against_direct_formula(normalize, direction):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    got = info_nce(a, b, 2.0, normalize=normalize, direction=direction)
    assert float(got) == pytest.approx(direct_info_nce(a, b, 2.0, normalize, direction == "symmetric"), rel=1e-10)


def direct_vsepp(a, b, margin, normalize, both):
    if normalize:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    s = (a @ b.T).tolist()
    n, total = len(s), 0.0
    for i in range(n):
        total += max(max(0.0, margin - s[i][i] + s[i][j]) for j in range(n) if j != i)
        if both:
            total += max(max(0.0, margin - s[i][i] + s[j][i]) for j in range(n) if j != i)
    return total / n


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("direction", ["symmetric", "image_to_text"])
def test_vsepp_against_direct_loop(normalize, direction):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64)
    got = vsepp(a, b, 0.3, normalize=normalize, direction=direction)
    assert float(got) == pytest.approx(direct_vsepp(a, b, 0.3, normalize, direction == "symmetric"), rel=1e-12)


def test_vsepp_zero_for_well_separated_pairs_and_gradients_flow():
    a = torch.eye(4, requires_grad=True)
    assert float(vsepp(a, torch.eye(4), margin=0.5).detach()) == 0.0  # s_ii = 1, s_ij = 0: margin 0.5 satisfied
    loss = vsepp(a, torch.eye(4).flip(0), margin=0.2)
    loss.backward()
    assert float(loss.detach()) > 0 and a.grad.abs().sum() > 0


def test_pair_loss_follows_the_config():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    default = pair_loss(TrainConfig())
    assert torch.allclose(default(a, b, 3.0), info_nce(a, b, 3.0))
    raw = pair_loss(dataclasses.replace(TrainConfig(), normalize=False, loss_direction="image_to_text"))
    assert torch.allclose(raw(a, b, 3.0), F.cross_entropy(3.0 * a @ b.T, torch.arange(5)))
    hinge = pair_loss(dataclasses.replace(TrainConfig(), loss="vsepp", margin=0.1))
    assert torch.allclose(hinge(a, b, 3.0), vsepp(a, b, 0.1))
    assert torch.allclose(multi_info_nce([a, b], 3.0, hinge), vsepp(a, b, 0.1))
    with pytest.raises(ValueError, match="Did you mean: vsepp"):
        pair_loss(dataclasses.replace(TrainConfig(), loss="vse++"))
    with pytest.raises(ValueError, match="loss direction"):
        info_nce(a, b, 1.0, direction="both")
