"""Studies: the grid, resuming, failing cells, nested train fractions and the summary math,
on generated data with tiny random encoders (extracted once per module)."""

from __future__ import annotations

import csv
import itertools
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import study.cells
from extract.run import extract
from pipeline.config import PipelineConfig, load_config, with_values
from pipeline.errors import PipelineError
from study.cli import main as study_cli
from study.grid import StudyError, config_hash, expand
from study.runner import run_study
from study.table import summarize
from tests.fixtures import make_flickr30k
from train.data import load_data
from train.fraction import kept_ids, pair_mask, subset_split

BASE = """
[data]
data_dir = "{data}"
captions = "all"
cache = "{cache}"
[extract]
encoders = ["tiny-resnet", "tiny-gpt2", "tiny-dinov2"]
workers = 0
batch_size = 8
[train]
image = "tiny-resnet"
text = "tiny-gpt2"
reference = "tiny-dinov2"
dim = 8
epochs = 1
batch_size = 16
lr = 1e-3
device = "cpu"
[analyze]
reference = "tiny-dinov2"
metrics = ["cka"]
bootstrap = 5
permutations = 5
"""
N_TRAIN = 16  # train images (5 captions each)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(config file, cache) with every tiny encoder extracted for train/val/test."""
    root = tmp_path_factory.mktemp("study")
    data = make_flickr30k(root / "data", n_per_split=(N_TRAIN, 6, 6))
    path = root / "base.toml"
    path.write_text(BASE.format(data=data, cache=root / "cache"))
    extract(load_config(path))
    return path


def study_config(world, tmp_path, name: str, axes: dict, **values) -> PipelineConfig:
    return with_values(load_config(world), {"study.name": name, "study.axes": axes, "analyze.out": str(tmp_path),
                                            **values})


