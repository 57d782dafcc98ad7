"""Tests for extract.datasets: the FORMATS registry and every format's loader (layouts, options,
split listings, bad input, fingerprints that must not change)."""
from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extract import datasets as D
from extract.datasets import DatasetError, Item, available_splits, load_split
from tests.fixtures import make_coco, make_flickr30k, make_hf_dataset, make_imagefolder, write_metadata


def karpathy_expected(path: Path, split: str) -> dict[str, tuple[str, ...]]:
    doc = json.loads(path.read_text())
    return {
        Path(im["filename"]).stem: tuple(s["raw"] for s in im["sentences"])
        for im in doc["images"] if im["split"] == split
    }


# --------------------------------------------------------------------------- Flickr30k


@pytest.fixture(scope="module")
def flickr(tmp_path_factory) -> Path:
    return make_flickr30k(tmp_path_factory.mktemp("flickr"))


@pytest.mark.parametrize("split,n", [("train", 6), ("val", 3), ("test", 3)])
def test_flickr30k_karpathy(flickr, split, n):
    s = load_split("flickr30k", flickr, split)
    assert (s.dataset, s.name, len(s)) == ("flickr30k", split, n)
    assert s.source.endswith("dataset_flickr30k.json")
    assert s.ids == sorted(s.ids) and all(i.isdigit() for i in s.ids)
    assert {it.id: it.captions for it in s.items} == karpathy_expected(flickr / "dataset_flickr30k.json", split)
    for it in s.items:
        assert Path(it.image).is_absolute() and Path(it.image).name == f"{it.id}.jpg"
    img = s.load_image(0)
    assert img.mode == "RGB" and img.size == (48, 48)


def test_flickr30k_fingerprint_stable_and_relocatable(flickr, tmp_path):
    a = load_split("flickr30k", flickr, "test")
    assert a.fingerprint() == load_split("flickr30k", flickr, "test").fingerprint()
    moved = shutil.copytree(flickr, tmp_path / "elsewhere")
    assert load_split("flickr30k", moved, "test").fingerprint() == a.fingerprint()
    assert load_split("flickr30k", flickr, "val").fingerprint() != a.fingerprint()
    doc = json.loads((moved / "dataset_flickr30k.json").read_text())
    next(im for im in doc["images"] if im["split"] == "test")["sentences"][0]["raw"] = "changed"
    (moved / "dataset_flickr30k.json").write_text(json.dumps(doc))
    assert load_split("flickr30k", moved, "test").fingerprint() != a.fingerprint()


def test_flickr30k_token_file_with_split_lists(flickr, tmp_path):
    d = shutil.copytree(flickr, tmp_path / "tok")
    (d / "dataset_flickr30k.json").unlink()
    for split in ("train", "val", "test"):
        tok, kar = load_split("flickr30k", d, split), load_split("flickr30k", flickr, split)
        assert tok.source.endswith("results_20130124.token")
        assert tok.items == [Item(i.id, i.image.replace(str(flickr.resolve()), str(d.resolve())), i.captions)
                             for i in kar.items]
        assert tok.fingerprint() == kar.fingerprint()
    for split in ("train", "val", "test"):
        (d / f"{split}.txt").unlink()
    with pytest.raises(DatasetError, match=r"no split information.*dataset_flickr30k\.json.*train\.txt"):
        load_split("flickr30k", d, "train")


def test_flickr30k_token_file_errors(tmp_path):
    d = make_flickr30k(tmp_path, n_per_split=(2, 1, 1), karpathy=False)
    tok = d / "results_20130124.token"
    lines = tok.read_text().splitlines()
    tok.write_text("\n".join(lines[:3] + ["no tab on this line"] + lines[3:]) + "\n")
    with pytest.raises(DatasetError, match=r"results_20130124\.token line 4: expected"):
        load_split("flickr30k", d, "train")
    tok.write_text("\n".join(lines + [lines[1]]) + "\n")
    with pytest.raises(DatasetError, match=rf"line {len(lines) + 1}: caption \d+#1 already given on line 2"):
        load_split("flickr30k", d, "train")
    tok.write_text("\n".join(lines) + "\n")
    (d / "val.txt").write_text("123\n")
    with pytest.raises(DatasetError, match=r"val\.txt lists image ids without captions.*123"):
        load_split("flickr30k", d, "val")


