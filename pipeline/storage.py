"""The storage layer under the feature cache: the cache's errors, the two file backends (HDF5 and
Zarr v3) behind one small interface, a folder lock, and atomic replacement of a finished file.

Only :mod:`pipeline.cache` (the format: what an entry holds) and :mod:`pipeline.staging` (the
resumable staging folder) use this module; everything else goes through ``pipeline.cache``.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import h5py
import numpy as np

from pipeline.errors import PipelineError
from pipeline.runtime import make_dir

FORMATS = ("h5", "zarr")  # file extensions of the two backends
MAX_STALE_FIELDS = 4  # how many differing key fields a stale message names
_TRASH = itertools.count()  # unique trash names within a process


class CacheError(PipelineError, RuntimeError):
    """A cache entry that is missing, malformed or unusable."""


class StaleCacheError(CacheError):
    """An existing entry (or partial extraction) was made for a different request."""


class DamagedEntryError(CacheError):
    """A finished entry whose stored bytes do not match its checksums, that cannot be read, or
    that is refused (links or external storage pointing outside it)."""


class OldFormatError(StaleCacheError):
    """An entry written by an older cache format (no checksums, no content fingerprint)."""


OLD_FORMAT = ("was written by an older version of platonic-align (cache format 1: no content fingerprint, "
              "no checksums), whose fingerprints no longer apply")


def stale_message(path: Path, old: Mapping | None, new: Mapping, partial: bool = False) -> str:
    """Why ``path`` cannot be reused: the key fields that differ, cached vs requested, and the fix."""
    what = "A partial extraction" if partial else "The cache entry"
    if old is None:
        return f"{what} {str(path)!r} is unreadable. Rerun with --force to recompute it."
    if "cache_format" in new and old.get("cache_format") != new["cache_format"]:
        return f"{what} {str(path)!r} {OLD_FORMAT}. Re-extract it: rerun with --force."
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    shown = "; ".join(f"{k}: cached {old.get(k)!r} vs requested {new.get(k)!r}" for k in diff[:MAX_STALE_FIELDS])
    return (f"{what} {str(path)!r} was made for a different request ({shown}). "
            f"It is stale: rerun with --force to recompute it, or use another --cache folder.")


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
    def create(group, name: str, shape: tuple[int, ...], chunk_rows: int, dtype: str = "float32"):
        """An empty (n, d) (or (n,)) array of ``dtype`` stored in blocks of ``chunk_rows`` rows."""
        chunks = (max(1, min(chunk_rows, shape[0])), *shape[1:]) if shape[0] else None
        return group.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks)

    @staticmethod
    def keys(group, name: str) -> list[str]:
        return list(group[name].keys()) if name in group else []

    @staticmethod
    def check_plain(group, path: Path, where: str = "") -> None:
        """Refuse anything but plain datasets stored in the file itself: external, soft or
        external links, external raw storage and virtual datasets could make a read return the
        bytes of another file (e.g. an arbitrary local file read as ``features``)."""
        for name in group:
            link = group.get(name, getlink=True)
            full = f"{where}/{name}"
            if not isinstance(link, h5py.HardLink):
                raise DamagedEntryError(f"Cache entry {str(path)!r} is refused: {full!r} is a {type(link).__name__} "
                                 "(pointing outside the file); entries hold only plain datasets. Re-extract it.")
            obj = group[name]
            if isinstance(obj, h5py.Group):
                _H5.check_plain(obj, path, full)
            elif obj.is_virtual or obj.external:
                kind = "a virtual dataset" if obj.is_virtual else "stored in external file(s)"
                raise DamagedEntryError(f"Cache entry {str(path)!r} is refused: {full!r} is {kind}, so reading it "
                                 "would read other files; entries hold only plain datasets. Re-extract it.")


class _Zarr:
    ext = "zarr"

    @staticmethod
    @contextlib.contextmanager
    def open(path: Path, mode: str):
        import zarr  # optional backend, imported only when a .zarr entry is touched

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
    def create(group, name: str, shape: tuple[int, ...], chunk_rows: int, dtype: str = "float32"):
        """An empty (n, d) (or (n,)) array of ``dtype`` stored in blocks of ``chunk_rows`` rows."""
        chunks = (max(1, min(chunk_rows, shape[0])), *(max(1, s) for s in shape[1:]))
        return group.create_array(name, shape=shape, dtype=dtype, chunks=chunks)

    @staticmethod
    def keys(group, name: str) -> list[str]:
        return list(group[name].keys()) if name in group else []

    @staticmethod
    def check_plain(group, path: Path) -> None:
        """Refuse symbolic links inside the Zarr folder (a chunk could be any file on the machine)."""
        for folder, dirs, files in os.walk(path):
            for name in dirs + files:
                if os.path.islink(os.path.join(folder, name)):
                    raise DamagedEntryError(f"Cache entry {str(path)!r} is refused: "
                                     f"{os.path.relpath(os.path.join(folder, name), path)!r} is a symbolic link; "
                                     "entries hold only plain files. Re-extract it.")


_BACKENDS = {b.ext: b for b in (_H5, _Zarr)}


def backend(path: Path):
    """The backend that reads and writes ``path``, chosen by its extension."""
    try:
        return _BACKENDS[path.suffix.lstrip(".")]
    except KeyError:
        raise CacheError(f"Cache entry {str(path)!r} has an unknown extension; use .h5 or .zarr.") from None


# ------------------------------------------------------------------------------ file system

@contextlib.contextmanager
def locked(path: Path):
    """An exclusive advisory lock on ``path``'s folder (serialises setup and finalisation across
    processes; held only for metadata work, never while computing features)."""
    make_dir(path.parent, "cache folder (data.cache, --cache)")
    with open(path.parent / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def replace(tmp: Path, final: Path) -> None:
    """Move the finished ``tmp`` (a file, or a Zarr folder) to ``final``, replacing what is there."""
    if final.is_dir():  # zarr: a directory cannot be os.replace'd over a non-empty one
        trash = final.with_name(final.name + f".old-{os.getpid()}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


def remove(path: Path) -> None:
    """Delete a file or a folder tree (nothing when absent). A folder is first renamed to a hidden
    trash name, atomically, so a process still writing into it fails on its next file instead of
    racing the deletion (and a kill leaves a trash folder that :func:`orphans` finds)."""
    if path.is_dir():
        trash = path.with_name(f".{path.name}.trash-{os.getpid()}-{next(_TRASH)}")
        try:
            os.replace(path, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def orphans(final: Path) -> list[Path]:
    """Leftovers of killed writers of the entry file ``final``: temporary files of
    ``write_entry`` (``.<name>.*``), replaced Zarr folders (``<name>.old-*``). Call under the lock
    (every writer writes these under it, so none found then is in use)."""
    return sorted([*final.parent.glob(f".{final.name}.*"), *final.parent.glob(f"{final.name}.old-*")])
