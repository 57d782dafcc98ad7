"""Karpathy split files (``dataset_flickr30k.json``, ``dataset_coco.json``), shared by the flickr30k
and coco formats.

Schema: ``{"images": [{"filename": "1000092795.jpg", "split": "train", "sentences": [{"raw": "..."},
...], ...}, ...]}``; COCO adds ``"filepath": "val2014"``. Image id = file name stem.
"""
from __future__ import annotations

from pathlib import Path

from .loading import Record, read_json, safe_relpath, split_name, stem, unknown_split
from .split import DatasetError


def _images(path: Path) -> list:
    doc = read_json(path)
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise DatasetError(f"{path} has no 'images' list: is this a Karpathy split file (dataset_*.json)?")
    return images


def karpathy_splits(path: Path) -> list[str]:
    """The split values of a Karpathy split file (in file order, repeated; each checked to be a
    safe folder name, since it names the split's cache folder)."""
    return [split_name(im["split"], f"{path} images[{i}]") for i, im in enumerate(_images(path))
            if isinstance(im, dict) and "split" in im]


def read_karpathy(path: Path, split: str, with_filepath: bool, merged: tuple[str, ...] = ()) -> list[Record]:
    """Records of one split (and of the ``merged`` splits, loaded as part of it) of a Karpathy split file.

    rel = [filepath/]filename; Record.path is left empty for the caller to fill in.
    """
    need = ("filename", "split", "sentences") + (("filepath",) if with_filepath else ())
    wanted = {split, *merged}
    available, records = set(), []
    for i, im in enumerate(_images(path)):
        where = f"{path} images[{i}]"
        if not isinstance(im, dict) or any(key not in im for key in need):
            lacks = [key for key in need if not isinstance(im, dict) or key not in im]
            raise DatasetError(f"{where} lacks key(s) {', '.join(lacks)}; re-download the Karpathy split file.")
        available.add(str(im["split"]))
        if im["split"] not in wanted:
            continue
        where = f"{where} ({im['filename']})"
        rel = safe_relpath(im["filename"], where)
        if with_filepath:
            rel = safe_relpath(f"{im['filepath']}/{rel}", where)
        sents = im["sentences"]
        if not isinstance(sents, list):
            raise DatasetError(f"{where}: 'sentences' must be a list.")
        caps = []
        for j, s in enumerate(sents):
            if not isinstance(s, dict) or not isinstance(s.get("raw"), str):
                raise DatasetError(f"{where} sentences[{j}] has no 'raw' string.")
            caps.append(s["raw"].strip())
        records.append(Record(stem(rel), rel, "", caps, list(range(len(caps))), where))
    if split not in available:
        raise unknown_split(split, available, str(path))
    return records
