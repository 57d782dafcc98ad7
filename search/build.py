"""``search index``: embed a gallery with the aligned model and write its index (``search.index``).

A gallery is either

* a folder of images: every image file under it (``extract.datasets.IMAGE_EXTENSIONS``, sorted by
  path; hidden files and links leading out of the folder are left out), id = the path relative to
  the folder without its extension (the imagefolder rule); captions, when known, from any
  imagefolder metadata file (``metadata.jsonl`` / ``.csv``) in the folder or below, matched by
  file name; or
* a cached split of the configured dataset (``--split``): its images and captions, embedded with
  the model, or, when the cache already holds the run's aligned image entry ``<image>@<run>`` for
  that split, read from it. That entry is used only when its key proves it is this model's output
  on these images (:func:`cached_vectors`: written by the model's own adapters, from the source
  entry the run trained on, of the data as it is now), joined to the split by image id.

Images that do not decode stop the build with the file named (``extract.on_error = "error"``) or
are left out, logged and listed in index.json (``"skip"``).

Galleries of more than ``search.exact_max`` images also get a faiss index (``search.engine``). Its
recall@10 against exact search is measured on ``PROBES`` queries (:func:`probe_queries`: captions of
the gallery when it has them, else gallery images, each leaving its own row out), with nprobe
doubled from ``search.nprobe`` until it reaches ``RECALL_TARGET`` (:func:`tune_nprobe`); the nprobe
chosen and every recall measured are recorded in index.json.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from extract import datasets as D
from extract.datasets.imagefolder import METADATA_FILES, read_metadata
from extract.datasets.loading import captions_from_cell, safe_relpath, strip_image_ext
from pipeline.cache import CacheError, find_entry
from pipeline.config import PipelineConfig
from pipeline.entry import DATA_FIELDS
from pipeline.layout import resolved_data_dir
from pipeline.runs import RunError, aligned_name, check_aligned, default_run_name
from search.engine import FaissIndex, SearchError, check_config, exact_topk, faiss_available, normalize, recall_at_k
from search.index import Item, ModelRef, write_index
from search.model import load_model

log = logging.getLogger(__name__)

CHUNK = 1024  # images per embedding call; under on_error = "skip" a broken file costs one chunk's re-embedding
PROBES = 200  # queries measuring a faiss index's recall@10 against exact search when it is built
RECALL_TARGET = 0.95  # search index raises nprobe (doubling from search.nprobe) until the measured recall@10 reaches this
RECALL_WARN = 0.9  # a measured recall@10 still below this (every list visited) is warned about
K = 10  # the k of the measured recall@k


# ----------------------------------------------------------------------------- galleries
def _captions_by_file(folder: Path) -> dict[str, list[str]]:
    """{resolved image path: captions} from every imagefolder metadata file in ``folder`` and below."""
    out: dict[str, list[str]] = {}
    for meta in sorted(p for name in METADATA_FILES for p in folder.rglob(name)):
        for where, name, cell, _ in read_metadata(meta, None):
            path = str((meta.parent / safe_relpath(name, where)).resolve())
            out.setdefault(path, []).extend(c for c in captions_from_cell(cell, where) if c)
    return out


def folder_items(folder: str | Path) -> list[Item]:
    """The images of a folder as gallery rows (see the module docstring), sorted by id."""
    root = Path(folder)
    if not root.is_dir():
        raise SearchError(f"{str(root)!r} is not a folder of images; pass an existing folder (or --split NAME "
                          "to index a cached split of the configured dataset).")
    root = root.resolve()
    captions = _captions_by_file(root)
    items = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(dirpath) / name
            if name.startswith(".") or path.suffix.lower() not in D.IMAGE_EXTENSIONS:
                continue
            real = path.resolve()
            if root not in real.parents:
                log.warning("leaving out %s: a link to %s, outside %s", path, real, root)
                continue
            rel = path.relative_to(root).as_posix()
            items.append(Item(strip_image_ext(rel), str(path), tuple(captions.get(str(real), ()))))
    if not items:
        raise SearchError(f"No image files ({', '.join(D.IMAGE_EXTENSIONS)}) under {str(root)!r}.")
    items.sort(key=lambda it: it.id)
    return items


def split_items(split: D.Split) -> list[Item]:
    """A dataset split's images as gallery rows (id, image file, every caption), in split order."""
    return [Item(it.id, it.image, tuple(it.captions)) for it in split.items]


def _data_of(cfg: PipelineConfig, split: D.Split, side_file: Path) -> dict:
    """The split's data as an entry key records it (``Entry.data``): what extract would write now."""
    digests = D.content_hashes(split, side_file)
    return {"dataset": cfg.data.dataset, "data_dir": resolved_data_dir(cfg.data.data_dir), "split": split.name,
            "fingerprint": split.fingerprint(), "content": D.content_digest(split.ids, digests)}


def _request(key) -> dict | None:
    """An entry key without the fields naming its data: the encoder and extraction settings, which
    the run's train-split entry and another split's entry share."""
    return {k: v for k, v in key.items() if k not in DATA_FIELDS} if isinstance(key, Mapping) else None


