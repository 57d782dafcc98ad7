"""Tests of the analyze commands (cka, platonic, layers, pairs, report) on small synthetic caches.

The cache holds a toy dataset whose representations share a latent signal Z: a reference
("dinov2"), a noisy image encoder ("resnet18", with per-layer features), a weakly related
text encoder ("gpt2", two captions per image, ids <id>#k, per-layer features), a second
image and text encoder for pair ranking, and two fit-adapters runs: "good", whose aligned
entries are linear maps of the reference (the test must say "supported"), and "shuf", the
same with the rows shuffled against their ids (it must not).
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from analyze import compare, platonic, plots
from analyze.cli import main
from analyze.compare import AnalyzeError, pairwise_scores
from analyze.layers import best_and_last, layer_scores
from analyze.report import chance_recall
from pipeline.cache import entry_path, find_entry, write_entry
from pipeline.runs import aligned_name, is_aligned
from similarity.metrics import METRICS
from tests.fixtures import embedded_images

N = 120  # images in the test split
DATASET = "toy"
FAST = ["--bootstrap", "60", "--permutations", "60"]  # enough draws for the assertions, quick


def _key(name, modality, split="test", dim=0):
    return {"entry": name, "dataset": DATASET, "split": split, "fingerprint": f"fp-{split}",
            "encoder": {"name": name, "modality": modality, "weights": f"toy/{name}", "revision": None,
                        "pooling": "mean", "dim": dim}}


def _write(cache, split, name, ids, X, modality=None, layers=(), key=None):
    key = key or _key(name, modality, split, X.shape[1])
    write_entry(entry_path(cache, DATASET, split, name), name, ids, X.astype(np.float32), key,
                {"note": "synthetic"}, layers=list(layers))


def _run_folder(cache, run, image, text, mean_r=None) -> str:
    """A run folder with stand-in adapters (their sha256 recorded as fit-adapters does, and
    returned) and, with ``mean_r``, metrics and history."""
    d = Path(cache) / "runs" / run
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"source": "test", "data": {"dataset": DATASET},
                                               "train": {"image": image, "text": text, "name": run}}))
    (d / "adapters.safetensors").write_bytes(f"stand-in weights of {run}".encode())
    sha = hashlib.sha256((d / "adapters.safetensors").read_bytes()).hexdigest()
    (d / "adapters.json").write_text(json.dumps({"format": 2, "sha256": sha, "train": {}, "modalities": {}}))
    if mean_r is None:
        return sha
    rec = {f"{w}_R@{k}": min(1.0, mean_r * k / 5) for w in ("i2t", "t2i") for k in (1, 5, 10)}
    rec["mean_R"] = mean_r
    base = {key: v / 2 for key, v in rec.items()}
    (d / "metrics.json").write_text(json.dumps({"run": run, "best_epoch": 3, "adapter_sha256": sha, "test": {
        "infonce": rec, "cca": base, "procrustes": base}, "sizes": {"test": {"pairs": 2 * N, "image": N, "text": 2 * N}}}))
    with open(d / "history.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["epoch", "train_loss", "val_mean_R"])
        for e in range(1, 5):
            w.writerow([e, 4.0 / e, mean_r * e / 4])
    from analyze import plots

    plots.scatter([1, 2], [1, 2], ["a", "b"], "curves", d / "curves.png", xlabel="epoch", ylabel="loss")
    return sha


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("analyze")
    cache = root / "cache"
    rng = np.random.default_rng(0)
    ids = [str(1000 + i) for i in range(N)]
    cap_ids = [f"{i}#{k}" for i in ids for k in range(2)]
    Z = rng.normal(size=(N, 6))
    ref = Z @ rng.normal(size=(6, 32)) + 0.3 * rng.normal(size=(N, 32))
    image = np.tanh(Z @ rng.normal(size=(6, 24))) + 1.5 * rng.normal(size=(N, 24))
    text_img = 0.4 * Z @ rng.normal(size=(6, 20)) + rng.normal(size=(N, 20))
    text = np.repeat(text_img, 2, axis=0) + 0.1 * rng.normal(size=(2 * N, 20))
    noise = lambda d, n=N: rng.normal(size=(n, d))  # noqa: E731
    _write(cache, "test", "dinov2", ids, ref, "image")
    _write(cache, "test", "resnet18", ids, image, "image", layers=[noise(10), Z @ rng.normal(size=(6, 12)), image])
    gpt_layers = [noise(8, 2 * N), np.repeat(Z @ rng.normal(size=(6, 16)), 2, axis=0), noise(8, 2 * N), text]
    _write(cache, "test", "gpt2", cap_ids, text, "text", layers=gpt_layers)
    _write(cache, "test", "vit", ids, Z @ rng.normal(size=(6, 16)) + noise(16), "image")
    _write(cache, "test", "bert", cap_ids, np.repeat(Z @ rng.normal(size=(6, 12)), 2, axis=0) + noise(12, 2 * N), "text")
    # run "good": aligned entries are linear maps of the reference; run "shuf": rows shuffled against ids
    W = rng.normal(size=(32, 16))
    shas = {"good": _run_folder(cache, "good", "resnet18", "gpt2", 0.6),
            "shuf": _run_folder(cache, "shuf", "resnet18", "gpt2")}  # "shuf": no metrics (not in pairs)
    for run, order in (("good", np.arange(N)), ("shuf", rng.permutation(N))):
        aligned = (ref @ W)[order]
        ri, rt = aligned_name("resnet18", run), aligned_name("gpt2", run)
        _write(cache, "test", ri, ids, aligned, key={"entry": ri, "run": run, "adapter_sha256": shas[run]})
        _write(cache, "test", rt, cap_ids, np.repeat(aligned, 2, axis=0) + 0.05 * noise(16, 2 * N),
               key={"entry": rt, "run": run, "adapter_sha256": shas[run]})
    _run_folder(cache, "vit-bert", "vit", "bert", 0.3)
    _run_folder(cache, "resnet-bert", "resnet18", "bert", 0.2)
    _run_folder(cache, "vit-gpt2", "vit", "gpt2", 0.1)
    # a small "val" split with problem entries for the error tests
    vids = [str(2000 + i) for i in range(10)]
    _write(cache, "val", "resnet18", vids, noise(6, 10), "image")
    _write(cache, "val", "gpt2", [f"{i}#0" for i in vids], noise(5, 10), "text")
    _write(cache, "val", "mismatch", [str(3000 + i) for i in range(10)], noise(4, 10), "image")
    bad = noise(4, 10)
    bad[3, 1] = np.nan
    _write(cache, "val", "nanny", vids, bad, "image")
    config = root / "analyze.toml"
    config.write_text(f'[data]\ndataset = "{DATASET}"\ncache = "{cache}"\n'
                      f'[train]\nimage = "resnet18"\ntext = "gpt2"\nname = "good"\n'
                      f'[analyze]\nk = 5\nreference = "dinov2"\nout = "{root / "reports"}"\nkernel_rows = 40\n'
                      f'bootstrap = 60\npermutations = 60\n')
    return config


def _invoke(config, *args):
    res = CliRunner().invoke(main, [*args, "--config", str(config)])
    return res


def _ok(config, *args):
    res = _invoke(config, *args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res.output


def _reports(config) -> Path:
    return config.parent / "reports" / DATASET / "test"


# ----------------------------------------------------------------------------- analyze cka
def test_cka_command_writes_tables_and_heatmaps(cache):
    good = aligned_name("resnet18", "good")
    out = _ok(cache, "cka", "--entries", f"resnet18,gpt2,dinov2,{good}", "--metric", "cka,mutual_knn", "--kernels")
    assert "cka (n=120" in out
    folder = _reports(cache) / "cka"
    doc = json.loads((folder / "scores.json").read_text())
    assert doc["entries"] == ["resnet18", "gpt2", "dinov2", good] and doc["n"] == N
    S = np.array(doc["scores"]["cka"])
    assert S.shape == (4, 4) and np.allclose(np.diag(S), 1.0) and np.allclose(S, S.T)
    assert S[2, 3] > 0.8 > S[0, 1]  # the aligned entry is a linear map of the reference
    X = np.array(doc["scores"]["mutual_knn"])
    assert X[2, 3] > X[0, 1]
    rows = list(csv.DictReader(open(folder / "scores.csv")))
    assert len(rows) == 2 * 16 and {"metric", "entry_a", "entry_b", "score"} <= set(rows[0])
    for png in ("cka.png", "mutual_knn.png", "kernels.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cka_defaults_to_every_entry_of_the_configured_split(cache, tmp_path, monkeypatch):
    (tmp_path / "pipeline.toml").write_text(cache.read_text())  # picked up with no --config
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["cka", "--metric", "cka"])
    assert res.exit_code == 0, res.output
    doc = json.loads((_reports(cache) / "cka" / "scores.json").read_text())
    assert len(doc["entries"]) == 9 and aligned_name("gpt2", "shuf") in doc["entries"]


def test_pairwise_scores_match_metrics_and_refuse_unpaired_rows():
    rng = np.random.default_rng(1)
    feats = {"a": rng.normal(size=(30, 5)), "b": rng.normal(size=(30, 7))}
    S, _ = pairwise_scores(feats, {"cka": METRICS["cka"], "cycle_knn": METRICS["cycle_knn"]}, k=3)
    assert S["cka"][0, 1] == pytest.approx(METRICS["cka"](feats["a"], feats["b"]))
    assert S["cycle_knn"][1, 0] == pytest.approx(METRICS["cycle_knn"](feats["b"], feats["a"], k=3))
    with pytest.raises(AnalyzeError, match="different row counts"):
        pairwise_scores({"a": feats["a"], "b": feats["b"][:20]}, {"cka": METRICS["cka"]}, k=3)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("args, message", [
    (["cka", "--metric", "ckaa"], "Did you mean"),
    (["cka", "--entries", "resnet18,dinov3"], "Did you mean: dinov2"),
    (["cka", "--split", "val", "--entries", "resnet18,mismatch"], "missing from cache entry"),
    (["cka", "--split", "val", "--entries", "resnet18,nanny"], "NaN or inf"),
    (["cka", "--entries", "resnet18,gpt2", "--metric", "unbiased_cka", "--max-rows", "3"], "n >= 4"),
    (["cka", "--entries", "resnet18,gpt2", "--metric", "mutual_knn", "--max-rows", "8", "--k", "10"], "k=10"),
    (["layers", "--pair", "dinov2,gpt2"], "--layers all"),
    (["platonic", "--run", "nosuchrun"], "fit-adapters"),
    (["cka", "--entries", "resnet18"], "at least two entries"),
])
def test_clear_errors(cache, args, message):
    res = _invoke(cache, *args)
    assert res.exit_code != 0 and message in res.output, res.output
    assert "Traceback" not in res.output


def test_every_command_has_help(cache):
    for cmd in ("cka", "platonic", "layers", "pairs", "report"):
        out = CliRunner().invoke(main, [cmd, "--help"]).output
        assert "--cache" in out and "--metric" in out and "--seed" in out and "--out" in out and "[config:" in out


# ----------------------------------------------------------------------------- the statistics
def _data(seed=0, n=100, related=True):
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(n, 12))
    X, Y = rng.normal(size=(n, 10)), rng.normal(size=(n, 8))
    R = ref @ rng.normal(size=(12, 6)) if related else rng.normal(size=(n, 6))
    return X, Y, R, rng.normal(size=(n, 6)), ref


METRIC3 = {m: METRICS[m] for m in ("cka", "unbiased_cka", "mutual_knn")}


def test_bootstrap_ci_contains_estimate_and_p_values_separate_signal_from_noise():
    X, Y, R, noise, ref = _data()
    res = platonic.hypothesis_test(X, Y, R, noise, ref, METRIC3, k=5, bootstrap=80, permutations=80, seed=0)
    for m, r in res.items():
        for term, t in r["terms"].items():
            assert t["ci_lo"] <= t["score"] <= t["ci_hi"], (m, term)
        assert r["terms"]["after_image"]["p_value"] == pytest.approx(1 / 81)  # real relation: smallest possible
        for term in ("before_image", "before_text", "after_text"):  # independent of the reference
            assert r["terms"][term]["p_value"] > 0.05, (m, term)
        assert r["delta"]["image"]["verdict"] == "supported"
        assert r["delta"]["text"]["verdict"] != "supported"
    assert "distinct drawn rows" in res["mutual_knn"]["resampling"]
    assert res["cka"]["resampling"].startswith("bootstrap")


@pytest.mark.parametrize("name", sorted(platonic.FAST_PATHS))
def test_fast_paths_equal_the_library_metric_on_resamples_and_permutations(name):
    X, Y, R, noise, ref = _data(n=60)
    reps, fn = [X, Y, R, noise], METRICS[name]
    kw = {"k": 5} if name == "mutual_knn" else {}
    engine = platonic.FAST_PATHS[name].build(reps, ref, 5)
    rng = np.random.default_rng(3)
    idx = np.sort(rng.choice(60, 48, replace=False)) if kw else rng.integers(0, 60, 60)  # with duplicates for CKA
    perm = rng.permutation(60)
    np.testing.assert_allclose(engine.resample(idx[None])[0], [fn(A[idx], ref[idx], **kw) for A in reps], atol=1e-10)
    np.testing.assert_allclose(engine.permuted(perm[None])[0], [fn(A, ref[perm], **kw) for A in reps], atol=1e-10)


def test_generic_path_is_used_for_other_metrics():
    X, Y, R, noise, ref = _data(n=40)
    res = platonic.hypothesis_test(X, Y, R, noise, ref, {"procrustes": METRICS["procrustes"]}, k=5,
                                   bootstrap=10, permutations=10)
    assert res["procrustes"]["engine"] == "Generic"
    assert res["procrustes"]["terms"]["after_image"]["score"] == pytest.approx(METRICS["procrustes"](R, ref))


def test_verdict_rules():
    assert platonic.verdict(0.1, 0.2, 0.01)[0] == "supported"
    assert platonic.verdict(0.1, 0.2, 0.5)[0] == "inconclusive"
    assert platonic.verdict(-0.1, 0.2, 0.01)[0] == "inconclusive"
    assert platonic.verdict(-0.3, -0.1, 0.01)[0] == "not supported"
    assert platonic.verdict(float("nan"), float("nan"), float("nan"))[0] == "inconclusive"


# ----------------------------------------------------------------------------- analyze platonic
def test_platonic_command_supported_for_a_linear_map_of_the_reference(cache):
    out = _ok(cache, "platonic", "--run", "good", *FAST)
    folder = _reports(cache) / "runs" / "good"
    doc = json.loads((folder / "platonic.json").read_text())
    assert doc["entries"]["image_aligned"] == aligned_name("resnet18", "good") and doc["n"] == N
    for m in ("cka", "unbiased_cka", "mutual_knn"):
        for side in ("image", "text"):
            assert doc["results"][m]["delta"][side]["verdict"] == "supported", doc["sentences"][m][side]
    assert out.splitlines()[1].startswith("Supported: 6 of 6 metric × side tests") and "supported" in doc["headline"]
    rows = list(csv.DictReader(open(folder / "platonic.csv")))
    assert {r["term"] for r in rows} >= {"before_image", "after_text", "delta_image"}
    for png in ("platonic.png", "kernels.png"):
        assert (folder / png).stat().st_size > 1000


def test_platonic_command_not_supported_when_pairing_is_shuffled(cache):
    _ok(cache, "platonic", "--run", "shuf", *FAST)
    doc = json.loads((_reports(cache) / "runs" / "shuf" / "platonic.json").read_text())
    for m, r in doc["results"].items():
        for side in ("image", "text"):
            assert r["delta"][side]["verdict"] != "supported", doc["sentences"][m][side]
            assert r["terms"][f"after_{side}"]["p_value"] > 0.05


# ----------------------------------------------------------------------------- analyze layers
def test_layers_heatmap_reports_best_and_last(cache):
    out = _ok(cache, "layers", "--metric", "cka")
    folder = _reports(cache) / "layers" / "resnet18--gpt2"
    doc = json.loads((folder / "cka.json").read_text())
    assert np.array(doc["scores"]).shape == (3, 4)
    assert (doc["best"]["layer_a"], doc["best"]["layer_b"]) == (1, 1)  # the two layers built from Z
    assert (doc["last"]["layer_a"], doc["last"]["layer_b"]) == (2, 3)
    assert doc["best"]["score"] > doc["last"]["score"]
    assert "best layer pair (1, 1)" in out and "last layer pair (2, 3)" in out and "inflates" in out
    assert (folder / "cka.png").exists() and len(list(csv.DictReader(open(folder / "cka.csv")))) == 12


def test_best_and_last_helpers():
    S = np.array([[0.1, 0.9], [0.3, 0.2]])
    assert best_and_last(S, [0, 5], [2, 7]) == {"best": {"layer_a": 0, "layer_b": 7, "score": 0.9},
                                                "last": {"layer_a": 5, "layer_b": 7, "score": 0.2}}
    A = [np.random.default_rng(i).normal(size=(20, 3)) for i in range(2)]
    assert layer_scores(A, A[:1], METRICS["cka"], 3).shape == (2, 1)


# ----------------------------------------------------------------------------- analyze pairs
def test_pairs_ranks_encoder_pairs_and_relates_runs(cache):
    out = _ok(cache, "pairs", "--metric", "cka")
    folder = _reports(cache) / "pairs"
    doc = json.loads((folder / "pairs.json").read_text())
    assert sorted(doc["images"]) == ["dinov2", "resnet18", "vit"] and sorted(doc["texts"]) == ["bert", "gpt2"]
    assert not any(is_aligned(r["image"]) or is_aligned(r["text"]) for r in doc["pairs"]) and len(doc["pairs"]) == 6
    scores = [r["cka"] for r in doc["pairs"]]
    assert scores == sorted(scores, reverse=True) and [r["rank"] for r in doc["pairs"]] == list(range(1, 7))
    good = next(r for r in doc["pairs"] if (r["image"], r["text"]) == ("resnet18", "gpt2"))
    assert good["best_test_mean_R"] == 0.6 and doc["runs_used"] == 4
    assert doc["spearman_rho"] is not None and "rho" in out
    assert (folder / "pairs.png").exists() and len(list(csv.DictReader(open(folder / "pairs.csv")))) == 6


# ----------------------------------------------------------------------------- analyze report
def test_report_markdown_and_self_contained_html(cache):
    out = _ok(cache, "report", "--run", "good", *FAST)
    folder = _reports(cache) / "runs" / "good"
    md, page = (folder / "report.md").read_text(), (folder / "report.html").read_text()
    assert str(folder / "report.md") in out
    assert "data:image/png;base64," in page and "<img src=\"report" not in page
    for png in ("curves.png", "platonic.png", "kernels.png", "cka-cka.png"):
        assert f"]({png})" in md and (folder / png).exists()
    assert "held-out image-to-text R@10 is" in md and "by chance" in md
    assert "cka, image side: supported" in md and "cka, image side: supported" in page
    assert "| chance |" in md and "fp-test" in md and "toy/dinov2" in md


def test_report_starts_with_the_answer_and_figures_are_made_for_their_width(cache):
    out = _ok(cache, "report", "--run", "good", *FAST)
    folder = _reports(cache) / "runs" / "good"
    md, page = (folder / "report.md").read_text(), (folder / "report.html").read_text()
    # the terminal, the Markdown and the page start with the same answer
    assert out.splitlines()[0].startswith(("Supported", "Partly supported")) and "Image side:" in out
    first = md.index("## Summary: the Platonic test")
    assert first < md.index("## Headline numbers") < md.index("## Platonic test: the details") < md.index("## Data")
    assert "Image side: closer to the reference under linear CKA" in md and " to " in md  # "x (lo to hi)"
    assert page.index('class="answer"') < page.index("<figcaption>Platonic delta per metric") < page.index("<h2>Headline numbers")
    # every figure is shown between 1x and 2x its natural width; the forest plot at exactly its width
    shown = embedded_images(page)
    assert len(shown) >= 5
    for display, natural in shown:
        assert display <= natural <= 2 * display, (display, natural)
    assert plots.png_size(folder / "summary-forest.png")[0] == plots.PAGE_PX
    # tables scroll inside their own box; human labels carry the raw key as a tooltip
    assert page.count('<div class="scroll"><table>') == page.count("<table>")
    assert '<th title="i2t_R@10">' in page and "Columns:" in md


def test_small_samples_are_marked_in_the_report(tmp_path):
    """Five test rows: R@5 and R@10 are marked, every interval is marked as resting on too few rows."""
    from analyze import display, summary

    assert display.recall_marks("i2t_R@10", 99) == display.FEW_FOR_K and display.recall_marks("i2t_R@10", 100) == ""
    assert display.recall_marks("t2i_R@1", 5) == display.FEW_FOR_K and display.recall_marks("mean_R", 5) == ""
    assert display.interval_marks(0.1, 0.2, 19) == display.FEW_ROWS and display.interval_marks(0.1, 0.2, 20) == ""
    rng = display.value_range("mutual_knn")
    assert display.interval_marks(0.79, 1.04, 100, rng) == display.OUT_OF_RANGE
    assert display.interval_marks(-1.7, 2.2, 5, display.value_range("unbiased_cka", difference=True)) == \
        display.FEW_ROWS + display.OUT_OF_RANGE
    assert display.interval(0.12, 0.09, 0.15, digits=2) == "0.12 (0.09 to 0.15)"
    assert display.interval(-0.1, float("nan"), 0.2, signed=True) == "-0.100"
    result = {"n": 5, "bootstrap": 10, "permutations": 10, "entries": {"reference": "ref", "image": "x", "text": "y"},
              "results": {"mutual_knn": {"terms": {}, "delta": {
                  s: {"delta": 0.3, "ci_lo": -1.2, "ci_hi": 1.1, "verdict": "inconclusive"} for s in ("image", "text")}}}}
    lines = summary.answer_lines(result)
    assert "Inconclusive" in lines[0] and display.FEW_ROWS + display.OUT_OF_RANGE in lines[1]
    assert "fewer than 20 rows" in " ".join(lines) and lines[-1].startswith("Marks:")


def test_report_without_run_folder_still_writes(cache):
    _ok(cache, "report", "--run", "absent", *FAST)  # neither a run folder nor aligned entries
    md = (_reports(cache) / "runs" / "absent" / "report.md").read_text()
    assert "No run folder" in md and "image side: supported" not in md


def test_chance_levels():
    assert chance_recall("t2i_R@10", 1000, 5000) == pytest.approx(0.01)
    assert chance_recall("i2t_R@1", 1000, 1000) == pytest.approx(0.001)
    assert chance_recall("i2t_R@10", 1000, 5000) == pytest.approx(1 - (1 - 10 / 5000) ** 5, rel=1e-2)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_metric_symmetry_matches_what_pairwise_scores_assumes(name):
    rng = np.random.default_rng(2)
    X, Y = rng.normal(size=(40, 6)), rng.normal(size=(40, 9)) + 0.5 * rng.normal(size=(40, 1))
    kw = {"k": 5} if compare.accepts_k(METRICS[name]) else {}
    symmetric = METRICS[name](X, Y, **kw) == pytest.approx(METRICS[name](Y, X, **kw), abs=1e-9)
    assert symmetric == (name not in compare.ASYMMETRIC)


def test_mutual_knn_fast_path_on_small_subsamples_uses_exact_fallback():
    X, Y, R, noise, ref = _data(n=200)
    engine = platonic.FAST_PATHS["mutual_knn"].build([X, Y, R, noise], ref, 5)
    rows = np.sort(np.random.default_rng(4).choice(200, 15, replace=False))  # few kept rows per neighbour list
    np.testing.assert_allclose(engine.resample(rows[None])[0],
                               [METRICS["mutual_knn"](A[rows], ref[rows], k=5) for A in (X, Y, R, noise)], atol=1e-12)


def test_zero_draws_give_inconclusive_without_intervals():
    X, Y, R, noise, ref = _data(n=30)
    res = platonic.hypothesis_test(X, Y, R, noise, ref, METRIC3, k=5, bootstrap=0, permutations=0)
    for r in res.values():
        assert all(r["delta"][s]["verdict"] == "inconclusive" for s in ("image", "text"))
        assert np.isnan(r["terms"]["after_image"]["ci_lo"]) and np.isnan(r["terms"]["after_image"]["p_value"])


def test_end_to_end_fit_adapters_then_platonic_pairs_and_report(tmp_path, monkeypatch):
    """Real entry points: a synthetic cache -> fit-adapters -> analyze platonic/pairs/report with
    the run name and entries taken from the config (as `make demo` does)."""
    from train.cli import main as fit_main

    rng = np.random.default_rng(5)
    cache = tmp_path / "cache"
    for split, n in {"train": 160, "val": 40, "test": 60}.items():
        ids = [f"{split}{i:04d}" for i in range(n)]
        Z = rng.normal(size=(n, 6))
        mix = np.random.default_rng(9)  # the same encoders on every split
        enc = {name: mix.normal(size=(6, d)) for name, d in (("resnet18", 24), ("gpt2", 20), ("dinov2", 12))}
        _write(cache, split, "resnet18", ids, Z @ enc["resnet18"] + 0.5 * rng.normal(size=(n, 24)), "image")
        _write(cache, split, "gpt2", [f"{i}#{k}" for i in ids for k in range(2)],
               np.repeat(Z @ enc["gpt2"], 2, axis=0) + 0.5 * rng.normal(size=(2 * n, 20)), "text")
        _write(cache, split, "dinov2", ids, Z @ enc["dinov2"] + 0.1 * rng.normal(size=(n, 12)), "image")
    (tmp_path / "pipeline.toml").write_text(
        f'[data]\ndataset = "{DATASET}"\ncache = "{cache}"\n[train]\nepochs = 4\ndim = 16\nbatch_size = 32\n'
        f'lr = 3e-3\ndevice = "cpu"\n[analyze]\nk = 5\nbootstrap = 40\npermutations = 40\nkernel_rows = 30\n'
        f'out = "{tmp_path / "reports"}"\n')
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(fit_main, ["--no-progress"])
    assert res.exit_code == 0, res.output
    for args in (["platonic"], ["pairs", "--metric", "cka"], ["report"]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0, res.output
    folder = tmp_path / "reports" / DATASET / "test" / "runs" / "resnet18-gpt2-linear"
    doc = json.loads((folder / "platonic.json").read_text())
    assert doc["entries"]["image_aligned"] == aligned_name("resnet18", "resnet18-gpt2-linear") and doc["n"] == 60
    pairs = json.loads((tmp_path / "reports" / DATASET / "test" / "pairs" / "pairs.json").read_text())
    trained = next(r for r in pairs["pairs"] if (r["image"], r["text"]) == ("resnet18", "gpt2"))
    assert [r["run"] for r in trained["runs"]] == ["resnet18-gpt2-linear"] and pairs["runs_used"] == 1
    md = (folder / "report.md").read_text()
    assert "trained adapters" in md and "| chance |" in md and "curves.png" in md and doc["headline"] in md


def test_report_reuses_saved_results_until_inputs_change(cache):
    import os

    path = _reports(cache) / "runs" / "good" / "platonic.json"
    _ok(cache, "report", "--run", "good")
    first = path.stat().st_mtime_ns
    _ok(cache, "report", "--run", "good")
    assert path.stat().st_mtime_ns == first  # same settings, same entries: reused
    aligned = find_entry(cache.parent / "cache", DATASET, "test", aligned_name("resnet18", "good")).path
    earlier = aligned.stat().st_mtime - 10
    os.utime(path, (earlier, earlier))  # the aligned entry is now newer, as if the run had been retrained
    _ok(cache, "report", "--run", "good")
    assert path.stat().st_mtime > aligned.stat().st_mtime
    second = path.stat().st_mtime_ns
    _ok(cache, "report", "--run", "good", "--bootstrap", "30")  # other settings: recomputed
    assert path.stat().st_mtime_ns != second and json.loads(path.read_text())["bootstrap"] == 30
