"""The staging folder of an unfinished cache entry: how a resumable extraction keeps its work.

``<entry>.partial/`` (beside the entry file ``<entry>.h5`` or ``<entry>.zarr``) holds

    manifest.json       the request this staging belongs to: entry name, key, chunk size, row count
                        and the sha256 of the row ids; a different request is stale
    chunk-<c>.npz       chunk c, complete: ``features`` (m, d) float32, ``ids`` (m,) str, ``layer<k>``
                        (m, d_k) float32, ``skipped`` (1,) str holding JSON {id: reason}
    note-<name>.json    small records of the processes sharing the work (which shard ran where)

Every file is written to a temporary name, flushed, fsynced and renamed (``pipeline.runtime.
atomic_write``), so a file exists only once complete and a kill -9 at any point leaves at most a
temporary file that nothing reads. :class:`pipeline.cache.EntryWriter` drives this folder under
the folder lock and turns it into the finished entry; nothing else should use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from pipeline.runtime import atomic_write, dumps_json
from pipeline.storage import CacheError, StaleCacheError, stale_message

PARTIAL_SUFFIX = ".partial"  # staging folder of an unfinished entry: <entry file name> + this
NOTE_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # allowed names of notes


def staging_path(entry_path: str | Path) -> Path:
    """``<entry>.h5`` -> ``<entry>.h5.partial``: where an unfinished entry stages its chunks."""
    entry_path = Path(entry_path)
    return entry_path.with_name(entry_path.name + PARTIAL_SUFFIX)


def canonical_json(doc) -> str:
    """One line of JSON with sorted keys (the cache's form for keys, manifests and notes)."""
    return dumps_json(doc, indent=None, sort_keys=True)


def ids_digest(ids: Sequence[str]) -> str:
    """sha256 hex of the ids, one per line (UTF-8): a manifest's fingerprint of the row list."""
    h = hashlib.sha256()
    for i in ids:
        h.update(i.encode("utf-8") + b"\n")
    return h.hexdigest()


@dataclass
class Chunk:
    """One staged chunk: the kept rows in order and the rows left out with their reasons."""

    ids: list[str]
    features: np.ndarray  # (m, d) float32
    layers: list[np.ndarray] = field(default_factory=list)  # (m, d_k) float32 each
    skipped: dict[str, str] = field(default_factory=dict)  # {id: reason}


class Staging:
    """The staging folder ``folder`` of one entry (it may not exist yet)."""

    def __init__(self, entry_path: str | Path):
        self.folder = staging_path(entry_path)

    def exists(self) -> bool:
        return self.folder.is_dir()

    # -- manifest ------------------------------------------------------------------------
    @staticmethod
    def manifest(name: str, key: Mapping, ids: Sequence[str], chunk_rows: int) -> dict:
        return {"entry": name, "key": dict(key), "chunk_rows": int(chunk_rows),
                "ids_sha256": ids_digest(ids), "n": len(ids)}

    def open(self, manifest: dict) -> None:
        """Create the folder with ``manifest``, or check that an existing one was made for the
        same request (StaleCacheError naming the differing key fields otherwise)."""
        mfile = self.folder / "manifest.json"
        if not mfile.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(mfile, canonical_json(manifest) + "\n")
            return
        old = json.loads(mfile.read_text())
        if old != manifest:
            same_key = old.get("key") == manifest["key"]
            raise StaleCacheError(stale_message(self.folder, old.get("key"), manifest["key"], partial=True)
                                  + (" (same request, but the row list or chunk size changed)" if same_key else ""))

    # -- chunks --------------------------------------------------------------------------
    def chunk_file(self, chunk: int) -> Path:
        return self.folder / f"chunk-{chunk:07d}.npz"

    def has_chunk(self, chunk: int) -> bool:
        return self.chunk_file(chunk).exists()

    def write_chunk(self, chunk: int, staged: Chunk) -> None:
        """Stage ``staged`` as chunk ``chunk`` atomically (replaces an older copy)."""
        arrays = {"features": np.asarray(staged.features, dtype=np.float32),
                  "ids": np.asarray(staged.ids, dtype=str),
                  "skipped": np.asarray([canonical_json(staged.skipped)])}
        for k, layer in enumerate(staged.layers):
            arrays[f"layer{k}"] = np.asarray(layer, dtype=np.float32)

        def save(tmp: str) -> None:
            with open(tmp, "wb") as fh:  # a file object: np.savez would add ".npz" to a name
                np.savez(fh, **arrays)

        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self.chunk_file(chunk), save)

    def read_chunk(self, chunk: int) -> Chunk:
        with np.load(self.chunk_file(chunk), allow_pickle=False) as z:
            n_layers = sum(1 for k in z.files if k.startswith("layer"))
            return Chunk([str(i) for i in z["ids"]], z["features"], [z[f"layer{k}"] for k in range(n_layers)],
                         json.loads(str(z["skipped"][0])))

    # -- notes ---------------------------------------------------------------------------
    def write_note(self, name: str, data: Mapping) -> None:
        """Store ``data`` as ``note-<name>.json`` (atomically; replaces an older note of that name)."""
        if not NOTE_NAME.fullmatch(name):
            raise CacheError(f"Note name {name!r} must match {NOTE_NAME.pattern}.")
        atomic_write(self.folder / f"note-{name}.json", canonical_json(dict(data)) + "\n")

    def notes(self) -> dict[str, dict]:
        """{name: record} of the notes in the folder (empty when there is none)."""
        out = {}
        for p in sorted(self.folder.glob("note-*.json")) if self.exists() else ():
            with contextlib.suppress(OSError, ValueError):
                out[p.stem[len("note-"):]] = json.loads(p.read_text())
        return out

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
