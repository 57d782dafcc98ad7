"""Format ``flickr30k``: Flickr30k (31,783 images, 5 captions each).

Expected under ``data_dir``: ``dataset_flickr30k.json`` (Karpathy split file; preferred), or the
original token file ``results_20130124.token`` (lines ``1000092795.jpg#0<TAB>caption``) with the
split lists ``train.txt`` / ``val.txt`` / ``test.txt`` (one image id per line, the Flickr30k
Entities convention; the token file alone holds no split information). Images in
``flickr30k-images/`` (or ``images/``, or ``data_dir`` itself; option ``image_dir``).
Image id = file name stem (``"1000092795"``). Splits: train, val, test (29,000 / 1,014 / 1,000).

Translated captions (Multi30k's German ones, say): option ``translations`` (``translations.py``).
"""
from __future__ import annotations

import os
from pathlib import Path

from .karpathy import karpathy_splits, read_karpathy
from .loading import (
    Format, Record, Source, finish, image_root, read_text, safe_relpath, stem, strip_image_ext, unknown_split,
)
from . import translations
from .split import DatasetError, listed

KARPATHY_FILE = "dataset_flickr30k.json"
TOKEN_FILE = "results_20130124.token"
SPLIT_LISTS = ("train", "val", "test")  # <split>.txt next to the token file
IMAGE_FOLDERS = ("flickr30k-images", "images", ".")  # looked for in this order


def _no_caption_file(data_dir: Path) -> DatasetError:
    return DatasetError(
        f"no Flickr30k caption file in {data_dir}: expected {KARPATHY_FILE} (Karpathy splits) or "
        f"{TOKEN_FILE} with split lists train.txt / val.txt / test.txt."
    )


def _no_split_lists(token: Path, data_dir: Path) -> DatasetError:
    return DatasetError(
        f"{token} holds no split information. Put the Karpathy split file {KARPATHY_FILE} in "
        f"{data_dir} (preferred), or split lists train.txt / val.txt / test.txt (one image id per line, "
        "as in Flickr30k Entities) next to the token file."
    )


def _token_captions(path: Path) -> tuple[dict[str, dict[int, str]], dict[str, str]]:
    """The token file as {image id: {k: caption}} and {image id: relative file name}."""
    caps: dict[str, dict[int, str]] = {}
    fname: dict[str, str] = {}
    seen_at: dict[tuple[str, int], int] = {}
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        key, tab, cap = line.partition("\t")
        name, hashsign, k = key.strip().rpartition("#")
        if not tab or not hashsign or not k.isdigit() or not name:
            raise DatasetError(f"{path} line {lineno}: expected '<file>.jpg#<k><TAB><caption>', got {line[:80]!r}.")
        rel = safe_relpath(name, f"{path} line {lineno}")
        img_id, k = stem(rel), int(k)
        if (img_id, k) in seen_at:
            raise DatasetError(
                f"{path} line {lineno}: caption {img_id}#{k} already given on line {seen_at[img_id, k]}; remove one."
            )
        seen_at[img_id, k] = lineno
        caps.setdefault(img_id, {})[k] = cap.strip()
        fname[img_id] = rel
    return caps, fname


def _read_token(path: Path, data_dir: Path, split: str) -> list[Record]:
    """Records of one split from the token file + <split>.txt (Flickr30k Entities split list)."""
    caps, fname = _token_captions(path)
    list_path = data_dir / f"{split}.txt"
    if not list_path.is_file():
        present = [s for s in SPLIT_LISTS if (data_dir / f"{s}.txt").is_file()]
        if not present:
            raise _no_split_lists(path, data_dir)
        raise unknown_split(split, present, f"{data_dir} (split lists <split>.txt)")
    ids = [strip_image_ext(s.strip()) for s in read_text(list_path).splitlines() if s.strip()]
    unknown = [i for i in ids if i not in caps]
    if unknown:
        raise DatasetError(
            f"{list_path} lists image ids without captions in {path}: {listed(unknown)}. "
            "Use split lists that match the token file."
        )
    records = []
    for n, img_id in enumerate(ids, 1):
        ks = sorted(caps[img_id])
        where = f"{list_path} line {n} ({img_id})"
        records.append(Record(img_id, fname[img_id], "", [caps[img_id][k] for k in ks], ks, where))
    return records


def load(source: Source, split: str):
    """One split of Flickr30k (see the module docstring)."""
    data_dir = source.data_dir
    kjson, token = data_dir / KARPATHY_FILE, data_dir / TOKEN_FILE
    if kjson.is_file():
        records, where = read_karpathy(kjson, split, with_filepath=False), kjson
    elif token.is_file():
        records, where = _read_token(token, data_dir, split), token
    else:
        raise _no_caption_file(data_dir)
    root = image_root(data_dir, source.options.get("image_dir"), IMAGE_FOLDERS, records[0].rel if records else None)
    for r in records:
        r.path = os.path.join(root, r.rel)
    translations.attach(records, dict(source.options), source.data_dir)
    return finish(source, split, records, str(where), root)


def splits(source: Source) -> list[str]:
    """Splits of the Karpathy file, else the split lists next to the token file."""
    data_dir = source.data_dir
    if (data_dir / KARPATHY_FILE).is_file():
        return karpathy_splits(data_dir / KARPATHY_FILE)
    if not (data_dir / TOKEN_FILE).is_file():
        raise _no_caption_file(data_dir)
    present = [s for s in SPLIT_LISTS if (data_dir / f"{s}.txt").is_file()]
    if not present:
        raise _no_split_lists(data_dir / TOKEN_FILE, data_dir)
    return present


FORMAT = Format(
    name="flickr30k",
    options=("image_dir", translations.OPTION),
    what_to_get=(
        f"It needs the Karpathy split file {KARPATHY_FILE} (from Karpathy's caption_datasets.zip) and the images "
        "in flickr30k-images/ (the Flickr30k request form, or the Hugging Face dataset nlphuji/flickr30k via "
        "--dataset hf:nlphuji/flickr30k on a machine with network)."
    ),
    load=load,
    splits=splits,
)
