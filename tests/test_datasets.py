"""Tests for extract.datasets (loaders, caption policies, image conversion) and extract.tuxpaint."""
from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from extract.datasets import (
    CAPTION_POLICIES,
    DatasetError,
    ImageError,
    Item,
    Split,
    available_splits,
    load_split,
    pad_square,
    to_rgb,
)
from extract import tuxpaint

try:
    from tests.fixtures import (
        BAD_IMAGE_BROKEN, BAD_IMAGE_PIXELS, TUXPAINT_FAKE_CAPTIONS, make_coco, make_flickr30k,
        make_hf_dataset, make_imagefolder, make_tuxpaint_deb, make_tuxpaint_tree, write_bad_images,
        write_metadata,
    )
except ImportError:  # tests/ on sys.path instead of the repo root
    from fixtures import (  # type: ignore[no-redef]
        BAD_IMAGE_BROKEN, BAD_IMAGE_PIXELS, TUXPAINT_FAKE_CAPTIONS, make_coco, make_flickr30k,
        make_hf_dataset, make_imagefolder, make_tuxpaint_deb, make_tuxpaint_tree, write_bad_images,
        write_metadata,
    )

REAL_DEB = Path(os.environ.get("TUXPAINT_DEB", "/tmp/tux/tuxpaint-stamps-default_2022.06.04-1_all.deb"))


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


# --------------------------------------------------------------------------- caption policies


