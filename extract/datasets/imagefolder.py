"""Format ``imagefolder``: a user's own image–caption pairs, in the Hugging Face ``datasets``
imagefolder convention.

A metadata file ``metadata.jsonl`` or ``metadata.csv`` with a ``file_name`` column and a caption
column (``caption``, else ``text``; option ``caption_column``). A caption cell is a string or a list
of strings (in CSV: a JSON list such as ``["a dog", "a brown dog"]``); several rows with the same
``file_name`` add captions k = 0, 1, ... in row order.

Splits are subfolders (``train/``, ``val/`` or ``validation/``, ``test/``, any other subfolder with
a metadata file), each with its own metadata file; a single metadata file at the root is split
``"train"`` unless it has a ``split`` column, whose values then name the splits (``validation`` is
read as ``val``). Image files without a metadata row are ignored.

File names must stay inside the folder (no absolute paths, no ``..``, no symlinks leading out) and
may not contain ``#`` (caption ids are ``<image id>#<k>``). Image id = ``file_name`` without its
extension, ``/`` kept (``"dogs/rex"``).

Languages: a column ``caption_<lang>`` (``caption_de``, ``caption_pt_BR`` = ``caption_pt-br``) holds
that language's captions (string or list); a row without the column, or with an empty cell, has
no caption in it. ``caption`` holds ``data.default_language`` (docs/languages.md).
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable

from pipeline.errors import did_you_mean

from .loading import Format, Record, Source, captions_from_cell, finish, read_text, safe_relpath, split_name
from .loading import add_translations, strip_image_ext, unknown_split
from .split import DatasetError, Split, option_hint

METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # metadata file names, in a split folder or the root
Row = tuple[str, Any, Any, dict]  # (where, file_name, caption cell, the whole row)


def metadata_file(folder: Path) -> Path | None:
    """The folder's metadata file, None when it has none."""
    found = [folder / m for m in METADATA_FILES if (folder / m).is_file()]
    if len(found) > 1:
        raise DatasetError(f"{folder} holds both metadata.jsonl and metadata.csv; keep one.")
    return found[0] if found else None


def _caption_key(keys: Iterable[str], caption_column: str | None, where: str) -> str:
    keys = list(keys)
    if caption_column is not None:
        if caption_column not in keys:
            raise DatasetError(f"{where}: no caption column {caption_column!r}; columns: {', '.join(keys)}."
                               + did_you_mean(caption_column, keys))
        return caption_column
    for c in ("caption", "text"):
        if c in keys:
            return c
    raise DatasetError(f"{where}: no caption column: expected 'caption' or 'text' (columns: {', '.join(keys)}); "
                       f"rename the column or name it with {option_hint('caption_column')}")


def _read_jsonl(path: Path, text: str, caption_column: str | None) -> list[Row]:
    rows, col = [], None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: malformed JSON ({exc.msg}, column {exc.colno}); one JSON object per line.") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: expected a JSON object like {{\"file_name\": ..., \"caption\": ...}}, "
                               f"got {type(row).__name__}.")
        if "file_name" not in row:
            raise DatasetError(f"{where}: no 'file_name' key (keys: {', '.join(row)}).")
        col = col or _caption_key(row, caption_column, where)
        if col not in row:
            raise DatasetError(f"{where}: no {col!r} key (keys: {', '.join(row)}); every row needs a caption.")
        rows.append((where, row["file_name"], row[col], row))
    return rows


def _read_csv(path: Path, text: str, caption_column: str | None) -> list[Row]:
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    rows = []
    try:
        header = reader.fieldnames
        if not header:
            raise DatasetError(f"{path} is empty; expected a header row with file_name and caption.")
        if "file_name" not in header:
            raise DatasetError(f"{path}: no 'file_name' column (columns: {', '.join(header)})."
                               + did_you_mean("file_name", header))
        col = _caption_key(header, caption_column, str(path))
        for row in reader:
            where = f"{path} line {reader.line_num}"
            if None in row:
                raise DatasetError(f"{where}: {len(row[None])} more field(s) than the header; quote cells that hold commas.")
            if any(v is None for v in row.values()):
                raise DatasetError(f"{where}: fewer fields than the header ({len(header)}).")
            cell: Any = row[col]
            if cell.lstrip().startswith("["):
                try:
                    parsed = json.loads(cell)
                    cell = parsed if isinstance(parsed, list) else cell
                except json.JSONDecodeError:
                    pass
            rows.append((where, row["file_name"], cell, row))
    except csv.Error as exc:
        raise DatasetError(f"{path} line {reader.line_num}: malformed CSV ({exc}).") from None
    return rows


