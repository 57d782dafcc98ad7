"""The search index: one folder, written whole, read back checked.

    <index>/index.json     format, the model (its hash, name and how to load it again), the rows
                           ({"id", "path", "captions"} per gallery image, row i = vector i), where they
                           came from, the engine, sha256, size and time of the files below, creation time, versions
    <index>/vectors.npy    (n, d) float32, the gallery's embeddings L2-normalised (numpy's .npy format,
                           read with allow_pickle=False and memory-mapped)
    <index>/faiss.index    only for galleries of more than search.exact_max images: a faiss IndexIVFFlat
                           over vectors.npy (search.engine.FaissIndex), with its recall@10 against exact
                           search measured when it was built (index.json "engine")

Writing: every file goes into a hidden sibling ``.<name>.partial-<pid>`` (fsynced) that is renamed
into place at the end (an older index of that name is replaced only then: ``pipeline.storage.replace``),
so a reader sees the old index or the new one; leftovers of killed writers are removed by the next
one. A folder that is not an index is never overwritten.

Reading (:func:`open_index`) checks each file against what index.json records before using it (a
faiss file is parsed by faiss's C++ reader only after that): its size, and its modification time or,
when that changed (a copied index), its sha256; then the shape against the rows. (A file rewritten
with its old size and modification time restored by hand would pass: rebuild rather than edit.)
:meth:`GalleryIndex.check_model` refuses a model other than the one that built the index (the
hash covers everything that decides an embedding: ``search.model``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.runs import file_sha256
from pipeline.runtime import process_alive, utc_now, versions, write_json
from pipeline.storage import replace
from search.engine import ExactIndex, FaissIndex, SearchError, faiss_available

log = logging.getLogger(__name__)

INDEX_FORMAT = 1
INDEX_JSON = "index.json"
VECTORS = "vectors.npy"
FAISS_FILE = "faiss.index"
STAGING_MARK = ".partial-"  # .<index>.partial-<pid>: an index being written by process <pid>
KIND = "platonic-align search index"  # index.json "kind": tells an index folder from any other folder


class IndexNotFoundError(SearchError, FileNotFoundError):
    """No index at the given folder (a query before ``search index`` ran)."""


class DamagedIndexError(SearchError):
    """An index folder whose files do not match what index.json records."""


class ModelMismatchError(SearchError):
    """A model other than the one that built the index."""


@dataclass(frozen=True)
class ModelRef:
    """Which aligned model made an index's vectors. hash: sha256 hex of everything that decides
    an embedding (``search.model.model_ref``); name: for messages; source: how to load it again,
    {"run": name, "cache": folder} or {"pretrained": folder}."""

    hash: str
    name: str
    source: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"hash": self.hash, "name": self.name, "source": dict(self.source)}

    @classmethod
    def from_json(cls, doc: Mapping) -> "ModelRef":
        return cls(str(doc.get("hash", "")), str(doc.get("name", "")), dict(doc.get("source") or {}))


@dataclass(frozen=True)
class Item:
    """One gallery image: its id, the image file (absolute; "" when unknown) and captions (may be empty)."""

    id: str
    path: str
    captions: tuple[str, ...] = ()


def _not_found(folder: Path) -> IndexNotFoundError:
    return IndexNotFoundError(
        f"No search index at {str(folder)!r}: build one first with `search index IMAGE_FOLDER --index {folder}` "
        f"(or `search index --split test --index {folder}` for a cached split), or pass --index to an existing one.")


def _check_target(folder: Path) -> None:
    """Refuse to replace a folder that is not an index (it could be anything of the user's)."""
    if folder.exists() and not folder.is_dir():
        raise SearchError(f"{str(folder)!r} is a file; pass --index a folder for the search index.")
    if folder.is_dir() and any(folder.iterdir()):
        doc = _read_doc(folder / INDEX_JSON)
        if not (isinstance(doc, dict) and doc.get("kind") == KIND):
            raise SearchError(f"{str(folder)!r} exists and is not a search index; it would be replaced. "
                              "Pass --index a new folder (or an existing index to rebuild it).")


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _record(path: Path) -> dict:
    """What index.json records of one of its files: sha256, size, modification time."""
    return {"sha256": file_sha256(path), **_stamp(path)}


def _check_file(folder: Path, name: str, record: Any) -> None:
    """DamagedIndexError unless ``folder/name`` is the file index.json records: the same size, and
    the same modification time or else the same sha256 (hashed only then: a 1M-image gallery is
    4 GB, tens of seconds of hashing per query on a small machine)."""
    path = folder / name
    if name not in (VECTORS, FAISS_FILE) or not isinstance(record, Mapping) or not path.is_file():
        why = "is missing" if name in (VECTORS, FAISS_FILE) and not path.is_file() else "is not a file an index holds"
    else:
        stamp = _stamp(path)
        if stamp == {k: record.get(k) for k in stamp}:
            return
        if stamp["size"] == record.get("size") and file_sha256(path) == record.get("sha256"):
            return
        why = "differs from the file index.json records (size or sha256)"
    raise DamagedIndexError(f"Index {str(folder)!r}: {name} {why}; the folder was modified or mixes two builds. "
                            "Rebuild it with `search index`.")


def _read_doc(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def write_index(folder: str | Path, vectors: np.ndarray, items: Sequence[Item], model: ModelRef,
                source: Mapping, faiss_index: FaissIndex | None = None, engine: Mapping | None = None,
                skipped: Sequence[Mapping] = ()) -> Path:
    """Write an index folder whole (see the module docstring). ``vectors`` (n, d) must already be
    L2-normalised (``search.engine.normalize``), row i for ``items[i]``; ``faiss_index`` built over
    them, ``engine`` its description (nlist, nprobe, measured recall); ``skipped``: {"id" or
    "path", "reason"} of images left out."""
    folder = Path(folder)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(items):
        raise SearchError(f"write_index: {len(items)} items but vectors of shape {vectors.shape}.")
    _check_target(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    for old in folder.parent.glob(f".{folder.name}{STAGING_MARK}*"):  # left by killed writers
        pid = old.name.rpartition(STAGING_MARK)[2]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    staging = folder.with_name(f".{folder.name}{STAGING_MARK}{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        with open(staging / VECTORS, "wb") as fh:
            np.save(fh, vectors, allow_pickle=False)
        if faiss_index is not None:
            faiss_index.write(staging / FAISS_FILE)
        for name in (VECTORS, FAISS_FILE):
            if (staging / name).is_file():
                with open(staging / name, "rb+") as fh:
                    os.fsync(fh.fileno())
        files = {name: _record(staging / name) for name in (VECTORS, FAISS_FILE) if (staging / name).is_file()}
        doc = {"kind": KIND, "format": INDEX_FORMAT, "model": model.to_json(), "n": int(vectors.shape[0]),
               "dim": int(vectors.shape[1]), "metric": "cosine",
               "engine": dict(engine or {"name": "exact"}), "files": files, "source": dict(source),
               "skipped": list(skipped), "created": utc_now(), "versions": versions(),
               "items": [{"id": it.id, "path": it.path, "captions": list(it.captions)} for it in items]}
        write_json(staging / INDEX_JSON, doc, indent=None)
        _check_target(folder)
        replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


@dataclass
class GalleryIndex:
    """An opened index: rows, the normalised vectors (memory-mapped), the model that made them,
    and the engine that searches them (``engine.search(queries, k) -> (scores, rows)``)."""

    folder: Path
    items: list[Item]
    vectors: np.ndarray
    model: ModelRef
    doc: dict
    engine: Any

    @property
    def n(self) -> int:
        return len(self.items)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def check_model(self, model: ModelRef) -> None:
        """ModelMismatchError unless ``model`` is the model that built this index."""
        if model.hash != self.model.hash:
            raise ModelMismatchError(
                f"Index {str(self.folder)!r} was built with model {self.model.name!r} (hash {self.model.hash[:12]}), "
                f"not with {model.name!r} (hash {model.hash[:12]}): its vectors live in another space. Query it "
                f"without --run (it loads its own model), or rebuild it with `search index ... --run {model.name}`.")


def open_index(folder: str | Path, nprobe: int | None = None) -> GalleryIndex:
    """Open and check an index folder; its faiss file is used when present and faiss-cpu is
    installed (else exact search, with a warning). ``nprobe``: faiss lists visited per query
    (None: the nprobe ``search index`` chose, recorded in index.json)."""
    folder = Path(folder)
    doc = _read_doc(folder / INDEX_JSON)
    if doc is None:
        if (folder / INDEX_JSON).is_file():
            raise DamagedIndexError(f"{str(folder / INDEX_JSON)!r} is not readable JSON; rebuild the index with "
                                    "`search index`.")
        raise _not_found(folder)
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise _not_found(folder)
    if doc.get("format") != INDEX_FORMAT:
        raise DamagedIndexError(f"Index {str(folder)!r} has format {doc.get('format')!r}; this version reads format "
                                f"{INDEX_FORMAT}. Rebuild it with `search index`.")
    files = doc.get("files") or {}
    for name, record in files.items():
        _check_file(folder, name, record)
    try:
        vectors = np.load(folder / VECTORS, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DamagedIndexError(f"Index {str(folder)!r}: cannot read {VECTORS} ({exc}). Rebuild it.") from None
    items = [Item(str(r["id"]), str(r.get("path") or ""), tuple(r.get("captions") or ())) for r in doc["items"]]
    if vectors.ndim != 2 or vectors.shape[0] != len(items) or vectors.dtype != np.float32:
        raise DamagedIndexError(f"Index {str(folder)!r}: {VECTORS} holds {vectors.shape} {vectors.dtype}, not "
                                f"({len(items)}, d) float32. Rebuild it with `search index`.")
    engine: Any = ExactIndex(vectors)
    if FAISS_FILE in files:
        if faiss_available():
            engine = FaissIndex.read(folder / FAISS_FILE, nprobe or int(doc["engine"].get("nprobe") or 1))
        else:
            log.warning("index %s has a faiss index but faiss-cpu is not installed: searching its %d vectors "
                        "exactly (slower; pip install 'platonic-align[search]')", folder, len(items))
    return GalleryIndex(folder, items, vectors, ModelRef.from_json(doc.get("model") or {}), doc, engine)
