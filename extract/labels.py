"""Class labels of a dataset's images (for zero-shot classification), keyed by image id.

``data.label_from`` says where a label comes from:

* ``"dir"``: the first folder of the image's file name, e.g. ``animals/birds/crane.png`` ->
  ``animals`` (imagefolder ids keep their folders, so this is the first part of the image id);
* any other value names a column of the imagefolder metadata file (default ``"label"``), e.g.
  ``{"file_name": "rex.jpg", "caption": "A dog.", "label": "dog"}``. Rows repeating a file name
  (extra captions) must repeat its label.

Class names are shown with ``_`` as spaces (``class_name``). The classes of a dataset are the
sorted union of the labels of all its splits (``dataset_classes``), so a class that happens to
be absent from the test split is still a candidate.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from pathlib import Path
from typing import Mapping

from extract.datasets import DatasetError, available_splits, load_split

LABEL_DIR = "dir"  # data.label_from value: the first folder of the file name


def class_name(label: str) -> str:
    """Readable class name: ``"naturalforces"`` stays, ``"hot_air_balloon"`` -> ``"hot air balloon"``."""
    return str(label).replace("_", " ").strip()


def _label_from_dir(image_id: str, where: str) -> str:
    parts = image_id.split("/")
    if len(parts) < 2 or not parts[0]:
        raise DatasetError(f"{where}: image {image_id!r} is not inside a folder, so data.label_from = 'dir' "
                           f"has no class for it. Put images in class folders (animals/crane.png) or give the "
                           f"metadata a label column and set data.label_from to its name.")
    return parts[0]


def _metadata_rows(path: Path) -> list[dict]:
    """Rows of an imagefolder metadata file (metadata.jsonl or metadata.csv) as dicts."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return list(csv.DictReader(io.StringIO(text, newline="")))


def _labels_from_column(split, column: str) -> dict[str, str]:
    if split.dataset != "imagefolder" or split.image_root is None:
        raise DatasetError(f"data.label_from = {column!r} reads a column of imagefolder metadata; dataset "
                           f"{split.dataset!r} has none. Use data.label_from = 'dir' for class folders.")
    meta = Path(split.source)
    by_file: dict[str, str] = {}
    for row in _metadata_rows(meta):
        if column not in row:
            raise DatasetError(f"{meta}: no {column!r} column (columns: {', '.join(row)}). Add one, or set "
                               f"data.label_from = 'dir' to use the first folder of file_name.")
        value = row[column]  # JSON null (None) is a missing label, not a class called "None"
        name, label = posixpath.normpath(str(row["file_name"])), "" if value is None else str(value).strip()
        if by_file.setdefault(name, label) != label:
            raise DatasetError(f"{meta}: file {name!r} has two labels, {by_file[name]!r} and {label!r}.")
    out = {}
    for item in split.items:
        rel = Path(os.path.relpath(item.image, split.image_root)).as_posix()
        if rel not in by_file or not by_file[rel]:
            raise DatasetError(f"{meta}: image {rel!r} (id {item.id!r}) has no {column!r} value.")
        out[item.id] = by_file[rel]
    return out


def image_labels(dataset: str, data_dir: str | Path, split: str, label_from: str = "label",
                 options: Mapping | None = None) -> dict[str, str]:
    """{image id: label} for every image of one split (see the module docstring).

    options: ``load_split`` options (on_empty, missing, ...). Raises DatasetError when an image
    has no label."""
    s = load_split(dataset, data_dir, split, **dict(options or {}))
    if label_from == LABEL_DIR:
        return {i: _label_from_dir(i, f"{dataset}/{split}") for i in s.ids}
    return _labels_from_column(s, label_from)


def dataset_classes(dataset: str, data_dir: str | Path, label_from: str = "label",
                    options: Mapping | None = None) -> list[str]:
    """Sorted labels that occur in any split of the dataset. Two labels with the same display name
    (``class_name``: ``big_cat`` and ``big cat``) are refused, naming both: their prompts would be
    identical, so the two classes would always tie."""
    labels: set[str] = set()
    for split in available_splits(dataset, data_dir):
        labels |= set(image_labels(dataset, data_dir, split, label_from, options).values())
    seen: dict[str, str] = {}
    for label in sorted(labels):
        other = seen.setdefault(class_name(label), label)
        if other != label:
            raise DatasetError(f"Classes {other!r} and {label!r} (data.label_from = {label_from!r}) have the same "
                               f"name {class_name(label)!r} once '_' is shown as a space: their prompts would be "
                               f"identical and the two always tie. Rename one of them in {data_dir}.")
    return sorted(labels)
