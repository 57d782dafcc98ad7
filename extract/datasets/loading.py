"""What the format modules share: the :class:`Format` spec each one exposes, the :class:`Source` a
loader reads from, strict text/JSON reading, safe relative paths, split-name rules, and the
finishing step (:func:`finish`) that turns loaded records into a :class:`Split`."""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from pipeline.errors import did_you_mean
from pipeline.languages import column_language
from pipeline.names import safe_name

from .split import CAPTION_ID_SEPARATOR, DatasetError, Item, Split, listed, option_hint

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SPLIT_ALIASES = {"validation": "val", "valid": "val"}  # split names read as "val" everywhere
SPLIT_ORDER = ("train", "restval", "val", "test")  # how split listings order the usual names


@dataclass(frozen=True)
class Source:
    """What a loader reads: the dataset name as given, its folder and the checked options.

    dataset: "flickr30k", "imagefolder", "hf:nlphuji/flickr30k", ...
    data_dir: the dataset folder (hf: where a relative local path is also looked up).
    options: on_empty and missing (always present) and the format options that were given.
    allowed: every option the format accepts (error messages only suggest these).
    """

    dataset: str
    data_dir: Path
    options: Mapping[str, Any] = field(default_factory=dict)
    allowed: tuple[str, ...] = ()

    @property
    def argument(self) -> str:
        """The part after "<format>:" ("nlphuji/flickr30k" for "hf:nlphuji/flickr30k"), else ""."""
        return self.dataset.partition(":")[2]


@dataclass(frozen=True)
class Format:
    """One dataset format: everything the package knows about it, in one object.

    name: registry key (``--dataset`` value; with ``argument`` it is written ``name:argument``).
    options: the format's own load options (besides on_empty and missing; config ``data.options``).
    what_to_get: which files the format needs and where to get them (shown when data_dir is missing).
    load: ``load(source, split) -> Split`` for a normalised split name.
    splits: ``splits(source) -> list[str]``, the split names the data holds (any order, aliases allowed).
    argument: what follows ``name:`` (e.g. "<hub id or local path>"); "" when the name stands alone.
    needs_folder: data_dir must be an existing folder.
    """

    name: str
    options: tuple[str, ...]
    what_to_get: str
    load: Callable[[Source, str], Split]
    splits: Callable[[Source], list[str]]
    argument: str = ""
    needs_folder: bool = True

    @property
    def usage(self) -> str:
        """How the dataset is named: "flickr30k", "hf:<hub id or local path>"."""
        return f"{self.name}:{self.argument}" if self.argument else self.name


@dataclass
class Record:
    """An item while loading: where it came from (for error messages) and its caption indices."""

    id: str
    rel: str  # image name relative to the image root ("hf-row:<i>" for hf)
    path: str  # absolute path ("hf-row:<i>" for hf)
    captions: list[str]
    ks: list[int]
    where: str  # "file line 3", "file images[12]", ...
    translations: dict[str, list[str]] = field(default_factory=dict)  # language -> captions (other languages)


# --------------------------------------------------------------------------- split names


def norm_split(name: Any) -> str:
    """"validation" and "valid" -> "val"; other names unchanged."""
    return SPLIT_ALIASES.get(str(name), str(name))


def split_name(value: Any, where: str) -> str:
    """A split name read from data (a 'split' column, a Karpathy ``"split"``, a folder name),
    normalised (:func:`norm_split`) and checked: it names the split's cache folder, so it must be
    one safe folder name (``pipeline.names.safe_name``); UnsafeNameError naming ``where`` (the
    file and row) otherwise."""
    return safe_name(norm_split(value), "split name", where)


def ordered_splits(names: Iterable[Any]) -> list[str]:
    """Distinct normalised split names, usual ones first (train, restval, val, test), then the others sorted."""
    names = {norm_split(n) for n in names}
    return sorted(names, key=lambda n: (SPLIT_ORDER.index(n) if n in SPLIT_ORDER else len(SPLIT_ORDER), n))


