"""Content hashes of a split's images: what makes a cache entry notice changed image bytes.

:func:`content_hashes` gives one digest per item of a :class:`Split` (sha256 of the image file's
bytes, cut to 32 hex characters; for ``hf:`` datasets, of the row's image bytes or file, kept under
the identity of the dataset's Arrow files). Hashing
every file on every run would cost a full read of the dataset, so digests are kept in a small JSON
side file (``<cache>/<dataset folder>/content-hashes.json``) keyed by the file's absolute path, with
its size, mtime and ctime (nanoseconds) and inode: a rerun only ``stat``s the files. ctime changes whenever a file
is written or replaced, and no copy tool can set it, so a file replaced under the same name (even by
``cp -p`` or ``rsync -a``, which keep mtime) is hashed again.

:func:`content_digest` folds the per-item digests into the one value a cache key holds;
:func:`duplicate_groups` finds images that are byte-identical copies under different ids
(``extract`` warns about them, ``analyze.duplicates`` drops or keeps them).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from pipeline.runtime import atomic_write, cpu_count, dumps_json

from .split import HF_ROW_PREFIX, DatasetError, Split

DIGEST_CHARS = 32  # hex characters kept of each sha256 (128 bits)
READ_BYTES = 1 << 20  # bytes per read while hashing a file
SIDE_FILE = "content-hashes.json"  # name of the side file in a dataset's cache folder
SIDE_VERSION = 2


def file_digest(path: str) -> str:
    """sha256 of a file's bytes (hex, DIGEST_CHARS characters)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(READ_BYTES):
            h.update(block)
    return h.hexdigest()[:DIGEST_CHARS]


def _stamp(path: str) -> tuple[str, list[int]] | None:
    """(absolute path, [size, mtime_ns, ctime_ns, inode]) of the file a path leads to (symbolic
    links followed: the inode is the target's), None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return os.path.abspath(path), [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


class HashStore:
    """The side file: {path: [size, mtime_ns, ctime_ns, inode, digest]}. Lost or corrupt = empty."""

    def __init__(self, path: Path | None):
        self.path, self.files, self.added = path, {}, 0
        if path is not None:
            self.files = self._load(path)

    @staticmethod
    def _load(path: Path) -> dict:
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(path.read_text(encoding="utf-8"))
            if doc.get("version") == SIDE_VERSION and isinstance(doc.get("files"), dict):
                return doc["files"]
        return {}

    def get(self, path: str, stamp: list[int]) -> str | None:
        rec = self.files.get(path)
        return rec[-1] if isinstance(rec, list) and rec[:-1] == stamp else None

    def put(self, path: str, stamp: list[int], value: str) -> None:
        self.files[path] = [*stamp, value]
        self.added += 1

    def save(self) -> None:
        """Write the side file (merged with what another process may have written meanwhile)."""
        if self.path is None or not self.added:
            return
        merged = {**self._load(self.path), **self.files}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, dumps_json({"version": SIDE_VERSION, "files": merged}, indent=None))


def _file_hashes(split: Split, store: HashStore, workers: int) -> list[str]:
    stamps = [_stamp(it.image) for it in split.items]
    todo = [k for k, s in enumerate(stamps) if s is None or store.get(*s) is None]
    out = [store.get(*s) if s is not None else None for s in stamps]

    def one(k: int) -> str:
        try:
            return file_digest(split.items[k].image)
        except OSError as exc:
            raise DatasetError(f"cannot read the image of sample {split.items[k].id!r} ({split.items[k].image}) "
                               f"to hash it: {exc}. Restore the file, or leave the sample out.") from None

    with ThreadPoolExecutor(max(1, min(workers, len(todo)))) as pool:  # hashlib releases the GIL
        for k, value in zip(todo, pool.map(one, todo)):
            out[k] = value
            if stamps[k] is not None:
                store.put(*stamps[k], value)
    store.save()
    return out


def _hf_row_digest(split: Split, row: int) -> str:
    value = split.hf_image_value(row)
    if isinstance(value, dict) and value.get("bytes"):
        return hashlib.sha256(value["bytes"]).hexdigest()[:DIGEST_CHARS]
    path = value.get("path") if isinstance(value, dict) else value
    return file_digest(path) if isinstance(path, str) and os.path.isfile(path) else "no-image"


def _hf_hashes(split: Split, store: HashStore) -> list[str]:
    """Digest per hf row: of its image bytes, or of the file its path names; kept in the side file
    under the identity of the dataset's Arrow files (``Split.hf_identity``) when it has one."""
    ident = split.hf_identity()
    out = []
    for it in split.items:
        row = int(it.image[len(HF_ROW_PREFIX):])
        key = f"hf:{ident}:{row}" if ident else None
        value = store.get(key, [0, 0, 0, 0]) if key else None
        if value is None:
            value = _hf_row_digest(split, row)
            if key:
                store.put(key, [0, 0, 0, 0], value)
        out.append(value)
    store.save()
    return out


def content_hashes(split: Split, side_file: Path | None = None, workers: int | None = None) -> list[str]:
    """One content digest per item of ``split`` (item order). ``side_file``: where digests are
    kept between runs (None: hash everything); ``workers``: hashing threads (default: CPU cores)."""
    if split.items and split.items[0].image.startswith(HF_ROW_PREFIX):
        return _hf_hashes(split, HashStore(side_file))
    return _file_hashes(split, HashStore(side_file), workers or cpu_count())


def content_digest(ids: Sequence[str], digests: Sequence[str]) -> str:
    """sha256 (hex) over ``<id>\\t<digest>`` lines: the one value a cache key records."""
    h = hashlib.sha256()
    for i, d in zip(ids, digests):
        h.update(f"{i}\t{d}\n".encode("utf-8"))
    return h.hexdigest()


def duplicate_groups(ids: Sequence[str], digests: Sequence[str]) -> list[list[str]]:
    """Groups (each sorted, two or more ids; groups ordered by their first id) of the ids whose
    images have the same content digest: byte-identical copies under different ids."""
    by_digest: dict[str, list[str]] = {}
    for i, d in zip(ids, digests):
        by_digest.setdefault(d, []).append(str(i))
    return sorted((sorted(g) for g in by_digest.values() if len(g) > 1), key=lambda g: g[0])