def test_flickr30k_image_dir_variants(flickr, tmp_path):
    d = shutil.copytree(flickr, tmp_path / "f")
    (d / "flickr30k-images").rename(d / "images")
    s = load_split("flickr30k", d, "val")
    assert Path(s.items[0].image).parent == (d / "images").resolve()
    (d / "images").rename(tmp_path / "pics")
    s = load_split("flickr30k", d, "val", image_dir=tmp_path / "pics")
    assert s.load_image(0).size == (48, 48)
    with pytest.raises(DatasetError, match=r"3 of 3 image files .* missing.*--set data\.options\.image_dir="):
        load_split("flickr30k", d, "val")


def test_prefers_karpathy_json_over_token(flickr):
    assert load_split("flickr30k", flickr, "train").source.endswith(".json")


# --------------------------------------------------------------------------- COCO


def test_coco_splits(tmp_path):
    d = make_coco(tmp_path)
    sizes = {sp: len(load_split("coco", d, sp)) for sp in ("train", "restval", "val", "test")}
    assert sizes == {"train": 4, "restval": 2, "val": 2, "test": 2}
    s = load_split("coco", d, "train")
    assert s.ids[0] == "COCO_train2014_000000391895"
    assert len(s.items[0].captions) == 6
    assert s.items[0].image == str((d / "train2014" / "COCO_train2014_000000391895.jpg").resolve())
    assert s._rel[s.ids[0]] == "train2014/COCO_train2014_000000391895.jpg"
    assert load_split("coco", d, "restval").items[0].image.startswith(str((d / "val2014").resolve()))
    with pytest.raises(DatasetError, match=r"split 'tset'.*'restval'.*Did you mean: test"):
        load_split("coco", d, "tset")


def test_coco_restval_joins_train(tmp_path):
    d = make_coco(tmp_path)
    plain, rest = load_split("coco", d, "train"), load_split("coco", d, "restval")
    both = load_split("coco", d, "train", restval="train")
    assert both.name == "train" and both.ids == sorted(plain.ids + rest.ids)
    assert {it.id: it.captions for it in both.items} == {it.id: it.captions for it in plain.items + rest.items}
    assert both.fingerprint() != plain.fingerprint()  # a cache of plain train reads as stale
    assert load_split("coco", d, "train", restval="split").fingerprint() == plain.fingerprint()
    assert load_split("coco", d, "test", restval="train").ids == load_split("coco", d, "test").ids
    assert available_splits("coco", d, restval="train") == ["train", "val", "test"]
    with pytest.raises(DatasetError, match=r"--set data\.options\.restval=train the restval images are part of split 'train'"):
        load_split("coco", d, "restval", restval="train")
    with pytest.raises(DatasetError, match=r"option restval='yes': use 'split' .* or 'train'"):
        load_split("coco", d, "train", restval="yes")


# --------------------------------------------------------------------------- imagefolder


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_imagefolder_split_folders(tmp_path, fmt):
    d = make_imagefolder(tmp_path, fmt=fmt, n=4, captions_per_image=3)
    s = load_split("imagefolder", d, "val")
    assert s.ids == ["sub/val_1", "sub/val_3", "val_0", "val_2"]
    assert all(len(it.captions) == 3 for it in s.items)
    assert s.source.endswith(f"val/metadata.{fmt}")
    assert s.load_image(0).size == (32, 32)
    assert load_split("imagefolder", d, "validation").ids == s.ids  # alias
    (d / "val").rename(d / "validation")
    assert load_split("imagefolder", d, "val").fingerprint() == s.fingerprint()


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_imagefolder_list_captions_and_split_column(tmp_path, fmt):
    d = make_imagefolder(tmp_path, fmt=fmt, list_captions=True, split_column=True, captions_per_image=4)
    assert (d / f"metadata.{fmt}").is_file() and not (d / "train").exists()
    s = load_split("imagefolder", d, "test")
    assert s.ids == ["sub/test_1", "sub/test_3", "test_0", "test_2"]
    assert all(len(it.captions) == 4 for it in s.items)
    with pytest.raises(DatasetError, match=r"split 'dev'.*'test', 'train', 'val'"):
        load_split("imagefolder", d, "dev")


