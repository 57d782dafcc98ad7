"""AlignedModel: embedding a split's raw images and captions reproduces the run's aligned cache
entries row for row (joined by sample id), for linear and mlp adapters, a run trained on hidden
layers and the "all" caption policy; the open_clip-shaped surface; one-line errors.

Tolerance: fp32 on CPU, max |difference| <= ATOL (observed ~1e-7: the same code computes both;
only batch composition differs, which changes the BLAS summation order)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aligned import AlignedError, AlignedModel, EncoderChangedError
from extract import datasets as D
from extract.datasets import ImageError
from extract.run import extract
from pipeline.cache import find_entry
from pipeline.config import load_config, with_values
from pipeline.runs import RunNotFoundError, aligned_name
from tests.fixtures import make_imagefolder, write_bad_images
from train.fit import fit_adapters

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ATOL = 1e-5  # max |AlignedModel embedding - aligned cache entry|, fp32 on CPU
IMAGE, TEXT = "tiny-resnet", "tiny-gpt2"


def _cfg(data, cache, captions="first", layers="last", **train):
    opts = {"data.dataset": "imagefolder", "data.data_dir": str(data), "data.cache": str(cache),
            "data.captions": captions, "extract.encoders": (IMAGE, TEXT), "extract.workers": 0,
            "extract.batch_size": 4, "extract.layers": layers, "train.image": IMAGE, "train.text": TEXT,
            "train.reference": "", "train.dim": 8, "train.epochs": 2, "train.batch_size": 8, "train.lr": 1e-2,
            "train.device": "cpu"}
    opts.update({f"train.{k}": v for k, v in train.items()})
    return load_config(None, options=opts)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("data"), n=6, captions_per_image=3, list_captions=True)


@pytest.fixture(scope="module")
def cache(data, tmp_path_factory):
    """One caption per image, every hidden layer stored: a linear run, an mlp run on hidden layers."""
    root = tmp_path_factory.mktemp("cache")
    extract(_cfg(data, root, layers="all"))
    for name, train in (("lin", {}), ("mlp-layer", {"adapter": "mlp", "hidden": 16, "image_layer": 1,
                                                    "text_layer": 0})):
        fit_adapters(_cfg(data, root, name=name, **train), progress=False)
    return root


@pytest.fixture(scope="module")
def cache_all(data, tmp_path_factory):
    """Every caption of every image (ids <image>#k)."""
    root = tmp_path_factory.mktemp("cache_all")
    extract(_cfg(data, root, captions="all"))
    fit_adapters(_cfg(data, root, captions="all", name="all"), progress=False)
    return root


def _by_id(entry, ids):
    row = {i: r for r, i in enumerate(entry.ids)}
    return entry.features()[[row[i] for i in ids]]


def _reproduces(model, data, cache, captions, image=IMAGE, text=TEXT, atol=ATOL):
    for split_name in ("train", "val", "test"):
        split = D.load_split("imagefolder", data, split_name)
        img = model.embed_images([it.image for it in split.items], batch_size=5, workers=0, progress=False)
        want = _by_id(find_entry(cache, "imagefolder", split_name, aligned_name(image, model.info["run"]), data),
                      split.ids)
        np.testing.assert_allclose(img, want, rtol=0, atol=atol)
        rows = split.caption_rows(captions)
        txt = model.embed_texts([r.text for r in rows], batch_size=3, progress=False)
        want = _by_id(find_entry(cache, "imagefolder", split_name, aligned_name(text, model.info["run"]), data),
                      [r.id for r in rows])
        np.testing.assert_allclose(txt, want, rtol=0, atol=atol)


# Token-projector runs: the model rounds the encoder's token states to float16 as extraction stored
# them, so both sides compute the same numbers, except where a token value lies within float32 noise
# (batch composition) of a float16 rounding boundary: then one value moves by one float16 step (2^-11
# relative). Observed max difference ~1e-6; TOKEN_ATOL leaves room for a few such flips.
TOKEN_ATOL = 1e-4


@pytest.mark.parametrize("branches", [{}, {"text_local": "patch", "vision_cls": "identity"}], ids=["default", "patch"])
def test_token_runs_reproduce_their_aligned_entries(data, tmp_path, branches):
    root, image = tmp_path / "cache", "tiny-dinov2"
    cfg = with_values(_cfg(data, root), {"extract.encoders": (image, TEXT), "extract.tokens": "grid:2",
                                         "train.image": image, "train.adapter": "token", "train.hidden": 16,
                                         "train.name": "tok", "train.token": branches})
    extract(cfg)
    fit_adapters(cfg, progress=False)
    model = AlignedModel.from_run("tok", cache=root, device="cpu")
    assert model.sides["image"].tokens["length"] == 5 and model.sides["text"].tokens["layout"] == "text"
    _reproduces(model, data, root, "first", image, TEXT, TOKEN_ATOL)


@pytest.mark.parametrize("run", ["lin", "mlp-layer"])
def test_embedding_the_raw_split_reproduces_the_aligned_entries(run, data, cache):
    """A linear adapter on the pooled features; an mlp adapter on hidden layers (image 1, text 0)."""
    model = AlignedModel.from_run(run, cache=cache, device="cpu")
    if run == "mlp-layer":
        assert (model.sides["image"].layer, model.sides["text"].layer) == (1, 0)
    _reproduces(model, data, cache, "first")


def test_captions_all_reproduces_every_caption_row(data, cache_all):
    model = AlignedModel.from_run(Path(cache_all) / "runs" / "all", device="cpu")  # a run folder works too
    _reproduces(model, data, cache_all, "all")


def test_open_clip_surface(data, cache):
    """preprocess -> encode_image, tokenizer -> .to(device) -> encode_text, normalize, logit_scale,
    forward; the float (preprocess) and uint8 (workers) image paths agree."""
    model = AlignedModel.from_run("lin", cache=cache, device="cpu")
    split = D.load_split("imagefolder", data, "test")
    pil = [Image.open(it.image) for it in split.items[:3]]
    with torch.no_grad():
        image = torch.stack([model.preprocess(im) for im in pil])
        assert image.dtype == torch.float32 and image.shape == (3, 3, 32, 32)
        tokens = model.tokenizer(["a red dog", "two cats"]).to(model.device)
        img, txt = model.encode_image(image), model.encode_text(tokens)
        assert img.shape == (3, model.dim) and txt.shape == (2, model.dim)
        assert not torch.allclose(img.norm(dim=-1), torch.ones(3))  # unnormalised by default, like open_clip
        unit = model.encode_image(image, normalize=True)
        torch.testing.assert_close(unit, img / img.norm(dim=-1, keepdim=True))
        uint8 = torch.stack([model.preprocess.pixels(im) for im in pil])
        torch.testing.assert_close(model.encode_image(uint8), img, rtol=0, atol=1e-6)
        a, b, scale = model(image, tokens)
        torch.testing.assert_close(a, unit)
        assert float(scale) == pytest.approx(1 / 0.07, rel=1e-5)  # the run's temperature
        assert float(model.logit_scale.exp()) == pytest.approx(1 / 0.07, rel=1e-5)
    np.testing.assert_allclose(model.embed_images(pil, progress=False), img.numpy(), atol=1e-6)
    np.testing.assert_allclose(model.embed_images([it.image for it in split.items[:3]], workers=1, progress=False),
                               img.numpy(), atol=1e-6)  # DataLoader workers: same numbers
    assert model.embed_texts("a red dog", progress=False).shape == (1, model.dim)


def test_bad_input_is_one_clear_line(data, cache, tmp_path):
    with pytest.raises(RunNotFoundError, match="Did you mean: lin"):
        AlignedModel.from_run("lni", cache=cache)
    other = tmp_path / "other"
    with pytest.raises(AlignedError, match="belongs to cache"):
        AlignedModel.from_run(Path(cache) / "runs" / "lin", cache=other)
    model = AlignedModel.from_run("lin", cache=cache, device="cpu")
    bad = write_bad_images(tmp_path / "bad")
    with pytest.raises(ImageError, match="corrupt.jpg"):
        model.embed_images([str(bad["gray"]), str(bad["corrupt"])], workers=0, progress=False)
    with pytest.raises(ImageError, match="file not found"):
        model.embed_images([str(tmp_path / "missing.png")], workers=0, progress=False)
    for texts in (["a dog", ""], ["   "]):
        with pytest.raises(AlignedError, match="empty"):
            model.embed_texts(texts, progress=False)
    with pytest.raises(AlignedError, match="empty"):
        model.tokenizer("")
    with pytest.raises(AlignedError, match="PIL image"):
        model.preprocess(str(bad["gray"]))
    with pytest.raises(AlignedError, match="cannot decode .*truncated.jpg"):
        model.preprocess(Image.open(bad["truncated"]))  # opened lazily: decoding fails inside preprocess


def test_a_changed_registry_entry_is_refused(cache, monkeypatch):
    """The rebuilt encoder must give back the provenance its entries recorded."""
    import dataclasses

    from extract.encoders import REGISTRY

    changed = dataclasses.replace(REGISTRY[IMAGE], config=(("layers", (1, 1, 2, 1)),))
    monkeypatch.setitem(REGISTRY, IMAGE, changed)
    with pytest.raises(EncoderChangedError, match="config changed"):
        AlignedModel.from_run("lin", cache=cache, device="cpu")


def test_fingerprint_identifies_the_model(cache):
    lin = AlignedModel.from_run("lin", cache=cache, device="cpu")
    assert lin.fingerprint == AlignedModel.from_run(Path(cache) / "runs" / "lin", device="cpu").fingerprint
    assert lin.fingerprint != AlignedModel.from_run("mlp-layer", cache=cache, device="cpu").fingerprint
