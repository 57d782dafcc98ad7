"""The feature cache: the one module that knows how features are stored.

Layout: ``<cache>/<dataset>/<split>/<entry>.h5`` (HDF5) or ``.zarr`` (Zarr v3), one file per
(dataset, split, entry). An entry is an encoder (``resnet18``) or an aligned embedding
written by fit-adapters (``resnet18@run``). Each holds

    features      (n, d) float32
    layers/<k>    (n, d_k) float32, optional: pooled hidden layer k (0-based) when extracted
    ids           (n,) UTF-8 strings: the sample ids (image id, or ``<image id>#<k>`` for captions)
    attributes    ``key`` (JSON: what was asked for; a different request makes the entry stale),
                  ``provenance`` (JSON: key + versions, config, timings), ``skipped`` (JSON list
                  of {"id", "reason"} for rows left out by a documented skip option), and a few
                  flat copies (entry, encoder, dataset, split, n, dim) for people browsing the file.

Writing is resumable and safe under kill -9 and concurrent writers: ``EntryWriter`` stages
each chunk of rows as its own file in ``<entry>.partial/`` (``pipeline.staging``: written to a
temporary name, flushed, fsynced, then renamed, so a chunk exists only once complete) and
assembles the final file under a lock into a temporary name that is atomically renamed.
Separate processes may write disjoint chunks of one entry (multi-process extraction) and leave
small JSON notes (``note-<name>.json``, e.g. which shard ran where) beside them. A finished
entry is never modified in place.

Readers open the file per call and keep no handle, so an ``Entry`` can be passed to
DataLoader workers (h5py handles do not survive fork).

Modules: this one is the public API and the entry format; ``pipeline.staging`` the staging
folder of an unfinished entry; ``pipeline.storage`` the HDF5/Zarr backends, the folder lock and
the errors (re-exported here). Import everything from ``pipeline.cache``.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from pipeline.errors import did_you_mean
from pipeline.runtime import first_nonfinite_row, utc_now
from pipeline.staging import PARTIAL_SUFFIX, Chunk, Staging, canonical_json, staging_path
from pipeline.storage import FORMATS, CacheError, StaleCacheError, backend, locked, remove, replace, stale_message

__all__ = ["FORMATS", "PARTIAL_SUFFIX", "CacheError", "StaleCacheError", "Entry", "EntryWriter", "entry_filename",
           "entry_path", "find_entry", "list_entries", "list_splits", "open_entry", "split_dir", "staging_path",
           "write_entry"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------- paths

def entry_filename(entry: str) -> str:
    """File stem of an entry name; ``/`` and ``:`` (hub ids, generic encoders) become ``--``."""
    return entry.replace("/", "--").replace(":", "--")


def split_dir(cache: str | Path, dataset: str, split: str) -> Path:
    return Path(cache) / entry_filename(dataset) / split


def entry_path(cache: str | Path, dataset: str, split: str, entry: str, fmt: str = "h5") -> Path:
    if fmt not in FORMATS:
        raise CacheError(f"Unknown cache format {fmt!r}; use one of {', '.join(FORMATS)}.{did_you_mean(fmt, FORMATS)}")
    return split_dir(cache, dataset, split) / f"{entry_filename(entry)}.{fmt}"


def list_entries(cache: str | Path, dataset: str, split: str) -> list[str]:
    """Names of the finished entries of one split (as stored in their attributes), sorted."""
    folder = split_dir(cache, dataset, split)
    if not folder.is_dir():
        return []
    names = []
    for p in sorted(folder.iterdir()):
        if p.suffix.lstrip(".") in FORMATS:
            try:
                names.append(open_entry(p).name)
            except CacheError as exc:
                log.warning("ignoring unreadable cache entry %s: %s", p, exc)
    return sorted(names)


def list_splits(cache: str | Path, dataset: str) -> list[str]:
    folder = Path(cache) / entry_filename(dataset)
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def find_entry(cache: str | Path, dataset: str, split: str, entry: str) -> "Entry":
    """Open an entry by name, whichever format it was written in; a clear error otherwise."""
    for fmt in FORMATS:
        path = entry_path(cache, dataset, split, entry, fmt)
        if path.exists():
            return open_entry(path)
    available = list_entries(cache, dataset, split)
    if not available:
        splits = list_splits(cache, dataset)
        where = f"splits present: {', '.join(splits)}" if splits else "nothing is cached for this dataset"
        raise CacheError(
            f"No cache entries for dataset {dataset!r}, split {split!r} under {str(cache)!r} ({where}). "
            f"Run `extract --encoder {entry.split('@')[0]} --split {split}` first.")
    raise CacheError(
        f"No cache entry {entry!r} for {dataset}/{split} under {str(cache)!r}.{did_you_mean(entry, available)} "
        f"Available: {', '.join(available)}.")


# ------------------------------------------------------------------------------------ reading

@dataclass(frozen=True)
class Entry:
    """A finished cache entry. Holds metadata only; arrays are read on demand."""

    path: Path
    name: str
    ids: np.ndarray  # (n,) str
    dim: int
    layers: tuple[int, ...]  # indices of stored hidden layers (empty when not extracted)
    key: dict  # the request identity (stale check)
    provenance: dict
    skipped: tuple[dict, ...]  # rows left out by a documented skip: {"id", "reason"}

    @property
    def n(self) -> int:
        return len(self.ids)

    def features(self, layer: int | None = None, rows: slice | None = None) -> np.ndarray:
        """(n, d) float32 features, or hidden layer ``layer``; ``rows`` reads a contiguous slice."""
        name = "features" if layer is None else f"layers/{layer}"
        if layer is not None and layer not in self.layers:
            raise CacheError(
                f"Entry {self.name!r} has no layer {layer} (stored: {list(self.layers) or 'none'}; "
                f"extract with --layers all).")
        with backend(self.path).open(self.path, "r") as g:
            out = g[name][rows if rows is not None else slice(None)]
        return np.asarray(out, dtype=np.float32)

    def iter_rows(self, block: int, layer: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start, (m, d) features) blocks without loading the whole entry."""
        for start in range(0, self.n, block):
            yield start, self.features(layer, slice(start, min(start + block, self.n)))