def test_imagefolder_split_column_needs_values(tmp_path):
    _one_image(tmp_path)
    write_metadata(tmp_path, [{"file_name": "a.png", "caption": "x", "split": "train"}, {"file_name": "a.png", "caption": "y"}])
    with pytest.raises(DatasetError, match=r"metadata\.jsonl line 2: empty or missing 'split' value"):
        load_split("imagefolder", tmp_path, "train")


def test_imagefolder_root_only_is_train(tmp_path):
    d = make_imagefolder(tmp_path, splits=None, n=3)
    assert len(load_split("imagefolder", d, "train")) == 3
    with pytest.raises(DatasetError, match=r"split 'test'.*available splits: 'train'"):
        load_split("imagefolder", d, "test")


def test_imagefolder_text_column_and_multiple_rows(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    write_metadata(tmp_path, [{"file_name": "a.png", "text": "one"}, {"file_name": "./a.png", "text": ["two", "three"]}])
    s = load_split("imagefolder", tmp_path, "train")
    assert s.items == [Item("a", str((tmp_path / "a.png").resolve()), ("one", "two", "three"))]
    assert [r.id for r in s.caption_rows("all")] == ["a#0", "a#1", "a#2"]


@pytest.mark.parametrize("name", ["a#1.png", "sub#x/b.png"])
def test_imagefolder_refuses_hash_in_file_names(tmp_path, name):
    _one_image(tmp_path, "ok.png")
    _one_image(tmp_path, name)
    write_metadata(tmp_path, [{"file_name": "ok.png", "caption": "x"}, {"file_name": name, "caption": "y"}])
    with pytest.raises(DatasetError, match=rf"metadata\.jsonl line 2: image '{name}' gives the id .*contains '#'; "
                                           r"caption ids are '<image id>#<k>'.*Rename the file"):
        load_split("imagefolder", tmp_path, "train")


# --------------------------------------------------------------------------- Hugging Face datasets


def test_hf_split_column(tmp_path):
    p = make_hf_dataset(tmp_path, n_per_split=(4, 2, 2))
    s = load_split(f"hf:{p}", tmp_path, "train")
    assert len(s) == 4 and s.ids == sorted(s.ids) and all(i.isdigit() for i in s.ids)
    assert all(it.image.startswith("hf-row:") and len(it.captions) == 5 for it in s.items)
    assert s.load_image(0).size == (32, 32)
    assert load_split(f"hf:{p}", tmp_path, "validation").ids == load_split(f"hf:{p}", tmp_path, "val").ids
    assert s.fingerprint() == load_split(f"hf:{p}", tmp_path, "train").fingerprint()
    restored = pickle.loads(pickle.dumps(s))
    assert np.array_equal(np.asarray(restored.load_image(3)), np.asarray(s.load_image(3)))
    with pytest.raises(DatasetError, match=r"split 'tests'.*Did you mean: test"):
        load_split(f"hf:{p}", tmp_path, "tests")


def test_hf_dataset_dict_and_relative_path(tmp_path):
    make_hf_dataset(tmp_path, n_per_split=(3, 2, 1), layout="dict", name="dd")
    s = load_split("hf:dd", tmp_path, "val")  # relative to data_dir; "val" finds member "validation"
    assert len(s) == 2 and s.load_image(1).mode == "RGB"


def test_hf_columns_options_and_errors(tmp_path):
    from datasets import load_from_disk

    p = make_hf_dataset(tmp_path, n_per_split=(2, 1, 1))
    ds = load_from_disk(str(p)).rename_columns({"caption": "sentences", "filename": "name", "image": "img"})
    ds.save_to_disk(str(tmp_path / "renamed"))
    with pytest.raises(DatasetError, match=r"no column 'image'.*img"):
        load_split(f"hf:{tmp_path / 'renamed'}", tmp_path, "train")
    with pytest.raises(DatasetError, match=r"no id column"):
        load_split(f"hf:{tmp_path / 'renamed'}", tmp_path, "train", image_column="img", caption_column="sentences")
    s = load_split(f"hf:{tmp_path / 'renamed'}", tmp_path, "train",
                   image_column="img", caption_column="sentences", id_column="name")
    assert s.ids == sorted(Path(n).stem for n, sp in zip(ds["name"], ds["split"]) if sp == "train")
    with pytest.raises(DatasetError, match=r"unknown option 'image_colum'.*Did you mean: --set data\.options\.image_column=\.\.\.\?"):
        load_split(f"hf:{p}", tmp_path, "train", image_colum="img")


def test_hf_hub_failure_is_dataset_error(tmp_path, monkeypatch):
    import datasets

    def fail(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(DatasetError, match=r"could not load Hugging Face dataset 'someone/flickr30k'.*HF_DATASETS_OFFLINE"):
        load_split("hf:someone/flickr30k", tmp_path, "test")


def test_available_splits(tmp_path, flickr):
    assert available_splits("flickr30k", flickr) == ["train", "val", "test"]
    tok = shutil.copytree(flickr, tmp_path / "tok")
    (tok / "dataset_flickr30k.json").unlink()
    (tok / "val.txt").unlink()
    assert available_splits("flickr30k", tok) == ["train", "test"]
    assert available_splits("coco", make_coco(tmp_path / "coco")) == ["train", "restval", "val", "test"]
    assert available_splits("imagefolder", make_imagefolder(tmp_path / "if", splits=("test", "validation"))) == ["val", "test"]
    assert available_splits("imagefolder", make_imagefolder(tmp_path / "root", splits=None)) == ["train"]
    col = make_imagefolder(tmp_path / "col", splits=("val", "extra"), split_column=True)
    assert available_splits("imagefolder", col) == ["val", "extra"]
    assert available_splits(f"hf:{make_hf_dataset(tmp_path)}", tmp_path) == ["train", "val", "test"]
    make_hf_dataset(tmp_path, layout="dict", name="dd")
    assert available_splits("hf:dd", tmp_path) == ["train", "val", "test"]
    with pytest.raises(DatasetError, match="no Flickr30k caption file"):
        available_splits("flickr30k", tmp_path / "col")
    for sp in ("train", "test"):
        (tok / f"{sp}.txt").unlink()
    with pytest.raises(DatasetError, match="no split information"):
        available_splits("flickr30k", tok)


# --------------------------------------------------------------------------- bad input


def _one_image(tmp_path: Path, name: str = "a.png") -> None:
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(tmp_path / name)


def test_non_utf8_metadata(tmp_path):
    _one_image(tmp_path)
    (tmp_path / "metadata.jsonl").write_bytes(
        b'{"file_name": "a.png", "caption": "ok"}\n{"file_name": "a.png", "caption": "caf\xe9"}\n'
    )
    with pytest.raises(DatasetError, match=r"metadata\.jsonl is not valid UTF-8: byte 78 \(line 2, column 39\)"):
        load_split("imagefolder", tmp_path, "train")


def test_non_utf8_karpathy_json(flickr, tmp_path):
    d = shutil.copytree(flickr, tmp_path / "f")
    path = d / "dataset_flickr30k.json"
    path.write_bytes(path.read_bytes().replace(b"A ", b"\xc0 ", 1))
    with pytest.raises(DatasetError, match=r"dataset_flickr30k\.json is not valid UTF-8: byte \d+ \(line 1"):
        load_split("flickr30k", d, "train")


def test_malformed_jsonl_row(tmp_path):
    _one_image(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "caption": "ok"}\n\n{"file_name": "a.png", caption}\n')
    with pytest.raises(DatasetError, match=r"metadata\.jsonl line 3: malformed JSON"):
        load_split("imagefolder", tmp_path, "train")
    (tmp_path / "metadata.jsonl").write_text('["a.png", "x"]\n')
    with pytest.raises(DatasetError, match=r"line 1: expected a JSON object"):
        load_split("imagefolder", tmp_path, "train")


def test_malformed_karpathy_json(flickr, tmp_path):
    d = shutil.copytree(flickr, tmp_path / "f")
    (d / "dataset_flickr30k.json").write_text('{"images": [\n  {"filename": "1.jpg",}\n]}')
    with pytest.raises(DatasetError, match=r"not valid JSON: .* line 2, column"):
        load_split("flickr30k", d, "train")
    (d / "dataset_flickr30k.json").write_text(json.dumps({"images": [{"filename": "1.jpg", "split": "train"}]}))
    with pytest.raises(DatasetError, match=r"images\[0\] lacks key\(s\) sentences"):
        load_split("flickr30k", d, "train")


def test_malformed_csv_rows(tmp_path):
    _one_image(tmp_path)
    (tmp_path / "metadata.csv").write_text("file_name,caption\na.png,fine\na.png,one,two\n")
    with pytest.raises(DatasetError, match=r"metadata\.csv line 3: 1 more field"):
        load_split("imagefolder", tmp_path, "train")
    (tmp_path / "metadata.csv").write_text("file_name,caption\na.png\n")
    with pytest.raises(DatasetError, match=r"line 2: fewer fields"):
        load_split("imagefolder", tmp_path, "train")
    (tmp_path / "metadata.csv").write_text('file_name,caption\na.png,"unterminated\n')
    with pytest.raises(DatasetError, match=r"malformed CSV"):
        load_split("imagefolder", tmp_path, "train")


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_missing_caption_column(tmp_path, fmt):
    _one_image(tmp_path)
    write_metadata(tmp_path, [{"file_name": "a.png", "desc": "x"}], fmt)
    with pytest.raises(DatasetError, match=r"no caption column: expected 'caption' or 'text' \(columns: file_name, desc\)"
                                           r".*--set data\.options\.caption_column=\.\.\."):  # a flag the user can type
        load_split("imagefolder", tmp_path, "train")
    assert load_split("imagefolder", tmp_path, "train", caption_column="desc").items[0].captions == ("x",)


def test_caption_wrong_type(tmp_path):
    _one_image(tmp_path)
    write_metadata(tmp_path, [{"file_name": "a.png", "caption": 42}])
    with pytest.raises(DatasetError, match=r"line 1: a caption must be a string or a list of strings, got int"):
        load_split("imagefolder", tmp_path, "train")


def test_empty_captions_error_and_skip(tmp_path, caplog):
    for n in ("a", "b", "c"):
        _one_image(tmp_path, f"{n}.png")
    write_metadata(tmp_path, [
        {"file_name": "a.png", "caption": ["first", "   ", "the third"]},
        {"file_name": "b.png", "caption": ""},
        {"file_name": "c.png", "caption": "fine"},
    ])
    s = load_split("imagefolder", tmp_path, "train")
    with pytest.raises(DatasetError, match=r"caption a#1 is empty or whitespace-only.*--set data\.on_empty=skip"):
        s.caption_rows("longest")
    with caplog.at_level(logging.WARNING, logger="extract.datasets"):
        s = load_split("imagefolder", tmp_path, "train", on_empty="skip")
    assert "a#1" in caplog.text and "skipped 1 image" in caplog.text
    assert s.ids == ["a", "c"] and s.skipped == [("b", "no non-empty caption")]
    assert [r.id for r in s.caption_rows("all")] == ["a#0", "a#2", "c#0"]  # original k kept
    assert [(r.k, r.text) for r in s.caption_rows("longest")] == [(2, "the third"), (0, "fine")]
    assert pickle.loads(pickle.dumps(s)).caption_rows("all") == s.caption_rows("all")


def test_duplicate_ids(tmp_path, flickr):
    _one_image(tmp_path, "x/a.png")
    _one_image(tmp_path, "x/a.jpg")
    write_metadata(tmp_path, [{"file_name": "x/a.png", "caption": "1"}, {"file_name": "x/a.jpg", "caption": "2"}])
    with pytest.raises(DatasetError, match=r"duplicate image ids .*'x/a' \(.*line 1; .*line 2\)"):
        load_split("imagefolder", tmp_path, "train")
    d = shutil.copytree(flickr, tmp_path / "f")
    doc = json.loads((d / "dataset_flickr30k.json").read_text())
    doc["images"].append(dict(doc["images"][0]))
    (d / "dataset_flickr30k.json").write_text(json.dumps(doc))
    split, dup = doc["images"][0]["split"], Path(doc["images"][0]["filename"]).stem
    with pytest.raises(DatasetError, match=rf"duplicate image ids .*'{dup}'"):
        load_split("flickr30k", d, split)


def test_missing_images_error_and_skip(tmp_path, caplog):
    d = make_imagefolder(tmp_path, splits=None, n=4)
    (d / "train_2.png").unlink()
    (d / "sub/train_3.png").unlink()
    with pytest.raises(DatasetError, match=r"2 of 4 image files .* missing under .*: train_2\.png, sub/train_3\.png\. .*--set data\.missing=skip"):
        load_split("imagefolder", d, "train")
    with caplog.at_level(logging.WARNING, logger="extract.datasets"):
        s = load_split("imagefolder", d, "train", missing="skip")
    assert s.ids == ["sub/train_1", "train_0"]
    assert sorted(i for i, _ in s.skipped) == ["sub/train_3", "train_2"]
    assert all("image file missing" in reason for _, reason in s.skipped)
    assert "skipped 2 image" in caplog.text


@pytest.mark.parametrize("name,msg", [
    ("../outside.png", "leaves the dataset folder"),
    ("sub/../../outside.png", "leaves the dataset folder"),
    ("/etc/passwd", "is absolute"),
    ("C:/x.png", "is absolute"),
])
def test_path_escape_rejected(tmp_path, name, msg):
    d = tmp_path / "ds"
    _one_image(tmp_path, "outside.png")
    write_metadata(d, [{"file_name": "ok.png", "caption": "x"}, {"file_name": name, "caption": "y"}])
    with pytest.raises(DatasetError, match=rf"metadata\.jsonl line 2: file name .*{msg}"):
        load_split("imagefolder", d, "train")


def test_symlink_escape_rejected(tmp_path):
    d = tmp_path / "ds"
    _one_image(tmp_path, "outside.png")
    d.mkdir()
    (d / "link.png").symlink_to(tmp_path / "outside.png")
    write_metadata(d, [{"file_name": "link.png", "caption": "x"}])
    with pytest.raises(DatasetError, match=r"line 1: 'link.png' resolves outside"):
        load_split("imagefolder", d, "train")


def test_argument_errors(flickr, tmp_path):
    with pytest.raises(DatasetError, match=r"unknown dataset format 'flickr30'; .*Did you mean: flickr30k"):
        load_split("flickr30", flickr, "train")
    with pytest.raises(DatasetError, match=r"unknown option 'caption_column' for dataset 'flickr30k'; allowed: on_empty, missing "
                       r"\(--set data\.on_empty=\.\.\.\) and image_dir, translations \(--set data\.options\.image_dir=\.\.\.\)\.$"):
        load_split("flickr30k", flickr, "train", caption_column="x")
    with pytest.raises(DatasetError, match=r"on_empty='drop'"):
        load_split("flickr30k", flickr, "train", on_empty="drop")
    with pytest.raises(DatasetError, match=r"split 'vall'.*available splits: 'test', 'train', 'val'.*Did you mean: val"):
        load_split("flickr30k", flickr, "vall")
    assert load_split("flickr30k", flickr, "validation").name == "val"
    with pytest.raises(DatasetError, match=r"is not a folder"):
        load_split("flickr30k", tmp_path / "nope", "train")
    with pytest.raises(DatasetError, match=r"no Flickr30k caption file"):
        load_split("flickr30k", tmp_path, "train")
    with pytest.raises(DatasetError, match=r"holds no metadata\.jsonl or metadata\.csv"):
        load_split("imagefolder", tmp_path, "train")


# --------------------------------------------------------------------------- the registry


def _fixture_of(name: str, root: Path) -> tuple[str, Path]:
    """(dataset, data_dir) of a small fixture for every registered format."""
    if name == "flickr30k":
        return "flickr30k", make_flickr30k(root)
    if name == "coco":
        return "coco", make_coco(root)
    if name == "imagefolder":
        return "imagefolder", make_imagefolder(root)
    if name == "hf":
        make_hf_dataset(root, name="hfd")
        return "hf:hfd", root
    raise AssertionError(f"format {name!r} has no fixture here: add one")


@pytest.mark.parametrize("name", sorted(D.FORMATS))
def test_every_format_loads_and_lists_its_splits(name, tmp_path):
    fmt = D.FORMATS[name]
    assert fmt.name == name and fmt.usage in D.DATASETS and fmt.what_to_get
    assert fmt.options and not set(fmt.options) & set(D.COMMON_OPTIONS)
    dataset, data_dir = _fixture_of(name, tmp_path)
    splits = available_splits(dataset, data_dir)
    assert splits[0] == "train" and "test" in splits
    for split in splits:
        s = load_split(dataset, data_dir, split)
        assert (s.dataset, s.name) == (dataset, split) and len(s) and s.ids == sorted(s.ids)
        assert not any("#" in i for i in s.ids) and len(s.fingerprint()) == 64


# sha256 of fixture splits computed by the single-file loader of commit 0f83b75 (the last before the
# package): caches written before must still read as fresh. tests/compare_fingerprints.py checks more.
FINGERPRINTS_BEFORE = {
    ("flickr30k", "test"): "f6b77aeac610dc6b4b75c74d75ca4d717ea1210284a4ae5b85faa257cf037432",
    ("coco", "train"): "41a8b9ad2a7e4f5afe547a214670a9c62225d0324e43de3be4915d2df087ac02",
    ("coco", "restval"): "080ffee506e1ee69b0ef133fbbd720ed24ece709e0c6467461cadf8ff8d4e017",
    ("imagefolder", "val"): "85374c664778359ad568698811eaf4f1146ab7e1191ea36a756793e79d30ce20",
    ("hf:dd", "val"): "b2f2750cfdd6cc19e533845a5764818e9724e7087296dccd3af9d8293200437d",
}


def test_fingerprints_unchanged_since_the_single_file_loader(tmp_path):
    dirs = {"flickr30k": make_flickr30k(tmp_path / "f"), "coco": make_coco(tmp_path / "c"),
            "imagefolder": make_imagefolder(tmp_path / "i", n=4, captions_per_image=3)}
    dirs["hf:dd"] = make_hf_dataset(tmp_path, n_per_split=(3, 2, 1), layout="dict", name="dd").parent
    for (dataset, split), want in FINGERPRINTS_BEFORE.items():
        assert load_split(dataset, dirs[dataset], split).fingerprint() == want, (dataset, split)


# --------------------------------------------------------------------------- split requests, options


def test_requested_splits(tmp_path):
    d = make_imagefolder(tmp_path, splits=("train", "validation", "extra"), n=2)
    assert D.requested_splits("imagefolder", d, "all") == ["train", "val", "extra"]
    assert D.requested_splits("imagefolder", d, "extra") == ["extra"]
    assert D.requested_splits("imagefolder", d, "validation") == ["val"]
    with pytest.raises(DatasetError, match=r"split 'extr' is not a split of imagefolder .*: train, val, extra "
                                           r"\(or use all\)\. Did you mean: extra\?"):
        D.requested_splits("imagefolder", d, "extr")


def test_config_options():
    from pipeline.config import DataConfig

    assert D.config_options(DataConfig(options={"restval": "train"})) == {
        "on_empty": "error", "missing": "error", "restval": "train"}
    with pytest.raises(DatasetError, match=r"data\.options\.on_empty is not a format option; .*--set data\.on_empty=skip"):
        D.config_options(DataConfig(options={"on_empty": "skip"}))
