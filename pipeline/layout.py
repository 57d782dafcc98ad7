"""Where cache entries live: the folder layout of the feature cache, shared by every stage.

    <cache>/<dataset folder>/dataset.json             what the folder holds: dataset, data folder, cache format
    <cache>/<dataset folder>/content-hashes.json      per-file content hashes (extract.datasets.content)
    <cache>/<dataset folder>/<split>/<entry>.h5|.zarr  one finished entry (pipeline.cache)

The dataset folder is named by :func:`dataset_folder`, the ONE rule every stage uses:
``<format>-<name of the data folder>-<hash>`` (e.g. ``imagefolder-tuxpaint-3f2a9c01d4``), where the
hash covers the dataset name and the resolved data folder. So two datasets of one format (two
imagefolder datasets, or a copy of a dataset in another folder) never share a cache folder.

Writers (``extract``) always use the exact folder of their ``data_dir`` (:func:`dataset_dir` with
``write=True``). Readers (fit-adapters, analyze, study) resolve with :func:`dataset_dir`:

1. the exact folder of ``data_dir`` when it exists;
2. else the only dataset folder of that format in the cache, provided the configured ``data_dir``
   does not exist on this machine (it cannot be the data meant: e.g. the default
   ``data/flickr30k`` when the data was extracted with ``extract --data-dir elsewhere``);
3. several candidates, or one that does not match an existing ``data_dir``: AmbiguousDatasetError listing the
   cached datasets and their data folders, with the ``--set data.data_dir=...`` to pick one;
4. else ``<cache>/<dataset>`` itself: hand-written caches (tests, benchmarks, ``write_entry``
   users) and the layout of cache format 1 (entries there are refused with a re-extract message).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from pipeline.names import name_problem, safe_name
from pipeline.runtime import atomic_write, dumps_json, make_dir
from pipeline.storage import CacheError

CACHE_FORMAT = 2  # 1: before content fingerprints, per-dataset folders and checksums
DATASET_MARKER = "dataset.json"  # in every dataset folder written by extract
FOLDER_HASH_CHARS = 10  # hex characters of the dataset-folder hash
READABLE_CHARS = 40  # at most this many characters of the data folder's name in the folder name


class AmbiguousDatasetError(CacheError):
    """The cache holds several folders of a dataset format and the configuration does not pick one."""


class OtherDatasetError(CacheError):
    """Nothing is cached for the configured dataset, but the cache holds others (the usual cause:
    data.dataset left at its default while the cache was extracted from another dataset)."""


def other_datasets_error(cache: str | Path, dataset: str) -> OtherDatasetError | None:
    """The error naming the datasets the cache does hold, or None when it holds none."""
    found = [m for m in cached_datasets(cache) if m["dataset"] != dataset]
    if not found:
        return None
    names = list(dict.fromkeys(m["dataset"] for m in found))
    listing = "; ".join(f"{m['dataset']} (extracted from {m.get('data_dir')})" for m in found)
    return OtherDatasetError(
        f"Nothing is cached for dataset {dataset!r} under {str(cache)!r}, which holds: {listing}. Pick it with "
        f"--dataset {names[0]} (or --set data.dataset={names[0]}), or extract {dataset} first "
        f"(extract --dataset {dataset} --data-dir DIR).")


def _stem(name: str) -> str:
    return str(name).replace("/", "--").replace(":", "--")


def entry_filename(entry: str, what: str = "cache entry name") -> str:
    """File stem of an entry (or run) name; ``/`` and ``:`` (hub ids, generic encoders) become
    ``--``; the result is checked to be one safe path component (``pipeline.names.safe_name``:
    UnsafeNameError for ``..``, hidden or over-long names)."""
    return safe_name(_stem(entry), what)


def resolved_data_dir(data_dir: str | Path) -> str:
    """The absolute, symlink-free path of a data folder (what cache keys and folder names use)."""
    return str(Path(data_dir).expanduser().resolve())


def dataset_folder(dataset: str, data_dir: str | Path) -> str:
    """Name of the cache folder of ``dataset`` read from ``data_dir``: ``<format>-<name>-<hash>``."""
    resolved = resolved_data_dir(data_dir)
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(resolved).name)[:READABLE_CHARS].strip("._") or "root"
    digest = hashlib.sha256(f"{dataset}\n{resolved}".encode("utf-8")).hexdigest()[:FOLDER_HASH_CHARS]
    name = f"{_stem(dataset)}-{readable}-{digest}"
    if name_problem(name):  # e.g. a long hf:<local path>: shortened (the hash covers the whole name)
        name = f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', _stem(dataset))[:READABLE_CHARS].strip('._')}-{readable}-{digest}"
    return safe_name(name, "dataset folder name")


def read_marker(folder: Path) -> dict | None:
    """The ``dataset.json`` of a dataset folder (plus ``folder``), None when it has none."""
    try:
        doc = json.loads((folder / DATASET_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {**doc, "folder": folder} if isinstance(doc, dict) and "dataset" in doc else None


def cached_datasets(cache: str | Path) -> list[dict]:
    """Every dataset folder of the cache: {"dataset", "data_dir", "cache_format", "folder"}, by name."""
    cache = Path(cache)
    if not cache.is_dir():
        return []
    return [m for p in sorted(cache.iterdir()) if p.is_dir() and (m := read_marker(p)) is not None]


def _choose(dataset: str, data_dir: str | Path | None, found: list[dict], cache: Path) -> Path:
    """Rules 2 and 3 of the module docstring."""
    configured = data_dir is not None and Path(data_dir).expanduser().exists()
    if len(found) == 1 and not configured:
        return found[0]["folder"]
    listing = "; ".join(f"{m['folder'].name} (from {m.get('data_dir')})" for m in found)
    if configured:
        why = f"none was extracted from data.data_dir {resolved_data_dir(data_dir)}"
    else:
        why = "data.data_dir does not name one of them"
    raise AmbiguousDatasetError(
        f"The cache {str(cache)!r} holds {len(found)} {dataset} dataset(s): {listing}; {why}. Pick one with "
        f"--set data.data_dir=DIR (the folder it was extracted from), or extract this one first "
        f"(extract --data-dir DIR).")


def dataset_dir(cache: str | Path, dataset: str, data_dir: str | Path | None = None, write: bool = False) -> Path:
    """The dataset folder of ``dataset`` in ``cache``; see the module docstring for the rules.

    write: the writer's folder (needs ``data_dir``): the exact folder, created with its marker."""
    cache = Path(cache)
    if write:
        if data_dir is None:
            raise CacheError("dataset_dir(write=True) needs the data folder.")
        folder = cache / dataset_folder(dataset, data_dir)
        marker = folder / DATASET_MARKER
        if not marker.exists():
            make_dir(folder, "cache folder (data.cache, --cache)")
            doc = {"dataset": dataset, "data_dir": resolved_data_dir(data_dir), "cache_format": CACHE_FORMAT}
            atomic_write(marker, dumps_json(doc) + "\n")
        return folder
    if data_dir is not None:
        exact = cache / dataset_folder(dataset, data_dir)
        if exact.is_dir():
            return exact
    found = [m for m in cached_datasets(cache) if m["dataset"] == dataset]
    if found:
        return _choose(dataset, data_dir, found, cache)
    return cache / entry_filename(dataset, "dataset name")


def legacy_hint(cache: str | Path, dataset: str) -> str:
    """A sentence for not-found errors when ``<cache>/<dataset>`` holds the layout of cache format 1."""
    old = Path(cache) / _stem(dataset)
    if old.is_dir() and read_marker(old) is None and any(p.is_dir() for p in old.iterdir()):
        return (f" {str(old)!r} holds entries in the layout of an older version (cache format 1, without "
                f"content fingerprints or checksums); they are no longer read: re-extract (extract --force).")
    return ""
