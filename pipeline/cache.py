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
each chunk of rows as its own file in ``<entry>.partial/`` (written to a temporary name,
flushed, fsynced, then renamed, so a chunk exists only once complete) and assembles the final
file under a lock into a temporary name that is atomically renamed. Separate processes may
write disjoint chunks of one entry (multi-process extraction) and leave small JSON notes
(``note-<name>.json``, e.g. which shard ran where) beside them. A finished entry is never
modified in place.

Readers open the file per call and keep no handle, so an ``Entry`` can be passed to
DataLoader workers (h5py handles do not survive fork).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import difflib
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import h5py
import numpy as np
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

FORMATS = ("h5", "zarr")  # file extensions of the two backends
PARTIAL_SUFFIX = ".partial"  # staging folder of an unfinished entry
_NOTE_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # allowed names of EntryWriter.write_note records


class CacheError(PipelineError, RuntimeError):
    """A cache entry that is missing, malformed or unusable."""


class StaleCacheError(CacheError):
    """An existing entry (or partial extraction) was made for a different request."""


# --------------------------------------------------------------------------------------- paths

def entry_filename(entry: str) -> str:
    """File stem of an entry name; ``/`` and ``:`` (hub ids, generic encoders) become ``--``."""
    return entry.replace("/", "--").replace(":", "--")


def split_dir(cache: str | Path, dataset: str, split: str) -> Path:
    return Path(cache) / entry_filename(dataset) / split


