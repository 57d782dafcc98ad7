"""Evaluating the shared space as the field does: zero-shot classification (hand-made cases,
cached prompt entries), the analyze zeroshot / matching commands and the report's gallery and
cost table, on a tiny imagefolder with class folders and tiny random encoders."""

import csv
import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import analyze.prompts as prompts_mod
from analyze.cli import main as analyze_cli
from analyze.compare import load_joined, read_rows
from analyze.metrics import cka
from analyze.platonic import platonic_test
from analyze.prompts import DEFAULT_TEMPLATES, prompt_entry_path, prompt_features, prompt_texts
from analyze.zeroshot import accuracy, chance, class_embeddings, predictions, summarize, true_ranks, zero_shot
from extract.labels import class_name, dataset_classes, image_labels
from extract.run import extract
from pipeline.cache import StaleCacheError, find_entry
from pipeline.config import load_config, with_values
from pipeline.errors import PipelineError
from study.runner import run_study
from tests.fixtures import write_metadata
from train.fit import fit_adapters
from train.losses import loss_label

CLASSES = ("blue", "green", "red_thing")
COLORS = {"blue": (30, 30, 220), "green": (30, 200, 30), "red_thing": (220, 30, 30)}
PER_CLASS = {"train": 4, "val": 2, "test": 3}


# ----------------------------------------------------------------------------- hand-made cases
def test_accuracy_hand_case_with_the_tie_rule():
    classes = np.eye(3)
    images = np.array([[1.0, 0.0, 0.0],   # class 0: hit
                       [0.6, 0.8, 0.0],   # class 0: class 1 scores higher -> rank 1
                       [0.0, 0.0, 1.0],   # class 2: hit
                       [1.0, 1.0, 0.0]])  # class 0: tied with class 1 -> counts against: rank 1
    labels = [0, 0, 2, 0]
    assert true_ranks(images @ classes.T, labels).tolist() == [0, 1, 0, 1]
    assert accuracy(images, classes, labels, ks=(1, 2, 3)) == {"top1": 0.5, "top2": 1.0, "top3": 1.0}
    assert predictions(images @ classes.T, labels).tolist() == [0, 1, 2, 1]
    assert accuracy(np.ones((4, 3)), classes, labels, ks=(1,)) == {"top1": 0.0}  # constant embeddings: all ties


