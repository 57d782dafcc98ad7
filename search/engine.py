"""Nearest neighbours of query vectors in a gallery, by cosine similarity: exact, or faiss IVF.

Both engines take L2-normalised float32 rows (``normalize``), so the inner product is the cosine,
and return, per query, the top k gallery rows as ``(scores, rows)``, each (m, k) with k capped at the
gallery size, best first.

``exact_topk`` scores the gallery in blocks of ``EXACT_BLOCK_SCORES / m`` rows for m queries (memory:
the gallery plus an (m, block) score matrix and its index arrays, never (m, n)) and keeps a
running top k. Ties are broken by row index
(the lower row wins), so the answer equals sorting every score by (-score, row), the naive
definition ``tests/test_search.py`` checks it against, whatever the block size.

``FaissIndex`` is faiss's ``IndexIVFFlat`` over inner products: k-means (faiss's own, seeded) puts
the rows into ``nlist`` lists (:func:`nlist_for`: sqrt(n), trained on at most ``TRAIN_PER_LIST``
rows per list; faiss's guideline of 4-16 sqrt(n) lists is faster per query but takes 4-16 times
longer to train, minutes at 1M rows on 2 cores: benchmarks/bench_search.py); a query scores only
the rows of the ``nprobe`` lists whose centroids are nearest. Vectors are stored unquantised, so
a row it returns has its exact cosine; what it can miss is a row in a list it did not visit
(:func:`recall_at_k` measures that against exact search). ``faiss-cpu`` is an optional extra
(``pip install 'platonic-align[search]'``): :func:`faiss_available`.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError

EXACT_BLOCK_SCORES = 2**22  # scores computed at once by exact search: block rows = this / queries (16 MiB of float32)
ADD_ROWS = 65536  # rows handed to faiss at once when building
TRAIN_PER_LIST = 64  # faiss k-means training rows per list (faiss warns below 39; the rest of the rows are only added)
FAISS_SEED = 1234  # seeds faiss's k-means and the choice of training rows


class SearchError(PipelineError, ValueError):
    """A search that cannot be run as asked (bad vectors, missing faiss for a faiss index, ...)."""


def check_config(sc) -> None:
    """SearchError naming the key when a [search] value (a ``SearchConfig``) is out of range."""
    for key, low in (("top_k", 1), ("exact_max", 0), ("nprobe", 1), ("port", 0)):
        value = getattr(sc, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (key == "port" and value > 65535):
            limit = "0..65535" if key == "port" else f"an integer >= {low}"
            raise SearchError(f"search.{key} must be {limit}, got {value!r}.")


def normalize(x: np.ndarray, what: str = "vectors") -> np.ndarray:
    """Rows of ``x`` (n, d) scaled to unit L2 norm, as float32 (computed in float64). A zero or
    non-finite row is a SearchError naming it: it has no direction to compare."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise SearchError(f"{what} must be a 2-D array (rows, width), got shape {x.shape}.")
    norms = np.linalg.norm(x, axis=1)
    bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
    if bad.size:
        raise SearchError(f"{what}: row {int(bad[0])} is zero or not finite ({bad.size} such rows); "
                          "it has no direction to compare by cosine.")
    return (x / norms[:, None]).astype(np.float32)


