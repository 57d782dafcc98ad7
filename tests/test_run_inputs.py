"""Runs compared fairly and trained as asked: the evaluation of a run trained on a fraction uses that
run's train pairs (baselines, ASIF anchors, local-CKA base), a fixed temperature is the one used,
and degenerate train splits are refused before training instead of failing in the baselines."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from click.testing import CliRunner

from analyze.evalrun import EvalError, open_run
from analyze.matching import run_matching
from pipeline.cache import entry_path, write_entry
from pipeline.config import with_values
from pipeline.join import join_pairs
from train.cli import main as fit_cli
from train.errors import ConfigValueError, TrainError
from train.fit import fit_adapters
from train.fraction import pair_mask, subset_pairs
from tests.test_train import D_IMG, D_TXT, make_cache, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def half(tmp_path_factory):
    """A run trained on half the train images, and its analyze config."""
    tmp = tmp_path_factory.mktemp("half")
    cache = make_cache(tmp / "cache", reference="")
    cfg = with_values(tiny_cfg(cache, train_fraction=0.5, epochs=2, name="half", reference=""),
                      {"analyze.out": str(tmp / "reports")})
    return cfg, fit_adapters(cfg, progress=False)


def test_matching_baselines_are_fitted_on_the_runs_train_pairs(half):
    """The same run's CCA / Procrustes recall in metrics.json and in matching.json (all test rows)."""
    cfg, res = half
    doc = run_matching(cfg, "half", seeds=2)
    for name in ("cca", "procrustes"):
        assert doc["retrieval"][name]["mean_R"] == pytest.approx(res.metrics.test[name]["mean_R"], abs=1e-12)
        assert doc["retrieval"][name]["rsum"] == pytest.approx(res.metrics.test[name]["rsum"], abs=1e-9)
    kept = res.metrics.sizes["train"]["pairs"]
    assert doc["anchors"] == kept < res.metrics.sizes["train"]["pairs_before_fraction"]  # ASIF: the run's pairs only
    rv = open_run(cfg, "half")
    train = rv.split("train")
    assert len(train.text_ids) == kept and len(set(train.image_ids)) == len(train.image_ids) == kept // 3


def test_subset_pairs_is_the_rule_fit_adapters_uses(half):
    cfg, _ = half
    rv = open_run(cfg, "half")
    img, txt = rv.entry("train", "image"), rv.entry("train", "text")
    pairs = join_pairs(img, txt)
    kept = subset_pairs(img, pairs, 0.5, cfg.train.seed)
    mask = pair_mask(np.asarray(img.ids)[pairs.image_rows[pairs.text_to_image]], 0.5, cfg.train.seed)
    np.testing.assert_array_equal(kept.text_rows, pairs.text_rows[mask])
    assert subset_pairs(img, pairs, 1.0, 0) is pairs


def test_a_run_whose_train_pairs_changed_is_refused(half, tmp_path):
    cfg, res = half
    path = res.run_dir / "adapters.json"
    doc = json.loads(path.read_text())
    original = path.read_text()
    try:
        doc["train_images"]["sha256"] = "0" * 32
        path.write_text(json.dumps(doc))
        with pytest.raises(EvalError, match="Rerun fit-adapters --name half"):
            open_run(cfg, "half").split("train")
    finally:
        path.write_text(original)


def test_a_fixed_temperature_is_used_as_given(tmp_path):
    cache = make_cache(tmp_path, splits={"train": 40, "val": 12, "test": 12}, reference="")
    res = fit_adapters(tiny_cfg(cache, temperature=0.005, epochs=1, name="cold", reference=""), progress=False)
    adapters = json.loads((res.run_dir / "adapters.json").read_text())
    metrics = json.loads((res.run_dir / "metrics.json").read_text())
    assert adapters["train"]["temperature"] == 0.005
    assert metrics["temperature"] == pytest.approx(0.005, rel=1e-6)
    assert res.history[0]["temperature"] == pytest.approx(0.005, rel=1e-6)
    with pytest.raises(ConfigValueError, match="cannot start there"):
        fit_adapters(tiny_cfg(cache, temperature=0.005, learnable_temperature=True, name="x", reference=""))


def _constant_text_cache(root):
    """Every caption's features identical in every split (one caption repeated), image features random."""
    rng = np.random.default_rng(0)
    caption = rng.normal(size=(1, D_TXT))
    for split, n in {"train": 20, "val": 8, "test": 8}.items():
        ids = [f"{split}{i:03d}" for i in range(n)]
        key = {"dataset": "fake", "split": split, "fingerprint": f"fp-{split}"}
        write_entry(entry_path(root, "fake", split, "resnet18"), "resnet18", ids,
                    rng.normal(size=(n, D_IMG)).astype(np.float32), {**key, "entry": "resnet18"}, {})
        write_entry(entry_path(root, "fake", split, "gpt2"), "gpt2", ids,
                    np.tile(caption, (n, 1)).astype(np.float32), {**key, "entry": "gpt2"}, {})
    return root


def test_identical_captions_are_one_line_before_training(tmp_path):
    cache = _constant_text_cache(tmp_path / "cache")
    out = CliRunner().invoke(fit_cli, ["--cache", str(cache), "--dataset", "fake", "--epochs", "1",
                                       "--set", "train.reference=", "--set", "train.dim=8"])
    assert out.exit_code == 1 and "Traceback" not in out.output, out.output
    assert "Every train row of 'gpt2' (text) has the same features" in out.output
    assert "tokenizer's length limit" in out.output and len(out.output.strip().splitlines()) == 1
    assert not (cache / "runs").exists() or not any((cache / "runs").iterdir())  # nothing trained or written


@pytest.mark.parametrize("options, message", [
    ({"train_fraction": 0.01}, "train.train_fraction = 0.01 keeps 1 train image"),
    ({"train_fraction": 0.001}, "keeps none"),
])
def test_too_few_train_images_are_refused_before_training(tmp_path, options, message):
    cache = make_cache(tmp_path, splits={"train": 120, "val": 10, "test": 10}, reference="")
    with pytest.raises(TrainError, match=message):
        fit_adapters(tiny_cfg(cache, name="few", reference="", **options))


def test_a_one_image_train_split_is_refused(tmp_path):
    cache = make_cache(tmp_path, splits={"train": 1, "val": 10, "test": 10}, reference="")
    with pytest.raises(TrainError, match="the train split has 1 image"):
        fit_adapters(tiny_cfg(cache, name="one", reference=""))


def test_a_baseline_that_maps_rows_to_zero_is_left_out_with_a_warning(tmp_path, caplog):
    """Without standardisation the constant text side is not refused, and the baselines' text side
    is zero for every row: no cosine ranking, so they are left out (not a ValueError traceback)."""
    cache = _constant_text_cache(tmp_path / "cache")
    cfg = tiny_cfg(cache, name="raw", reference="", standardize=False, epochs=1)
    with caplog.at_level(logging.WARNING, logger="train.fit"):
        res = fit_adapters(cfg, progress=False)
    assert set(res.metrics.test) == {"infonce"} and res.metrics.test["infonce"]["collapsed"] == 1.0
    assert "baseline cca left out of metrics.json" in caplog.text and "8 text test rows to zero" in caplog.text
