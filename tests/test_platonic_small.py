"""The Platonic test's verdicts and numbers on samples too small or too degenerate to support
them: a minimum of rows, too few resamples, exact permutation nulls with few rows, intervals
kept inside the metric's range, and constant features / tie-decided kNN graphs marked."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from analyze import resampling
from analyze.compare import compare_entries
from analyze.metrics import METRICS, cka, mutual_knn
from analyze.nulls import exact_permutations, permutations_of
from analyze.platonic import headline, hypothesis_test
from pipeline.cache import entry_path, write_entry
from pipeline.config import load_config
from similarity.degenerate import degenerate, is_constant, knn_tie_share
from similarity.metrics import value_range

pytestmark = pytest.mark.usefixtures("one_thread")


def reps(n: int, seed: int = 0):
    """X, Y, RX, RY, ref of a shared latent: related, so a large sample would give verdicts."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4))
    noisy = lambda d, s: z @ rng.normal(size=(4, d)) + s * rng.normal(size=(n, d))  # noqa: E731
    return noisy(6, 0.5), noisy(5, 1.0), noisy(8, 0.2), noisy(8, 0.4), noisy(7, 0.1)


def test_three_rows_say_too_few_rows_with_an_exact_null():
    X, Y, RX, RY, ref = reps(3)
    out = hypothesis_test(X, Y, RX, RY, ref, {"cka": METRICS["cka"]}, k=1, bootstrap=20, permutations=20)
    r = out["cka"]
    assert all(r["delta"][s]["verdict"] == resampling.TOO_FEW_ROWS for s in ("image", "text"))
    assert "below the minimum of 10" in r["delta"]["image"]["reason"]
    assert r["null_draws"] == 5 and r["null_exact"]  # the 3! - 1 other pairings, each once
    assert min(t["p_value"] for t in r["terms"].values()) >= 1 / 6
    assert headline(out).startswith("Platonic hypothesis not tested (too few rows)")


def test_exact_null_p_value_equals_the_share_of_all_pairings():
    X, Y, RX, RY, ref = reps(5, seed=1)
    r = hypothesis_test(X, Y, RX, RY, ref, {"cka": METRICS["cka"]}, k=1, bootstrap=0, permutations=200)["cka"]
    assert r["null_draws"] == 119 and r["null_exact"]
    observed = cka(RX, ref)
    every = [cka(RX, ref[list(p)]) for p in itertools.permutations(range(5))]  # identity included
    assert r["terms"]["after_image"]["p_value"] == pytest.approx(np.mean([v >= observed - 1e-12 for v in every]))


def test_exact_permutations_are_every_other_pairing_once():
    perms = exact_permutations(4, 30)
    assert perms.shape == (23, 4) and len({tuple(p) for p in perms}) == 23
    assert not any((p == np.arange(4)).all() for p in perms)
    assert exact_permutations(4, 22) is None and exact_permutations(20, 10**9) is None
    np.testing.assert_array_equal(permutations_of(4, 30, seed=0), perms)  # analyze cka --calibrate, layers too
    assert permutations_of(30, 7, seed=0).shape == (7, 30)


def test_few_resamples_make_a_percentile_verdict_inconclusive():
    X, Y, RX, RY, ref = reps(60, seed=2)
    r = hypothesis_test(X, Y, RX, RY, ref, {"mutual_knn": METRICS["mutual_knn"], "cka": METRICS["cka"]}, k=5,
                        bootstrap=1, permutations=50)
    knn = r["mutual_knn"]["delta"]
    assert {knn[s]["verdict"] for s in ("image", "text")} == {"inconclusive"}
    assert "from 1 resamples" in knn["image"]["reason"]
    # CKA's delta interval is the jackknife one (all n leave-one-out rows): not overridden
    assert "resamples" not in r["cka"]["delta"]["image"]["reason"]


def test_intervals_never_leave_the_metrics_range():
    X, Y, RX, RY, ref = reps(12, seed=3)
    out = hypothesis_test(X, Y, RX, RY, ref, {m: METRICS[m] for m in ("cka", "unbiased_cka", "mutual_knn")}, k=3,
                          bootstrap=60, permutations=60)
    for m, r in out.items():
        lo, hi = value_range(m)
        for t in r["terms"].values():
            assert lo <= t["ci_lo"] <= t["ci_hi"] <= hi, (m, t)
        for d in r["delta"].values():
            assert lo - hi <= d["ci_lo"] <= d["ci_hi"] <= hi - lo, (m, d)
        for c in r["controls"].values():
            for d in c["delta"].values():
                assert lo - hi <= d["excess_ci_lo"] <= d["excess_ci_hi"] <= hi - lo
        assert set(r["clipped"]) <= {"terms", "differences"}


