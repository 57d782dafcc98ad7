"""The staging folder of an unfinished cache entry: how a resumable extraction keeps its work.

``<entry>.partial-<request>/`` (beside the entry file ``<entry>.h5`` or ``<entry>.zarr``; ``<request>``
is the first REQUEST_CHARS hex characters of the sha256 of the manifest) holds

    manifest.json       the request this staging belongs to: entry name, key, chunk size, row count
                        and the sha256 of the row ids
    chunk-<c>.npz       chunk c, complete: ``features`` (m, d) float32, ``ids`` (m,) str, ``layer<k>``
                        (m, d_k) float32, ``skipped`` (1,) str holding JSON {id: reason}; token
                        entries also ``tokens`` (t, w) in the stored dtype and ``token_lengths`` (m,)
    note-<name>.json    small records of the processes sharing the work (which shard ran where)

The folder is named by the request, so two extractions of one entry with different requests (say
``extract --force`` with another pooling while an older run still computes) never write into the
same folder: each writer only ever writes into its own request's folder, and never creates it
again once it is gone (another writer's ``--force`` discarded it): it fails with
:class:`StagingLostError` instead.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from pipeline.runtime import atomic_write, dumps_json
from pipeline.storage import CacheError, remove

PARTIAL_SUFFIX = ".partial"  # staging folders of an unfinished entry: <entry file name> + this + "-<request>"
REQUEST_CHARS = 12  # hex characters of the manifest digest in a staging folder's name
NOTE_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # allowed names of notes


class StagingLostError(CacheError):
    """This writer's staging folder was discarded by another process while it ran."""


def staging_folders(entry_path: str | Path) -> list[Path]:
    """Every staging folder of an entry, whatever its request (also the ``<entry>.partial`` of
    cache format 1), sorted."""
    entry_path = Path(entry_path)
    return sorted(p for p in entry_path.parent.glob(entry_path.name + PARTIAL_SUFFIX + "*") if p.is_dir())


def read_manifest(folder: Path) -> dict | None:
    """The manifest of a staging folder, None when it has none (or it is unreadable)."""
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


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
    tokens: np.ndarray | None = None  # (t, w) flat tokens of the kept rows (token entries); not read back
    token_lengths: np.ndarray | None = None  # (m,) tokens per kept row; None without tokens


class Staging:
    """The staging folder of one request for one entry (it may not exist yet)."""

    def __init__(self, entry_path: str | Path, manifest: dict):
        entry_path = Path(entry_path)
        self.manifest = manifest
        request = hashlib.sha256(canonical_json(manifest).encode("utf-8")).hexdigest()[:REQUEST_CHARS]
        self.folder = entry_path.with_name(f"{entry_path.name}{PARTIAL_SUFFIX}-{request}")

    def exists(self) -> bool:
        return self.folder.is_dir()

    # -- manifest ------------------------------------------------------------------------
    @staticmethod
    def make_manifest(name: str, key: Mapping, ids: Sequence[str], chunk_rows: int) -> dict:
        return {"entry": name, "key": dict(key), "chunk_rows": int(chunk_rows),
                "ids_sha256": ids_digest(ids), "n": len(ids)}

    def open(self) -> None:
        """Create the folder with its manifest (nothing when it exists). Call under the lock."""
        if not (self.folder / "manifest.json").exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(self.folder / "manifest.json", canonical_json(self.manifest) + "\n")

    def intact(self) -> bool:
        """True when the folder still exists and holds this request's manifest."""
        return read_manifest(self.folder) == self.manifest

    def lost(self) -> StagingLostError:
        return StagingLostError(
            f"The partial extraction {str(self.folder)!r} of {self.manifest['entry']!r} was discarded by another "
            "process while this one ran (an `extract --force` with a different request?). Nothing of this run "
            "was kept; rerun the extraction you want (the last --force wins).")

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
        if staged.token_lengths is not None:
            arrays["tokens"] = np.asarray(staged.tokens)
            arrays["token_lengths"] = np.asarray(staged.token_lengths, dtype=np.int64)

        def save(tmp: str) -> None:
            with open(tmp, "wb") as fh:  # a file object: np.savez would add ".npz" to a name
                np.savez(fh, **arrays)

        if not self.exists():
            raise self.lost()
        try:
            atomic_write(self.chunk_file(chunk), save)
        except FileNotFoundError:  # the folder vanished while we wrote
            raise self.lost() from None

    def read_chunk(self, chunk: int) -> Chunk:
        """The staged chunk, without its tokens (``read_tokens``: they are read when written out)."""
        with np.load(self.chunk_file(chunk), allow_pickle=False) as z:
            n_layers = sum(1 for k in z.files if k.startswith("layer"))
            lengths = z["token_lengths"] if "token_lengths" in z.files else None
            return Chunk([str(i) for i in z["ids"]], z["features"], [z[f"layer{k}"] for k in range(n_layers)],
                         json.loads(str(z["skipped"][0])), token_lengths=lengths)

    def read_tokens(self, chunk: int) -> np.ndarray:
        """(t, w) flat tokens of a staged chunk, in their stored dtype."""
        with np.load(self.chunk_file(chunk), allow_pickle=False) as z:
            return z["tokens"]

    # -- notes ---------------------------------------------------------------------------
    def write_note(self, name: str, data: Mapping) -> None:
        """Store ``data`` as ``note-<name>.json`` (atomically; replaces an older note of that name)."""
        if not NOTE_NAME.fullmatch(name):
            raise CacheError(f"Note name {name!r} must match {NOTE_NAME.pattern}.")
        if not self.exists():
            raise self.lost()
        atomic_write(self.folder / f"note-{name}.json", canonical_json(dict(data)) + "\n")

    def notes(self) -> dict[str, dict]:
        """{name: record} of the notes in the folder (empty when there is none)."""
        out = {}
        for p in sorted(self.folder.glob("note-*.json")) if self.exists() else ():
            with contextlib.suppress(OSError, ValueError):
                out[p.stem[len("note-"):]] = json.loads(p.read_text())
        return out

    def remove(self) -> None:
        remove(self.folder)
