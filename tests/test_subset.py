"""``train.subset``: reading subset files (bad ones refused line by line), training on exactly the
listed pairs (with and without a train fraction), the subset's fingerprint and copy in the run,
the evaluation's baselines fitted on the same pairs, and the refusals: an id not in the train
split (named), a subset of another dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from analyze.evalrun import EvalError, open_run
from analyze.matching import run_matching
from pipeline.config import with_values
from train.fit import fit_adapters
from train.subset import SubsetError, parse_subset, read_subset, write_subset
from tests.test_train import make_cache, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")
SIZES = {"train": 60, "val": 12, "test": 12}


def _subset(path, ids, dataset="fake", split="train"):
    rows = [(i, f"c{k % 3}", 0.5) for k, i in enumerate(ids)]
    return write_subset(path, rows, {"dataset": dataset, "split": split, "entry": "gpt2"})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("subset")
    cache = make_cache(tmp / "cache", splits=SIZES, reference="")
    # 20 images with every caption (by image id) and 10 single captions of other images
    ids = [f"train{i:04d}" for i in range(20)] + [f"train{i:04d}#1" for i in range(30, 40)]
    path = _subset(tmp / "subset.csv", ids)
    cfg = with_values(tiny_cfg(cache, subset=str(path), epochs=2, name="sub", reference=""),
                      {"analyze.out": str(tmp / "reports")})
    return tmp, cache, path, cfg, fit_adapters(cfg, progress=False)


def test_a_run_trains_on_exactly_the_listed_pairs(setup):
    tmp, cache, path, cfg, res = setup
    assert res.metrics.sizes["train"]["pairs"] == 20 * 3 + 10
    adapters = json.loads((res.run_dir / "adapters.json").read_text())
    assert adapters["train_images"]["n"] == 30
    assert adapters["subset"]["sha256"] == read_subset(path).sha256 and adapters["subset"]["n_ids"] == 30
    assert json.loads((res.run_dir / "config.json").read_text())["subset"]["sha256"] == adapters["subset"]["sha256"]
    assert (res.run_dir / "subset.csv").read_bytes() == path.read_bytes()
    rv = open_run(cfg, "sub")
    train = rv.split("train")
    assert len(train.text_ids) == 70 and len(train.image_ids) == 30
    assert sorted(t for t in train.text_ids if t.startswith("train003")) == [f"train{i:04d}#1" for i in range(30, 40)]
    doc = run_matching(cfg, "sub", seeds=2)  # baselines refitted on the subset: the same numbers as fit-adapters
    for name in ("cca", "procrustes"):
        assert doc["retrieval"][name]["mean_R"] == pytest.approx(res.metrics.test[name]["mean_R"], abs=1e-12)
    assert doc["anchors"] == 70


def test_subset_then_fraction_and_other_subsets_give_other_runs(setup):
    tmp, cache, path, cfg, res = setup
    half = fit_adapters(tiny_cfg(cache, subset=str(path), train_fraction=0.5, epochs=1, name="subhalf", reference=""),
                        progress=False)
    doc = json.loads((half.run_dir / "adapters.json").read_text())
    assert doc["train_images"]["n"] == 15  # half of the subset's 30 images
    other = _subset(tmp / "other.csv", [f"train{i:04d}" for i in range(10, 40)])
    run = fit_adapters(tiny_cfg(cache, subset=str(other), epochs=1, name="other", reference=""), progress=False)
    assert json.loads((run.run_dir / "adapters.json").read_text())["subset"]["sha256"] != read_subset(path).sha256


def test_an_edited_copy_is_refused_at_evaluation(setup):
    tmp, cache, path, cfg, res = setup
    copy = res.run_dir / "subset.csv"
    original = copy.read_bytes()
    try:
        copy.write_bytes(original + b"train0050,c0,0.1\n")
        with pytest.raises(EvalError, match="was edited.*Rerun fit-adapters --name sub"):
            open_run(cfg, "sub").split("train")
    finally:
        copy.write_bytes(original)


def test_ids_not_in_the_train_split_are_named(setup):
    tmp, cache, path, cfg, res = setup
    bad = _subset(tmp / "bad.csv", ["train0001", "val0003", "nope#2"])
    with pytest.raises(SubsetError, match=r"2 of the 3 ids .* are not pairs of the train split of 'fake'.*'val0003', 'nope#2'"):
        fit_adapters(tiny_cfg(cache, subset=str(bad), epochs=1, name="bad", reference=""), progress=False)
    none = _subset(tmp / "none.csv", ["x1", "x2"])
    with pytest.raises(SubsetError, match="None of the 2 ids .* another dataset"):
        fit_adapters(tiny_cfg(cache, subset=str(none), epochs=1, name="bad", reference=""), progress=False)


def test_a_subset_of_another_dataset_or_split_is_refused(setup):
    tmp, cache, path, cfg, res = setup
    other = _subset(tmp / "coco.csv", ["train0001", "train0002"], dataset="coco")
    with pytest.raises(SubsetError, match="curated from dataset 'coco', but this run trains on 'fake'"):
        fit_adapters(tiny_cfg(cache, subset=str(other), epochs=1, name="bad", reference=""), progress=False)
    val = _subset(tmp / "val.csv", ["train0001", "train0002"], split="val")
    with pytest.raises(SubsetError, match="from the 'val' split"):
        fit_adapters(tiny_cfg(cache, subset=str(val), epochs=1, name="bad", reference=""), progress=False)
    with pytest.raises(SubsetError, match="no such file"):
        fit_adapters(tiny_cfg(cache, subset=str(tmp / "missing.csv"), name="bad", reference=""), progress=False)
    assert not (cache / "runs" / "bad").exists()


@pytest.mark.parametrize("text, message", [
    ("id,concept\nA,x\n", "no column score"),
    ("id,concept,score\nA,x,0.1\nA,y,0.2\n", "line 3: id 'A' again"),
    ("id,concept,score\n,x,0.1\n", "line 2: empty id"),
    ("id,concept,score\nA,x,high\n", "score 'high' is not a number"),
    ("id,concept,score\n", "lists no pairs"),
    ("# curate: {oops\nid,concept,score\nA,x,1\n", "is not JSON"),
])
def test_bad_subset_files_are_refused_naming_the_line(text, message):
    with pytest.raises(SubsetError, match=message):
        parse_subset(text, "s.csv")


def test_a_hand_written_subset_has_no_provenance_and_reads(tmp_path):
    p = tmp_path / "s.csv"
    p.write_text("id,concept,score,note\nA,cat,0.9,x\nB,dog,0.5,y\n")
    s = read_subset(p)
    assert s.ids == ("A", "B") and s.concepts == ("cat", "dog") and s.source == {}
    mask = s.mask(["A", "B", "C"], ["A#0", "B#0", "C#0"], "the split")
    np.testing.assert_array_equal(mask, [True, True, False])


def test_a_study_retrains_when_its_subset_file_is_edited_in_place(setup, tmp_path):
    from study.grid import train_hash
    tmp, cache, path, cfg, res = setup
    copy = _subset(tmp_path / "s.csv", [f"train{i:04d}" for i in range(20)])
    cfg2 = tiny_cfg(cache, subset=str(copy), reference="")
    before = train_hash(cfg2)
    run = json.loads((res.run_dir / "config.json").read_text())
    assert train_hash(cfg) == train_hash(run)  # the run's config.json records the file it trained on
    _subset(copy, [f"train{i:04d}" for i in range(21)])
    assert train_hash(cfg2) != before


def test_a_streamed_train_split_keeps_the_same_subset(setup):
    tmp, cache, path, cfg, res = setup
    streamed = fit_adapters(tiny_cfg(cache, subset=str(path), epochs=1, name="substream", reference="",
                                     max_rows_in_memory=64, stream_block=16), progress=False)
    assert streamed.metrics.streamed and streamed.metrics.sizes["train"]["pairs"] == 70
    a = json.loads((streamed.run_dir / "adapters.json").read_text())["train_images"]
    assert a == json.loads((res.run_dir / "adapters.json").read_text())["train_images"]
