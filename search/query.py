"""Queries: a sentence or an image -> the top k gallery images of an index, with cosine scores.

A :class:`Searcher` holds an opened index and the model that built it (checked by hash: an index
built with another model is refused). Text queries are embedded by the text tower, image queries
by the image tower (the same path the gallery took); both are L2-normalised and scored against the
normalised gallery by the index's engine (exact, or faiss above ``search.exact_max``), so a
score is a cosine similarity in [-1, 1]. Exact search breaks ties by gallery row.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from extract.datasets import to_rgb
from pipeline.config import PipelineConfig
from search.engine import SearchError, check_config, normalize
from search.index import GalleryIndex, ModelRef, open_index
from search.model import load_model, load_recorded


class QueryError(SearchError):
    """A query that cannot be searched: empty, both a text and an image, an image that does not decode."""


EMPTY_QUERY = "The query is empty: type a sentence (e.g. search query \"a red bicycle\") or give an image (--image PATH)."


@dataclass(frozen=True)
class Hit:
    """One result: its rank (1 = best), gallery row, image id, cosine score, image file, captions."""

    rank: int
    row: int
    id: str
    score: float
    path: str
    captions: tuple[str, ...]

    def to_json(self) -> dict:
        return {"rank": self.rank, "row": self.row, "id": self.id, "score": self.score, "path": self.path,
                "captions": list(self.captions)}


def check_top_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise QueryError(f"top_k must be a positive integer, got {k!r}.")
    return k


def decode_upload(data: bytes, name: str = "the uploaded file") -> Image.Image:
    """An image from encoded bytes, fully decoded and converted to RGB (as the datasets convert);
    QueryError naming the problem when the bytes are not a decodable image."""
    if not data:
        raise QueryError(f"{name} is empty; drop an image file (JPEG, PNG, ...).")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return to_rgb(im)
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, DecompressionBombError...)
        raise QueryError(f"{name} is not an image that can be decoded ({type(exc).__name__}: {exc}).") from None


class Searcher:
    """An index and its model. ``text(query, k)`` / ``image(image, k)`` -> list of :class:`Hit`.
    Safe to call from several threads (one embedding at a time; the search itself runs in parallel)."""

    def __init__(self, index: GalleryIndex, model, ref: ModelRef):
        index.check_model(ref)
        if getattr(model, "dim", index.dim) != index.dim:
            raise SearchError(f"the model embeds in {model.dim} dimensions, the index holds {index.dim}.")
        self.index, self.model, self.ref = index, model, ref
        self._lock = threading.Lock()

    @classmethod
    def open(cls, cfg: PipelineConfig) -> "Searcher":
        """The index ``search.index`` (a faiss index at the nprobe ``search index`` chose) and its
        model: the one ``search.run`` names (checked against the index), else the one it records."""
        check_config(cfg.search)
        index = open_index(cfg.search.index)
        if cfg.search.run:
            model, ref = load_model(cfg.search.run, cfg.data.cache, cfg.extract.device)
        else:
            model, ref = load_recorded(index.model, cfg.extract.device), index.model
        return cls(index, model, ref)

    def text(self, query: str, k: int) -> list[Hit]:
        """The k gallery images closest to the sentence ``query``."""
        if not isinstance(query, str) or not query.strip():
            raise QueryError(EMPTY_QUERY)
        with self._lock:
            vec = self.model.embed_texts([query.strip()], progress=False)
        return self._search(vec, k)

    def image(self, image: Image.Image | str | Path, k: int) -> list[Hit]:
        """The k gallery images closest to ``image`` (a PIL image, or a file: ImageError if it does not decode)."""
        if isinstance(image, (str, Path)) and not Path(image).is_file():
            raise QueryError(f"Query image {str(image)!r} does not exist.")
        with self._lock:
            vec = self.model.embed_images([image if isinstance(image, Image.Image) else str(image)], workers=0,
                                          progress=False)
        return self._search(vec, k)

    def _search(self, vec: np.ndarray, k: int) -> list[Hit]:
        q = normalize(vec, "the query's embedding")
        scores, rows = self.index.engine.search(q, check_top_k(k))
        hits: list[Hit] = []
        for s, r in zip(scores[0], rows[0]):
            if r >= 0:  # faiss pads with -1 when the lists it visited hold fewer than k rows
                item = self.index.items[r]
                hits.append(Hit(len(hits) + 1, int(r), item.id, float(s), item.path, item.captions))
        return hits
