"""The feature cache: the public API (import everything cache-related from here).

Layout (``pipeline.layout``): ``<cache>/<dataset folder>/<split>/<entry>.h5`` (HDF5) or ``.zarr``
(Zarr v3), one file per (dataset, data folder, split, entry); the dataset folder is
``<format>-<data folder name>-<hash>``, so two datasets never share one. An entry is an encoder
(``resnet18``) or an aligned embedding written by fit-adapters (``resnet18@run``); what a file holds
and how every read is checked against its checksums: ``pipeline.entry``.

Writing is resumable and safe under kill -9 and concurrent writers: ``EntryWriter`` stages
each chunk of rows as its own file in ``<entry>.partial-<request>/`` (``pipeline.staging``: named by
the request, written to a temporary name, flushed, fsynced, then renamed, so a chunk exists only
once complete and two requests never mix) and assembles the final file under a lock into a
temporary name that is atomically renamed. Separate processes may write disjoint chunks of one
entry (multi-process extraction) and leave small JSON notes (``note-<name>.json``, e.g. which
shard ran where) beside them. A finished entry is never modified in place; leftovers of killed
writers (an orphan staging folder of a finished entry, temporary files) are removed on the next
run under the lock, and staging folders of other requests are reported.

Readers open the file per call and keep no handle, so an ``Entry`` can be passed to
DataLoader workers (h5py handles do not survive fork).

Modules: this one (paths, the resumable writer); ``pipeline.layout`` (the folder layout);
``pipeline.entry`` (the entry format, reading and writing one file); ``pipeline.integrity``
(checksums); ``pipeline.staging`` (the staging folder of an unfinished entry);
``pipeline.storage`` (HDF5/Zarr backends, the folder lock, the errors).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from pipeline.entry import TOKEN_DTYPES, Entry, TokenData, open_entry, write_file
from pipeline.names import safe_name, source_of
from pipeline.errors import did_you_mean
from pipeline.integrity import repair_hint
from pipeline.layout import (CACHE_FORMAT, AmbiguousDatasetError, OtherDatasetError, cached_datasets, dataset_dir,
                             dataset_folder, entry_filename, legacy_hint, other_datasets_error, resolved_data_dir)
from pipeline.runtime import first_nonfinite_row
from pipeline.staging import (PARTIAL_SUFFIX, Chunk, Staging, StagingLostError, canonical_json, read_manifest,
                              staging_folders)
from pipeline.storage import (FORMATS, CacheError, DamagedEntryError, OldFormatError, StaleCacheError, backend,
                              locked, orphans, remove, stale_message)

__all__ = ["CACHE_FORMAT", "FORMATS", "TOKEN_DTYPES", "TokenData", "PARTIAL_SUFFIX", "AmbiguousDatasetError", "CacheError", "DamagedEntryError",
           "Entry", "EntryWriter", "OldFormatError", "OtherDatasetError", "StaleCacheError", "StagingLostError", "cached_datasets", "dataset_dir",
           "dataset_folder", "entry_filename", "entry_path", "find_entry", "list_entries", "list_splits",
           "open_entry", "resolved_data_dir", "scan_entries", "sibling_path", "split_dir", "staging_folders",
           "write_entry"]

log = logging.getLogger(__name__)
MAX_LISTED = 5  # ids named by a changed-content message


# --------------------------------------------------------------------------------------- paths

def split_dir(cache: str | Path, dataset: str, split: str, data_dir: str | Path | None = None,
              write: bool = False) -> Path:
    """The folder of one split's entries (``pipeline.layout.dataset_dir`` resolves the dataset; the
    split name must be one safe path component, ``pipeline.names.safe_name``)."""
    return dataset_dir(cache, dataset, data_dir, write) / safe_name(split, "split name")


def entry_path(cache: str | Path, dataset: str, split: str, entry: str, fmt: str = "h5",
               data_dir: str | Path | None = None, write: bool = False) -> Path:
    """Where entry ``entry`` of ``split`` lives (``write``: the writer's exact folder, created)."""
    if fmt not in FORMATS:
        raise CacheError(f"Unknown cache format {fmt!r}; use one of {', '.join(FORMATS)}.{did_you_mean(fmt, FORMATS)}")
    return split_dir(cache, dataset, split, data_dir, write) / f"{entry_filename(entry)}.{fmt}"


def sibling_path(entry: Entry, name: str) -> Path:
    """Where entry ``name`` lives beside ``entry`` (same folder and format), e.g. its aligned entry."""
    return entry.path.parent / f"{entry_filename(name)}{entry.path.suffix}"


def scan_entries(cache: str | Path, dataset: str, split: str,
                 data_dir: str | Path | None = None) -> tuple[list[str], list[tuple[Path, str]]]:
    """(names of the readable finished entries of one split, sorted; [(path, why)] of the unreadable ones)."""
    folder = split_dir(cache, dataset, split, data_dir)
    names, bad = [], []
    for p in sorted(folder.iterdir()) if folder.is_dir() else ():
        if p.suffix.lstrip(".") in FORMATS and not p.name.startswith("."):
            try:
                names.append(open_entry(p).name)
            except CacheError as exc:
                bad.append((p, str(exc)))
    return sorted(names), bad


def list_entries(cache: str | Path, dataset: str, split: str, data_dir: str | Path | None = None) -> list[str]:
    """Names of the readable finished entries of one split, sorted (unreadable ones are logged)."""
    names, bad = scan_entries(cache, dataset, split, data_dir)
    for p, why in bad:
        log.warning("ignoring unreadable cache entry %s: %s", p, why)
    return names


def list_splits(cache: str | Path, dataset: str, data_dir: str | Path | None = None) -> list[str]:
    folder = dataset_dir(cache, dataset, data_dir)
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def other_formats(path: Path) -> list[Path]:
    """The paths the same entry would have in the other formats (``x.h5`` -> ``[x.zarr]``)."""
    return [path.with_suffix(f".{fmt}") for fmt in FORMATS if f".{fmt}" != path.suffix]


def find_entry(cache: str | Path, dataset: str, split: str, entry: str, data_dir: str | Path | None = None) -> Entry:
    """Open an entry by name, whichever format it was written in; a clear error otherwise (also when
    it exists in two formats: one of them is stale, and picking one silently could read it)."""
    found = [p for fmt in FORMATS if (p := entry_path(cache, dataset, split, entry, fmt, data_dir)).exists()]
    if len(found) > 1:
        raise CacheError(f"Entry {entry!r} of {dataset}/{split} exists in two formats ({', '.join(map(str, found))}); "
                         f"one of them is stale. Delete the one you do not want, or re-extract with "
                         f"`extract --force --format h5|zarr`, which replaces both.")
    if found:
        return open_entry(found[0])
    available = list_entries(cache, dataset, split, data_dir)
    if not available:
        splits = list_splits(cache, dataset, data_dir)
        other = None if splits else other_datasets_error(cache, dataset)
        if other is not None:
            raise other
        where = f"splits present: {', '.join(splits)}" if splits else "nothing is cached for this dataset"
        raise CacheError(
            f"No cache entries for dataset {dataset!r}, split {split!r} under {str(cache)!r} ({where}). "
            f"Run `extract --encoder {source_of(entry)[0]} --split {split}` first.{legacy_hint(cache, dataset)}")
    raise CacheError(
        f"No cache entry {entry!r} for {dataset}/{split} under {str(cache)!r}.{did_you_mean(entry, available)} "
        f"Available: {', '.join(available)}.")


# ------------------------------------------------------------------------------------ writing

def write_entry(path: str | Path, name: str, ids: Sequence[str], features: np.ndarray, key: Mapping,
                provenance: Mapping, layers: Sequence[np.ndarray] = (), skipped: Sequence[Mapping] = (),
                chunk_rows: int = 1024, content: Mapping | None = None, tokens: TokenData | None = None) -> Entry:
    """Write a whole entry at once, atomically (temporary name, then rename), under the folder lock.

    features: (n, d); layers: optional list of (n, d_k) arrays stored as ``layers/<k>``;
    content: optional {"ids", "digests"} content hashes of the source split's images;
    tokens: optional token vectors of the rows (``TokenData.of(flat, lengths)``).
    """
    path = Path(path)
    backend(path)  # an unknown extension fails before anything is written
    with locked(path):
        _remove_orphans(path)
        write_file(path, name, ids, features, key, provenance, layers, skipped, chunk_rows, content, tokens)
    return open_entry(path)


def _remove_orphans(path: Path) -> None:
    """Remove leftovers of killed writers of ``path`` (call under the lock)."""
    for p in orphans(path):
        log.info("removing %s, left by an interrupted writer", p)
        remove(p)


def _content_changes(old: Mapping | None, new: Mapping | None) -> str:
    """' Images changed since ...: 3 of 12 (first: a, b); 1 new, 0 gone.' ('' when unknown)."""
    if not old or not new:
        return ""
    before = dict(zip(old["ids"], old["digests"]))
    after = dict(zip(new["ids"], new["digests"]))
    changed = [i for i, d in after.items() if i in before and before[i] != d]
    added = [i for i in after if i not in before]
    gone = [i for i in before if i not in after]
    if not (changed or added or gone):
        return ""
    shown = ", ".join(repr(i) for i in changed[:MAX_LISTED])
    return (f" Image files changed since it was extracted: {len(changed)} of {len(after)}"
            f"{f' (first: {shown})' if shown else ''}; {len(added)} new, {len(gone)} gone.")


class EntryWriter:
    """Resumable, chunked writer of one entry.

    ``ids`` is the full ordered list of rows the entry is asked to hold; rows are grouped in
    chunks of ``chunk_rows``. Call ``pending()`` for the chunks still to compute, ``write_chunk``
    for each, then ``finalize()``. The staging folder is created by ``open()`` (or the first
    ``write_chunk``), not by the constructor, so a request that fails before any work (an encoder
    whose weights do not load) leaves nothing that a corrected request would be refused for. Chunks already staged by an earlier (interrupted) run or by
    another process of the same request are kept, so a rerun computes only what is missing.

    A finished entry of the same request is verified against its checksums (DamagedEntryError
    unless ``repair=True``: then it is recomputed). A finished entry or a staging folder of a
    different request raises ``StaleCacheError`` unless ``force=True`` (then both are discarded; a
    process still writing the discarded staging fails with StagingLostError). ``content``:
    {"ids", "digests"} of the source split's images, stored with the entry so that a stale
    message can name the changed images.
    """

    def __init__(self, path: str | Path, name: str, ids: Sequence[str], key: Mapping,
                 chunk_rows: int = 1024, force: bool = False, repair: bool = False,
                 content: Mapping | None = None):
        self.path = Path(path)
        self.name = name
        self.ids = [str(i) for i in ids]
        self.key = json.loads(canonical_json(dict(key)))  # as it reads back from the file
        self.chunk_rows = int(chunk_rows)
        self.content = content
        self.force = force
        if self.chunk_rows < 1:
            raise CacheError("chunk_rows must be >= 1.")
        self._staging = Staging(self.path, Staging.make_manifest(name, self.key, self.ids, self.chunk_rows))
        self.staging = self._staging.folder  # this request's staging folder, <entry>.partial-<request>
        with locked(self.path):
            _remove_orphans(self.path)
            twins = [p for p in other_formats(self.path) if p.exists()]
            if force:
                for old in (self.path, *staging_folders(self.path), *twins):
                    if old.exists():
                        log.warning("--force: discarding %s", old)
                        remove(old)
            elif twins:
                raise StaleCacheError(
                    f"{str(twins[0])!r} already holds entry {name!r} in another format; a second copy in "
                    f"{self.path.suffix[1:]} would leave readers to pick one. Keep that format "
                    f"(--format {twins[0].suffix[1:]}), or rerun with --force to replace it.")
            self.done = self._check_existing(repair)
            self._check_other_staging()
        self._opened = False  # this writer created (or found) its staging folder

    def open(self) -> None:
        """Create this request's staging folder (nothing once finished or already open); call it
        when the work can start (extract: once the encoders have loaded). StaleCacheError if
        another request's staging appeared meanwhile (with ``force`` it is discarded)."""
        if self._opened or self.done:
            return
        with locked(self.path):
            self._open_locked()

    def _open_locked(self) -> None:
        if self._finished():
            self.done = True
            return
        if self.force:  # another request that started meanwhile: the last --force wins
            for old in staging_folders(self.path):
                if old != self.staging:
                    log.warning("--force: discarding %s", old)
                    remove(old)
        self._check_other_staging()
        self._staging.open()
        self._opened = True

    def _check_existing(self, repair: bool) -> bool:
        """True when the finished entry answers this request (verified); StaleCacheError when it
        answers another, DamagedEntryError when it is damaged (removed instead with ``repair``)."""
        if not self.path.exists():
            return False
        try:
            existing = open_entry(self.path)
            if existing.key == self.key:
                existing.verify()
                return True
        except DamagedEntryError as exc:
            if not repair:
                raise
            log.warning("--repair: recomputing %s (%s)", self.path, exc)
            remove(self.path)
            return False
        except OldFormatError:
            raise
        except CacheError:
            existing = None
        old = existing.key if existing else None
        changes = _content_changes(existing.content(), self.content) if existing else ""
        raise StaleCacheError(stale_message(self.path, old, self.key) + changes)

    def _check_other_staging(self) -> None:
        """A finished entry: remove this request's leftover staging (a kill during finalisation),
        report the others. Unfinished: refuse while another request's staging exists."""
        others = [f for f in staging_folders(self.path) if f != self.staging]
        if self.done and self._staging.exists():
            log.info("removing %s: left by an interrupted finalisation of the finished entry", self.staging)
            self._staging.remove()
        for folder in others:
            old = (read_manifest(folder) or {}).get("key")
            if self.done:
                log.warning("%s is the partial extraction of a different request (%s); rerun that request to "
                            "finish it, or extract --force (the request you want) to discard it.",
                            folder, stale_message(folder, old, self.key, partial=True))
            else:
                same = old == self.key
                raise StaleCacheError(
                    stale_message(folder, old, self.key, partial=True)
                    + (" (same request, but the row list or chunk size changed)" if same else "")
                    + " If that extraction is running now, let it finish first.")

    # -- chunks ----------------------------------------------------------------------------
    @property
    def num_chunks(self) -> int:
        return (len(self.ids) + self.chunk_rows - 1) // self.chunk_rows

    def rows(self, chunk: int) -> range:
        return range(chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, len(self.ids)))

    def _finished(self) -> Entry | None:
        """The finished entry of this request, if one exists (another process may have finalised it)."""
        try:
            entry = open_entry(self.path) if self.path.exists() else None
        except CacheError:
            return None
        return entry if entry is not None and entry.key == self.key else None

    def pending(self) -> list[int]:
        """Chunks not yet staged (empty when the entry is already finished)."""
        if self.done or self._finished():
            self.done = True
            return []
        return [c for c in range(self.num_chunks) if not self._staging.has_chunk(c)]

    def write_chunk(self, chunk: int, features: np.ndarray, layers: Sequence[np.ndarray] = (),
                    skipped: Mapping[str, str] | None = None,
                    tokens: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Stage one chunk. ``features`` holds the chunk's rows in order, minus ``skipped``
        ({id: reason}) rows, which must belong to the chunk; ``tokens``: (flat (t, w) in the dtype
        to store, (m,) tokens per kept row) for token entries."""
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
        if tokens is not None:
            flat, lengths = np.asarray(tokens[0]), np.asarray(tokens[1], dtype=np.int64)
            if flat.dtype.name not in TOKEN_DTYPES or flat.ndim != 2 or lengths.shape != (len(kept),) \
                    or int(lengths.sum()) != len(flat):
                raise CacheError(f"chunk {chunk}: tokens must be flat (t, w) {'/'.join(TOKEN_DTYPES)} with one "
                                 f"length per kept row ({len(kept)}), got {flat.dtype} {flat.shape}, {lengths.shape}.")
            bad = first_nonfinite_row(flat)
            if bad is not None:
                row = kept[int(np.searchsorted(np.cumsum(lengths), bad, side="right"))]
                raise CacheError(f"chunk {chunk}: non-finite token values for id {row!r} (beyond the {flat.dtype} "
                                 "range? try --set extract.token_dtype=float32).")
        if self._finished():  # another process completed the entry meanwhile
            return
        self.open()
        if self.done:
            return
        staged = Chunk(kept, features, list(layers), skipped)
        if tokens is not None:
            staged.tokens, staged.token_lengths = flat, lengths
        self._staging.write_chunk(chunk, staged)

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
        """Assemble the staged chunks into the entry once every chunk is there (under the lock,
        start to end, after checking that the staging folder still holds this request).

        skipped: extra {"id", "reason"} records to store (rows dropped before extraction,
        e.g. a missing image file or an empty caption under a skip option).

        Returns the finished Entry, or None if chunks are still missing (another process may
        be writing them). Safe to call from several processes: one assembles, the others find
        the finished entry. StagingLostError when another request's --force discarded our work.
        """
        with locked(self.path):
            entry = self._finished()
            if entry is not None:
                self.done = True
                if self._staging.exists():
                    self._staging.remove()
                return entry
            if not self._opened and not self._staging.exists() and self.num_chunks == 0:
                self._open_locked()  # an entry of no rows: nothing to stage, assemble it now
            if not self._staging.intact():
                if not self._opened:
                    return None  # nothing staged for this request yet (other shards may stage it)
                raise self._staging.lost()
            if any(not self._staging.has_chunk(c) for c in range(self.num_chunks)):
                return None
            self._assemble(provenance, skipped)
            self._staging.remove()
        self.done = True
        return open_entry(self.path)

    def _assemble(self, provenance: Mapping, skipped: Sequence[Mapping]) -> None:
        """Read every staged chunk, check it holds the requested rows, write the entry file."""
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
        write_file(self.path, self.name, ids, features, self.key, provenance, layers, [*skipped, *staged_skips],
                   self.chunk_rows, self.content, self._staged_tokens(parts))

    def _staged_tokens(self, parts: list[Chunk]) -> TokenData | None:
        """The staged chunks' tokens, read chunk by chunk while the entry is written (None when
        none has any; CacheError when only some have)."""
        with_tokens = [p.token_lengths is not None for p in parts]
        if not any(with_tokens):
            return None
        if not all(with_tokens):
            raise CacheError(f"Staged chunks of {self.name!r} mix token and pooled chunks; rerun with --force.")
        first = self._staging.read_tokens(0)
        lengths = np.concatenate([p.token_lengths for p in parts]).astype(np.int64)
        reads = lambda: (first if c == 0 else self._staging.read_tokens(c) for c in range(len(parts)))  # noqa: E731
        return TokenData(lengths, int(first.shape[1]), first.dtype.name, reads)
