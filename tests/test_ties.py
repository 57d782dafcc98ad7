"""Ties count against the query wherever a rank is computed (retrieval, zero-shot, the matching's
score-matrix rows, the gallery), identical embeddings tie exactly, and collapsed embeddings are
flagged: hand-computed cases, fully tied inputs, and a run whose baselines collapse."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch

from analyze.gallery import _order
from analyze.report import _ties_sentence
from analyze.zeroshot import accuracy, class_scores, true_ranks
from tests.test_train import make_cache, tiny_cfg
from train.fit import fit_adapters
from train.retrieval import (cosine_scores, is_collapsed, ranks_from_scores, recall_at_k, retrieval_summary,
                             summarize_ranks)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fully_tied_inputs_score_at_the_floor_not_one(caplog):
    """Every image and caption identical: each correct item ties every wrong one, so it ranks last."""
    n = 12
    with caplog.at_level(logging.WARNING, logger="train.retrieval"):
        res = retrieval_summary(np.ones((n, 4)), np.ones((n, 4)), np.arange(n))
    for way in ("i2t", "t2i"):
        assert res[f"{way}_R@1"] == 0.0 and res[f"{way}_R@5"] == 0.0 and res[f"{way}_R@10"] == 0.0
        assert res[f"{way}_medr"] == n and res[f"{way}_meanr"] == n  # ranked after the n - 1 wrong ones
    assert res["ties"] == 1.0 and res["collapsed"] == 1.0
    assert "collapsed embeddings" in caplog.text and "image (12 rows), text (12 rows)" in caplog.text
    # the same rule on a precomputed score matrix, and with several captions per image
    r = ranks_from_scores(np.zeros((3, 6)), np.repeat(np.arange(3), 2))
    assert r["i2t"].tolist() == [4, 4, 4] and r["t2i"].tolist() == [2] * 6
    assert summarize_ranks(r)["mean_R"] == pytest.approx((0 + 1 + 1 + 0 + 1 + 1) / 6)  # R@5, R@10 reach past 4 / 2


def test_partial_ties_by_hand_with_several_captions():
    images = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # i0, i1, i2 (cosine 1/sqrt(2) to both axes)
    captions = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])  # c0, c1 of i0; c2 of i1; c3 of i2
    t2i = np.array([0, 0, 1, 2])
    # cosines: i0 -> (1, 0, 0, 1), i1 -> (0, 1, 1, 0), i2 -> (.71, .71, .71, .71)
    # t2i rank = other images scoring >= the caption's own: c0 0; c1 2 (i1 1, i2 .71 >= 0); c2 0; c3 1 (i0 1 >= .71)
    # i2t rank = other images' captions scoring >= the best own: i0 1 (c3 ties at 1); i1 1 (c1 ties); i2 3 (all .71)
    ranks_t2i, ranks_i2t = [0, 2, 0, 1], [1, 1, 3]
    res = retrieval_summary(images, captions, t2i, ks=(1, 2))
    assert res["t2i_R@1"] == pytest.approx(2 / 4) and res["t2i_R@2"] == pytest.approx(3 / 4)
    assert res["i2t_R@1"] == 0.0 and res["i2t_R@2"] == pytest.approx(2 / 3)
    assert res["i2t_meanr"] == pytest.approx(np.mean(ranks_i2t) + 1)
    assert res["t2i_meanr"] == pytest.approx(np.mean(ranks_t2i) + 1)
    assert res["ties"] == pytest.approx(3 / 7)  # the three image queries; no caption query ties a wrong image
    S = cosine_scores(images, captions)  # the same exact scores, ranked by ranks_from_scores
    assert ranks_from_scores(S, t2i)["i2t"].tolist() == ranks_i2t
    assert ranks_from_scores(S, t2i)["t2i"].tolist() == ranks_t2i


def test_identical_rows_tie_exactly_whatever_their_position():
    """Plain float32 products of identical rows differ in the last bit with their place in a matrix
    product; on the exact grid they are equal, so 700 copies of one vector all tie."""
    v = np.random.default_rng(0).normal(size=(1, 97)).astype(np.float32)
    X = np.repeat(v, 700, axis=0)
    res = retrieval_summary(X, X, np.arange(700))
    assert res["i2t_R@10"] == 0.0 and res["t2i_R@10"] == 0.0 and res["collapsed"] == 1.0
    assert recall_at_k(X, X, np.arange(700), block=7) == recall_at_k(X, X, np.arange(700))
    unit = torch.from_numpy(X[:3].astype(np.float64) / np.linalg.norm(v))
    assert is_collapsed(unit) and not is_collapsed(torch.eye(3, dtype=torch.float64))


def test_zero_shot_uses_the_same_rule_and_exact_scores():
    classes = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # classes 0 and 1 identical: always tied
    images = np.array([[1.0, 0.1], [0.2, 1.0]])
    assert true_ranks(class_scores(images, classes), [0, 2]).tolist() == [1, 0]
    assert accuracy(images, classes, [1, 2], ks=(1, 2)) == {"top1": 0.5, "top2": 1.0}
    assert class_scores(np.zeros((1, 2)), classes).tolist() == [[0.0, 0.0, 0.0]]  # a zero row ties every class


def test_gallery_lists_a_tied_wrong_item_first():
    scores = np.array([0.5, 0.9, 0.9, 0.1])
    correct = np.array([False, True, False, False])
    assert _order(scores, correct).tolist() == [2, 1, 0, 3]


def test_collapsed_baselines_of_two_train_pairs_sit_at_chance(tmp_path):
    """train_fraction = 0.04 of 50 images keeps 2: CCA and Procrustes map to 1 dimension, where every
    score is +-1 and most queries tie. Counted against the query they no longer look like 0.69."""
    cache = make_cache(tmp_path, policy="first", splits={"train": 50, "val": 20, "test": 30}, reference="")
    cfg = tiny_cfg(cache, train_fraction=0.04, epochs=2, name="two", reference="")
    res = fit_adapters(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, captions="first")), progress=False)
    assert res.metrics.sizes["train"]["pairs"] == 2
    for name in ("cca", "procrustes"):
        r = res.metrics.test[name]
        assert r["ties"] > 0.5 and r["mean_R"] < 0.35, (name, r)
        assert r["t2i_R@1"] <= 2 / 30 + 1e-9
    assert "ties" in res.metrics.test["infonce"] and res.metrics.test["infonce"]["collapsed"] == 0.0


def test_report_sentence_names_ties_and_collapsed_methods():
    text = _ties_sentence({"cca": 0.8, "infonce": 0.01}, ["cca"])
    assert "cca 80.0%" in text and "Collapsed embeddings" in text and "cca" in text.split("Collapsed")[1]
