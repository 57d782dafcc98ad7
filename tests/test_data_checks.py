"""Data that is valid but would make numbers silently wrong, on a tiny imagefolder with tiny
encoders: zero-shot classes with the same display name, a gallery over edited data, duplicate
images under different ids, captions the tokenizer makes identical, and `analyze matching
--seeds` leaving nothing to match (plus a stored null read by the report)."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from analyze.cli import main as analyze_cli
from analyze.compare import compare_entries, load_joined
from analyze.evalreport import section_matching
from analyze.gallery import build_gallery
from analyze.report import Document, build_report
from extract.datasets import DatasetError
from extract.labels import dataset_classes
from extract.run import extract
from pipeline.cache import StaleCacheError
from pipeline.config import load_config, with_values
from tests.fixtures import write_metadata
from train.fit import fit_adapters

pytestmark = pytest.mark.usefixtures("one_thread")

COLORS = {"blue": (30, 30, 220), "green": (30, 200, 30), "red": (220, 30, 30)}
PER_SPLIT = {"train": 6, "val": 2, "test": 4}


def make_data(root, copies: int = 0):
    """Class folders of coloured squares with distinct captions; ``copies`` train images are
    byte-identical copies of other train images under new names."""
    rng = np.random.default_rng(0)
    for split, k in PER_SPLIT.items():
        rows = []
        for c, rgb in COLORS.items():
            for i in range(k):
                rel = f"{c}/{split}_{i}.png"
                (root / split / c).mkdir(parents=True, exist_ok=True)
                pixels = np.clip(np.array(rgb) + rng.integers(-40, 40, (24, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / rel)
                rows.append({"file_name": rel, "caption": f"{c} square {i} of the {split} split"})
        for j in range(copies if split == "train" else 0):
            src = rows[j]["file_name"]
            shutil.copyfile(root / split / src, root / split / src.replace(".png", "_copy.png"))
            rows.append({"file_name": src.replace(".png", "_copy.png"), "caption": f"another picture, number {j}"})
        write_metadata(root / split, rows)
    return root


def options(tmp, data) -> dict:
    return {"data.dataset": "imagefolder", "data.data_dir": str(data), "data.captions": "first",
            "data.cache": str(tmp / "cache"), "data.label_from": "dir", "extract.encoders": ["tiny-resnet", "tiny-gpt2"],
            "extract.workers": 0, "extract.batch_size": 8, "train.image": "tiny-resnet", "train.text": "tiny-gpt2",
            "train.reference": "", "train.dim": 8, "train.epochs": 2, "train.batch_size": 6, "train.name": "t",
            "analyze.reference": "", "analyze.metrics": ["cka", "mutual_knn"], "analyze.k": 2,
            "analyze.bootstrap": 5, "analyze.permutations": 5, "analyze.out": str(tmp / "reports")}


def config(tmp, data):
    return load_config(None, options=options(tmp, data))


def write_toml(path, values: dict):
    """The dotted options as a TOML file (JSON literals are TOML for these values)."""
    sections: dict = {}
    for key, v in values.items():
        section, name = key.split(".")
        sections.setdefault(section, []).append(f"{name} = {json.dumps(v)}")
    path.write_text("".join(f"[{s}]\n" + "\n".join(lines) + "\n" for s, lines in sections.items()))
    return path


def rename_class(data, split: str, old: str, new: str) -> None:
    (data / split / old).rename(data / split / new)
    meta = data / split / "metadata.jsonl"
    rows = [json.loads(x) for x in meta.read_text().splitlines()]
    write_metadata(data / split, [{**r, "file_name": r["file_name"].replace(f"{old}/", f"{new}/")} for r in rows])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("checks")
    data = make_data(tmp / "data")
    cfg = config(tmp, data)
    extract(cfg)
    fit_adapters(cfg, progress=False)
    return tmp, cfg, write_toml(tmp / "exp.toml", options(tmp, data))


# ----------------------------------------------------------------------------- zero-shot class names
def test_classes_with_the_same_display_name_are_refused_naming_both(tmp_path):
    data = make_data(tmp_path / "data")
    rename_class(data, "train", "blue", "big_cat")
    rename_class(data, "test", "blue", "big cat")
    with pytest.raises(DatasetError, match="Classes 'big cat' and 'big_cat'.*same name 'big cat'"):
        dataset_classes("imagefolder", data, "dir")
    toml = write_toml(tmp_path / "exp.toml", options(tmp_path, data))
    out = CliRunner().invoke(analyze_cli, ["zeroshot", "--config", str(toml)])
    assert out.exit_code == 1 and "'big cat' and 'big_cat'" in out.output and "Traceback" not in out.output


# ----------------------------------------------------------------------------- the gallery and edited data
def test_the_gallery_refuses_data_edited_after_extraction(trained):
    tmp, cfg, _ = trained
    md, _ = build_gallery(cfg)
    assert "square" in md
    meta = tmp / "data" / "test" / "metadata.jsonl"
    original = meta.read_text()
    try:
        meta.write_text(original.replace("red square 1 of the test split", "an edited caption"))
        with pytest.raises(StaleCacheError, match="changed since entry .* was extracted .*captions"):
            build_gallery(cfg)
        report = build_report(cfg).md.read_text()
        gallery = report.split("## Retrieval gallery")[1].split("\n## ")[0]
        assert "Not available" in gallery and "an edited caption" not in report
    finally:
        meta.write_text(original)
    image = tmp / "data" / "test" / "green" / "test_2.png"
    pixels = image.read_bytes()
    try:
        Image.new("RGB", (24, 24), (0, 0, 0)).save(image)
        with pytest.raises(StaleCacheError, match="Image files of the test split changed .*first: 'green/test_2'"):
            build_gallery(cfg)
    finally:
        image.write_bytes(pixels)


# ----------------------------------------------------------------------------- duplicate images
def test_duplicate_images_are_warned_at_extraction_and_dropped_or_kept(tmp_path, caplog):
    cfg = with_values(config(tmp_path, make_data(tmp_path / "data", copies=3)),
                      {"analyze.split": "train", "analyze.entries": ["tiny-resnet", "tiny-gpt2"]})
    with caplog.at_level(logging.WARNING, logger="extract.checks"):
        extract(cfg)
    assert "imagefolder/train: 3 of 21 images are byte-identical copies" in caplog.text
    assert "'blue/train_0' = 'blue/train_0_copy'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="analyze.compare"):
        dropped = compare_entries(cfg)
    assert dropped["n"] == 18 and dropped["duplicates"]["dropped"] == 3 and dropped["duplicates"]["policy"] == "drop"
    assert "dropped, one image of each group kept" in caplog.text
    caplog.clear()
    keep = with_values(cfg, {"analyze.duplicates": "keep"})
    with caplog.at_level(logging.WARNING, logger="analyze.compare"):
        kept = compare_entries(keep)
    assert kept["n"] == 21 and kept["duplicates"]["dropped"] == 0 and kept["duplicates"]["copies"] == 3
    assert "kept; kNN and kernel scores count copies" in caplog.text
    joined = load_joined(cfg, ["tiny-resnet"])
    assert "blue/train_0" in joined.ids and "blue/train_0_copy" not in joined.ids
    out = CliRunner().invoke(analyze_cli, ["cka", "--duplicates", "sometimes"])
    assert out.exit_code == 2 and "'sometimes' is not one of 'drop', 'keep'" in out.output


# ----------------------------------------------------------------------------- captions the tokenizer merges
def test_captions_made_identical_by_the_tokenizer_are_warned(tmp_path, caplog):
    """tiny-gpt2 reads 16 byte tokens: captions sharing their first 16 characters become one."""
    data = make_data(tmp_path / "data")
    meta = data / "val" / "metadata.jsonl"
    rows = [json.loads(x) for x in meta.read_text().splitlines()]
    for i, r in enumerate(rows):
        r["caption"] = f"a long shared beginning of every caption, then {i}"
    write_metadata(data / "val", rows)
    cfg = with_values(config(tmp_path, data), {"extract.split": "val", "extract.encoders": ["tiny-gpt2"]})
    with caplog.at_level(logging.WARNING, logger="extract.checks"):
        extract(cfg)
    assert "tiny-gpt2's tokenizer reads 5 distinct caption(s) as the same tokens" in caplog.text
    assert "longest such sequence: 16 tokens" in caplog.text


# ----------------------------------------------------------------------------- matching seeds
@pytest.mark.parametrize("seeds", ["12", "40", "0.99", "0.97"])
def test_matching_seeds_leaving_nothing_to_match_are_one_line(trained, seeds):
    _, _, toml = trained  # 12 test images are matched; 0.97 x 12 rounds to 12
    out = CliRunner().invoke(analyze_cli, ["matching", "--config", str(toml), "--seeds", seeds])
    assert out.exit_code == 1 and "Traceback" not in out.output, out.output
    assert "leave none to match" in out.output and len(out.output.strip().splitlines()) == 1


def test_the_report_reads_a_stored_null_accuracy(trained, monkeypatch):
    _, cfg, _ = trained
    saved = {"matching": {"raw": {"n": 12, "seeds": 12, "accuracy": None, "chance": None, "seconds": 0.1}},
             "kernel": "linear", "split": "test", "base_rows": 18, "anchors": 18}
    monkeypatch.setattr("analyze.evalreport.saved_output", lambda *a: (saved, ""))
    doc = Document("r", cfg.analyze.out)
    section_matching(doc, cfg, "t")
    text = " ".join(str(b) for b in doc.blocks)
    assert "n/a of the other 0 images" in text