def test_clipper_clips_and_records():
    clipped = []
    fn = resampling.clipper(0.0, 1.0, clipped, "terms")(lambda th, dr: (np.array([-0.2, 0.3]), np.array([0.5, 1.4])))
    lo, hi = fn(None, None)
    assert lo.tolist() == [0.0, 0.3] and hi.tolist() == [0.5, 1.0] and clipped == ["terms"]
    clipped2 = []
    resampling.clipper(0.0, 1.0, clipped2, "terms")(lambda th, dr: (np.array([np.nan]), np.array([np.nan])))(0, 0)
    assert clipped2 == []  # NaN (no resamples) is not "outside"


# ----------------------------------------------------------------------------- constant and tied features
def test_constant_features_are_degenerate_and_their_knn_graph_is_ties():
    rng = np.random.default_rng(0)
    C, X = np.ones((30, 4)), rng.normal(size=(30, 4))
    assert mutual_knn(C, 3 * C, k=3) == 1.0  # the lowest-index rule picks the same neighbours: not a measurement
    assert is_constant(C) and is_constant(np.zeros((5, 2))) and not is_constant(X)
    assert knn_tie_share(C, 3) == 1.0 and knn_tie_share(X, 3) == 0.0
    assert knn_tie_share(np.sign(rng.normal(size=(30, 1))), 3) == 1.0  # 1-d: cosine +-1, all tied
    assert degenerate(X, 3) is None and "constant" in degenerate(C)
    assert "decided by ties in 100%" in degenerate(np.sign(rng.normal(size=(30, 1))), 3)


def test_platonic_marks_a_constant_representation_inconclusive():
    X, Y, RX, RY, ref = reps(40, seed=4)
    RX = np.ones_like(RX)  # a collapsed aligned image embedding
    out = hypothesis_test(X, Y, RX, RY, ref, {"mutual_knn": METRICS["mutual_knn"], "cka": METRICS["cka"]}, k=3,
                          bootstrap=50, permutations=50)
    for m in ("mutual_knn", "cka"):
        assert out[m]["degenerate"] == {"image aligned": "constant features (every row the same)"}
        for s in ("image", "text"):
            assert out[m]["delta"][s]["verdict"] == "inconclusive"
            assert "not measurements" in out[m]["delta"][s]["reason"]


def test_analyze_cka_marks_scores_of_a_constant_entry(tmp_path, caplog):
    rng = np.random.default_rng(5)
    ids = [f"s{i:02d}" for i in range(30)]
    for name, feats in (("a", rng.normal(size=(30, 6))), ("b", rng.normal(size=(30, 5))), ("flat", np.ones((30, 4)))):
        key = {"entry": name, "dataset": "fake", "split": "test", "fingerprint": "fp"}
        write_entry(entry_path(tmp_path / "cache", "fake", "test", name), name, ids, feats.astype(np.float32), key, {})
    cfg = load_config(None, options={"data.cache": str(tmp_path / "cache"), "data.dataset": "fake",
                                     "analyze.metrics": ["mutual_knn", "cka"], "analyze.k": 3,
                                     "analyze.out": str(tmp_path / "out")})
    with caplog.at_level("WARNING", logger="analyze.compare"):
        doc = compare_entries(cfg)
    assert "flat: mutual_knn, cka scores are not measurements" in caplog.text
    names = doc["entries"]
    f, a = names.index("flat"), names.index("a")
    for m in ("mutual_knn", "cka"):
        assert np.isnan(doc["scores"][m][f]).all() and np.isnan(doc["scores"][m][:, f]).all()
        assert np.isfinite(doc["scores"][m][a, names.index("b")])
        assert doc["degenerate"][m] == {"flat": "constant features (every row the same)"}
    saved = json.loads((doc["out"] / "scores.json").read_text())
    assert saved["scores"]["mutual_knn"][f][a] is None  # NaN is stored as null
