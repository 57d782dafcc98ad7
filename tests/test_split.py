"""Tests for extract.datasets.split: caption policies, image conversion (every PIL mode, broken
files), subsets and pickling of a Split."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from extract.datasets import CAPTION_POLICIES, DatasetError, ImageError, Item, Split, load_split, pad_square, to_rgb
from tests.fixtures import (
    BAD_IMAGE_BROKEN, BAD_IMAGE_PIXELS, make_flickr30k, make_imagefolder, write_bad_images, write_metadata,
)


@pytest.fixture(scope="module")
def flickr(tmp_path_factory) -> Path:
    return make_flickr30k(tmp_path_factory.mktemp("flickr"))


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


def test_split_constructor_rejects_duplicates():
    with pytest.raises(DatasetError, match="duplicate image ids"):
        Split("x", "train", [Item("a", "/a.png", ("c",)), Item("a", "/b.png", ("d",))], "here")
