"""One finished cache entry: what its file holds, how it is read (every read checked), how it is written.

An entry file (``<entry>.h5``, HDF5, or ``<entry>.zarr``, Zarr v3) holds

    features      (n, d) float32
    layers/<k>    (n, d_k) float32, optional: pooled hidden layer k (0-based) when extracted
    tokens        (T, w) float16 (``token_dtype``), optional (``extract --tokens``): every row's token
                  vectors, flat, row after row; T = sum of token_lengths
    token_lengths (n,) int32: tokens of each row (row i's are tokens[offsets[i]:offsets[i+1]],
                  offsets = 0 followed by the cumulative sum); ``Entry.tokens`` reads them per row range
    ids           (n,) UTF-8 strings: the sample ids (image id, or ``<image id>#<k>`` for captions)
    checksums     (1,) UTF-8 string: JSON record of the digests of everything above
                  (``pipeline.integrity``), written once, checked on every read
    content       (1,) UTF-8 string, optional: JSON {"ids": [image id, ...], "digests": [...]}, the
                  content hash of every image of the split it was extracted from (names the changed
                  images when the data changes)
    attributes    ``key`` (JSON: what was asked for; a different request makes the entry stale),
                  ``provenance`` (JSON: key + versions, config, timings), ``skipped`` (JSON list
                  of {"id", "reason"} for rows left out by a documented skip option),
                  ``cache_format`` (2), and flat copies (entry, encoder, dataset, split, n, dim)
                  for people browsing the file.

Use it through :mod:`pipeline.cache`, which re-exports everything here.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from pipeline.integrity import (Checksums, RaggedDigests, block_digests, damaged, digest, lengths_digest,
                                 strings_digest)
from pipeline.layout import CACHE_FORMAT
from pipeline.names import source_of
from pipeline.runtime import utc_now
from pipeline.staging import canonical_json
from pipeline.storage import OLD_FORMAT, CacheError, DamagedEntryError, OldFormatError, backend, replace

VERIFY_BLOCKS = 16  # checksum blocks read at once by Entry.verify
DATA_FIELDS = ("dataset", "data_dir", "split", "fingerprint", "content")  # key fields naming the data
TOKEN_DTYPES = ("float16", "float32")  # stored dtypes of token arrays (extract.token_dtype)
TOKEN_CHUNK_BYTES = 4 << 20  # storage chunk of the flat token array, bytes (about)


@dataclass(frozen=True)
class TokenData:
    """Token vectors to store with an entry: ``lengths`` (n,) tokens per row, ``width``,
    ``dtype`` (TOKEN_DTYPES) and ``parts()``: an iterator of (m, width) arrays, the flat tokens in
    row order, possibly in several pieces (so an entry's tokens never have to fit in memory)."""

    lengths: np.ndarray
    width: int
    dtype: str
    parts: Callable[[], Iterable[np.ndarray]]

    @classmethod
    def of(cls, tokens: np.ndarray, lengths: Sequence[int], dtype: str = "float16") -> "TokenData":
        """From one flat (T, width) array."""
        tokens = np.asarray(tokens)
        return cls(np.asarray(lengths, dtype=np.int64), int(tokens.shape[1]), dtype, lambda: [tokens])


def _attrs_digest(attrs: Mapping) -> str:
    """Digest of the attributes that decide what an entry means: its name, key and skips."""
    return strings_digest([str(attrs.get("entry")), str(attrs["key"]), str(attrs.get("skipped", "[]"))])


@dataclass(frozen=True)
class Entry:
    """A finished cache entry. Holds metadata only; arrays are read on demand, checked against
    their checksums (a :class:`DamagedEntryError` instead of wrong numbers)."""

    path: Path
    name: str
    ids: np.ndarray  # (n,) str
    dim: int
    layers: tuple[int, ...]  # indices of stored hidden layers (empty when not extracted)
    key: dict  # the request identity (stale check)
    provenance: dict
    skipped: tuple[dict, ...]  # rows left out by a documented skip: {"id", "reason"}
    checksums: Checksums
    token_dtype: str = ""  # dtype of the stored tokens; "" = pooled features only
    token_width: int = 0  # width of each token vector (0 without tokens)

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def has_tokens(self) -> bool:
        return bool(self.token_dtype)

    def _need_tokens(self) -> None:
        if not self.has_tokens:
            encoder = source_of(self.name)[0]
            raise CacheError(
                f"Entry {self.name!r} holds pooled features only, no tokens; token adapters (train.adapter = "
                f"\"token\") need token features: `extract --encoder {encoder} --tokens grid:4` (or all) "
                f"with --force to replace it.")

    @functools.cached_property
    def _lengths(self) -> np.ndarray:
        try:
            with backend(self.path).open(self.path, "r") as g:
                lengths = np.asarray(g["token_lengths"][:], dtype=np.int64)
        except Exception as exc:
            raise damaged(self.path, self.name, f"reading 'token_lengths' failed ({type(exc).__name__}: {exc})") from None
        self.checksums.check_value("token_lengths", lengths_digest(lengths), self.path, self.name)
        return lengths

    def token_lengths(self) -> np.ndarray:
        """(n,) int64: tokens stored for each row (CacheError for an entry without tokens)."""
        self._need_tokens()
        return self._lengths.copy()

    def tokens(self, rows: slice | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(flat (T, w) tokens in the stored dtype, (m,) lengths) of a contiguous row range, the
        checksum blocks covering it read whole and checked; row i's tokens follow row i-1's."""
        self._need_tokens()
        start, stop, step = (rows or slice(None)).indices(self.n)
        if step != 1:
            raise CacheError("Entry.tokens reads a contiguous row range (step 1).")
        lengths = self._lengths
        if stop <= start:
            return np.zeros((0, self.token_width), self.token_dtype), lengths[:0]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        first, end = self.checksums.block_range(start, stop)
        lo, hi = first * self.checksums.block_rows, min(end * self.checksums.block_rows, self.n)
        try:
            with backend(self.path).open(self.path, "r") as g:
                data = np.asarray(g["tokens"][int(offsets[lo]):int(offsets[hi])])
        except Exception as exc:
            raise damaged(self.path, self.name, f"reading the tokens of rows {lo}-{hi - 1} failed "
                                                f"({type(exc).__name__}: {exc})") from None
        self.checksums.check_ragged("tokens", data, lengths[lo:hi], first, self.token_dtype, self.path, self.name)
        base = offsets[lo]
        return data[int(offsets[start] - base):int(offsets[stop] - base)], lengths[start:stop].copy()

    @property
    def data(self) -> dict | None:
        """What data the rows come from: {dataset, data_dir, split, fingerprint, content} of the
        key (for an aligned entry ``<encoder>@<run>``: of its source entry's key); None when the
        key does not say (entries written by hand). Joins refuse entries whose data differ."""
        key = self.key
        while "fingerprint" not in key and isinstance(key.get("source"), dict):
            key = key["source"]
        return {k: key.get(k) for k in DATA_FIELDS} if "fingerprint" in key else None

    def _read(self, array: str, lo: int, hi: int) -> np.ndarray:
        try:
            with backend(self.path).open(self.path, "r") as g:
                return np.asarray(g[array][lo:hi], dtype=np.float32)
        except Exception as exc:  # any failure to decode stored bytes means a damaged file
            raise damaged(self.path, self.name, f"reading rows {lo}-{hi - 1} of {array!r} failed "
                                                f"({type(exc).__name__}: {exc})") from None

    def features(self, layer: int | None = None, rows: slice | None = None) -> np.ndarray:
        """(n, d) float32 features, or hidden layer ``layer``; ``rows`` reads a contiguous slice.
        The checksum blocks covering the rows are read whole and checked."""
        name = "features" if layer is None else f"layers/{layer}"
        if layer is not None and layer not in self.layers:
            raise CacheError(
                f"Entry {self.name!r} has no layer {layer} (stored: {list(self.layers) or 'none'}; "
                f"extract with --layers all).")
        start, stop, step = (rows or slice(None)).indices(self.n)
        if step != 1:
            return self.features(layer)[rows]
        if stop <= start:  # no rows: nothing to check
            return self._read(name, start, start)
        first, end = self.checksums.block_range(start, stop)
        lo, hi = first * self.checksums.block_rows, min(end * self.checksums.block_rows, self.n)
        data = self._read(name, lo, hi)
        self.checksums.check_blocks(name, data, first, self.path, self.name)
        return data[start - lo:stop - lo]

    def iter_rows(self, block: int, layer: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start, (m, d) features) blocks without loading the whole entry."""
        for start in range(0, self.n, block):
            yield start, self.features(layer, slice(start, min(start + block, self.n)))

    def content(self) -> dict | None:
        """{"ids": [...], "digests": [...]}: the content hash of every image of the source split
        when the entry was written (None when it does not record them)."""
        if "content" not in self.checksums.arrays:
            return None
        store = backend(self.path)
        with store.open(self.path, "r") as g:
            text = str(store.read_strings(g, "content")[0])
        self.checksums.check_value("content", digest(text.encode("utf-8")), self.path, self.name)
        return json.loads(text)

    def verify(self) -> None:
        """Read every stored array and check every checksum (DamagedEntryError on the first bad block)."""
        R = self.checksums.block_rows * VERIFY_BLOCKS
        for k in (None, *self.layers):
            for start in range(0, max(self.n, 1), R):
                self.features(k, slice(start, min(start + R, self.n)))
        if self.has_tokens:
            for start in range(0, self.n, R):
                self.tokens(slice(start, min(start + R, self.n)))
        self.content()


def open_entry(path: str | Path) -> Entry:
    """The finished entry at ``path`` (metadata only; ids and attributes checked); CacheError when
    missing, OldFormatError when written by cache format 1, DamagedEntryError when malformed."""
    path = Path(path)
    if not path.exists():
        raise CacheError(f"Cache entry {str(path)!r} does not exist.")
    store = backend(path)
    try:
        with store.open(path, "r") as g:
            store.check_plain(g, path)
            attrs = dict(g.attrs)
            name = str(attrs.get("entry", path.stem))
            if "cache_format" not in attrs or "checksums" not in g:
                raise OldFormatError(f"Cache entry {name!r} ({str(path)!r}) {OLD_FORMAT}. Re-extract it with "
                                     f"`extract --force` (README: Reliability).")
            checks = Checksums.from_json(str(store.read_strings(g, "checksums")[0]))
            ids = store.read_strings(g, "ids")
            shape = tuple(g["features"].shape)
            layers = tuple(sorted(int(k) for k in store.keys(g, "layers")))
            key, provenance = json.loads(attrs["key"]), json.loads(attrs["provenance"])
            skipped = tuple(json.loads(attrs.get("skipped", "[]")))
            tokens = ((str(g["tokens"].dtype), int(g["tokens"].shape[1]), int(g["token_lengths"].shape[0]))
                      if "tokens" in g else ("", 0, len(ids)))
    except (DamagedEntryError, OldFormatError):
        raise
    except CacheError as exc:  # the file cannot be opened (truncated, not HDF5/Zarr)
        raise damaged(path, path.stem, str(exc)) from None
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise damaged(path, path.stem, f"incomplete or not a feature cache ({type(exc).__name__}: {exc})") from None
    checks.check_value("ids", strings_digest(ids), path, name)
    checks.check_value("attrs", _attrs_digest(attrs), path, name)
    if shape[0] != len(ids):
        raise damaged(path, name, f"{shape[0]} feature rows but {len(ids)} ids")
    if tokens[2] != len(ids) or (tokens[0] and "tokens" not in checks.arrays):
        raise damaged(path, name, f"{tokens[2]} token lengths (or no token checksums) for {len(ids)} ids")
    return Entry(path, name, ids, int(shape[1]), layers, key, provenance, skipped, checks, tokens[0], tokens[1])


def _attributes(name: str, n: int, dim: int, key: Mapping, provenance: Mapping, skipped: Sequence[Mapping]) -> dict:
    """The attributes of an entry file (see the module docstring)."""
    full = {**provenance, "key": dict(key), "created": utc_now()}
    attrs = {"entry": name, "key": canonical_json(dict(key)), "provenance": canonical_json(full),
             "skipped": canonical_json(list(skipped)), "n": n, "dim": dim, "cache_format": CACHE_FORMAT}
    attrs.update({k: str(key[k]) for k in ("encoder", "dataset", "split") if k in key})
    return attrs


def check_rows(name: str, ids: list[str], features: np.ndarray) -> None:
    """CacheError unless ``features`` is (n, d) for n unique ``ids``."""
    if features.ndim != 2 or features.shape[0] != len(ids):
        raise CacheError(f"features must be (n, d) with n = {len(ids)} ids, got {features.shape}.")
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise CacheError(f"Duplicate ids in entry {name!r}: {dup}.")


def write_file(path: Path, name: str, ids: Sequence[str], features: np.ndarray, key: Mapping, provenance: Mapping,
               layers: Sequence[np.ndarray] = (), skipped: Sequence[Mapping] = (), chunk_rows: int = 1024,
               content: Mapping | None = None, tokens: TokenData | None = None) -> None:
    """Write an entry file to a temporary name beside ``path``, then rename it over ``path``.

    features: (n, d); layers: (n, d_k) arrays stored as ``layers/<k>``; content: {"ids",
    "digests"} of the source split; tokens: the rows' token vectors (written part by part).
    The caller holds the folder lock (pipeline.storage.locked)."""
    ids = [str(i) for i in ids]
    features = np.asarray(features, dtype=np.float32)  # a float32 np.memmap stays one (no copy)
    check_rows(name, ids, features)
    store = backend(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / path.name
    sums = Checksums(arrays={"ids": [strings_digest(ids)], "features": block_digests(features)})
    try:
        with store.open(tmp, "w") as g:
            store.write_strings(g, "ids", ids)
            store.create(g, "features", features.shape, chunk_rows)[:] = features
            for k, layer in enumerate(layers):
                layer = np.asarray(layer, dtype=np.float32)
                if layer.shape[0] != len(ids):
                    raise CacheError(f"layer {k} has {layer.shape[0]} rows, expected {len(ids)}.")
                if k == 0:
                    g.create_group("layers")
                store.create(g, f"layers/{k}", layer.shape, chunk_rows)[:] = layer
                sums.arrays[f"layers/{k}"] = block_digests(layer)
            if content is not None:
                text = canonical_json({"ids": list(content["ids"]), "digests": list(content["digests"])})
                store.write_strings(g, "content", [text])
                sums.arrays["content"] = [digest(text.encode("utf-8"))]
            if tokens is not None:
                _write_tokens(store, g, tokens, len(ids), sums, chunk_rows)
            attrs = _attributes(name, len(ids), int(features.shape[1]), key, provenance, skipped)
            sums.attrs = _attrs_digest(attrs)
            store.write_strings(g, "checksums", [sums.to_json()])
            g.attrs.update(attrs)
        replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def _write_tokens(store, g, tokens: TokenData, n: int, sums: Checksums, chunk_rows: int) -> None:
    """Store ``tokens`` as ``tokens`` (flat) + ``token_lengths``, recording their checksums."""
    if tokens.dtype not in TOKEN_DTYPES:
        raise CacheError(f"token dtype must be one of {', '.join(TOKEN_DTYPES)}, got {tokens.dtype!r}.")
    lengths = np.asarray(tokens.lengths, dtype=np.int64)
    if lengths.shape != (n,) or (lengths < 0).any():
        raise CacheError(f"token lengths must be {n} counts >= 0, got shape {lengths.shape}.")
    total, width = int(lengths.sum()), int(tokens.width)
    store.create(g, "token_lengths", (n,), chunk_rows, "int32")[:] = lengths.astype(np.int32)
    per_chunk = max(1, TOKEN_CHUNK_BYTES // max(1, width * np.dtype(tokens.dtype).itemsize))
    out = store.create(g, "tokens", (total, width), per_chunk, tokens.dtype)
    digests, pos = RaggedDigests(lengths, tokens.dtype, sums.block_rows), 0
    for part in tokens.parts():
        part = np.asarray(part, dtype=tokens.dtype)
        if part.ndim != 2 or part.shape[1] != width or pos + len(part) > total:
            raise CacheError(f"token part of shape {part.shape} does not fit ({total}, {width}) at {pos}.")
        if len(part):
            out[pos:pos + len(part)] = part
        digests.feed(part)
        pos += len(part)
    if pos != total:
        raise CacheError(f"{pos} tokens written, the lengths sum to {total}.")
    sums.arrays["tokens"] = digests.result()
    sums.arrays["token_lengths"] = [lengths_digest(lengths)]
