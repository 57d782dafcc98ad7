"""What analyze says: what `analyze pairs` says is missing for a rank
correlation, figure titles that fit their figure, and error messages that name what the user
typed (config keys and flags, not library argument names)."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
from click.testing import CliRunner

from analyze import plots
from analyze.cli import main as analyze_main
from analyze.compare import AnalyzeError, subset_rows
from analyze.pairs import _missing
from analyze.platonic import hypothesis_test
from pipeline.cache import write_entry
from pipeline.config import load_config
from similarity.metrics import METRICS
from train.errors import ConfigValueError
from train.fit import check_config


def _cache_with_runs(root, runs_per_pair):
    """Two image and two text entries of 20 rows and fake runs: {(image, text): count}."""
    rng = np.random.default_rng(0)
    ids = [f"i{k}" for k in range(20)]
    for name, modality in (("im1", "image"), ("im2", "image"), ("tx1", "text"), ("tx2", "text")):
        key = {"entry": name, "encoder": {"name": name, "modality": modality}, "fingerprint": "fp"}
        write_entry(root / "ds" / "test" / f"{name}.h5", name, ids, rng.normal(size=(20, 4)), key, {})
    recall = iter(np.linspace(0.1, 0.6, sum(runs_per_pair.values())))
    for (image, text), count in runs_per_pair.items():
        for r in range(count):
            d = root / "runs" / f"{image}-{text}-{r}"
            d.mkdir(parents=True)
            (d / "adapters.safetensors").write_bytes(d.name.encode())
            sha = hashlib.sha256(d.name.encode()).hexdigest()
            (d / "adapters.json").write_text(json.dumps({"format": 2, "sha256": sha}))
            (d / "config.json").write_text(json.dumps({"data": {"dataset": "ds"}, "train": {"image": image, "text": text}}))
            (d / "metrics.json").write_text(json.dumps({"run": d.name, "adapter_sha256": sha,
                                                        "test": {"infonce": {"mean_R": float(next(recall))}}}))


@pytest.mark.parametrize("runs_per_pair, note", [
    ({("im1", "tx1"): 11}, "needs runs with test metrics for >= 3 distinct encoder pairs (found 1 pair with 11 runs)"),
    ({("im1", "tx1"): 2, ("im2", "tx2"): 1}, "(found 2 pairs with 3 runs)"),
    ({("im1", "tx1"): 1, ("im2", "tx2"): 1, ("im1", "tx2"): 1}, "Spearman rank correlation between cka and test "
                                                                 "mean_R over 3 runs of 3 encoder pairs: rho"),
])
def test_pairs_says_what_is_missing_for_a_rank_correlation(tmp_path, runs_per_pair, note):
    _cache_with_runs(tmp_path, runs_per_pair)
    res = CliRunner().invoke(analyze_main, ["pairs", "--cache", str(tmp_path), "--dataset", "ds", "--metric", "cka",
                                            "--out", str(tmp_path / "out")])
    assert res.exit_code == 0 and note in res.output, res.output
    assert "needs >= 3 runs" not in res.output


def test_missing_note_when_the_correlation_is_undefined():
    assert "undefined" in _missing(3, 4) and "found 3 pairs with 4 runs" in _missing(3, 4)


# ----------------------------------------------------------------------------- figures
LONG = ("mutual_knn between cache entries (flickr30k-with-a-rather-long-dataset-name test, n=31783) "
        "with an extra clause that makes this title far wider than a small heatmap")


def _captured(monkeypatch):
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)  # keep the figure after saving
    return figures


def _inside(fig, artist) -> bool:
    box = artist.get_window_extent(fig.canvas.get_renderer())
    return box.x0 >= -1 and box.x1 <= fig.bbox.x1 + 1 and box.y1 <= fig.bbox.y1 + 1


def test_long_titles_are_wrapped_to_fit_their_figure(tmp_path, monkeypatch):
    figures = _captured(monkeypatch)
    names = ["resnet18", "gpt2@a-long-run-name-for-testing"]
    path = plots.heatmap(np.random.default_rng(0).random((2, 2)), names, names, LONG, tmp_path / "h.png")
    plots.kernel_panels({"K_X (resnet18)": np.eye(4), f"K_repr text ({names[1]}-and-more)": np.eye(4)}, LONG,
                        tmp_path / "k.png")
    plots.grouped_bars({"mutual_knn": [{"label": "before image", "value": 0.3}]}, LONG, tmp_path / "b.png")
    heat, kern, bars = figures
    title = heat.axes[0].title
    assert "\n" in title.get_text() and _inside(heat, title)
    assert all(_inside(kern, ax.title) for ax in kern.axes[::2]) and _inside(kern, kern._suptitle)
    assert _inside(bars, bars._suptitle)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- messages
def test_bad_kernel_rows_names_the_key_the_user_set():
    with pytest.raises(AnalyzeError, match=r"analyze\.kernel_rows = -5 .*--kernel-rows N \(or --set analyze\.kernel_rows=N\)"):
        subset_rows(10, -5, 0, key="analyze.kernel_rows")
    with pytest.raises(AnalyzeError, match=r"analyze\.max_rows = -1"):
        subset_rows(10, -1, 0)


def test_messages_name_flags_and_config_keys():
    X = np.random.default_rng(0).normal(size=(20, 3))
    with pytest.raises(AnalyzeError, match="--bootstrap .*--set analyze.bootstrap=N"):
        hypothesis_test(X, X, X, X, X, {"cka": METRICS["cka"]}, 3, -1, 0)
    tc = load_config(None, options={"train.device": "cpu"}).train
    for key, value, allowed in (("epochs", 0, ">= 1"), ("dropout", 1.0, "in [0, 1)")):
        bad = dataclasses.replace(tc, **{key: value})
        with pytest.raises(ConfigValueError, match=rf"train\.{key} = .* must be {allowed.replace('[', '.').replace(')', '.')}"
                                                   rf" \(set it with --set train\.{key}=VALUE\)"):
            check_config(bad)