def _block_topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices (m, k) of each row's k largest scores, ties to the lower column, in column
    order (not sorted by score). ``scores``: (m, b) with b >= k."""
    if k == scores.shape[1]:
        return np.broadcast_to(np.arange(k), scores.shape).copy()
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(scores, part, axis=1).min(axis=1, keepdims=True)  # the k-th largest score
    above = scores > kth
    tied = scores == kth
    room = k - above.sum(axis=1, keepdims=True)  # how many of the tied columns make the cut
    chosen = above | (tied & (np.cumsum(tied, axis=1) <= room))
    return np.nonzero(chosen)[1].reshape(scores.shape[0], k)


def exact_topk(gallery: np.ndarray, queries: np.ndarray, k: int,
               block_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k rows of ``gallery`` (n, d) with the largest inner product with each of ``queries``
    (m, d): (scores (m, k'), rows (m, k')) with k' = min(k, n), sorted by (-score, row).

    On normalised rows the inner product is the cosine. Blockwise: ``block_rows`` gallery rows at
    a time (default ``EXACT_BLOCK_SCORES // m``; a memory-mapped gallery is read once per call)."""
    n = gallery.shape[0]
    m = queries.shape[0]
    block_rows = block_rows or max(1, EXACT_BLOCK_SCORES // max(1, m))
    k = min(int(k), n)
    if k < 1 or m == 0:
        return np.zeros((m, 0), np.float32), np.zeros((m, 0), np.int64)
    best_s = np.full((m, 0), -np.inf, np.float32)
    best_r = np.zeros((m, 0), np.int64)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    for lo in range(0, n, block_rows):
        block = np.asarray(gallery[lo:lo + block_rows], dtype=np.float32)
        scores = q @ block.T  # (m, b)
        cols = _block_topk(scores, min(k, scores.shape[1]))
        cand_s = np.concatenate([best_s, np.take_along_axis(scores, cols, axis=1)], axis=1)
        cand_r = np.concatenate([best_r, cols + lo], axis=1)
        order = np.lexsort((cand_r, -cand_s), axis=1)[:, :k]
        best_s = np.take_along_axis(cand_s, order, axis=1)
        best_r = np.take_along_axis(cand_r, order, axis=1)
    return best_s, best_r


def recall_at_k(found: np.ndarray, exact: np.ndarray, k: int = 10) -> float:
    """Mean over queries of |found[:k] & exact[:k]| / |exact[:k]|: the share of the exact top k
    an approximate search returned (rows (m, >=k) each; -1 in ``found`` = nothing)."""
    if exact.shape[0] == 0:
        return math.nan
    hits = [len(set(f[:k].tolist()) & set(e[:k].tolist())) / max(1, len(e[:k])) for f, e in zip(found, exact)]
    return float(np.mean(hits))


# ------------------------------------------------------------------------------------ faiss
def faiss_available() -> bool:
    """True when the optional ``faiss-cpu`` package can be imported."""
    return importlib.util.find_spec("faiss") is not None


def _faiss():
    if not faiss_available():
        raise SearchError("faiss-cpu is not installed; install it with `pip install 'platonic-align[search]'` "
                          "(or faiss-cpu), or search exactly.")
    import faiss  # optional dependency, imported only when a faiss index is built or read

    return faiss


def nlist_for(n: int) -> int:
    """Inverted lists of a faiss index over n rows: round(sqrt(n)), at most n // TRAIN_PER_LIST
    (so every list has its training rows), at least 1."""
    return max(1, min(round(math.sqrt(n)), n // TRAIN_PER_LIST))


class FaissIndex:
    """A faiss ``IndexIVFFlat`` (inner product) over normalised rows. ``search`` matches
    :func:`exact_topk`'s return (rows of lists it did not reach are missing; -1 pads)."""

    name = "faiss"

    def __init__(self, index, nprobe: int):
        self.index = index
        self.nprobe = int(nprobe)

    @property
    def nlist(self) -> int:
        return int(self.index.nlist)

    @classmethod
    def build(cls, vectors: np.ndarray, nprobe: int, nlist: int | None = None) -> "FaissIndex":
        """Train the lists on a seeded sample of at most ``TRAIN_PER_LIST * nlist`` rows, then add
        every row (in row order: faiss ids are row numbers)."""
        faiss = _faiss()
        n, d = vectors.shape
        nlist = nlist or nlist_for(n)
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = FAISS_SEED
        index.cp.max_points_per_centroid = TRAIN_PER_LIST
        rng = np.random.default_rng(FAISS_SEED)
        sample = np.sort(rng.choice(n, size=min(n, TRAIN_PER_LIST * nlist), replace=False))
        index.train(np.ascontiguousarray(vectors[sample], dtype=np.float32))
        for lo in range(0, n, ADD_ROWS):
            index.add(np.ascontiguousarray(vectors[lo:lo + ADD_ROWS], dtype=np.float32))
        return cls(index, nprobe)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(int(k), int(self.index.ntotal))
        if k < 1 or queries.shape[0] == 0:
            return np.zeros((queries.shape[0], 0), np.float32), np.zeros((queries.shape[0], 0), np.int64)
        self.index.nprobe = max(1, min(self.nprobe, self.nlist))
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores.astype(np.float32), rows.astype(np.int64)

    def write(self, path: Path) -> None:
        _faiss().write_index(self.index, str(path))

    @classmethod
    def read(cls, path: Path, nprobe: int) -> "FaissIndex":
        """Read a faiss file this module wrote (the caller checks its sha256 first)."""
        return cls(_faiss().read_index(str(path)), nprobe)


class ExactIndex:
    """Exact search over the gallery rows (an array or a read-only memory map)."""

    name = "exact"

    def __init__(self, vectors: np.ndarray):
        self.vectors = vectors

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return exact_topk(self.vectors, queries, k)