def entry_path(cache: str | Path, dataset: str, split: str, entry: str, fmt: str = "h5") -> Path:
    if fmt not in FORMATS:
        raise CacheError(f"Unknown cache format {fmt!r}; use one of {', '.join(FORMATS)}.")
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
    close = difflib.get_close_matches(entry, available, n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise CacheError(
        f"No cache entry {entry!r} for {dataset}/{split} under {str(cache)!r}.{hint} "
        f"Available: {', '.join(available)}.")


# ------------------------------------------------------------------------------------ backends

class _H5:
    ext = "h5"

    @staticmethod
    @contextlib.contextmanager
    def open(path: Path, mode: str):
        try:
            f = h5py.File(path, mode)
        except OSError as exc:
            raise CacheError(f"Cannot open HDF5 cache entry {str(path)!r}: {exc}") from None
        try:
            yield f
        finally:
            f.close()

    @staticmethod
    def write_strings(group, name: str, values: Sequence[str]) -> None:
        group.create_dataset(name, data=np.asarray(values, dtype=object), dtype=h5py.string_dtype("utf-8"))

    @staticmethod
    def read_strings(group, name: str) -> np.ndarray:
        return np.asarray(group[name].asstr()[()], dtype=str)

    @staticmethod
    def create(group, name: str, shape: tuple[int, int], chunk_rows: int):
        chunks = (max(1, min(chunk_rows, shape[0])), shape[1]) if shape[0] else None
        return group.create_dataset(name, shape=shape, dtype="float32", chunks=chunks)

    @staticmethod
    def keys(group, name: str) -> list[str]:
        return list(group[name].keys()) if name in group else []


class _Zarr:
    ext = "zarr"

    @staticmethod
    @contextlib.contextmanager
    def open(path: Path, mode: str):
        import zarr

        try:
            yield zarr.open_group(str(path), mode=mode)
        except (FileNotFoundError, ValueError, KeyError) as exc:
            raise CacheError(f"Cannot open Zarr cache entry {str(path)!r}: {exc}") from None

    @staticmethod
    def write_strings(group, name: str, values: Sequence[str]) -> None:
        arr = group.create_array(name, shape=(len(values),), dtype=str)
        if len(values):
            arr[:] = np.asarray(values, dtype=str)

    @staticmethod
    def read_strings(group, name: str) -> np.ndarray:
        return np.array([str(s) for s in group[name][:]], dtype=str)

    @staticmethod
    def create(group, name: str, shape: tuple[int, int], chunk_rows: int):
        chunks = (max(1, min(chunk_rows, shape[0])), max(1, shape[1]))
        return group.create_array(name, shape=shape, dtype="float32", chunks=chunks)

    @staticmethod
    def keys(group, name: str) -> list[str]:
        return list(group[name].keys()) if name in group else []


def _backend(path: Path):
    ext = path.suffix.lstrip(".")
    if ext == "h5":
        return _H5
    if ext == "zarr":
        return _Zarr
    raise CacheError(f"Cache entry {str(path)!r} has an unknown extension; use .h5 or .zarr.")


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
        with _backend(self.path).open(self.path, "r") as g:
            out = g[name][rows if rows is not None else slice(None)]
        return np.asarray(out, dtype=np.float32)

    def iter_rows(self, block: int, layer: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start, (m, d) features) blocks without loading the whole entry."""
        for start in range(0, self.n, block):
            yield start, self.features(layer, slice(start, min(start + block, self.n)))


def open_entry(path: str | Path) -> Entry:
    path = Path(path)
    if not path.exists():
        raise CacheError(f"Cache entry {str(path)!r} does not exist.")
    backend = _backend(path)
    with backend.open(path, "r") as g:
        try:
            attrs = dict(g.attrs)
            ids = backend.read_strings(g, "ids")
            dim = int(g["features"].shape[1])
            n = int(g["features"].shape[0])
            layers = tuple(sorted(int(k) for k in backend.keys(g, "layers")))
            key = json.loads(attrs["key"])
            provenance = json.loads(attrs["provenance"])
            skipped = tuple(json.loads(attrs.get("skipped", "[]")))
        except KeyError as exc:
            raise CacheError(f"Cache entry {str(path)!r} is incomplete or not a feature cache (missing {exc}).") from None
    if n != len(ids):
        raise CacheError(f"Cache entry {str(path)!r} is corrupt: {n} feature rows but {len(ids)} ids.")
    return Entry(path, str(attrs.get("entry", path.stem)), ids, dim, layers, key, provenance, skipped)


# ------------------------------------------------------------------------------------ writing

def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _json(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _atomic_dir_or_file_replace(tmp: Path, final: Path) -> None:
    if final.is_dir():  # zarr: a directory cannot be os.replace'd over a non-empty one
        trash = final.with_name(final.name + f".old-{os.getpid()}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive advisory lock on ``path``'s folder (serialises setup and finalisation across
    processes; held only for metadata work, never while computing features)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


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
    backend = _backend(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / path.name
    try:
        with backend.open(tmp, "w") as g:
            backend.write_strings(g, "ids", ids)
            backend.create(g, "features", features.shape, chunk_rows)[:] = features
            for k, layer in enumerate(layers):
                layer = np.asarray(layer, dtype=np.float32)
                if layer.shape[0] != len(ids):
                    raise CacheError(f"layer {k} has {layer.shape[0]} rows, expected {len(ids)}.")
                if k == 0:
                    g.create_group("layers")
                backend.create(g, f"layers/{k}", layer.shape, chunk_rows)[:] = layer
            full = {**provenance, "key": dict(key), "created": _now()}
            attrs = {"entry": name, "key": _json(dict(key)), "provenance": _json(full),
                     "skipped": _json(list(skipped)), "n": len(ids), "dim": int(features.shape[1])}
            for k in ("encoder", "dataset", "split"):
                if k in key:
                    attrs[k] = str(key[k])
            g.attrs.update(attrs)
        with _locked(path):
            _atomic_dir_or_file_replace(tmp, path)
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
        self.key = json.loads(_json(dict(key)))
        self.chunk_rows = int(chunk_rows)
        self.staging = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        if self.chunk_rows < 1:
            raise CacheError("chunk_rows must be >= 1.")
        manifest = {"entry": name, "key": self.key, "chunk_rows": self.chunk_rows,
                    "ids_sha256": _sha256_lines(self.ids), "n": len(self.ids)}
        with _locked(self.path):
            if force:
                for old in (self.path, self.staging):
                    if old.exists():
                        log.warning("--force: discarding %s", old)
                        _remove(old)
            self.done = self._check_existing()
            if not self.done:
                self._open_staging(manifest)

    # -- setup ---------------------------------------------------------------------------
    def _check_existing(self) -> bool:
        if not self.path.exists():
            return False
        try:
            existing = open_entry(self.path)
        except CacheError:
            existing = None
        if existing is not None and existing.key == self.key:
            return True
        raise StaleCacheError(_stale_message(self.path, existing.key if existing else None, self.key))

    def _open_staging(self, manifest: dict) -> None:
        mfile = self.staging / "manifest.json"
        if mfile.exists():
            old = json.loads(mfile.read_text())
            if old != manifest:
                raise StaleCacheError(_stale_message(self.staging, old.get("key"), self.key, partial=True)
                                      + ("" if old.get("key") != self.key else
                                         " (same request, but the row list or chunk size changed)"))
        else:
            self.staging.mkdir(parents=True, exist_ok=True)
            _atomic_write_bytes(mfile, (_json(manifest) + "\n").encode())

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

    def _chunk_file(self, chunk: int) -> Path:
        return self.staging / f"chunk-{chunk:07d}.npz"

    def pending(self) -> list[int]:
        """Chunks not yet staged (empty when the entry is already finished)."""
        if self.done or self._finished():
            self.done = True
            return []
        return [c for c in range(self.num_chunks) if not self._chunk_file(c).exists()]

    def write_chunk(self, chunk: int, features: np.ndarray, layers: Sequence[np.ndarray] = (),
                    skipped: Mapping[str, str] | None = None) -> None:
        """Stage one chunk. ``features`` holds the chunk's rows in order, minus ``skipped``
        ({id: reason}) rows, which must belong to the chunk."""
        rows = self.rows(chunk)
        skipped = dict(skipped or {})
        chunk_ids = [self.ids[i] for i in rows]
        unknown = set(skipped) - set(chunk_ids)
        if unknown:
            raise CacheError(f"skipped ids {sorted(unknown)[:3]} are not in chunk {chunk}.")
        kept = [i for i in chunk_ids if i not in skipped]
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[0] != len(kept):
            raise CacheError(f"chunk {chunk}: expected {len(kept)} feature rows, got {features.shape}.")
        if not np.isfinite(features).all():
            bad = kept[int(np.nonzero(~np.isfinite(features).all(1))[0][0])]
            raise CacheError(f"chunk {chunk}: non-finite features for id {bad!r} (try --precision fp32).")
        arrays = {"features": features, "ids": np.asarray(kept, dtype=str),
                  "skipped": np.asarray([_json(skipped)])}
        for k, layer in enumerate(layers):
            arrays[f"layer{k}"] = np.asarray(layer, dtype=np.float32)
        if self._finished():  # another process completed the entry meanwhile
            return
        target = self._chunk_file(chunk)
        self.staging.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".chunk-", suffix=".npz", dir=self.staging)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def write_note(self, name: str, data: Mapping) -> bool:
        """Store a small JSON record as ``<staging>/note-<name>.json`` (atomically; replaces an
        older note of that name). Multi-process extraction uses it to say which shard staged
        what, with its host and timing. Notes are ignored by everything else and vanish with
        the staging folder. Returns False (and writes nothing) once the entry is finished."""
        if not _NOTE_NAME.fullmatch(name):
            raise CacheError(f"Note name {name!r} must match {_NOTE_NAME.pattern}.")
        with _locked(self.path):  # finalize removes the staging folder under this lock
            if self.done or self._finished() or not self.staging.is_dir():
                return False
            _atomic_write_bytes(self.staging / f"note-{name}.json", (_json(dict(data)) + "\n").encode())
        return True

    def notes(self) -> dict[str, dict]:
        """{name: record} of the notes in the staging folder (empty when there is none)."""
        out = {}
        for p in sorted(self.staging.glob("note-*.json")) if self.staging.is_dir() else ():
            with contextlib.suppress(OSError, ValueError):
                out[p.stem[len("note-"):]] = json.loads(p.read_text())
        return out

    def _read_chunk(self, chunk: int) -> dict:
        with np.load(self._chunk_file(chunk), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def finalize(self, provenance: Mapping, skipped: Sequence[Mapping] = ()) -> Entry | None:
        """Assemble the staged chunks into the entry once every chunk is there.

        skipped: extra {"id", "reason"} records to store (rows dropped before extraction,
        e.g. a missing image file or an empty caption under a skip option).

        Returns the finished Entry, or None if chunks are still missing (another process may
        be writing them). Safe to call from several processes: one assembles, the others find
        the finished entry.
        """
        with _locked(self.path):
            if self.path.exists():
                entry = open_entry(self.path)
                if entry.key == self.key:
                    self.done = True
                    return entry
            missing = self.pending()
            if missing:
                return None
            parts = [self._read_chunk(c) for c in range(self.num_chunks)]
        ids = [str(i) for p in parts for i in p["ids"]]
        staged_skips = [{"id": i, "reason": r} for p in parts for i, r in json.loads(str(p["skipped"][0])).items()]
        n_layers = sum(1 for k in parts[0] if k.startswith("layer")) if parts else 0
        dim = next((p["features"].shape[1] for p in parts if p["features"].size), 0)
        features = np.concatenate([p["features"].reshape(-1, dim) for p in parts]) if parts else np.zeros((0, 0))
        layers = [np.concatenate([p[f"layer{k}"] for p in parts]) for k in range(n_layers)]
        expected = [i for i in self.ids if i not in {s["id"] for s in staged_skips}]
        if ids != expected:
            raise CacheError(f"Staged chunks of {self.name!r} do not match the requested rows; rerun with --force.")
        for s in staged_skips:
            log.warning("%s: skipped %s (%s)", self.name, s["id"], s["reason"])
        entry = write_entry(self.path, self.name, ids, features, self.key, provenance, layers,
                            [*skipped, *staged_skips],
                            chunk_rows=self.chunk_rows)
        with _locked(self.path):
            shutil.rmtree(self.staging, ignore_errors=True)
        self.done = True
        return entry


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _sha256_lines(lines: Sequence[str]) -> str:
    import hashlib

    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8") + b"\n")
    return h.hexdigest()


def _stale_message(path: Path, old: Mapping | None, new: Mapping, partial: bool = False) -> str:
    what = "A partial extraction" if partial else "The cache entry"
    if old is None:
        return f"{what} {str(path)!r} is unreadable. Rerun with --force to recompute it."
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    shown = "; ".join(f"{k}: cached {old.get(k)!r} vs requested {new.get(k)!r}" for k in diff[:4])
    return (f"{what} {str(path)!r} was made for a different request ({shown}). "
            f"It is stale: rerun with --force to recompute it, or use another --cache folder.")