def unknown_split(split: str, available: Iterable[str], where: str) -> DatasetError:
    """The error for a split the data does not hold, listing the ones it does."""
    available = sorted(set(available))
    return DatasetError(
        f"split {split!r} is not in {where}; available splits: {', '.join(map(repr, available)) or 'none'}."
        + did_you_mean(split, available)
    )


# --------------------------------------------------------------------------- file reading


def read_text(path: Path) -> str:
    """Read a UTF-8 text file (BOM allowed); a decoding error names the byte offset and line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        bad = data[exc.start : exc.end + 3]
        raise DatasetError(
            f"{path} is not valid UTF-8: byte {exc.start} (line {line}, column {col}) starts {bad!r}. "
            "Re-save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 in > out`."
        ) from None


def read_json(path: Path) -> Any:
    """Parse a JSON file; an error names the line and column."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}. Fix or re-download the file."
        ) from None


def safe_relpath(name: Any, where: str) -> str:
    """Normalise a relative image name ("./a//b.png" -> "a/b.png"); reject absolute paths and '..' escapes."""
    if not isinstance(name, str) or not name.strip():
        raise DatasetError(f"{where}: file name must be a non-empty string, got {name!r}.")
    name = name.strip()
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise DatasetError(f"{where}: file name {name!r} is absolute; use a path relative to the dataset folder.")
    parts = [p for p in name.split("/") if p not in (".", "")]
    if ".." in parts or not parts:
        raise DatasetError(f"{where}: file name {name!r} leaves the dataset folder ('..'); use a path inside it.")
    return "/".join(parts)


def strip_image_ext(name: str) -> str:
    """'dogs/rex.jpg' -> 'dogs/rex' (any extension of the last component)."""
    return os.path.splitext(name)[0]


def stem(rel: str) -> str:
    """'train2014/COCO_x.jpg' -> 'COCO_x'."""
    return os.path.splitext(rel.rsplit("/", 1)[-1])[0]


def captions_from_cell(value: Any, where: str) -> list[str]:
    """A caption cell (string, list of strings, or None = empty) -> list of stripped captions."""
    if value is None:
        return [""]
    if isinstance(value, str):
        return [value.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value]
    raise DatasetError(f"{where}: a caption must be a string or a list of strings, got {type(value).__name__} {value!r:.60}.")


def image_root(data_dir: Path, override: Any, candidates: tuple[str, ...], sample: str | None) -> Path:
    """The image folder: option image_dir (relative to data_dir), else the first candidate holding `sample`."""
    if override is not None:
        root = Path(override).expanduser()
        root = root if root.is_absolute() else data_dir / root
        if not root.is_dir():
            raise DatasetError(f"image_dir {root} is not a folder; pass the folder that holds the images "
                               f"({option_hint('image_dir')}).")
        return root.resolve()
    dirs = [data_dir / c for c in candidates if (data_dir / c).is_dir()]
    for d in dirs:
        if sample is not None and (d / sample).is_file():
            return d.resolve()
    return (dirs[0] if dirs else data_dir).resolve()


# --------------------------------------------------------------------------- the finishing step


def finish(source: Source, split: str, records: list[Record], where: str, root: Path | None,
           check_files: bool = True, hf_images: Any = None) -> Split:
    """Id checks, empty-caption and missing-file handling, sorting by id; builds the Split.

    where: the file(s) the records were read from (Split.source); root: folder image names are
    relative to (None for hf); check_files: test every image file for existence (not for hf).
    """
    _check_ids(records, where)
    skipped: list[tuple[str, str]] = []
    if source.options["on_empty"] == "skip":
        records, skipped = _drop_empty(records, where)
    if check_files:
        records, gone = _drop_missing(records, source, split, root)
        skipped += gone
    if skipped:
        log.warning("%s split %r: skipped %d image(s), e.g. %s", source.dataset, split, len(skipped), listed(skipped, 3))
    if not records:
        raise DatasetError(f"{source.dataset} split {split!r} in {where} has no usable images left" + (
            f" ({len(skipped)} skipped, e.g. {skipped[0]})." if skipped else "."))
    records.sort(key=lambda r: r.id)
    ks = {r.id: tuple(r.ks) for r in records if r.ks != list(range(len(r.captions)))}
    return Split(
        source.dataset, split, [Item(r.id, r.path, tuple(r.captions), _translations(r)) for r in records], where,
        image_root=root, rel_images=[r.rel for r in records], caption_ks=ks, skipped=skipped, hf_images=hf_images,
    )