@pytest.fixture
def tie_folder(tmp_path) -> Path:
    for name in ("x", "y"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
    write_metadata(tmp_path, [
        {"file_name": "y.png", "caption": ["short", "the longest one", "a tie for first", "tiny"]},
        {"file_name": "x.png", "caption": ["abc", "xyz", "a"]},
    ])
    return tmp_path


def test_caption_policies(tie_folder):
    s = load_split("imagefolder", tie_folder, "train")
    longest = s.caption_rows("longest")
    assert [(r.id, r.image_id, r.k, r.text) for r in longest] == [
        ("x", "x", 0, "abc"),  # tie between k=0 and k=1 -> lowest k
        ("y", "y", 1, "the longest one"),
    ]
    assert [(r.id, r.k, r.text) for r in s.caption_rows("first")] == [("x", 0, "abc"), ("y", 0, "short")]
    rows = s.caption_rows("all")
    assert [r.id for r in rows] == ["x#0", "x#1", "x#2", "y#0", "y#1", "y#2", "y#3"]
    assert rows[4].text == "the longest one" and rows[4].image_id == "y"
    assert CAPTION_POLICIES == ("longest", "first", "all")
    with pytest.raises(DatasetError, match=r"unknown caption policy 'longets'.*Did you mean: longest"):
        s.caption_rows("longets")


# --------------------------------------------------------------------------- image modes


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory) -> dict[str, Path]:
    return write_bad_images(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("name", sorted(BAD_IMAGE_PIXELS))
def test_to_rgb_modes(bad_images, name):
    with Image.open(bad_images[name]) as im:
        im.load()
        rgb = to_rgb(im)
    assert rgb.mode == "RGB"
    for xy, want in BAD_IMAGE_PIXELS[name].items():
        assert rgb.getpixel(xy) == pytest.approx(want, abs=1), (name, xy)


def test_fixture_modes_are_what_they_claim(bad_images):
    modes = {n: Image.open(p).mode for n, p in bad_images.items() if n in BAD_IMAGE_PIXELS}
    assert modes == {"gray": "L", "one_bit": "1", "palette": "P", "palette_transparent": "P", "rgba": "RGBA",
                     "la": "LA", "cmyk": "CMYK", "i16": "I;16"}


def test_to_rgb_in_memory_modes():
    i32 = Image.fromarray(np.array([[65535, 32768, -5, 70000]], np.int32))
    assert i32.mode == "I"
    assert [to_rgb(i32).getpixel((x, 0))[0] for x in range(4)] == [255, 128, 0, 255]
    b16 = Image.frombytes("I;16B", (2, 1), np.array([65535, 32768], ">u2").tobytes())
    assert [to_rgb(b16).getpixel((x, 0)) for x in range(2)] == [(255,) * 3, (128,) * 3]
    f = Image.fromarray(np.array([[0.4, 254.6, 300.0, np.nan]], np.float32))
    assert [to_rgb(f).getpixel((x, 0))[0] for x in range(4)] == [0, 255, 255, 0]
    rgb = Image.new("RGB", (2, 2), (1, 2, 3))
    assert to_rgb(rgb).getpixel((0, 0)) == (1, 2, 3)
    assert to_rgb(Image.new("RGBa", (1, 1), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_applied(bad_images):
    with Image.open(bad_images["exif_rotated"]) as im:
        assert im.size == (4, 2)
        assert to_rgb(im).size == (2, 4)


def test_pad_square():
    img = pad_square(Image.new("RGBA", (6, 2), (255, 0, 0, 255)))
    assert img.size == (6, 6) and img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((3, 3)) == (255, 0, 0)
    assert pad_square(Image.new("RGB", (2, 6)), fill=(0, 0, 255)).getpixel((0, 0)) == (0, 0, 255)


def _folder_of(tmp_path: Path, files: dict[str, Path]) -> Path:
    d = tmp_path / "ds"
    d.mkdir()
    rows = []
    for name, src in files.items():
        shutil.copy(src, d / src.name)
        rows.append({"file_name": src.name, "caption": f"an image called {name}"})
    write_metadata(d, rows)
    return d


def test_broken_images_raise_image_error(bad_images, tmp_path):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    d = _folder_of(tmp_path, bad_images)
    s = load_split("imagefolder", d, "train")
    for i, it in enumerate(s.items):
        if it.id in BAD_IMAGE_BROKEN:
            with pytest.raises(ImageError) as info:
                s.load_image(i)
            err = info.value
            assert err.sample_id == it.id and err.path == it.image and err.reason
            assert it.id in str(err)
            again = pickle.loads(pickle.dumps(err))
            assert (again.sample_id, again.path, again.reason) == (err.sample_id, err.path, err.reason)
        else:
            assert s.load_image(i).mode == "RGB"
    with pytest.raises(ImageError) as info:
        s.load_image(s.ids.index("truncated"))
    assert "truncated" in info.value.reason


def test_image_deleted_after_load_is_image_error(tmp_path):
    d = make_imagefolder(tmp_path, splits=None, n=2)
    s = load_split("imagefolder", d, "train")
    Path(s.items[0].image).unlink()
    with pytest.raises(ImageError, match="file not found"):
        s.load_image(0)


def test_select_subset(flickr):
    s = load_split("flickr30k", flickr, "train")
    sub = s.select(range(2))
    assert sub.items == s.items[:2] and (sub.dataset, sub.name) == (s.dataset, s.name)
    assert sub.fingerprint() != s.fingerprint() and s.select(range(len(s))).fingerprint() == s.fingerprint()
    assert sub.load_image(1).size == (48, 48)


def test_split_pickles(flickr):
    s = load_split("flickr30k", flickr, "val")
    restored = pickle.loads(pickle.dumps(s))
    assert restored.items == s.items and restored.fingerprint() == s.fingerprint()
    assert np.array_equal(np.asarray(restored.load_image(2)), np.asarray(s.load_image(2)))


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
    with pytest.raises(DatasetError, match=r"no caption column: expected 'caption' or 'text' \(columns: file_name, desc\)"):
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
                       r"\(--set data\.on_empty=\.\.\.\) and image_dir \(--set data\.options\.image_dir=\.\.\.\)\.$"):
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


def test_split_constructor_rejects_duplicates():
    with pytest.raises(DatasetError, match="duplicate image ids"):
        Split("x", "train", [Item("a", "/a.png", ("c",)), Item("a", "/b.png", ("d",))], "here")


# --------------------------------------------------------------------------- Tux Paint


def test_read_description(tmp_path):
    cases = {
        "plain": (b"A cat.\nfr.utf8=Un chat.\n", ("A cat.", False)),
        "comment": (b"# c\n\n  An   owl. \n", ("An owl.", False)),
        "bom": ("\ufeffA b\u00e9e.\n".encode(), ("A b\u00e9e.", False)),
        "latin1": ("A cr\u00e8me.\n".encode("latin-1"), ("A cr\u00e8me.", True)),
        "no_english": (b"\nfr.utf8=Un arbre.\n", (None, False)),
        "empty": (b"", (None, False)),
        "calc": (b"A calculator.  6x7=42\n", ("A calculator. 6x7=42", False)),
    }
    for name, (data, want) in cases.items():
        (tmp_path / f"{name}.txt").write_bytes(data)
        assert tuxpaint.read_description(tmp_path / f"{name}.txt") == want, name


def test_prepare_tuxpaint_fake_tree(tmp_path, caplog):
    tree = make_tuxpaint_tree(tmp_path / "tree")
    out = tuxpaint.prepare_tuxpaint(tree, tmp_path / "out", seed=0, fractions=(0.5, 0.25, 0.25), size=16)
    summary = tuxpaint.read_summary(out)
    assert summary["pairs"] == 4 and summary["distinct_captions"] == 4
    assert summary["splits"] == {"train": 2, "val": 1, "test": 1}
    assert summary["skipped"] == {
        "excluded category (symbols/)": 1,
        "mirror copy without txt (NAME_mirror.png)": 1,
        "no English line in txt": 1,
        "no txt": 1,
        "txt read as Latin-1 (not UTF-8)": 1,
    }
    got = {}
    for split in ("train", "val", "test"):
        s = load_split("imagefolder", out, split)
        for i, it in enumerate(s.items):
            got[it.id] = it.captions
            img = s.load_image(i)
            assert img.size[0] == img.size[1] <= 16
    assert got == {k: (v,) for k, v in TUXPAINT_FAKE_CAPTIONS.items()}
    car = Image.open(next(out.glob("*/vehicles/car.png")))
    assert car.size == (16, 16) and car.mode == "RGB"
    assert car.getpixel((0, 0)) == (255, 255, 255)  # transparent + padding -> white
    r, g, b = car.getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60

    marker = out / tuxpaint.MARKER
    mtime = marker.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="extract.tuxpaint"):
        assert tuxpaint.prepare_tuxpaint(tree, out, seed=0, fractions=(0.5, 0.25, 0.25), size=16) == out
    assert marker.stat().st_mtime_ns == mtime and "up to date" in caplog.text
    tuxpaint.prepare_tuxpaint(tree, out, seed=0, fractions=(0.5, 0.25, 0.25), size=12)  # new parameters: rebuilt
    assert Image.open(next(out.glob("*/vehicles/car.png"))).size == (12, 12)
    assert json.loads(marker.read_text())["params"]["size"] == 12


def test_tuxpaint_split_is_deterministic_and_seeded():
    rels = [f"cat/{i}" for i in range(200)]
    a = tuxpaint._assign_splits(rels, 0, (0.7, 0.1, 0.2))
    assert a == tuxpaint._assign_splits(list(reversed(rels)), 0, (0.7, 0.1, 0.2))
    assert sorted(list(a.values()).count(s) for s in ("train", "val", "test")) == [20, 40, 140]
    assert a != tuxpaint._assign_splits(rels, 1, (0.7, 0.1, 0.2))


def test_tuxpaint_refuses_foreign_folder_and_bad_args(tmp_path):
    tree = make_tuxpaint_tree(tmp_path / "tree")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not empty and holds no"):
        tuxpaint.prepare_tuxpaint(tree, tmp_path / "busy")
    with pytest.raises(DatasetError, match="summing to 1"):
        tuxpaint.prepare_tuxpaint(tree, tmp_path / "o", fractions=(0.5, 0.5, 0.5))
    with pytest.raises(DatasetError, match="no Tux Paint stamps"):
        tuxpaint.prepare_tuxpaint(tmp_path / "busy", tmp_path / "o")


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_prepare_tuxpaint_from_deb_and_cli(tmp_path, capsys):
    deb = make_tuxpaint_deb(tmp_path)
    assert tuxpaint.fetch_tuxpaint_deb(tmp_path) == deb  # already there: no download
    assert tuxpaint.main([str(deb), str(tmp_path / "out"), "--size", "8"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pairs"] == 4 and sum(summary["splits"].values()) == 4
    assert json.loads((tmp_path / "out" / tuxpaint.MARKER).read_text())["source"]["kind"] == "deb"
    assert tuxpaint.main([str(tmp_path / "missing.deb"), str(tmp_path / "o2")]) == 2


@pytest.mark.slow
@pytest.mark.skipif(not REAL_DEB.is_file(), reason=f"real .deb not at {REAL_DEB} (set TUXPAINT_DEB)")
def test_prepare_tuxpaint_real_deb(tmp_path):
    out = tuxpaint.prepare_tuxpaint(REAL_DEB, tmp_path / "tux")
    summary = tuxpaint.read_summary(out)
    assert summary["pairs"] == 538 and summary["distinct_captions"] == 498
    assert summary["splits"] == {"train": 377, "val": 53, "test": 108}
    s = load_split("imagefolder", out, "test")
    assert len(s) == summary["splits"]["test"] and s.load_image(0).size == (256, 256)