def open_entry(path: str | Path) -> Entry:
    """The finished entry at ``path`` (metadata only); CacheError when missing or malformed."""
    path = Path(path)
    if not path.exists():
        raise CacheError(f"Cache entry {str(path)!r} does not exist.")
    store = backend(path)
    with store.open(path, "r") as g:
        try:
            attrs = dict(g.attrs)
            ids = store.read_strings(g, "ids")
            dim = int(g["features"].shape[1])
            n = int(g["features"].shape[0])
            layers = tuple(sorted(int(k) for k in store.keys(g, "layers")))
            key = json.loads(attrs["key"])
            provenance = json.loads(attrs["provenance"])
            skipped = tuple(json.loads(attrs.get("skipped", "[]")))
        except KeyError as exc:
            raise CacheError(f"Cache entry {str(path)!r} is incomplete or not a feature cache (missing {exc}).") from None
    if n != len(ids):
        raise CacheError(f"Cache entry {str(path)!r} is corrupt: {n} feature rows but {len(ids)} ids.")
    return Entry(path, str(attrs.get("entry", path.stem)), ids, dim, layers, key, provenance, skipped)


# ------------------------------------------------------------------------------------ writing

def _attributes(name: str, n: int, dim: int, key: Mapping, provenance: Mapping, skipped: Sequence[Mapping]) -> dict:
    """The attributes of an entry file (see the module docstring)."""
    full = {**provenance, "key": dict(key), "created": utc_now()}
    attrs = {"entry": name, "key": canonical_json(dict(key)), "provenance": canonical_json(full),
             "skipped": canonical_json(list(skipped)), "n": n, "dim": dim}
    attrs.update({k: str(key[k]) for k in ("encoder", "dataset", "split") if k in key})
    return attrs


def write_entry(path: str | Path, name: str, ids: Sequence[str], features: np.ndarray, key: Mapping,
                provenance: Mapping, layers: Sequence[np.ndarray] = (), skipped: Sequence[Mapping] = (),
                chunk_rows: int = 1024) -> Entry:
    """Write a whole entry at once, atomically (temporary name, then rename).

    features: (n, d); layers: optional list of (n, d_k) arrays stored as ``layers/<k>``.
    """
    path = Path(path)
    ids = [str(i) for i in ids]
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or features.shape[0] != len(ids):
        raise CacheError(f"features must be (n, d) with n = {len(ids)} ids, got {features.shape}.")
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise CacheError(f"Duplicate ids in entry {name!r}: {dup}.")
    store = backend(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / path.name
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
            g.attrs.update(_attributes(name, len(ids), int(features.shape[1]), key, provenance, skipped))
        with locked(path):
            replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)
    return open_entry(path)