def read_metadata(path: Path, caption_column: str | None) -> list[Row]:
    """Rows of a metadata file as (where, file_name, caption cell, row dict)."""
    text = read_text(path)
    read = _read_jsonl if path.suffix == ".jsonl" else _read_csv
    return read(path, text, caption_column)


def _split_folders(data_dir: Path) -> dict[str, Path]:
    """{split name: subfolder} for the subfolders that hold a metadata file (hidden ones ignored)."""
    folders: dict[str, Path] = {}
    for sub in sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if metadata_file(sub) is not None:
            name = split_name(sub.name, f"{data_dir} (split folder {sub.name}/)")
            if name in folders:
                raise DatasetError(f"{data_dir}: both {folders[name].name}/ and {sub.name}/ are split {name!r}; keep one.")
            folders[name] = sub
    return folders


def _root_metadata(data_dir: Path, folders: dict[str, Path]) -> Path | None:
    meta = metadata_file(data_dir)
    if folders and meta is not None:
        raise DatasetError(f"{data_dir} has a root {meta.name} and split folders ({', '.join(sorted(folders))}); "
                           "keep one layout.")
    if not folders and meta is None:
        raise DatasetError(
            f"{data_dir} holds no metadata.jsonl or metadata.csv (at its root or in split folders train/ val/ test/). "
            'Write one row per image, e.g. {"file_name": "dog.jpg", "caption": "A dog."}.'
        )
    return meta


def _split_values(rows: list[Row]) -> list[str] | None:
    """The normalised 'split' value of every row (checked: it names a cache folder), None when the
    file has no split column."""
    if not any("split" in r[3] for r in rows):
        return None
    for where, _, _, row in rows:
        if not isinstance(row.get("split"), str) or not row["split"].strip():
            raise DatasetError(f"{where}: empty or missing 'split' value; give every row a split name.")
    return [split_name(r[3]["split"].strip(), r[0]) for r in rows]


def _split_rows(source: Source, split: str) -> tuple[Path, Path, list[Row]]:
    """(image folder, metadata file, rows) of one split."""
    data_dir, caption_column = source.data_dir, source.options.get("caption_column")
    folders = _split_folders(data_dir)
    meta = _root_metadata(data_dir, folders)
    if folders:
        if split not in folders:
            raise unknown_split(split, folders, f"{data_dir} (split folders)")
        meta = metadata_file(folders[split])
        return folders[split], meta, read_metadata(meta, caption_column)
    rows = read_metadata(meta, caption_column)
    values = _split_values(rows)
    if values is None:
        if split != "train":
            raise unknown_split(split, ["train"], f"{meta} (a root metadata file without a 'split' column is split 'train')")
        return data_dir, meta, rows
    if split not in values:
        raise unknown_split(split, values, f"the 'split' column of {meta}")
    return data_dir, meta, [r for r, v in zip(rows, values) if v == split]


def load(source: Source, split: str) -> Split:
    """One split of an imagefolder dataset (see the module docstring)."""
    folder, meta, rows = _split_rows(source, split)
    if not rows:
        raise DatasetError(f"{meta} has no rows for split {split!r}.")
    root = folder.resolve()
    root_prefix = os.path.join(str(root), "")  # "<root>/"
    by_rel: dict[str, Record] = {}
    column = source.options.get("caption_column")
    for where, name, cell, row in rows:
        rel = safe_relpath(name, where)
        r = by_rel.get(rel)
        if r is None:
            path = os.path.join(root, rel)
            real = os.path.realpath(path)
            if not real.startswith(root_prefix):
                raise DatasetError(f"{where}: {name!r} resolves outside {root} (symlink to {real}); copy the file into the folder.")
            r = by_rel[rel] = Record(strip_image_ext(rel), rel, path, [], [], where)
        caps = captions_from_cell(cell, where)
        add_translations(r, row, column or _caption_key(row, None, where), where)
        r.ks += list(range(len(r.captions), len(r.captions) + len(caps)))
        r.captions += caps
    return finish(source, split, list(by_rel.values()), str(meta), root)


def splits(source: Source) -> list[str]:
    """Split folders, else the root metadata file's 'split' column, else ["train"]."""
    folders = _split_folders(source.data_dir)
    meta = _root_metadata(source.data_dir, folders)
    if folders:
        return list(folders)
    rows = read_metadata(meta, source.options.get("caption_column"))
    names = {split_name(r[3]["split"].strip(), r[0]) for r in rows
             if isinstance(r[3].get("split"), str) and r[3]["split"].strip()}
    return sorted(names) or ["train"]


FORMAT = Format(
    name="imagefolder",
    options=("caption_column",),
    what_to_get=("It needs train/ val/ test/ folders of images, each with metadata.jsonl or metadata.csv "
                 "(columns file_name and caption)."),
    load=load,
    splits=splits,
)