def test_summarize_balanced_accuracy_and_confusion():
    scores = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.1, 0.9, 0.0], [0.0, 0.2, 0.7]])
    res = summarize(scores, np.array([0, 1, 1, 2]), ["a", "b", "c"])
    assert res["top1"] == 0.75 and res["confusion"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert res["per_class"]["b"] == {"n": 2, "top1": 0.5}
    assert res["balanced"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert chance(np.array([0, 1, 1, 2]), 3) == {"top1": 1 / 3, "top5": 1.0, "balanced": 1 / 3, "majority": 0.5,
                                                 "majority_balanced": 1 / 3}
    # always answering the majority class: balanced accuracy averages over the classes present (2 of 4 here)
    assert chance(np.array([1, 1, 3]), 4)["majority_balanced"] == 0.5
    majority = summarize(np.tile([0.0, 1.0, 0.0, 0.0], (3, 1)), np.array([1, 1, 3]), ["a", "b", "c", "d"])
    assert majority["balanced"] == 0.5


def test_class_embeddings_mean_of_normalised_prompts():
    prompts = np.array([[2.0, 0.0], [0.0, 5.0], [0.0, -1.0], [0.0, -3.0]])  # 2 classes x 2 templates
    np.testing.assert_allclose(class_embeddings(prompts, 2), [[2 ** -0.5, 2 ** -0.5], [0.0, -1.0]])
    with pytest.raises(ValueError, match="equal size"):
        class_embeddings(prompts, 3)


def test_prompt_texts_show_underscores_as_spaces():
    ids, texts = prompt_texts(["red_thing", "dog"], ["a photo of a {}.", "{}"])
    assert ids == ["red_thing#0", "red_thing#1", "dog#0", "dog#1"]
    assert texts == ["a photo of a red thing.", "red thing", "a photo of a dog.", "dog"]
    assert class_name("hot_air_balloon") == "hot air balloon"


# ----------------------------------------------------------------------------- a tiny trained run
def make_classed_imagefolder(root):
    """train/val/test with one folder per class; a label column that differs from the folder."""
    rng = np.random.default_rng(0)
    for split, k in PER_CLASS.items():
        rows = []
        for c in CLASSES:
            for i in range(k):
                rel = f"{c}/{split}_{i}.png"
                (root / split / c).mkdir(parents=True, exist_ok=True)
                pixels = np.clip(np.array(COLORS[c]) + rng.integers(-20, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / rel)
                rows.append({"file_name": rel, "caption": f"a {class_name(c)} picture number {i} of {split}",
                             "label": f"kind_{c}"})
        write_metadata(root / split, rows)
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config file, config) of a trained tiny run "t" on the classed imagefolder."""
    tmp = tmp_path_factory.mktemp("eval")
    data = make_classed_imagefolder(tmp / "data")
    toml = tmp / "exp.toml"
    toml.write_text(f"""
[data]
dataset = "imagefolder"
data_dir = "{data}"
captions = "first"
cache = "{tmp / 'cache'}"
label_from = "dir"
[extract]
encoders = ["tiny-resnet", "tiny-gpt2"]
workers = 0
batch_size = 8
[train]
image = "tiny-resnet"
text = "tiny-gpt2"
reference = ""
dim = 8
epochs = 2
batch_size = 6
lr = 1e-3
name = "t"
[analyze]
reference = ""
metrics = ["cka"]
k = 2
bootstrap = 5
permutations = 5
out = "{tmp / 'reports'}"
""")
    cfg = load_config(toml)
    extract(cfg)
    fit_adapters(cfg, progress=False)
    return toml, cfg


def test_labels_from_dir_and_from_a_column(tiny):
    _, cfg = tiny
    d = cfg.data
    by_dir = image_labels(d.dataset, d.data_dir, "test", "dir")
    assert by_dir["red_thing/test_2"] == "red_thing" and len(by_dir) == 9
    by_col = image_labels(d.dataset, d.data_dir, "test", "label")
    assert by_col["red_thing/test_2"] == "kind_red_thing"
    assert dataset_classes(d.dataset, d.data_dir, "dir") == list(CLASSES)
    with pytest.raises(ValueError, match="no 'species' column"):
        image_labels(d.dataset, d.data_dir, "test", "species")



def test_a_null_label_is_missing_not_a_class(tmp_path):
    """JSON null in the label column must not become a class called "None"."""
    data = make_classed_imagefolder(tmp_path / "data")
    meta = data / "test" / "metadata.jsonl"
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    rows[1]["label"] = None
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="has no 'label' value"):
        image_labels("imagefolder", data, "test", "label")


def test_prompt_entries_are_cached_and_refused_when_stale(tiny, monkeypatch):
    _, cfg = tiny
    text = find_entry(cfg.data.cache, cfg.data.dataset, "test", "tiny-gpt2")
    loads = []
    real = prompts_mod.load_encoder
    monkeypatch.setattr(prompts_mod, "load_encoder", lambda *a, **k: loads.append(1) or real(*a, **k))
    first = prompt_features(cfg.data.cache, cfg.data.dataset, text, CLASSES, DEFAULT_TEMPLATES, "cpu")
    assert first.shape == (len(CLASSES) * len(DEFAULT_TEMPLATES), text.dim) and len(loads) == 1
    again = prompt_features(cfg.data.cache, cfg.data.dataset, text, CLASSES, DEFAULT_TEMPLATES, "cpu")
    np.testing.assert_array_equal(first, again)
    assert len(loads) == 1  # read from the cache, no encoder loaded
    path = prompt_entry_path(cfg.data.cache, cfg.data.dataset, "tiny-gpt2")
    assert path.is_file() and "prompts" in path.parts
    with pytest.raises(StaleCacheError, match="templates"):
        prompt_features(cfg.data.cache, cfg.data.dataset, text, CLASSES, ["a sketch of a {}."], "cpu")
    fresh = prompt_features(cfg.data.cache, cfg.data.dataset, text, CLASSES, ["a sketch of a {}."], "cpu", force=True)
    assert fresh.shape == (3, text.dim) and len(loads) == 2
    prompt_features(cfg.data.cache, cfg.data.dataset, text, CLASSES, DEFAULT_TEMPLATES, "cpu", force=True)  # restore


def test_zeroshot_matching_and_report_through_the_cli(tiny):
    toml, cfg = tiny
    runner = CliRunner()
    res = runner.invoke(analyze_cli, ["zeroshot", "--config", str(toml)])
    assert res.exit_code == 0, res.output
    reports = Path(cfg.analyze.out)
    doc = json.loads(next(reports.rglob("zeroshot.json")).read_text())
    assert doc["classes"] == list(CLASSES) and doc["n"] == 9
    assert set(doc["results"]) == {"adapters", "cca", "procrustes", "relative"}
    assert doc["chance"]["top1"] == pytest.approx(1 / 3)
    for r in doc["results"].values():
        assert 0 <= r["top1"] <= r["top5"] <= 1 and sum(map(sum, r["confusion"])) == 9
    for bad in (["--seeds", "-1"], ["--base-rows", "-3"]):
        res = runner.invoke(analyze_cli, ["matching", "--config", str(toml), *bad])
        assert res.exit_code == 1 and bad[0] in res.output and "Traceback" not in res.output, res.output
    res = runner.invoke(analyze_cli, ["matching", "--config", str(toml), "--seeds", "2"])
    assert res.exit_code == 0, res.output
    doc = json.loads(next(reports.rglob("matching.json")).read_text())
    assert {"local_cka", "relative", "adapters", "cca", "procrustes"} == set(doc["retrieval"])
    assert doc["matching"]["raw"]["seeds"] == 2 and doc["matching"]["raw"]["chance"] == pytest.approx(1 / 7)
    assert doc["retrieval"]["relative"]["rsum"] >= 0
    res = runner.invoke(analyze_cli, ["report", "--config", str(toml)])
    assert res.exit_code == 0, res.output
    html = next(reports.rglob("report.html")).read_text()
    for heading in ("Zero-shot classification", "Training-free matching", "Retrieval gallery", "Cost"):
        assert f">{heading}<" in html
    assert "ASIF relative (training-free)" in html and "rsum" in html
    srcs = re.findall(r'src="([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/") for s in srcs)  # self-contained: every image embedded
    assert "<link" not in html and "<script" not in html and "http://" not in html and "https://" not in html
    assert html.count("data:image/jpeg;base64") >= 4  # gallery thumbnails
    from tests.fixtures import embedded_images

    for display, natural in embedded_images(html):  # every image shown at 1x to 2x its natural width
        assert display <= natural <= 2 * display, (display, natural)
    assert "✓" in html
    res = runner.invoke(analyze_cli, ["report", "--config", str(toml), "--set", "data.label_from=label"])
    assert res.exit_code == 0, res.output
    md = next(reports.rglob("report.md")).read_text()  # zero-shot results of other labels are not shown
    assert "made for other adapters, data or labels" in md and "analyze zeroshot --run" in md
    # test features re-extracted after matching.json was written: its numbers are not shown any more
    entry = find_entry(cfg.data.cache, cfg.data.dataset, "test", "tiny-gpt2", cfg.data.data_dir).path
    st = entry.stat()
    os.utime(entry, (st.st_atime + 100, st.st_mtime + 100))
    try:
        res = runner.invoke(analyze_cli, ["report", "--config", str(toml)])
        md = next(reports.rglob("report.md")).read_text()
        assert res.exit_code == 0 and "analyze matching --run t" in md and "ASIF relative" not in md, res.output
    finally:
        os.utime(entry, (st.st_atime, st.st_mtime))


def test_zeroshot_refuses_a_dataset_without_labels(tiny):
    toml, _ = tiny
    res = CliRunner().invoke(analyze_cli, ["zeroshot", "--config", str(toml), "--label-from", "species"])
    assert res.exit_code != 0 and "no 'species' column" in res.output


def test_a_missing_data_folder_is_reported_with_options_the_command_has(tiny, tmp_path):
    from tests.test_error_messages import check_message

    toml, _ = tiny
    res = CliRunner().invoke(analyze_cli, ["zeroshot", "--config", str(toml), "--set",
                                           f"data.data_dir={tmp_path / 'moved'}"])
    assert res.exit_code == 1 and "data.data_dir" in res.output, res.output
    check_message(res.output, reached_from="analyze zeroshot")


def test_fit_with_the_proposal_formulation(tiny):
    _, cfg = tiny
    tc = dataclasses.replace(cfg.train, loss="vsepp", loss_direction="image_to_text", normalize=False, name="prop")
    result = fit_adapters(dataclasses.replace(cfg, train=tc), progress=False)
    test = result.metrics.test["infonce"]
    assert {"rsum", "i2t_medr", "t2i_meanr"} <= set(test) and 0 <= test["rsum"] <= 600
    assert loss_label(tc.loss, tc.loss_direction, tc.normalize) == "image_to_text VSE++ on raw inner products"
    assert loss_label() == "symmetric InfoNCE"  # the default, as tables and curves.png name it
    with pytest.raises(PipelineError, match="Did you mean: symmetric"):
        fit_adapters(dataclasses.replace(cfg, train=dataclasses.replace(tc, loss_direction="symetric")))


def test_a_study_of_variants_with_zero_shot_columns(tiny, tmp_path):
    """study.variants x seeds with study.evaluations = [zeroshot]: one column per method and figure,
    equal to `analyze zeroshot` on the cell's run, with t-intervals over seeds in the summary."""
    _, cfg = tiny
    cfg = with_values(cfg, {"study.name": "zs", "study.variants": {"plain": {}, "mix": {"train.mixup": 1.0}},
                            "study.axes": {"train.seed": [0, 1]}, "study.evaluations": ["zeroshot"],
                            "analyze.out": str(tmp_path)})
    result = run_study(cfg, progress=False)
    assert result.failed == 0 and result.ran == 4
    with open(result.folder / "cells.csv", newline="") as fh:
        cells = list(csv.DictReader(fh))
    assert list(cells[0])[:2] == ["variant", "train.seed"] and [c["variant"] for c in cells] == ["plain"] * 2 + ["mix"] * 2
    assert not any(k.startswith("cka.") for k in cells[0])  # no platonic test asked for
    direct = zero_shot(with_values(cfg, {"train.name": cells[2]["run"]}), cells[2]["run"])
    for method in ("adapters", "procrustes", "relative"):
        for figure in ("top1", "top5", "balanced"):
            assert float(cells[2][f"zeroshot.{method}.{figure}"]) == pytest.approx(direct["results"][method][figure])
    assert float(cells[0]["zeroshot.chance.top1"]) == pytest.approx(1 / len(CLASSES))
    with open(result.folder / "summary.csv", newline="") as fh:
        summary = list(csv.DictReader(fh))
    assert [s["variant"] for s in summary] == ["plain", "mix"] and all(s["n"] == "2" for s in summary)
    assert {"zeroshot.adapters.top1.lo95", "zeroshot.adapters.balanced.hi95"} <= set(summary[0])


def test_zero_shot_of_a_run_trained_on_hidden_layers(tiny, tmp_path):
    """A run that reads stored hidden layers (train.image_layer / text_layer) is evaluated on those
    layers, and its prompts are embedded from the same text layer (cached apart from the pooled ones)."""
    _, cfg = tiny
    cfg = with_values(cfg, {"data.cache": str(tmp_path / "cache"), "extract.layers": "all", "train.name": "deep",
                            "train.image_layer": 1, "train.text_layer": 0, "analyze.out": str(tmp_path / "r")})
    extract(cfg)
    fit_adapters(cfg, progress=False)
    doc = zero_shot(cfg, "deep")
    text = find_entry(cfg.data.cache, cfg.data.dataset, "test", "tiny-gpt2", cfg.data.data_dir)
    layered = prompt_entry_path(cfg.data.cache, cfg.data.dataset, "tiny-gpt2.layer0")
    assert layered.exists() and not prompt_entry_path(cfg.data.cache, cfg.data.dataset, "tiny-gpt2").exists()
    prompts = prompt_features(cfg.data.cache, cfg.data.dataset, text, doc["classes"], doc["templates"], "cpu", layer=0)
    assert prompts.shape[1] == text.features(0).shape[1]  # the hidden layer's width
    assert 0.0 <= doc["results"]["adapters"]["top1"] <= 1.0



def test_platonic_of_a_layer_run_compares_the_layers_it_read(tiny, tmp_path):
    """'before' = the stored layers the adapters read (not the final features), the controls are fitted
    on them too; a source re-extracted with other encoder settings afterwards is refused."""
    _, cfg = tiny
    cfg = with_values(cfg, {"data.cache": str(tmp_path / "cache"), "extract.layers": "all", "train.name": "deep",
                            "extract.encoders": ["tiny-resnet", "tiny-gpt2", "tiny-dinov2"],
                            "train.image_layer": 1, "train.text_layer": 0, "analyze.out": str(tmp_path / "r"),
                            "analyze.reference": "tiny-dinov2", "analyze.metrics": ["cka"],
                            "analyze.bootstrap": 4, "analyze.permutations": 4})
    extract(cfg)
    fit_adapters(cfg, progress=False)
    doc = platonic_test(cfg, "deep", kernels=False)
    joined = load_joined(cfg, ["tiny-resnet", "tiny-gpt2", "tiny-dinov2"])
    ref = joined.features["tiny-dinov2"]
    layer1 = read_rows(joined, "tiny-resnet", 1)
    assert layer1.shape[1] != joined.features["tiny-resnet"].shape[1]  # the case that used to fail outright
    terms = doc["results"]["cka"]["terms"]
    assert terms["before_image"]["score"] == pytest.approx(cka(layer1, ref), abs=1e-9)
    assert terms["before_text"]["score"] == pytest.approx(cka(read_rows(joined, "tiny-gpt2", 0), ref), abs=1e-9)
    assert "layer 1" in doc["controls"]["cca"] and "control_random.after_image" in str(doc["flat"])
    gpt2 = with_values(cfg, {"extract.encoders": ["tiny-gpt2"], "extract.encoder_options": {"tiny-gpt2": {"pooling": "last"}}})
    extract(gpt2, force=True)  # same name and width, other pooling
    with pytest.raises(PipelineError, match="re-extracted since.*encoder"):
        platonic_test(cfg, "deep", kernels=False)


def test_zero_shot_and_a_study_of_a_token_run(tiny, tmp_path):
    """A token-projector run (train.adapter = "token") is evaluated on its token rows: the prompts'
    tokens go through its text projector; closed-form baselines and ASIF are left out (they read
    pooled features). The same through a study of pooled vs token variants."""
    _, cfg = tiny
    cfg = with_values(cfg, {"data.cache": str(tmp_path / "cache"), "extract.tokens": "grid:2", "train.name": "tok",
                            "train.adapter": "token", "analyze.out": str(tmp_path / "r")})
    extract(cfg)
    fit_adapters(cfg, progress=False)
    doc = zero_shot(cfg, "tok")
    assert set(doc["results"]) == {"adapters"} and 0 <= doc["results"]["adapters"]["top1"] <= 1
    cfg = with_values(cfg, {"study.name": "tok", "study.variants": {"pooled": {"train.adapter": "mlp"},
                            "token": {"train.token.text_global": "identity"}}, "study.axes": {"train.seed": [0]},
                            "study.evaluations": ["zeroshot"]})
    result = run_study(cfg, progress=False)
    assert result.failed == 0 and result.ran == 2