def _translations(r: Record) -> tuple:
    return tuple((lang, tuple(c for c in caps if c.strip())) for lang, caps in sorted(r.translations.items())
                 if any(c.strip() for c in caps))


def add_translations(record: Record, row: Mapping[str, Any], caption_column: str, where: str) -> None:
    """The ``caption_<lang>`` cells of a metadata row into ``record.translations`` (a missing, None
    or empty cell: the row lacks that language; two spellings of one code are one language)."""
    for column, cell in row.items():
        lang = column_language(column)
        if lang is None or column == caption_column or cell is None or cell == "":
            continue
        if isinstance(cell, str) and cell.lstrip().startswith("["):
            try:
                cell = json.loads(cell)
            except json.JSONDecodeError:
                pass
        record.translations.setdefault(lang, []).extend(captions_from_cell(cell, f"{where} column {column}"))


def _check_ids(records: list[Record], where: str) -> None:
    """Every image id once per split, and none holding the caption-id separator '#'."""
    for r in records:
        if CAPTION_ID_SEPARATOR in r.id:
            raise DatasetError(
                f"{r.where}: image {r.rel!r} gives the id {r.id!r}, which contains "
                f"'{CAPTION_ID_SEPARATOR}'; caption ids are '<image id>{CAPTION_ID_SEPARATOR}<k>', so such an id "
                f"would be confused with a caption's when features are joined. Rename the file without "
                f"'{CAPTION_ID_SEPARATOR}'."
            )
    by_id: dict[str, list[Record]] = {}
    for r in records:
        by_id.setdefault(r.id, []).append(r)
    dups = {i: rs for i, rs in by_id.items() if len(rs) > 1}
    if dups:
        desc = [f"{i!r} ({'; '.join(r.where for r in rs[:3])})" for i, rs in sorted(dups.items())]
        raise DatasetError(
            f"duplicate image ids in {where}: {listed(desc)}. Each image must appear once per split "
            "(for imagefolder, two files that differ only in extension give the same id: rename one)."
        )


def _drop_empty(records: list[Record], where: str) -> tuple[list[Record], list[tuple[str, str]]]:
    """on_empty="skip": drop empty captions (the others keep their k) and images left without one."""
    kept, dropped, skipped = [], [], []
    for r in records:
        pairs = [(k, c) for k, c in zip(r.ks, r.captions) if c.strip()]
        dropped += [f"{r.id}{CAPTION_ID_SEPARATOR}{k}" for k, c in zip(r.ks, r.captions) if not c.strip()]
        if not pairs:
            skipped.append((r.id, "no non-empty caption"))
            continue
        r.ks, r.captions = [k for k, _ in pairs], [c for _, c in pairs]
        kept.append(r)
    if dropped:
        log.warning("%s: dropped %d empty caption(s): %s", where, len(dropped), listed(dropped))
    return kept, skipped


def _drop_missing(records: list[Record], source: Source, split: str,
                  root: Path | None) -> tuple[list[Record], list[tuple[str, str]]]:
    """Image files that do not exist: an error, or (missing="skip") left out and recorded."""
    missing = [r for r in records if not os.path.isfile(r.path)]
    if not missing:
        return records, []
    if source.options["missing"] == "error":
        raise DatasetError(
            f"{len(missing)} of {len(records)} image files of {source.dataset} split {split!r} are missing under "
            f"{root}: {listed(r.rel for r in missing)}. Check data_dir"
            + (f" (or {option_hint('image_dir')})" if "image_dir" in source.allowed else "") + ", "
            f"or leave them out with {option_hint('missing', 'skip')}."
        )
    gone = {id(r) for r in missing}
    return [r for r in records if id(r) not in gone], [(r.id, f"image file missing: {r.path}") for r in missing]