def cached_vectors(cfg: PipelineConfig, split: D.Split, model, items: Sequence[Item]) -> tuple[np.ndarray | None, str]:
    """(vectors for ``items`` (rows in item order) read from the run's aligned image entry, or None;
    why / what was read). Used only when every check passes: the model was loaded from a run that
    records its adapters' sha256 and its image source key; the entry ``<image>@<run>`` exists for
    this split, passes ``pipeline.runs.check_aligned`` (its run's adapters wrote it), names the same
    adapters as the model and a source entry extracted with the same encoder settings as the one the
    run trained on (keys equal but for the fields naming the data); its data is the split as it is now; and every
    item is one of its rows (joined by id; never by position)."""
    info = getattr(model, "info", {}) or {}
    run, adapters = info.get("run"), info.get("adapters") or {}
    side = (adapters.get("modalities") or {}).get("image") or {}
    if not run or not adapters.get("sha256") or not side.get("key"):
        return None, "the model does not come from a run of this cache"
    name = aligned_name(model.sides["image"].entry, str(run))
    try:
        entry = find_entry(cfg.data.cache, cfg.data.dataset, split.name, name, cfg.data.data_dir)
        check_aligned(cfg.data.cache, [entry])
    except (CacheError, RunError) as exc:
        return None, f"no usable cached entry {name!r} ({exc})"
    if entry.key.get("adapter_sha256") != adapters["sha256"] or _request(entry.key.get("source")) != _request(side["key"]):
        return None, f"cached entry {name!r} was not written by this model's adapters from its image encoder's features"
    if entry.data != _data_of(cfg, split, entry.path.parent.parent / D.SIDE_FILE):
        return None, f"cached entry {name!r} was computed from other data than the split holds now"
    rows = {str(i): r for r, i in enumerate(entry.ids)}
    missing = [it.id for it in items if it.id not in rows]
    if missing:
        return None, f"cached entry {name!r} lacks {len(missing)} of the split's images (first: {missing[0]!r})"
    features = entry.features()
    return features[[rows[it.id] for it in items]], f"read from cache entry {name!r} ({entry.path})"


def embed_items(model, items: Sequence[Item], batch_size: int, workers: int,
                on_error: str) -> tuple[np.ndarray, list[Item], list[dict]]:
    """(vectors, the items kept, skipped [{"id", "path", "reason"}]): the items' image files embedded
    in chunks of ``CHUNK``; an image that does not decode raises its ImageError (on_error "error")
    or is left out, logged (on_error "skip": its chunk is embedded again without it)."""
    kept: list[Item] = []
    skipped: list[dict] = []
    parts: list[np.ndarray] = []
    with tqdm(total=len(items), desc="index images", unit="img", dynamic_ncols=True, disable=None) as bar:
        for lo in range(0, len(items), CHUNK):
            chunk = list(items[lo:lo + CHUNK])
            while chunk:
                try:
                    parts.append(model.embed_images([it.path for it in chunk], batch_size=batch_size,
                                                    workers=workers, progress=False))
                    kept += chunk
                    break
                except D.ImageError as exc:
                    if on_error != "skip":
                        raise
                    bad = next((it for it in chunk if it.path == exc.path), None)
                    if bad is None:
                        raise
                    log.warning("skipping %s: %s", bad.path, exc.reason)
                    skipped.append({"id": bad.id, "path": bad.path, "reason": exc.reason})
                    chunk.remove(bad)
            bar.update(min(CHUNK, len(items) - lo))
            log.info("embedded %d of %d images", min(lo + CHUNK, len(items)), len(items))
    if not kept:
        raise SearchError(f"None of the {len(items)} images could be decoded; nothing to index.")
    return np.concatenate(parts), kept, skipped


# ----------------------------------------------------------------------------- the index
def probe_queries(model, vectors: np.ndarray, items: Sequence[Item],
                  probes: int = PROBES) -> tuple[np.ndarray, np.ndarray, str]:
    """(queries (m, d) normalised, the gallery row each one leaves out (-1: none), what they are):
    the first captions of ``probes`` seeded gallery images when the gallery has captions (text
    queries are what the index is for, and they lie elsewhere in the space than images), else
    those images themselves, each leaving its own row out of both answers."""
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(len(items), size=min(probes, len(items)), replace=False))
    captioned = [r for r in rows if items[r].captions]
    if len(captioned) >= len(rows) // 2:
        texts = model.embed_texts([items[r].captions[0] for r in captioned], progress=False)
        return normalize(texts, "caption embeddings"), np.full(len(captioned), -1), f"{len(captioned)} captions"
    return np.asarray(vectors[rows], np.float32), rows, f"{len(rows)} gallery images"