class EntryWriter:
    """Resumable, chunked writer of one entry.

    ``ids`` is the full ordered list of rows the entry is asked to hold; rows are grouped in
    chunks of ``chunk_rows``. Call ``pending()`` for the chunks still to compute, ``write_chunk``
    for each, then ``finalize()``. Chunks already staged by an earlier (interrupted) run or by
    another process are kept, so a rerun computes only what is missing.

    A staged run or finished entry whose ``key`` differs from this request raises
    ``StaleCacheError`` unless ``force=True`` (then it is discarded).
    """

    def __init__(self, path: str | Path, name: str, ids: Sequence[str], key: Mapping,
                 chunk_rows: int = 1024, force: bool = False):
        self.path = Path(path)
        self.name = name
        self.ids = [str(i) for i in ids]
        self.key = json.loads(canonical_json(dict(key)))  # as it reads back from the file
        self.chunk_rows = int(chunk_rows)
        self._staging = Staging(self.path)
        self.staging = self._staging.folder  # the staging folder, <entry>.partial
        if self.chunk_rows < 1:
            raise CacheError("chunk_rows must be >= 1.")
        with locked(self.path):
            if force:
                for old in (self.path, self.staging):
                    if old.exists():
                        log.warning("--force: discarding %s", old)
                        remove(old)
            self.done = self._check_existing()
            if not self.done:
                self._staging.open(Staging.manifest(name, self.key, self.ids, self.chunk_rows))

    def _check_existing(self) -> bool:
        """True when the finished entry answers this request; StaleCacheError when it does not."""
        if not self.path.exists():
            return False
        try:
            existing = open_entry(self.path)
        except CacheError:
            existing = None
        if existing is not None and existing.key == self.key:
            return True
        raise StaleCacheError(stale_message(self.path, existing.key if existing else None, self.key))

    # -- chunks ----------------------------------------------------------------------------
    @property
    def num_chunks(self) -> int:
        return (len(self.ids) + self.chunk_rows - 1) // self.chunk_rows

    def rows(self, chunk: int) -> range:
        return range(chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, len(self.ids)))

    def _finished(self) -> bool:
        """True when a matching finished entry exists (another process may have finalised it)."""
        try:
            return self.path.exists() and open_entry(self.path).key == self.key
        except CacheError:
            return False

    def pending(self) -> list[int]:
        """Chunks not yet staged (empty when the entry is already finished)."""
        if self.done or self._finished():
            self.done = True
            return []
        return [c for c in range(self.num_chunks) if not self._staging.has_chunk(c)]

    def write_chunk(self, chunk: int, features: np.ndarray, layers: Sequence[np.ndarray] = (),
                    skipped: Mapping[str, str] | None = None) -> None:
        """Stage one chunk. ``features`` holds the chunk's rows in order, minus ``skipped``
        ({id: reason}) rows, which must belong to the chunk."""
        skipped = dict(skipped or {})
        chunk_ids = [self.ids[i] for i in self.rows(chunk)]
        unknown = set(skipped) - set(chunk_ids)
        if unknown:
            raise CacheError(f"skipped ids {sorted(unknown)[:3]} are not in chunk {chunk}.")
        kept = [i for i in chunk_ids if i not in skipped]
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[0] != len(kept):
            raise CacheError(f"chunk {chunk}: expected {len(kept)} feature rows, got {features.shape}.")
        bad = first_nonfinite_row(features)
        if bad is not None:
            raise CacheError(f"chunk {chunk}: non-finite features for id {kept[bad]!r} (try --precision fp32).")
        if self._finished():  # another process completed the entry meanwhile
            return
        self._staging.write_chunk(chunk, Chunk(kept, features, list(layers), skipped))

    def write_note(self, name: str, data: Mapping) -> bool:
        """Store a small JSON record as ``<staging>/note-<name>.json`` (atomically; replaces an
        older note of that name). Multi-process extraction uses it to say which shard staged
        what, with its host and timing. Notes are ignored by everything else and vanish with
        the staging folder. Returns False (and writes nothing) once the entry is finished."""
        with locked(self.path):  # finalize removes the staging folder under this lock
            if self.done or self._finished() or not self._staging.exists():
                return False
            self._staging.write_note(name, data)
        return True

    def notes(self) -> dict[str, dict]:
        """{name: record} of the notes in the staging folder (empty when there is none)."""
        return self._staging.notes()

    def finalize(self, provenance: Mapping, skipped: Sequence[Mapping] = ()) -> Entry | None:
        """Assemble the staged chunks into the entry once every chunk is there.

        skipped: extra {"id", "reason"} records to store (rows dropped before extraction,
        e.g. a missing image file or an empty caption under a skip option).

        Returns the finished Entry, or None if chunks are still missing (another process may
        be writing them). Safe to call from several processes: one assembles, the others find
        the finished entry.
        """
        with locked(self.path):
            if self.path.exists():
                entry = open_entry(self.path)
                if entry.key == self.key:
                    self.done = True
                    return entry
            if self.pending():
                return None
            parts = [self._staging.read_chunk(c) for c in range(self.num_chunks)]
        ids = [i for p in parts for i in p.ids]
        staged_skips = [{"id": i, "reason": r} for p in parts for i, r in p.skipped.items()]
        left_out = {s["id"] for s in staged_skips}
        if ids != [i for i in self.ids if i not in left_out]:
            raise CacheError(f"Staged chunks of {self.name!r} do not match the requested rows; rerun with --force.")
        dim = next((p.features.shape[1] for p in parts if p.features.size), 0)
        features = np.concatenate([p.features.reshape(-1, dim) for p in parts]) if parts else np.zeros((0, 0))
        n_layers = max((len(p.layers) for p in parts), default=0)  # a chunk with every row skipped has none
        layers = [np.concatenate([p.layers[k] for p in parts if k < len(p.layers)]) for k in range(n_layers)]
        for s in staged_skips:
            log.warning("%s: skipped %s (%s)", self.name, s["id"], s["reason"])
        entry = write_entry(self.path, self.name, ids, features, self.key, provenance, layers,
                            [*skipped, *staged_skips], chunk_rows=self.chunk_rows)
        with locked(self.path):
            self._staging.remove()
        self.done = True
        return entry
