"""Calibrated scores and controls in the Platonic test, and calibration in analyze cka / layers.

Synthetic arrays for the statistics; a tiny fit-adapters run (tests.test_train.make_cache) for
the controls, which need the run's adapters and the train split.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from analyze import platonic
from analyze.calibration import calibrate
from analyze.cli import main
from analyze.compare import AnalyzeError
from analyze.controls import CONTROLS, control_embeddings
from analyze.metrics import METRICS
from analyze.nulls import calibrated_layers
from pipeline.cache import entry_path, write_entry
from pipeline.config import load_config
from tests.test_train import make_cache
from train.fit import fit_adapters

METRIC3 = {m: METRICS[m] for m in ("cka", "unbiased_cka", "mutual_knn")}
FLAT_SIDE = ("before_{s}", "after_{s}", "delta_{s}", "delta_{s}_ci_lo", "delta_{s}_ci_hi", "p_{s}",
             "calibrated_before_{s}", "calibrated_after_{s}", "calibrated_delta_{s}", "verdict_{s}",
             "beats_controls_{s}")
FLAT_CONTROL = ("after_{s}", "calibrated_after_{s}", "delta_{s}", "delta_{s}_ci_lo", "delta_{s}_ci_hi",
                "excess_{s}", "excess_{s}_ci_lo", "excess_{s}_ci_hi", "exceeds_{s}")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _data(seed=0, n=80):
    """X, Y: unrelated to ref; R: a linear map of ref; noise: unrelated; ref."""
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(n, 12))
    return (rng.normal(size=(n, 10)), rng.normal(size=(n, 8)), ref @ rng.normal(size=(12, 6)),
            rng.normal(size=(n, 6)), ref)


# ----------------------------------------------------------------------------- statistics
def test_a_control_equal_to_the_trained_embeddings_has_zero_excess_and_the_same_delta():
    X, Y, R, noise, ref = _data()
    rng = np.random.default_rng(7)
    unrelated = [(rng.normal(size=(80, 6)), rng.normal(size=(80, 6))) for _ in range(3)]
    res = platonic.hypothesis_test(X, Y, R, noise, ref, METRIC3, k=5, bootstrap=60, permutations=40,
                                   controls={"same": [(R, noise)], "random": unrelated})
    alone = platonic.hypothesis_test(X, Y, R, noise, ref, METRIC3, k=5, bootstrap=60, permutations=40)
    for m, r in res.items():
        same = r["controls"]["same"]
        assert same["seeds"] == 1 and r["controls"]["random"]["seeds"] == 3
        for side in ("image", "text"):
            d = same["delta"][side]
            assert d["delta"] == pytest.approx(r["delta"][side]["delta"], abs=1e-12)
            assert d["excess"] == 0 and d["excess_ci_lo"] == pytest.approx(0, abs=1e-12) and d["exceeds"] is False
            assert (d["ci_lo"], d["ci_hi"]) == pytest.approx((r["delta"][side]["ci_lo"], r["delta"][side]["ci_hi"]))
            # adding controls changes nothing about the trained statistics (same draws)
            for key in ("delta", "ci_lo", "ci_hi", "verdict", "calibrated_delta"):
                assert r["delta"][side][key] == pytest.approx(alone[m]["delta"][side][key], abs=1e-9)
            assert r["delta"][side]["beats_controls"] is False  # never beats a copy of itself
        rnd = r["controls"]["random"]
        assert rnd["terms"]["after_image"]["score"] == pytest.approx(np.mean(rnd["terms"]["after_image"]["per_seed"]))
        assert rnd["delta"]["image"]["exceeds"] is True  # R is a map of the reference, the controls are noise
        assert "the trained delta does not exceed the same control" in r["delta"]["image"]["vs_controls"]
        assert "Controls:" in platonic.sentence(m, "image", r)
    assert alone["cka"]["controls"] == {} and alone["cka"]["delta"]["image"]["beats_controls"] is None


def test_calibrated_terms_use_the_shuffled_pairing_null():
    X, Y, R, noise, ref = _data(n=40)
    fn, perms_n = METRICS["procrustes"], 19
    res = platonic.hypothesis_test(X, Y, R, noise, ref, {"procrustes": fn}, k=5, bootstrap=0,
                                   permutations=perms_n, seed=3)
    _, _, perms = platonic._draws(40, 0, perms_n, 3, int(round(platonic.SUBSAMPLE_FRACTION * 40)))
    for term, A in zip(platonic.TERMS, (X, Y, R, noise)):
        want = calibrate(fn(A, ref), [fn(A, ref[p]) for p in perms])
        got = res["procrustes"]["terms"][term]
        assert (got["threshold"], got["p_value"], got["calibrated"]) == pytest.approx(
            (want.threshold, want.p_value, want.calibrated), abs=1e-9)
    t = res["procrustes"]["terms"]
    assert t["after_image"]["calibrated"] > 0.5 and t["after_text"]["calibrated"] == 0.0
    d = res["procrustes"]["delta"]["image"]
    assert d["calibrated_delta"] == pytest.approx(
        t["after_image"]["calibrated"] - (t["before_image"]["calibrated"] + t["before_text"]["calibrated"]) / 2)


def test_flat_results_names():
    X, Y, R, noise, ref = _data(n=40)
    res = platonic.hypothesis_test(X, Y, R, noise, ref, {"cka": METRICS["cka"]}, k=5, bootstrap=10,
                                   permutations=10, controls={"cca": [(noise, R)]})
    flat = platonic.flat_results(res)
    want = {f"cka.{f.format(s=s)}" for s in ("image", "text") for f in FLAT_SIDE}
    want |= {f"cka.control_cca.{f.format(s=s)}" for s in ("image", "text") for f in FLAT_CONTROL}
    assert set(flat) == want
    assert flat["cka.delta_image"] == res["cka"]["delta"]["image"]["delta"]
    assert flat["cka.control_cca.excess_image"] == pytest.approx(flat["cka.after_image"] - flat["cka.control_cca.after_image"])
    assert flat["cka.beats_controls_image"] in (0.0, 1.0)


# ----------------------------------------------------------------------------- with a real run
@pytest.fixture(scope="module")
def run_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("controls")
    cache = make_cache(root / "cache", policy="all", splits={"train": 120, "val": 30, "test": 60})
    opts = {"data.cache": str(cache), "data.dataset": "fake", "train.epochs": 3, "train.batch_size": 32,
            "train.lr": 3e-3, "train.dim": 16, "train.device": "cpu", "train.name": "run",
            "train.reference": "dinov2", "analyze.k": 5, "analyze.bootstrap": 30, "analyze.permutations": 30,
            "analyze.out": str(root / "reports"), "analyze.kernel_rows": 20}
    cfg = load_config(None, options=opts)
    fit_adapters(cfg, progress=False)
    return cfg


def test_platonic_test_reports_controls_and_calibrated_scores(run_cfg):
    res = platonic.platonic_test(run_cfg, kernels=False)
    assert set(res["controls"]) == set(CONTROLS)
    assert not any(note.startswith("skipped") for note in res["controls"].values()), res["controls"]
    for m, r in res["results"].items():
        assert set(r["controls"]) == set(CONTROLS) and r["controls"]["random"]["seeds"] == 3
        seeds = r["controls"]["random"]["terms"]["after_image"]["per_seed"]
        assert len(set(np.round(seeds, 12))) == 3  # three different initialisations
        for side in ("image", "text"):
            assert "Controls:" in res["sentences"][m][side]
            assert 0 <= r["terms"][f"after_{side}"]["calibrated"] <= 1
    doc = json.loads((res["out"] / "platonic.json").read_text())
    assert doc["flat"]["cka.control_procrustes.delta_text"] == pytest.approx(
        res["results"]["cka"]["controls"]["procrustes"]["delta"]["text"]["delta"])
    summary = list(csv.DictReader(open(res["out"] / "platonic_summary.csv")))
    assert len(summary) == 1 and summary[0]["run"] == "run"
    for m in METRIC3:
        for s in ("image", "text"):
            for f in FLAT_SIDE:
                assert f"{m}.{f.format(s=s)}" in summary[0]
            for c in CONTROLS:
                for f in FLAT_CONTROL:
                    assert f"{m}.control_{c}.{f.format(s=s)}" in summary[0]
    terms = {r["term"] for r in csv.DictReader(open(res["out"] / "platonic.csv"))}
    assert {"control_random.excess_image", "control_cca.after_text", "control_procrustes.delta_image"} <= terms
    assert "exceeds every control" in res["headline"]


def test_control_embeddings_skip_with_a_note_and_check_names(run_cfg):
    X = np.random.default_rng(0).normal(size=(10, 24)).astype(np.float32)
    Y = np.random.default_rng(1).normal(size=(10, 20)).astype(np.float32)
    out = control_embeddings(run_cfg, "no-such-run", X, Y)
    assert out.notes["random"].startswith("skipped") and "random" not in out.embeddings
    assert out.embeddings["cca"][0][0].shape == (10, 16)  # fitted on the train split at the configured dim
    cfg = load_config(None, options={**_opts(run_cfg), "analyze.controls": ["randm"]})
    with pytest.raises(AnalyzeError, match="Did you mean: random"):
        control_embeddings(cfg, "run", X, Y)
    cfg = load_config(None, options={**_opts(run_cfg), "analyze.controls": []})
    assert control_embeddings(cfg, "run", X, Y).embeddings == {}


def _opts(cfg):
    return {"data.cache": cfg.data.cache, "data.dataset": cfg.data.dataset}


# ----------------------------------------------------------------------------- analyze cka / layers
@pytest.fixture(scope="module")
def layer_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("layers")
    rng = np.random.default_rng(0)
    n, ids = 50, [f"s{i:03d}" for i in range(50)]
    Z = rng.normal(size=(n, 4))
    feats = {"a": Z @ rng.normal(size=(4, 8)) + 0.2 * rng.normal(size=(n, 8)),
             "b": Z @ rng.normal(size=(4, 6)) + 0.2 * rng.normal(size=(n, 6)),
             "c": rng.normal(size=(n, 7))}
    layers = {"a": [rng.normal(size=(n, 5)), feats["a"]], "b": [rng.normal(size=(n, 5)), rng.normal(size=(n, 5)), feats["b"]],
              "c": [rng.normal(size=(n, 5)), feats["c"]]}
    for name, X in feats.items():
        key = {"entry": name, "dataset": "toy", "split": "test", "fingerprint": "fp"}
        write_entry(entry_path(root / "cache", "toy", "test", name), name, ids, X.astype(np.float32), key,
                    {"note": "synthetic"}, layers=[L.astype(np.float32) for L in layers[name]])
    config = root / "a.toml"
    config.write_text(f'[data]\ndataset = "toy"\ncache = "{root / "cache"}"\n'
                      f'[analyze]\nk = 5\nout = "{root / "reports"}"\npermutations = 19\n')
    return config


def test_cka_calibrate_adds_calibrated_tables(layer_cache):
    res = CliRunner().invoke(main, ["cka", "--entries", "a,b,c", "--metric", "cka,mutual_knn", "--calibrate",
                                    "--config", str(layer_cache)])
    assert res.exit_code == 0, res.output
    assert "calibrated against 19 shuffled pairings" in res.output
    folder = layer_cache.parent / "reports" / "toy" / "test" / "cka"
    doc = json.loads((folder / "scores.json").read_text())
    for m in ("cka", "mutual_knn"):
        C, P = np.array(doc["calibrated"][m]), np.array(doc["p_value"][m])
        assert C.shape == (3, 3) and ((0 <= C) & (C <= 1)).all()
        assert C[0, 1] > 0 and P[0, 1] == pytest.approx(1 / 20)  # a and b share the latent signal
        assert C[0, 2] == 0 and C[1, 2] == 0  # c is unrelated
    rows = list(csv.DictReader(open(folder / "scores.csv")))
    assert {"calibrated", "threshold", "p_value"} <= set(rows[0])
    res = CliRunner().invoke(main, ["cka", "--entries", "a,b", "--metric", "cka", "--config", str(layer_cache)])
    assert "calibrated" not in json.loads((folder / "scores.json").read_text())


def test_layers_calibrates_the_maximum_over_layer_pairs(layer_cache):
    res = CliRunner().invoke(main, ["layers", "--pair", "a,b", "--metric", "cka", "--config", str(layer_cache)])
    assert res.exit_code == 0, res.output
    doc = json.loads((layer_cache.parent / "reports" / "toy" / "test" / "layers" / "a--b" / "cka.json").read_text())
    assert doc["best"]["calibrated"] > 0 and doc["best"]["p_value"] == pytest.approx(1 / 20)
    assert "calibrated" in res.output and len(doc["calibrated_scores"]) == 2


def test_the_maximum_null_is_stricter_than_a_single_cell_null():
    rng = np.random.default_rng(2)
    A = [rng.normal(size=(40, 5)) for _ in range(4)]
    B = [rng.normal(size=(40, 6)) for _ in range(5)]
    fn = METRICS["cka"]
    S = np.array([[fn(a, b) for b in B] for a in A])
    cal = calibrated_layers("cka", fn, {}, A, B, S, 39, seed=0)
    i, j = np.unravel_index(S.argmax(), S.shape)
    assert cal["best"]["threshold"] >= cal["cells"]["threshold"][i, j]
    assert cal["best"]["p_value"] >= cal["cells"]["p_value"][i, j]
    assert cal["best"]["p_value"] > 0.05 and cal["best"]["calibrated"] == 0  # nothing is related
    assert cal["null_max"].shape == (39,)


# ----------------------------------------------------------------------------- kNN resampling
def test_mutual_knn_bootstrap_takes_neighbours_among_distinct_drawn_rows():
    """Naive definition: neighbours among the distinct drawn rows (self excluded), per-row overlap
    weighted by how often the row was drawn."""
    from analyze.metrics import nearest_neighbours

    X, Y, R, noise, ref = _data(n=70)
    engine = platonic.FAST_PATHS["mutual_knn"].build([X, R], ref, 5)
    rng = np.random.default_rng(5)
    for size in (70, 12):  # 12 draws: few distinct rows, so most lists need the exact fallback
        rows = rng.integers(0, 70, size)
        u, counts = np.unique(rows, return_counts=True)
        iy = nearest_neighbours(ref[u], 5)[0].numpy()
        want = []
        for A in (X, R):
            ix = nearest_neighbours(A[u], 5)[0].numpy()
            overlap = (ix[:, :, None] == iy[:, None, :]).sum(axis=(1, 2)) / 5
            want.append(float((overlap * counts).sum() / counts.sum()))
        np.testing.assert_allclose(engine.resample(rows[None])[0], want, atol=1e-12)


def test_knn_metrics_without_fast_path_keep_rescaled_subsampling():
    X, Y, R, noise, ref = _data(n=40)
    res = platonic.hypothesis_test(X, Y, R, noise, ref, {"cycle_knn": METRICS["cycle_knn"]}, k=5, bootstrap=5,
                                   permutations=0)
    assert res["cycle_knn"]["resampling"].startswith("subsampling without replacement, 32 of 40 rows")


@pytest.mark.parametrize("name", ["cka", "unbiased_cka"])
def test_closed_form_jackknife_equals_leave_one_out_resamples(name):
    X, Y, R, noise, ref = _data(n=30)
    engine = platonic.FAST_PATHS[name].build([X, Y, R, noise], ref, None)
    loo = np.stack([np.delete(np.arange(30), i) for i in range(30)])
    np.testing.assert_allclose(engine.jackknife(), engine.resample(loo), atol=1e-12)
    np.testing.assert_allclose(engine.resample(loo[:3]), [[METRICS[name](A[r], ref[r]) for A in (X, Y, R, noise)]
                                                         for r in loo[:3]], atol=1e-10)


def test_cka_deltas_use_the_jackknife_normal_interval():
    X, Y, R, noise, ref = _data(n=50)
    res = platonic.hypothesis_test(X, Y, R, noise, ref, METRIC3, k=5, bootstrap=20, permutations=0)
    assert res["cka"]["difference_interval"].startswith("normal, jackknife")
    assert res["mutual_knn"]["difference_interval"].startswith("re-centred percentile")
    engine = platonic.FAST_PATHS["cka"].build([X, Y, R, noise], ref, None)
    jack = platonic._deltas(engine.jackknife())
    d = res["cka"]["delta"]["image"]
    se = np.sqrt(49 / 50 * ((jack[:, 0] - jack[:, 0].mean()) ** 2).sum())
    assert (d["ci_lo"], d["ci_hi"]) == pytest.approx((d["delta"] - 1.959964 * se, d["delta"] + 1.959964 * se))