def tune_nprobe(vectors: np.ndarray, index: FaissIndex, queries: np.ndarray, own: np.ndarray,
                start: int, k: int = K) -> list[dict]:
    """recall@k of ``index`` against exact search for ``queries`` (``own``: a row each leaves out of
    both answers, -1 none) at nprobe = start, 2 start, 4 start, ... until it reaches RECALL_TARGET
    or every list is visited; ``index.nprobe`` is left at the last one. Returns [{"nprobe",
    "recall@k"}, ...]."""
    _, exact = exact_topk(vectors, queries, k + 1)
    exact = _without(exact, own, k)
    tried = []
    nprobe = min(start, index.nlist)
    while True:
        index.nprobe = nprobe
        recall = recall_at_k(_without(index.search(queries, k + 1)[1], own, k), exact, k)
        tried.append({"nprobe": nprobe, f"recall@{k}": recall})
        if recall >= RECALL_TARGET or nprobe >= index.nlist:
            return tried
        nprobe = min(2 * nprobe, index.nlist)


def _without(answers: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """(m, k) answers without each query's own row (and faiss's -1 padding), -1 padded."""
    out = np.full((len(own), k), -1, np.int64)
    for i, (a, q) in enumerate(zip(answers, own)):
        kept = [int(r) for r in a if r != q and r >= 0][:k]
        out[i, :len(kept)] = kept
    return out


def build_index(model, ref: ModelRef, items: Sequence[Item], cfg: PipelineConfig, source: Mapping,
                vectors: np.ndarray | None = None, skipped: Sequence[Mapping] = ()) -> dict:
    """Embed ``items`` with ``model`` (unless ``vectors``, row i for items[i], are given), normalise,
    add a faiss index above ``search.exact_max`` rows, write the index folder ``search.index``.
    Returns a summary: index, n, dim, engine (name, and for faiss nlist, nprobe, recall@10),
    skipped, seconds."""
    sc, ec = cfg.search, cfg.extract
    check_config(sc)
    t0 = time.perf_counter()
    skipped = list(skipped)
    if vectors is None:
        vectors, items, more = embed_items(model, items, ec.batch_size, ec.workers, ec.on_error)
        skipped += more
    items = list(items)
    vectors = normalize(vectors, f"the embeddings of {len(items)} gallery images")
    engine: dict = {"name": "exact"}
    faiss_index = None
    if len(items) > sc.exact_max:
        if faiss_available():
            faiss_index = FaissIndex.build(vectors, sc.nprobe)
            queries, own, what = probe_queries(model, vectors, items)
            tried = tune_nprobe(vectors, faiss_index, queries, own, sc.nprobe)
            recall = tried[-1][f"recall@{K}"]
            engine = {"name": "faiss", "type": "IndexIVFFlat", "nlist": faiss_index.nlist,
                      "nprobe": faiss_index.nprobe, f"recall@{K}": recall, "recall_queries": what, "tried": tried}
            if recall < RECALL_WARN:
                log.warning("the faiss index finds %.1f%% of the exact top %d (queries: %s) even visiting all %d "
                            "lists; search exactly with --set search.exact_max=%d", 100 * recall, K, what,
                            faiss_index.nlist, len(items))
        else:
            log.warning("%d images > search.exact_max = %d, but faiss-cpu is not installed: the index will be searched "
                        "exactly (slower; pip install 'platonic-align[search]')", len(items), sc.exact_max)
    folder = write_index(sc.index, vectors, items, ref, source, faiss_index, engine, skipped)
    return {"index": str(folder), "n": len(items), "dim": int(vectors.shape[1]), "engine": engine,
            "skipped": skipped, "source": dict(source), "model": ref.to_json(), "seconds": time.perf_counter() - t0}


def index_gallery(cfg: PipelineConfig, folder: str | Path | None = None, split: str | None = None) -> dict:
    """``search index``: load the model ``search.run`` names (default: ``train.name``, else the
    default run name, in ``data.cache``), gather the gallery (``folder``, or the cached ``split`` of
    ``data.dataset``) and :func:`build_index` it. Exactly one of folder and split."""
    check_config(cfg.search)
    if (folder is None) == (split is None):
        raise SearchError("Give a folder of images to index, or --split NAME for a split of the configured dataset "
                          "(not both).")
    model, ref = load_model(cfg.search.run or default_run_name(cfg.train), cfg.data.cache, cfg.extract.device)
    if folder is not None:
        items = folder_items(folder)
        return build_index(model, ref, items, cfg, {"kind": "folder", "folder": str(Path(folder).resolve())})
    data = D.load_split(cfg.data.dataset, cfg.data.data_dir, split, **D.config_options(cfg.data))
    items = split_items(data)
    vectors, how = cached_vectors(cfg, data, model, items)
    if vectors is None and any(it.path.startswith(D.HF_ROW_PREFIX) for it in items):
        raise SearchError(f"Split {data.name!r} of {cfg.data.dataset} keeps its images inside the dataset, not as files, "
                          f"and {how}: run extract and fit-adapters on it first (the run's aligned entry is then "
                          "read), or save the images to a folder and index that.")
    log.info("split %s: %s", data.name, how if vectors is not None else f"embedding its images ({how})")
    source = {"kind": "split", "dataset": cfg.data.dataset, "data_dir": resolved_data_dir(cfg.data.data_dir),
              "split": data.name, "fingerprint": data.fingerprint(), "cached": vectors is not None, "how": how}
    return build_index(model, ref, items, cfg, source, vectors, [{"id": i, "reason": r} for i, r in data.skipped])