def read_csv(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


class Spy:
    """Counts calls of a function it wraps; ``fail_at`` raises KeyboardInterrupt at that call."""

    def __init__(self, fn, fail_at: int | None = None):
        self.fn, self.fail_at, self.calls = fn, fail_at, []

    def __call__(self, *args, **kwargs):
        self.calls.append(args)
        if self.fail_at == len(self.calls):
            raise KeyboardInterrupt
        return self.fn(*args, **kwargs)


# ----------------------------------------------------------------------------- the grid
def test_grid_is_the_product_of_the_axes():
    axes = {"train.adapter": ["linear", "mlp"], "train.seed": [0, 1, 2], "analyze.k": [3, 5]}
    cells = expand(with_values(PipelineConfig(), {"study.axes": axes}))
    assert [tuple(c.values.values()) for c in cells] == list(itertools.product(*axes.values()))
    assert [(c.config.train.adapter, c.config.train.seed, c.config.analyze.k) for c in cells] == \
        list(itertools.product(*axes.values()))
    assert len({c.cell_id for c in cells}) == len({c.config_hash for c in cells}) == 12
    assert len({c.run for c in cells}) == 6  # cells differing only in an analyze axis share one training
    assert all(c.config.train.name == c.run for c in cells)
    assert config_hash(cells[0].config.to_dict()) == cells[0].config_hash  # a stored config.json hashes the same
    nested = {"train": {"adapter": ["linear", "mlp"], "seed": [0, 1, 2]}, "analyze": {"k": [3, 5]}}
    assert [c.cell_id for c in expand(with_values(PipelineConfig(), {"study.axes": nested}))] == \
        [c.cell_id for c in cells]


def test_variants_are_a_leading_axis_of_named_recipes():
    variants = {"plain": {}, "mixup": {"train.mixup": 1.0}, "all": {"train": {"mixup": 1.0, "adapter": "mlp"}},
                "k3": {"analyze.k": 3}}
    cfg = with_values(PipelineConfig(), {"study.variants": variants, "study.axes": {"train.seed": [0, 1]}})
    cells = expand(cfg)
    assert [tuple(c.values.items()) for c in cells] == [(("variant", v), ("train.seed", s))
                                                        for v in variants for s in (0, 1)]
    got = [(c.config.train.mixup, c.config.train.adapter, c.config.analyze.k, c.config.train.seed) for c in cells]
    base = PipelineConfig()
    assert got == [(m, a, k, s) for m, a, k in ((base.train.mixup, "linear", base.analyze.k), (1.0, "linear", base.analyze.k),
                                               (1.0, "mlp", base.analyze.k), (base.train.mixup, "linear", 3))
                   for s in (0, 1)]
    runs = [c.run for c in cells]
    assert "variant-mixup" in runs[2] and "variant" not in runs[6]  # an analyze-only variant shares plain's training
    assert runs[0] == runs[6] and len(set(runs)) == 6
    only = expand(with_values(PipelineConfig(), {"study.variants": variants}))  # variants alone make a grid
    assert [c.values for c in only] == [{"variant": v} for v in variants]


@pytest.mark.parametrize("variants, axes, evaluations, match", [
    ({"plain": {}, "x": {"train.mixp": 1.0}}, {}, ["platonic"], "Did you mean: train.mixup"),
    ({"plain": {}, "x": {"train.seed": 1}}, {"train.seed": [0, 1]}, ["platonic"], "also an axis"),
    ({"a b": {}}, {}, ["platonic"], "variant name"),
    ({"x": 1.0}, {}, ["platonic"], "must be a table"),
    ({"x": {}}, {"variant": ["x"]}, ["platonic"], "made by \\[study.variants\\]"),
    ({"x": {}}, {}, ["platonic", "zeroshoot"], "Did you mean: zeroshot"),
])
def test_bad_variants_and_evaluations_are_clear_errors(variants, axes, evaluations, match):
    cfg = with_values(PipelineConfig(), {"study.variants": variants, "study.axes": axes,
                                         "study.evaluations": evaluations})
    with pytest.raises(StudyError, match=match):
        run_study(cfg, dry_run=True)


@pytest.mark.parametrize("axes, repeat, match", [
    ({"train.sed": [0, 1]}, "", "Did you mean: train.seed"),
    ({"trian.seed": [0, 1]}, "", "Did you mean: train"),
    ({"train.name": ["a", "b"]}, "", "names each cell's run"),
    ({"train.epochs": ["many"]}, "", "'train.epochs' expects int"),
    ({"train.seed": []}, "", "non-empty list"),
    ({"train.seed": [0, 0]}, "", "lists a value twice"),
    ({}, "", "study.axes is empty"),
    ({"train.seed": [0, 1]}, "train.sede", "is not one of the axes"),
])
def test_bad_axes_are_clear_errors_before_any_work(axes, repeat, match):
    cfg = with_values(PipelineConfig(), {"study.axes": axes, "study.repeat": repeat})
    with pytest.raises(StudyError, match=match):
        run_study(cfg, dry_run=True)


def test_unknown_axis_through_the_cli_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.toml").write_text('[study]\nname = "x"\n[study.axes]\n"train.adaptor" = ["linear"]\n')
    res = CliRunner().invoke(study_cli, ["--config", "s.toml", "--dry-run"])
    assert res.exit_code == 1 and "Did you mean: train.adapter" in res.output and "Traceback" not in res.output


# ----------------------------------------------------------------------------- train fractions
def test_train_fractions_are_seeded_nested_and_by_image():
    ids = [f"img{i:02d}" for i in range(40)]
    for seed in (0, 1):
        kept = {f: set(kept_ids(ids, f, seed)) for f in (0.25, 0.5, 1.0)}
        assert [len(kept[f]) for f in (0.25, 0.5, 1.0)] == [10, 20, 40]
        assert kept[0.25] <= kept[0.5] <= kept[1.0]
        assert set(kept_ids(ids[::-1], 0.5, seed)) == kept[0.5]  # the row order does not matter
    assert set(kept_ids(ids, 0.5, 0)) != set(kept_ids(ids, 0.5, 1))
    captions = [f"{i}#{k}" for i in ids for k in range(5)]  # every caption of a kept image stays
    mask = pair_mask(captions, 0.5, 0)
    assert mask.sum() == 100 and {c.split("#")[0] for c, m in zip(captions, mask) if m} == set(kept_ids(ids, 0.5, 0))
    with pytest.raises(PipelineError, match="keeps none"):
        kept_ids(ids, 0.01, 0)
    with pytest.raises(PipelineError, match=r"must be in \(0, 1\]"):
        kept_ids(ids, 1.5, 0)


def test_subset_split_restricts_the_retrieval_rows():
    # 3 images (entry rows 10, 11, 12), 2 captions each (rows 0..5); keep the pairs of images 10 and 12
    rows_a, rows_b, b_to_a = np.array([10, 11, 12]), np.arange(6), np.array([0, 0, 1, 1, 2, 2])
    pairs = np.stack([rows_a[b_to_a], rows_b], axis=1)
    mask = np.array([True, True, False, False, True, True])
    kept, ret = subset_split(pairs, {("image", "text"): (rows_a, rows_b, b_to_a)}, mask)
    ra, rb, b2a = ret[("image", "text")]
    assert kept.tolist() == [[10, 0], [10, 1], [12, 4], [12, 5]]
    assert ra.tolist() == [10, 12] and rb.tolist() == [0, 1, 4, 5] and b2a.tolist() == [0, 0, 1, 1]
    assert np.array_equal(np.stack([ra[b2a], rb], axis=1), kept)


def test_load_data_keeps_the_fraction_in_memory_and_streamed(world):
    cfg = with_values(load_config(world), {"train.train_fraction": 0.5, "train.seed": 3})
    full = load_data(with_values(cfg, {"train.train_fraction": 1.0}), torch.device("cpu"))
    half = load_data(cfg, torch.device("cpu"))
    assert full.splits["train"].n_pairs == 5 * N_TRAIN and half.splits["train"].n_pairs == 5 * N_TRAIN // 2
    assert half.train_pairs_total == 5 * N_TRAIN
    assert half.splits["test"].n_pairs == full.splits["test"].n_pairs  # only train is cut
    streamed = load_data(with_values(cfg, {"train.max_rows_in_memory": 32}), torch.device("cpu"), stream=True)
    try:
        assert streamed.streaming
        assert np.array_equal(streamed.splits["train"].pairs, half.splits["train"].pairs.numpy())
        for m in half.stats.mean:  # statistics over the kept rows only, both paths alike
            assert np.allclose(streamed.stats.mean[m], half.stats.mean[m], atol=1e-6)
    finally:
        streamed.close()
    assert not np.allclose(half.stats.mean["image"], full.stats.mean["image"])


# ----------------------------------------------------------------------------- running studies
def test_study_writes_tables_figures_report_and_a_rerun_trains_nothing(world, tmp_path, monkeypatch):
    fits = Spy(study.cells.fit_adapters)
    monkeypatch.setattr(study.cells, "fit_adapters", fits)
    extracts = Spy(study.cells.extract)
    monkeypatch.setattr(study.cells, "extract", extracts)
    cfg = study_config(world, tmp_path, "grid", {"train.train_fraction": [0.5, 1.0], "train.seed": [0, 1]})
    res = CliRunner().invoke(study_cli, ["--config", str(world), "--name", "grid", "--no-progress",
                                         "--set", f"analyze.out={tmp_path}",
                                         "--set", "study.axes.train.train_fraction=[0.5, 1.0]",
                                         "--set", "study.axes.train.seed=[0, 1]"])
    assert res.exit_code == 0, res.output
    assert "4 cells: 4 done, 0 failed" in res.output and "Q1" in res.output and "Q2" in res.output
    assert len(fits.calls) == 4 and len(extracts.calls) == 1  # one request for all cells, cached already: verified
    folder = tmp_path / "flickr30k" / "test" / "studies" / "grid"
    cells = read_csv(folder / "cells.csv")
    head = list(cells[0])
    assert head[:5] == ["train.train_fraction", "train.seed", "run", "status", "error"]
    wanted = ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mean_R"] + \
        [f"cka.{t}" for t in ("before_image", "before_text", "after_image", "after_text", "delta_image",
                              "delta_text", "p_image", "p_text")]
    assert set(wanted) <= set(head)
    assert [c["status"] for c in cells] == ["done"] * 4
    assert [float(c["run.train_fraction"]) for c in cells] == [0.5, 0.5, 1.0, 1.0]
    assert [int(float(c["run.sizes.train.pairs"])) for c in cells] == [40, 40, 80, 80]
    summary = read_csv(folder / "summary.csv")
    assert [s["train.train_fraction"] for s in summary] == ["0.500000", "1.000000"]
    assert all(s["n"] == "2" for s in summary)
    for s, pair in zip(summary, ([c for c in cells[:2]], [c for c in cells[2:]])):
        values = [float(c["mean_R"]) for c in pair]
        assert float(s["mean_R.mean"]) == pytest.approx(np.mean(values), abs=1e-6)
        assert float(s["mean_R.std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-6)
        assert {"cka.delta_image.lo95", "cka.delta_text.hi95", "mean_R.vs_cca.lo95"} <= set(s)
    html = (folder / "study.html").read_text()
    assert "data:image/png;base64" in html and "Q1 (can frozen encoders be aligned?)" in html
    assert (folder / "fraction.png").is_file() and (folder / "study.md").is_file()
    # the answers (and their figure) first; tables scroll inside their box, with human labels over raw keys
    assert html.index('class="answer"') < html.index('class="side"') < html.index("Q1 (") < html.index("<table>")
    assert html.count('<div class="scroll"><table>') == html.count("<table>") >= 3
    assert '<th title="cka.delta_image">linear CKA Δ image</th>' in html and "<th>cka.delta_image</th>" not in html
    assert " (" in html and " to " in html and "[" not in html.split("<h2>Retrieval per setting")[1].split("</table>")[0]
    md = (folder / "study.md").read_text()
    assert "linear CKA Δ image = `cka.delta_image`" in md
    # 6 test images: the mean recall (R@10 over fewer than 100 images) and every delta (6 rows) are marked
    assert "Marks: * R@K on fewer than 10 x K test items" in md and "† from fewer than 20 rows" in md
    from tests.fixtures import embedded_images

    for display, natural in embedded_images(html):
        assert display <= natural <= 2 * display, (display, natural)

    again = run_study(with_values(cfg, {"study.name": "grid"}), progress=False)  # a rerun: nothing to do
    assert again.ran == 0 and len(fits.calls) == 4
    changed = run_study(with_values(cfg, {"analyze.bootstrap": 6}), progress=False)  # new analysis, same training
    assert changed.ran == 4 and changed.trained == 0 and len(fits.calls) == 4


def test_a_killed_study_resumes_where_it_stopped(world, tmp_path, monkeypatch):
    cfg = study_config(world, tmp_path, "resume", {"train.seed": [5, 6, 7]})
    killer = Spy(study.cells.compute_cell, fail_at=2)
    monkeypatch.setattr(study.cells, "compute_cell", killer)
    with pytest.raises(KeyboardInterrupt):
        run_study(cfg, progress=False)
    folder = tmp_path / "flickr30k" / "test" / "studies" / "resume"
    assert len(list((folder / "cells").glob("*.json"))) == 1  # the first cell was written, the second was not
    monkeypatch.setattr(study.cells, "compute_cell", killer.fn)
    result = run_study(cfg, progress=False)
    assert result.ran == 2 and result.failed == 0
    assert [r["status"] for r in read_csv(folder / "cells.csv")] == ["done"] * 3


def test_a_failing_cell_is_recorded_and_the_study_goes_on(world, tmp_path):
    # analyze.k = 50 passes every check a config allows (it depends on the rows) and fails in the cell
    cfg = study_config(world, tmp_path, "fails", {"analyze.k": [3, 50]},
                       **{"study.repeat": "", "analyze.metrics": ["cka", "mutual_knn"]})
    result = run_study(cfg, progress=False)
    assert result.failed == 1 and result.ran == 2 and result.trained == 1  # one training, two analyses
    cells = read_csv(result.folder / "cells.csv")
    assert [c["status"] for c in cells] == ["done", "failed"]
    assert "k" in cells[1]["error"] and cells[1]["cka.delta_image"] == ""
    summary = read_csv(result.folder / "summary.csv")
    assert [(s["n"], s["failed"]) for s in summary] == [("1", "0"), ("0", "1")]
    assert "Failed cells" in result.html.read_text()
    assert run_study(cfg, progress=False).ran == 1  # a rerun retries only the failed cell


def test_a_study_with_failed_cells_exits_non_zero_with_its_summary_written(world, tmp_path):
    res = CliRunner().invoke(study_cli, ["--config", str(world), "--name", "exit", "--no-progress", "--repeat", "",
                                         "--set", f"analyze.out={tmp_path}", "--set", "study.axes.analyze.k=[3, 50]",
                                         "--set", 'analyze.metrics=["cka", "mutual_knn"]'])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert "1 of 2 cells failed (first: k-50-" in res.output and "A rerun retries the failed cells" in res.output
    folder = tmp_path / "flickr30k" / "test" / "studies" / "exit"
    assert (folder / "summary.csv").is_file() and (folder / "study.html").is_file()


@pytest.mark.parametrize("axes, match", [
    ({"train.adapter": ["linear", "mlpp"]}, r"cell 2 of 2 \(train.adapter = 'mlpp'\): Unknown adapter .*Did you mean: mlp"),
    ({"train.seed": [0, 1], "train.epochs": [1, -1]}, r"cell 2 of 4 \(train.seed = 0, train.epochs = -1\): train.epochs = -1 "
                                                      r"is out of range"),
    ({"train.lr": [1e-3, -1.0]}, r"\(train.lr = -1.0\): train.lr = -1.0 is out of range"),
    ({"train.image": ["tiny-resnet", "tiny-resnt"]}, r"\(train.image = 'tiny-resnt'\): .*tiny-resnet"),
    ({"analyze.metrics": [["cka"], ["ckaa"]]}, r"\(analyze.metrics = \['ckaa'\]\): .*cka"),
    ({"analyze.controls": [["random"], ["randm"]]}, r"Unknown control 'randm'"),
])
def test_every_cell_is_checked_before_the_first_cell_runs(world, tmp_path, monkeypatch, axes, match):
    fits = Spy(study.cells.fit_adapters)
    monkeypatch.setattr(study.cells, "fit_adapters", fits)
    extracts = Spy(study.cells.extract)
    monkeypatch.setattr(study.cells, "extract", extracts)
    cfg = study_config(world, tmp_path, "checked", axes)
    with pytest.raises(StudyError, match=match):
        run_study(cfg, progress=False)
    assert not fits.calls and not extracts.calls  # refused before any work
    assert not (tmp_path / "flickr30k" / "test" / "studies" / "checked" / "cells").exists()
    with pytest.raises(StudyError, match=match):
        run_study(cfg, dry_run=True)  # a dry run says so too
    sets = [arg for k, v in axes.items() for arg in ("--set", f"study.axes.{k}={json.dumps(v)}")]
    res = CliRunner().invoke(study_cli, ["--config", str(world), "--name", "checked", "--dry-run", *sets])
    assert res.exit_code == 1 and res.output.startswith("Error: Study cell") and "Traceback" not in res.output


# ----------------------------------------------------------------------------- summary math
def test_summary_mean_std_and_t_interval_by_hand():
    def row(a, s, r, d, status="done"):
        return {"a": a, "s": s, "run": f"{a}{s}", "status": status, "error": "", "mean_R": r, "m.delta_image": d,
                "other": 10.0 * s, "m.verdict_image": "supported"}

    rows = [row("x", 0, 0.1, 1.0), row("x", 1, 0.2, 2.0), row("x", 2, 0.3, 3.0),
            row("y", 0, 0.5, -1.0), {"a": "y", "s": 1, "run": "y1", "status": "failed", "error": "boom"}]
    x, y = summarize(rows, ["a", "s"], "s")
    t975_2 = 4.302652729911275  # Student's t, 2 degrees of freedom, 97.5th percentile
    assert (x["a"], x["n"], x["failed"], y["n"], y["failed"]) == ("x", 3, 0, 1, 1)
    assert x["mean_R.mean"] == pytest.approx(0.2) and x["mean_R.std"] == pytest.approx(0.1)
    assert x["mean_R.lo95"] == pytest.approx(0.2 - t975_2 * 0.1 / math.sqrt(3))
    assert x["m.delta_image.hi95"] == pytest.approx(2.0 + t975_2 * 1.0 / math.sqrt(3))
    assert x["other.mean"] == pytest.approx(10.0) and "other.lo95" not in x  # intervals: mean_R and deltas only
    assert "m.verdict_image.mean" not in x and "s.mean" not in x  # strings and axes are not summarised
    assert y["mean_R.mean"] == 0.5 and math.isnan(y["mean_R.std"]) and math.isnan(y["m.delta_image.lo95"])


def test_platonic_columns_are_read_generically():
    from study.table import flat_platonic

    flat = {"cka.delta_image": 0.1, "cka.verdict_image": "supported", "cka.control_cca.excess_image": 0.05}
    cols = flat_platonic({"n": 8, "flat": flat})  # platonic's own flat names pass through, new ones included
    assert cols == {**flat, "cka.supported_image": 1.0, "platonic.n": 8.0}
    results = {"cka": {"terms": {t: {"score": 0.5, "ci_lo": 0.4, "p_value": 0.01} for t in
                                 ("before_image", "before_text", "after_image", "after_text")},
                       "delta": {"image": {"delta": 0.2, "ci_lo": 0.1, "verdict": "inconclusive"}},
                       "seconds": 1.5, "calibrated": {"after_image": 0.3}}}
    cols = flat_platonic({"results": results})  # without "flat": the same names built from the results
    assert cols["cka.after_image"] == 0.5 and cols["cka.p_image"] == 0.01 and cols["cka.after_image_ci_lo"] == 0.4
    assert cols["cka.delta_image"] == 0.2 and cols["cka.delta_image_ci_lo"] == 0.1
    assert cols["cka.supported_image"] == 0.0 and cols["cka.calibrated.after_image"] == 0.3


def test_figures_and_answers_from_a_hand_made_summary(tmp_path):
    from study.figures import fraction_figure, heatmap_figure, pair_figure
    from study.report import answer_q1, answer_q2

    axes = {"train.image": ["a", "b", "c"], "train.adapter": ["linear", "mlp"], "train.train_fraction": [0.5, 1.0],
            "train.seed": [0, 1]}
    summary = []
    for i, image in enumerate(axes["train.image"]):
        for adapter in axes["train.adapter"]:
            for f in axes["train.train_fraction"]:
                r = 0.2 + 0.1 * i + 0.05 * f
                summary.append({"train.image": image, "train.adapter": adapter, "train.train_fraction": f, "n": 2,
                                "mean_R.mean": r, "mean_R.lo95": r - 0.01, "mean_R.hi95": r + 0.01,
                                "chance.mean_R.mean": 0.05, "mean_R.vs_chance.mean": r - 0.05,
                                "mean_R.vs_chance.lo95": r - 0.06, "mean_R.vs_chance.hi95": r - 0.04,
                                "pair.cka.mean": 0.1 * i, "cka.delta_image.mean": 0.02,
                                "cka.delta_image.lo95": 0.01, "cka.delta_image.hi95": 0.03,
                                "cka.delta_text.mean": -0.02, "cka.delta_text.lo95": -0.03,
                                "cka.delta_text.hi95": -0.01, "cka.supported_image.mean": 1.0})
    assert fraction_figure(summary, axes, "train.seed", tmp_path / "fraction.png").is_file()
    path, rho, x_col = pair_figure(summary, axes, "train.seed", tmp_path / "pair.png")
    assert path.is_file() and x_col == "pair.cka" and rho == pytest.approx(0.9, abs=0.1)  # ties in fraction
    assert heatmap_figure(summary, axes, "train.seed", tmp_path / "heat.png").is_file()
    assert heatmap_figure(summary, {"train.seed": [0, 1], "train.adapter": ["x", "y"]}, "train.seed",
                          tmp_path / "none.png") is None  # one categorical axis: no heatmap
    q1 = answer_q1(summary, axes, "train.seed")
    assert "yes: the held-out mean recall lies above chance in every setting" in q1 and "2 train.seed values" in q1
    q2 = answer_q2(summary, axes, "train.seed", n_cells=24)
    assert "\nImage side: yes, in every test: delta above 0 in 12 and below 0 in 0 of 12" in q2
    assert "supported in 24 of 24" in q2 and "\nText side: no: delta above 0 in 0 and below 0 in 12 of 12" in q2


def test_a_study_notices_changed_data_and_mismatched_requests(tmp_path):
    """Re-extracted data (same names, other pixels) makes the finished cells run again and the reused
    run retrain; a study axis the cached entries do not answer (data.captions here) fails its cells
    with the stale-entry error instead of silently reading the other cell's entries."""
    from PIL import Image

    from extract import datasets as D

    data = make_flickr30k(tmp_path / "data", n_per_split=(N_TRAIN, 6, 6))
    path = tmp_path / "base.toml"
    path.write_text(BASE.format(data=data, cache=tmp_path / "cache"))
    cfg = with_values(load_config(path), {"study.name": "d", "study.axes": {"train.seed": [0]},
                                          "analyze.out": str(tmp_path / "out"), "analyze.bootstrap": 4,
                                          "analyze.permutations": 4})
    first = run_study(cfg, progress=False)
    assert (first.ran, first.trained) == (1, 1)
    assert run_study(cfg, progress=False).ran == 0
    image = D.load_split("flickr30k", data, "train").items[0].image
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(image)
    extract(load_config(path), force=True)
    again = run_study(cfg, progress=False)
    assert (again.ran, again.trained) == (1, 1)  # new train features: the run is not reused
    other = run_study(with_values(cfg, {"study.name": "c", "study.axes": {"data.captions": ["all", "first"]}}),
                      progress=False)
    cells = read_csv(other.folder / "cells.csv")
    assert [c["status"] for c in cells] == ["done", "failed"]
    assert "captions" in cells[1]["error"] and "--force" in cells[1]["error"]
