"""Image–caption dataset loaders with stable sample ids.

One entry point, :func:`load_split`, reads one split of a dataset into a :class:`Split`:
a list of :class:`Item` (image id, image location, captions) plus an image decoder
(:meth:`Split.load_image`) and caption rows under a caption policy
(:meth:`Split.caption_rows`). :func:`available_splits` lists a dataset's split names;
:meth:`Split.select` takes a subset (e.g. for a quick run).

Formats (``dataset`` argument) and where the files are expected under ``data_dir``:

``"flickr30k"``
    ``dataset_flickr30k.json`` (Karpathy split file; preferred) or the original token file
    ``results_20130124.token`` (lines ``1000092795.jpg#0<TAB>caption``) together with the split
    lists ``train.txt`` / ``val.txt`` / ``test.txt`` (one image id per line, the Flickr30k Entities
    convention; the token file alone holds no split information). Images in
    ``flickr30k-images/`` (or ``images/``, or ``data_dir`` itself; option ``image_dir``).
    Image id = file name stem (``"1000092795"``).
``"coco"``
    ``dataset_coco.json`` (Karpathy split file): images at ``data_dir/<filepath>/<filename>``
    (option ``image_dir`` replaces ``data_dir`` as the root). Splits ``train``, ``restval``,
    ``val``, ``test``; ``restval`` stays a split of its own (load it and ``train`` separately).
    Image id = file name stem (``"COCO_val2014_000000391895"``).
``"imagefolder"``
    The Hugging Face ``datasets`` imagefolder convention: ``metadata.jsonl`` or ``metadata.csv``
    with a ``file_name`` column and a caption column (``caption``, else ``text``; option
    ``caption_column``). A caption cell is a string or a list of strings (in CSV: a JSON list such
    as ``["a dog", "a brown dog"]``); several rows with the same ``file_name`` add captions
    k = 0, 1, ... in row order. Splits are subfolders (``train/``, ``val/`` or ``validation/``,
    ``test/``, any other subfolder with a metadata file) each with its own metadata file; a single
    metadata file at the root is split ``"train"`` unless it has a ``split`` column, whose values
    then name the splits (``validation`` is read as ``val``). Image files without a metadata row
    are ignored. File names must stay inside the folder. Image id = ``file_name`` without its
    extension, ``/`` kept (``"dogs/rex"``).
``"hf:<hub id or local path>"``
    A local path (absolute, relative to the working directory, or relative to ``data_dir``)
    written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` is read with
    ``datasets.load_from_disk``; anything else goes to ``datasets.load_dataset(id)`` (standard HF
    cache, honours ``HF_DATASETS_OFFLINE``). Columns: image (``image_column``, default
    ``"image"``), captions (``caption_column``, default ``"caption"``; string or list of strings),
    split (``split_column``, default ``"split"``; when absent the DatasetDict member of that name
    is used, and a plain Dataset is split ``"train"``), id (``id_column``, default ``"filename"``
    then ``"img_id"``; a value with an image extension is reduced to its stem). Images are decoded
    lazily from the Arrow files; ``Item.image`` is ``"hf-row:<row>"``.

Options common to every format:

``on_empty`` (``"error"`` | ``"skip"``, default ``"error"``)
    With ``"error"``, an empty or whitespace-only caption makes :meth:`Split.caption_rows` raise
    :class:`DatasetError` naming the caption id. With ``"skip"`` such captions are dropped at load
    time (the others keep their original index k), and an image left without captions is removed
    from ``items`` and recorded in ``Split.skipped``.
``missing`` (``"error"`` | ``"skip"``, default ``"error"``)
    Every image file is checked for existence at load time (cheap: tens of ms for 31k files).
    ``"error"`` raises :class:`DatasetError` listing the first missing files; ``"skip"`` removes
    those images from ``items`` and records them in ``Split.skipped``. Corrupt or truncated files
    are only found when decoded: :meth:`Split.load_image` raises :class:`ImageError`.

Split names: ``"validation"`` and ``"valid"`` are read as ``"val"`` (``Split.name`` is then ``"val"``).

Ordering: ``Split.items`` is sorted by image id (plain string order), whatever the file order,
so it is stable across runs, machines and formats. Captions keep file order (k).
"""
from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image, ImageFile, ImageOps
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

CAPTION_POLICIES = ("longest", "first", "all")  # caption-row policies of Split.caption_rows
SPLITS = ("train", "val", "test")  # the usual split names (COCO adds "restval")
DATASETS = ("flickr30k", "coco", "imagefolder", "hf:<hub id or local path>")  # load_split formats

MAX_LISTED = 5  # how many offending ids / files / lines an error message names
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # imagefolder metadata file names
HF_ROW_PREFIX = "hf-row:"  # Item.image for hf datasets: "hf-row:<row index>"

# Options each format accepts, beyond the common ones.
_COMMON_OPTIONS = ("on_empty", "missing")
_FORMAT_OPTIONS = {
    "flickr30k": ("image_dir",),
    "coco": ("image_dir",),
    "imagefolder": ("caption_column",),
    "hf": ("image_column", "caption_column", "split_column", "id_column"),
}
_SPLIT_ALIASES = {"validation": "val", "valid": "val"}  # split names read as "val" everywhere
_warned_truncated = False  # LOAD_TRUNCATED_IMAGES warning given once per process


# --------------------------------------------------------------------------- errors


class DatasetError(PipelineError, ValueError):
    """Bad dataset input; the message names the file, line/row or id, and how to fix it."""


class ImageError(DatasetError):
    """An image that cannot be decoded (missing, corrupt, truncated, unsupported mode)."""

    def __init__(self, sample_id: str, path: str, reason: str):
        self.sample_id, self.path, self.reason = sample_id, str(path), reason
        super().__init__(
            f"cannot decode the image of sample {sample_id!r} ({path}): {reason}. "
            "Replace or re-download the file, or leave the sample out of the dataset."
        )

    def __reduce__(self):  # picklable, so DataLoader workers can send it back
        return (type(self), (self.sample_id, self.path, self.reason))


def _did_you_mean(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=3)
    return f" Did you mean: {', '.join(map(repr, close))}?" if close else ""


def _first(values: Iterable[Any], n: int = MAX_LISTED) -> str:
    values = list(values)
    shown = ", ".join(map(str, values[:n]))
    return shown + (f", ... ({len(values)} in all)" if len(values) > n else "")


def _unknown_split(split: str, available: Iterable[str], where: str) -> DatasetError:
    available = sorted(set(available))
    return DatasetError(
        f"split {split!r} is not in {where}; available splits: {', '.join(map(repr, available)) or 'none'}."
        + _did_you_mean(split, available)
    )


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Item:
    """One image of a split.

    id: stable image id (Flickr30k/COCO: file name stem; imagefolder: file_name without extension).
    image: absolute path of the image file, or ``"hf-row:<row>"`` for hf datasets.
    captions: the image's captions, stripped, in file order.
    """

    id: str
    image: str
    captions: tuple[str, ...]


@dataclass(frozen=True)
class CaptionRow:
    """One text sample. id is ``"<image id>#<k>"`` under policy "all", the image id otherwise."""

    id: str
    image_id: str
    k: int  # which caption of the image (0-based, as in the source file)
    text: str


@dataclass
class _Entry:
    """An item while loading: where it came from (for error messages) and its caption indices."""

    id: str
    rel: str  # image name relative to the image root ("hf-row:<i>" for hf)
    path: str  # absolute path ("hf-row:<i>" for hf)
    captions: list[str]
    ks: list[int]
    where: str  # "file line 3", "file images[12]", ...


# --------------------------------------------------------------------------- image conversion


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB, after applying its EXIF orientation.

    - transparency ("LA", "La", "PA", "RGBA", "RGBa", "P"/"L"/"RGB" with a transparency key):
      alpha-composited on white;
    - 16-bit ("I;16", "I;16L", "I;16B", "I;16N") and 32-bit integer "I" (read as 16-bit data,
      clipped to 0..65535): value >> 8, so 65535 -> 255 and 32768 -> 128;
    - "F": Pillow's convention, values are 0..255, rounded and clipped (NaN -> 0);
    - "1", "L", "P", "CMYK", "YCbCr", ...: Pillow's ``convert("RGB")`` (pure cyan CMYK -> (0, 255, 255)).
    """
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as exc:  # a broken EXIF block is common in the wild and harmless to ignore
        log.warning("ignoring unreadable EXIF orientation: %s", exc)
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(img).astype(np.int64)
        a = (np.clip(a, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0)
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode in ("LA", "La", "PA", "RGBA", "RGBa") or img.has_transparency_data:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return img
    return img.convert("RGB")


def pad_square(img: Image.Image, fill: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Pad an image to a square (side = max(width, height)), centred, with ``fill``. Returns RGB."""
    img = img if img.mode == "RGB" else to_rgb(img)
    w, h = img.size
    side = max(w, h)
    if w == h:
        return img
    canvas = Image.new("RGB", (side, side), tuple(fill))
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def _decode(opener, sample_id: str, where: str) -> Image.Image:
    """Open, fully decode (so truncation raises) and convert an image; any failure -> ImageError."""
    try:
        with opener() as im:
            im.load()
            return to_rgb(im)
    except FileNotFoundError:
        raise ImageError(sample_id, where, "file not found") from None
    except Exception as exc:
        raise ImageError(sample_id, where, f"{type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------- Split


class Split:
    """One split of a dataset: items sorted by id, an image decoder and caption rows.

    Attributes: dataset ("flickr30k" | "coco" | "imagefolder" | "hf:<id>"), name (split name),
    items (list[Item]), source (files it was read from), image_root (folder image names are
    relative to; None for hf), skipped (list of (id, reason) left out by on_empty/missing="skip").
    Picklable (hf datasets are memory-mapped Arrow files, pickled by reference), so it can be
    handed to DataLoader workers.
    """

    def __init__(
        self,
        dataset: str,
        name: str,
        items: list[Item],
        source: str,
        *,
        image_root: str | Path | None = None,
        rel_images: list[str] | None = None,
        caption_ks: dict[str, tuple[int, ...]] | None = None,
        skipped: list[tuple[str, str]] | None = None,
        hf_images: Any = None,
    ):
        self.dataset, self.name, self.items, self.source = dataset, name, list(items), source
        self.image_root = None if image_root is None else str(image_root)
        self.skipped = list(skipped or [])
        self._caption_ks = dict(caption_ks or {})  # only for items whose ks are not 0..n-1
        self._hf_images = hf_images  # datasets.Dataset with one image column, arrow format
        if rel_images is None:
            rel_images = [self._relative(it.image) for it in self.items]
        self._rel = {it.id: rel for it, rel in zip(self.items, rel_images)}  # id -> image name for fingerprint
        dups = [i for i, c in Counter(it.id for it in self.items).items() if c > 1]
        if dups:
            raise DatasetError(f"duplicate image ids in {source}: {_first(sorted(dups))}; each image may appear once.")

    def _relative(self, image: str) -> str:
        if self.image_root is None or image.startswith(HF_ROW_PREFIX):
            return image
        try:
            return Path(image).relative_to(self.image_root).as_posix()
        except ValueError:
            return Path(image).name

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"Split(dataset={self.dataset!r}, name={self.name!r}, items={len(self.items)}, source={self.source!r})"

    @property
    def ids(self) -> list[str]:
        """Image ids in item order."""
        return [it.id for it in self.items]

    def select(self, indices: Iterable[int]) -> "Split":
        """A Split of the items at ``indices`` (e.g. ``range(100)`` for a quick run); same dataset and name,
        its own fingerprint."""
        items = [self.items[i] for i in indices]
        return Split(
            self.dataset, self.name, items, self.source, image_root=self.image_root,
            rel_images=[self._rel.get(it.id) or self._relative(it.image) for it in items],
            caption_ks={it.id: self._caption_ks[it.id] for it in items if it.id in self._caption_ks},
            skipped=self.skipped, hf_images=self._hf_images,
        )

    def load_image(self, i: int) -> Image.Image:
        """Decode item i to an RGB PIL image (see :func:`to_rgb`). Raises ImageError, never returns garbage."""
        item = self.items[i]
        global _warned_truncated
        if ImageFile.LOAD_TRUNCATED_IMAGES and not _warned_truncated:
            _warned_truncated = True
            log.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set elsewhere): truncated images will not be detected")
        if self._hf_images is None:
            return _decode(lambda: Image.open(item.image), item.id, item.image)
        row = int(item.image[len(HF_ROW_PREFIX):])
        where = f"{self.source} row {row}"
        value = self._hf_images[row].column(0)[0].as_py()
        if isinstance(value, dict) and value.get("bytes"):
            data = value["bytes"]
            return _decode(lambda: Image.open(io.BytesIO(data)), item.id, where)
        path = value.get("path") if isinstance(value, dict) else value
        if isinstance(path, str) and path:
            return _decode(lambda: Image.open(path), item.id, f"{where} ({path})")
        raise ImageError(item.id, where, "the row holds no image (neither bytes nor a path)")

    def caption_rows(self, policy: str) -> list[CaptionRow]:
        """Text samples under a caption policy, in item order.

        "longest": one row per image, its longest caption in characters (ties -> lowest k);
        "first": one row per image, its first caption (the first kept one under on_empty="skip");
        both carry the image id as row id and the chosen caption's index in k.
        "all": one row per caption, id "<image id>#<k>".
        Raises DatasetError on an empty or whitespace-only caption (load with on_empty="skip" to drop them).
        """
        if policy not in CAPTION_POLICIES:
            raise DatasetError(
                f"unknown caption policy {policy!r}; choose one of {', '.join(CAPTION_POLICIES)}."
                + _did_you_mean(policy, CAPTION_POLICIES)
            )
        rows: list[CaptionRow] = []
        for it in self.items:
            ks = self._caption_ks.get(it.id) or tuple(range(len(it.captions)))
            if not it.captions:
                raise DatasetError(
                    f"image {it.id!r} has no caption ({self.source}); add one, or load with on_empty='skip' to leave it out."
                )
            for k, text in zip(ks, it.captions):
                if not text.strip():
                    raise DatasetError(
                        f"caption {it.id}#{k} is empty or whitespace-only ({self.source}); fix it, "
                        "or load with on_empty='skip' to drop empty captions."
                    )
            if policy == "all":
                rows.extend(CaptionRow(f"{it.id}#{k}", it.id, k, t) for k, t in zip(ks, it.captions))
            else:
                j = 0 if policy == "first" else max(range(len(it.captions)), key=lambda j: (len(it.captions[j]), -j))
                rows.append(CaptionRow(it.id, it.id, ks[j], it.captions[j]))
        return rows

    def fingerprint(self) -> str:
        """sha256 hex of canonical JSON of (dataset, split, [(id, relative image name, captions)...]).

        Independent of absolute paths, mtimes and the machine. Computed once per Split (items
        do not change after loading); every entry extracted from the split asks for it.
        """
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    def _compute_fingerprint(self) -> str:
        payload = {
            "dataset": self.dataset,
            "split": self.name,
            "items": [[it.id, self._rel.get(it.id) or self._relative(it.image), list(it.captions)] for it in self.items],
        }
        blob = json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- file reading helpers


def _read_text(path: Path) -> str:
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


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}. Fix or re-download the file."
        ) from None


def _safe_relpath(name: Any, where: str) -> str:
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


def _strip_image_ext(name: str) -> str:
    """'dogs/rex.jpg' -> 'dogs/rex' (any extension of the last component)."""
    return os.path.splitext(name)[0]


def _stem(rel: str) -> str:
    """'train2014/COCO_x.jpg' -> 'COCO_x'."""
    return os.path.splitext(rel.rsplit("/", 1)[-1])[0]


def _captions_from_cell(value: Any, where: str) -> list[str]:
    """A caption cell (string, list of strings, or None = empty) -> list of stripped captions."""
    if value is None:
        return [""]
    if isinstance(value, str):
        return [value.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value]
    raise DatasetError(f"{where}: a caption must be a string or a list of strings, got {type(value).__name__} {value!r:.60}.")


def _norm_split(name: Any) -> str:
    return _SPLIT_ALIASES.get(str(name), str(name))


# --------------------------------------------------------------------------- shared finishing step


def _finish(
    dataset: str,
    split: str,
    entries: list[_Entry],
    source: str,
    image_root: Path | None,
    opts: dict,
    check_files: bool,
    hf_images: Any = None,
) -> Split:
    """Duplicate check, empty-caption and missing-file handling, sorting; builds the Split."""
    by_id: dict[str, list[_Entry]] = {}
    for e in entries:
        by_id.setdefault(e.id, []).append(e)
    dups = {i: es for i, es in by_id.items() if len(es) > 1}
    if dups:
        desc = [f"{i!r} ({'; '.join(e.where for e in es[:3])})" for i, es in sorted(dups.items())]
        raise DatasetError(
            f"duplicate image ids in {source}: {_first(desc)}. Each image must appear once per split "
            "(for imagefolder, two files that differ only in extension give the same id: rename one)."
        )
    skipped: list[tuple[str, str]] = []
    if opts["on_empty"] == "skip":
        kept, dropped = [], []
        for e in entries:
            pairs = [(k, c) for k, c in zip(e.ks, e.captions) if c.strip()]
            dropped += [f"{e.id}#{k}" for k, c in zip(e.ks, e.captions) if not c.strip()]
            if not pairs:
                skipped.append((e.id, "no non-empty caption"))
                continue
            e.ks, e.captions = [k for k, _ in pairs], [c for _, c in pairs]
            kept.append(e)
        entries = kept
        if dropped:
            log.warning("%s: dropped %d empty caption(s): %s", source, len(dropped), _first(dropped))
    if check_files:
        missing = [e for e in entries if not os.path.isfile(e.path)]
        if missing and opts["missing"] == "error":
            raise DatasetError(
                f"{len(missing)} of {len(entries)} image files of {dataset} split {split!r} are missing under "
                f"{image_root}: {_first(e.rel for e in missing)}. Check data_dir (or pass image_dir=...), "
                "or load with missing='skip' to leave them out."
            )
        if missing:
            gone = {id(e) for e in missing}
            skipped += [(e.id, f"image file missing: {e.path}") for e in missing]
            entries = [e for e in entries if id(e) not in gone]
    if skipped:
        log.warning("%s split %r: skipped %d image(s), e.g. %s", dataset, split, len(skipped), _first(skipped, 3))
    if not entries:
        raise DatasetError(f"{dataset} split {split!r} in {source} has no usable images left" + (
            f" ({len(skipped)} skipped, e.g. {skipped[0]})." if skipped else "."))
    entries.sort(key=lambda e: e.id)
    ks = {e.id: tuple(e.ks) for e in entries if e.ks != list(range(len(e.captions)))}
    return Split(
        dataset,
        split,
        [Item(e.id, e.path, tuple(e.captions)) for e in entries],
        source,
        image_root=image_root,
        rel_images=[e.rel for e in entries],
        caption_ks=ks,
        skipped=skipped,
        hf_images=hf_images,
    )


def _image_root(data_dir: Path, override: Any, candidates: tuple[str, ...], sample: str | None) -> Path:
    """The image folder: option image_dir (relative to data_dir), else the first candidate holding `sample`."""
    if override is not None:
        root = Path(override).expanduser()
        root = root if root.is_absolute() else data_dir / root
        if not root.is_dir():
            raise DatasetError(f"image_dir {root} is not a folder; pass the folder that holds the images.")
        return root.resolve()
    dirs = [data_dir / c for c in candidates if (data_dir / c).is_dir()]
    for d in dirs:
        if sample is not None and (d / sample).is_file():
            return d.resolve()
    return (dirs[0] if dirs else data_dir).resolve()


# --------------------------------------------------------------------------- Karpathy / Flickr30k / COCO


def _read_karpathy(path: Path, split: str, with_filepath: bool) -> list[_Entry]:
    """Entries of one split of a Karpathy split file (rel = [filepath/]filename; path filled in later)."""
    doc = _read_json(path)
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise DatasetError(f"{path} has no 'images' list: is this a Karpathy split file (dataset_*.json)?")
    need = ("filename", "split", "sentences") + (("filepath",) if with_filepath else ())
    available, entries = set(), []
    for i, im in enumerate(images):
        where = f"{path} images[{i}]"
        if not isinstance(im, dict) or any(key not in im for key in need):
            lacks = [key for key in need if not isinstance(im, dict) or key not in im]
            raise DatasetError(f"{where} lacks key(s) {', '.join(lacks)}; re-download the Karpathy split file.")
        available.add(str(im["split"]))
        if im["split"] != split:
            continue
        where = f"{where} ({im['filename']})"
        rel = _safe_relpath(im["filename"], where)
        if with_filepath:
            rel = _safe_relpath(f"{im['filepath']}/{rel}", where)
        sents = im["sentences"]
        if not isinstance(sents, list):
            raise DatasetError(f"{where}: 'sentences' must be a list.")
        caps = []
        for j, s in enumerate(sents):
            if not isinstance(s, dict) or not isinstance(s.get("raw"), str):
                raise DatasetError(f"{where} sentences[{j}] has no 'raw' string.")
            caps.append(s["raw"].strip())
        entries.append(_Entry(_stem(rel), rel, "", caps, list(range(len(caps))), where))
    if split not in available:
        raise _unknown_split(split, available, str(path))
    return entries


def _read_flickr_token(path: Path, data_dir: Path, split: str) -> list[_Entry]:
    """Entries of one split from results_20130124.token + <split>.txt (Flickr30k Entities split list)."""
    text = _read_text(path)
    caps: dict[str, dict[int, str]] = {}
    fname: dict[str, str] = {}
    seen_at: dict[tuple[str, int], int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, tab, cap = line.partition("\t")
        name, hashsign, k = key.strip().rpartition("#")
        if not tab or not hashsign or not k.isdigit() or not name:
            raise DatasetError(
                f"{path} line {lineno}: expected '<file>.jpg#<k><TAB><caption>', got {line[:80]!r}."
            )
        rel = _safe_relpath(name, f"{path} line {lineno}")
        img_id, k = _stem(rel), int(k)
        if (img_id, k) in seen_at:
            raise DatasetError(
                f"{path} line {lineno}: caption {img_id}#{k} already given on line {seen_at[img_id, k]}; remove one."
            )
        seen_at[img_id, k] = lineno
        caps.setdefault(img_id, {})[k] = cap.strip()
        fname[img_id] = rel
    list_path = data_dir / f"{split}.txt"
    if not list_path.is_file():
        present = [s for s in SPLITS if (data_dir / f"{s}.txt").is_file()]
        if not present:
            raise DatasetError(
                f"{path} holds no split information. Put the Karpathy split file dataset_flickr30k.json in "
                f"{data_dir} (preferred), or split lists train.txt / val.txt / test.txt (one image id per line, "
                "as in Flickr30k Entities) next to the token file."
            )
        raise _unknown_split(split, present, f"{data_dir} (split lists <split>.txt)")
    ids = [_strip_image_ext(s.strip()) for s in _read_text(list_path).splitlines() if s.strip()]
    unknown = [i for i in ids if i not in caps]
    if unknown:
        raise DatasetError(
            f"{list_path} lists image ids without captions in {path}: {_first(unknown)}. "
            "Use split lists that match the token file."
        )
    entries = []
    for n, img_id in enumerate(ids, 1):
        ks = sorted(caps[img_id])
        where = f"{list_path} line {n} ({img_id})"
        entries.append(_Entry(img_id, fname[img_id], "", [caps[img_id][k] for k in ks], ks, where))
    return entries


def _load_karpathy_family(dataset: str, data_dir: Path, split: str, opts: dict) -> Split:
    if dataset == "flickr30k":
        kjson, token = data_dir / "dataset_flickr30k.json", data_dir / "results_20130124.token"
        if kjson.is_file():
            entries, source = _read_karpathy(kjson, split, with_filepath=False), kjson
        elif token.is_file():
            entries, source = _read_flickr_token(token, data_dir, split), token
        else:
            raise DatasetError(
                f"no Flickr30k caption file in {data_dir}: expected dataset_flickr30k.json (Karpathy splits) or "
                "results_20130124.token with split lists train.txt / val.txt / test.txt."
            )
        candidates = ("flickr30k-images", "images", ".")
    else:
        source = data_dir / "dataset_coco.json"
        if not source.is_file():
            raise DatasetError(f"no {source.name} in {data_dir}; download the Karpathy COCO split file there.")
        entries = _read_karpathy(source, split, with_filepath=True)
        candidates = (".", "images")
    root = _image_root(data_dir, opts.get("image_dir"), candidates, entries[0].rel if entries else None)
    for e in entries:
        e.path = os.path.join(root, e.rel)
    return _finish(dataset, split, entries, str(source), root, opts, check_files=True)


# --------------------------------------------------------------------------- imagefolder


def _metadata_file(folder: Path) -> Path | None:
    found = [folder / m for m in METADATA_FILES if (folder / m).is_file()]
    if len(found) > 1:
        raise DatasetError(f"{folder} holds both metadata.jsonl and metadata.csv; keep one.")
    return found[0] if found else None


def _read_metadata(path: Path, caption_column: str | None) -> list[tuple[str, Any, Any, dict]]:
    """Rows of a metadata file as (where, file_name, caption cell, row dict)."""
    text = _read_text(path)

    def pick_caption(keys: Iterable[str], where: str) -> str:
        keys = list(keys)
        if caption_column is not None:
            if caption_column not in keys:
                raise DatasetError(
                    f"{where}: no caption column {caption_column!r}; columns: {', '.join(keys)}."
                    + _did_you_mean(caption_column, keys)
                )
            return caption_column
        for c in ("caption", "text"):
            if c in keys:
                return c
        raise DatasetError(
            f"{where}: no caption column: expected 'caption' or 'text' (columns: {', '.join(keys)}); "
            "rename the column or pass caption_column=..."
        )

    rows = []
    if path.suffix == ".jsonl":
        col = None
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{where}: malformed JSON ({exc.msg}, column {exc.colno}); one JSON object per line.") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{where}: expected a JSON object like {{\"file_name\": ..., \"caption\": ...}}, got {type(row).__name__}.")
            if "file_name" not in row:
                raise DatasetError(f"{where}: no 'file_name' key (keys: {', '.join(row)}).")
            col = col or pick_caption(row, where)
            if col not in row:
                raise DatasetError(f"{where}: no {col!r} key (keys: {', '.join(row)}); every row needs a caption.")
            rows.append((where, row["file_name"], row[col], row))
        return rows
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    try:
        header = reader.fieldnames
        if not header:
            raise DatasetError(f"{path} is empty; expected a header row with file_name and caption.")
        if "file_name" not in header:
            raise DatasetError(f"{path}: no 'file_name' column (columns: {', '.join(header)})." + _did_you_mean("file_name", header))
        col = pick_caption(header, str(path))
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


def _load_imagefolder(data_dir: Path, split: str, opts: dict) -> Split:
    split_dirs: dict[str, Path] = {}
    for sub in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        if _metadata_file(sub) is not None:
            name = _norm_split(sub.name)
            if name in split_dirs:
                raise DatasetError(f"{data_dir}: both {split_dirs[name].name}/ and {sub.name}/ are split {name!r}; keep one.")
            split_dirs[name] = sub
    root_meta = _metadata_file(data_dir)
    if split_dirs and root_meta is not None:
        raise DatasetError(
            f"{data_dir} has a root {root_meta.name} and split folders ({', '.join(sorted(split_dirs))}); keep one layout."
        )
    if split_dirs:
        if split not in split_dirs:
            raise _unknown_split(split, split_dirs, f"{data_dir} (split folders)")
        folder = split_dirs[split]
        meta = _metadata_file(folder)
        rows = _read_metadata(meta, opts.get("caption_column"))
    elif root_meta is not None:
        folder, meta = data_dir, root_meta
        rows = _read_metadata(meta, opts.get("caption_column"))
        if any("split" in r[3] for r in rows):
            for where, _, _, row in rows:
                if not isinstance(row.get("split"), str) or not row["split"].strip():
                    raise DatasetError(f"{where}: empty or missing 'split' value; give every row a split name.")
            values = [_norm_split(r[3]["split"].strip()) for r in rows]
            if split not in values:
                raise _unknown_split(split, values, f"the 'split' column of {meta}")
            rows = [r for r, v in zip(rows, values) if v == split]
        elif split != "train":
            raise _unknown_split(split, ["train"], f"{meta} (a root metadata file without a 'split' column is split 'train')")
    else:
        raise DatasetError(
            f"{data_dir} holds no metadata.jsonl or metadata.csv (at its root or in split folders train/ val/ test/). "
            'Write one row per image, e.g. {"file_name": "dog.jpg", "caption": "A dog."}.'
        )
    if not rows:
        raise DatasetError(f"{meta} has no rows for split {split!r}.")
    root = folder.resolve()
    root_prefix = os.path.join(str(root), "")  # "<root>/"
    by_rel: dict[str, _Entry] = {}
    for where, name, cell, _ in rows:
        rel = _safe_relpath(name, where)
        e = by_rel.get(rel)
        if e is None:
            path = os.path.join(root, rel)
            real = os.path.realpath(path)
            if not real.startswith(root_prefix):
                raise DatasetError(f"{where}: {name!r} resolves outside {root} (symlink to {real}); copy the file into the folder.")
            e = by_rel[rel] = _Entry(_strip_image_ext(rel), rel, path, [], [], where)
        caps = _captions_from_cell(cell, where)
        e.ks += list(range(len(e.captions), len(e.captions) + len(caps)))
        e.captions += caps
    return _finish("imagefolder", split, list(by_rel.values()), str(meta), root, opts, check_files=True)


# --------------------------------------------------------------------------- Hugging Face datasets


def _load_hf(spec: str, data_dir: Path, split: str, opts: dict) -> Split:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise DatasetError("hf:... datasets need the `datasets` package: pip install datasets") from exc
    local = Path(spec).expanduser()
    candidates = [local] + ([data_dir / local] if not local.is_absolute() else [])
    found = next((c for c in candidates if c.exists()), None)
    if found is not None:
        try:
            obj = datasets.load_from_disk(str(found))
        except Exception as exc:
            raise DatasetError(
                f"{found} exists but is not a dataset saved with save_to_disk ({type(exc).__name__}: {exc})."
            ) from exc
        source = str(found.resolve())
    else:
        try:
            obj = datasets.load_dataset(spec)
        except Exception as exc:
            raise DatasetError(
                f"could not load Hugging Face dataset {spec!r} ({type(exc).__name__}: {exc}). Either download it "
                f"where there is network (`python -c \"import datasets; datasets.load_dataset('{spec}')\"` fills the "
                "HF cache; then HF_DATASETS_OFFLINE=1 works offline), or save it with save_to_disk(PATH) and pass "
                "hf:PATH. A local path given here was not found (also tried relative to data_dir)."
            ) from exc
        source = f"hf-hub:{spec}"

    split_col = opts.get("split_column", "split")
    members = dict(obj) if isinstance(obj, datasets.DatasetDict) else {None: obj}
    some = next(iter(members.values()))
    if split_col in some.column_names:
        if len(members) == 1:
            ds = some
        else:
            key = next((k for k in members if _norm_split(k) == split), None)
            ds = members[key] if key is not None else datasets.concatenate_datasets([members[k] for k in sorted(members)])
        values = [_norm_split(v) for v in ds.select_columns([split_col]).to_dict()[split_col]]
        rows = [i for i, v in enumerate(values) if v == split]
        if not rows:
            raise _unknown_split(split, values, f"the {split_col!r} column of {source}")
    else:
        if "split_column" in opts:
            raise DatasetError(f"{source} has no split column {opts['split_column']!r}; columns: {', '.join(some.column_names)}.")
        if None in members:  # a plain Dataset without split column: all of it is "train"
            if split != "train":
                raise _unknown_split(split, ["train"], f"{source} (a Dataset without a {split_col!r} column is split 'train')")
            ds = members[None]
        else:
            key = next((k for k in members if _norm_split(k) == split), None)
            if key is None:
                raise _unknown_split(split, [_norm_split(k) for k in members], source)
            ds = members[key]
        rows = list(range(len(ds)))

    cols = ds.column_names

    def need(option: str, default: str | None) -> str:
        name = opts.get(option, default)
        if name not in cols:
            raise DatasetError(
                f"{source} has no column {name!r} ({option}); columns: {', '.join(cols)}. Pass {option}=..."
                + _did_you_mean(str(name), cols)
            )
        return name

    image_col = need("image_column", "image")
    caption_col = need("caption_column", "caption")
    if "id_column" in opts:
        id_col = need("id_column", None)
    else:
        id_col = next((c for c in ("filename", "img_id") if c in cols), None)
        if id_col is None:
            raise DatasetError(
                f"{source} has no id column ('filename' or 'img_id'); columns: {', '.join(cols)}. Pass id_column=..."
            )
    table = ds.select_columns([caption_col, id_col]).to_dict()
    entries = []
    for r in rows:
        where = f"{source} row {r}"
        raw_id = table[id_col][r]
        if raw_id is None or str(raw_id).strip() == "":
            raise DatasetError(f"{where}: empty id in column {id_col!r}.")
        img_id = str(raw_id).strip()
        if img_id.lower().endswith(IMAGE_EXTENSIONS):
            img_id = _strip_image_ext(img_id)
        caps = _captions_from_cell(table[caption_col][r], where)
        key = f"{HF_ROW_PREFIX}{r}"
        entries.append(_Entry(img_id, key, key, caps, list(range(len(caps))), where))
    images = ds.select_columns([image_col]).with_format("arrow")
    return _finish(f"hf:{spec}", split, entries, source, None, opts, check_files=False, hf_images=images)


# --------------------------------------------------------------------------- split listing

_SPLIT_ORDER = ("train", "restval", "val", "test")  # how available_splits orders the usual names


def _ordered(names: Iterable[str]) -> list[str]:
    names = {_norm_split(n) for n in names}
    return sorted(names, key=lambda n: (_SPLIT_ORDER.index(n) if n in _SPLIT_ORDER else len(_SPLIT_ORDER), n))


def available_splits(dataset: str, data_dir: str | Path, **options: Any) -> list[str]:
    """The split names a dataset holds, usual ones first (train, restval, val, test, then others sorted).

    Same arguments as :func:`load_split` (without split); reads only the caption/metadata files
    (for hf: the split column or the DatasetDict member names).
    """
    kind = "hf" if isinstance(dataset, str) and dataset.startswith("hf:") else dataset
    data_dir = Path(data_dir).expanduser()
    if kind in ("flickr30k", "coco"):
        kjson = data_dir / f"dataset_{kind}.json"
        if kjson.is_file():
            doc = _read_json(kjson)
            images = doc.get("images") if isinstance(doc, dict) else None
            if not isinstance(images, list):
                raise DatasetError(f"{kjson} has no 'images' list: is this a Karpathy split file (dataset_*.json)?")
            return _ordered(str(im.get("split")) for im in images if isinstance(im, dict) and "split" in im)
        listed = [sp for sp in SPLITS if (data_dir / f"{sp}.txt").is_file()]
        if kind == "flickr30k" and (data_dir / "results_20130124.token").is_file() and listed:
            return _ordered(listed)
    if kind == "imagefolder" and data_dir.is_dir():
        subs = [p.name for p in data_dir.iterdir() if p.is_dir() and _metadata_file(p) is not None]
        if subs:
            return _ordered(subs)
        meta = _metadata_file(data_dir)
        if meta is not None:
            rows = _read_metadata(meta, options.get("caption_column"))
            names = {r[3]["split"].strip() for r in rows if isinstance(r[3].get("split"), str) and r[3]["split"].strip()}
            return _ordered(names or ["train"])
    if kind == "hf":
        import datasets

        spec = dataset[3:]
        local = Path(spec).expanduser()
        found = next((c for c in (local, data_dir / local) if c.exists()), None)
        try:
            obj = datasets.load_from_disk(str(found)) if found is not None else datasets.load_dataset(spec)
        except Exception as exc:
            raise DatasetError(f"could not open Hugging Face dataset {spec!r}: {type(exc).__name__}: {exc}") from exc
        members = list(obj.values()) if isinstance(obj, datasets.DatasetDict) else [obj]
        col = options.get("split_column", "split")
        if col in members[0].column_names:
            return _ordered(v for m in members for v in m.select_columns([col]).to_dict()[col])
        return _ordered(obj.keys()) if isinstance(obj, datasets.DatasetDict) else ["train"]
    # nothing recognisable: let load_split produce its explanatory error
    load_split(dataset, data_dir, "train", **options)
    raise DatasetError(f"no split information found for {dataset!r} in {data_dir}.")  # pragma: no cover


# --------------------------------------------------------------------------- entry point


_WHAT_TO_GET = {  # shown when the data folder is missing
    "flickr30k": "It needs the Karpathy split file dataset_flickr30k.json (from Karpathy's caption_datasets.zip) "
                 "and the images in flickr30k-images/ (the Flickr30k request form, or the Hugging Face dataset "
                 "nlphuji/flickr30k via --dataset hf:nlphuji/flickr30k on a machine with network).",
    "coco": "It needs the Karpathy split file dataset_coco.json (caption_datasets.zip) and the COCO 2014 image "
            "folders train2014/ and val2014/ (cocodataset.org).",
    "imagefolder": "It needs train/ val/ test/ folders of images, each with metadata.jsonl or metadata.csv "
                   "(columns file_name and caption).",
}


def load_split(dataset: str, data_dir: str | Path, split: str, **options: Any) -> Split:
    """Read one split of an image–caption dataset.

    dataset: "flickr30k" | "coco" | "imagefolder" | "hf:<hub id or local save_to_disk path>".
    data_dir: the dataset folder (for hf: where a relative local path is also looked up).
    split: split name, e.g. "train", "val", "test" (COCO also "restval").
    options: on_empty ("error"|"skip"), missing ("error"|"skip"); flickr30k/coco: image_dir;
      imagefolder: caption_column; hf: image_column, caption_column, split_column, id_column.
      See the module docstring. Unknown options raise DatasetError.
    """
    if not isinstance(dataset, str):
        raise DatasetError(f"dataset must be a string, got {dataset!r}.")
    kind = "hf" if dataset.startswith("hf:") else dataset
    if kind not in _FORMAT_OPTIONS:
        raise DatasetError(
            f"unknown dataset format {dataset!r}; choose one of {', '.join(DATASETS)}."
            + _did_you_mean(dataset, [d for d in DATASETS if not d.startswith("hf:")])
        )
    allowed = _COMMON_OPTIONS + _FORMAT_OPTIONS[kind]
    for key in options:
        if key not in allowed:
            raise DatasetError(
                f"unknown option {key!r} for dataset {dataset!r}; allowed: {', '.join(allowed)}."
                + _did_you_mean(key, allowed)
            )
    opts = {"on_empty": "error", "missing": "error", **options}
    for key in _COMMON_OPTIONS:
        if opts[key] not in ("error", "skip"):
            raise DatasetError(f"option {key}={opts[key]!r}: use 'error' or 'skip'.")
    if not isinstance(split, str) or not split:
        raise DatasetError(f"split must be a non-empty string such as 'train', got {split!r}.")
    data_dir, split = Path(data_dir).expanduser(), _norm_split(split)
    if kind == "hf":
        spec = dataset[3:]
        if not spec:
            raise DatasetError("dataset 'hf:' needs a hub id or a local path, e.g. 'hf:nlphuji/flickr30k'.")
        return _load_hf(spec, data_dir, split, opts)
    if not data_dir.is_dir():
        raise DatasetError(f"data_dir {data_dir} is not a folder; pass the folder that holds the {dataset} files "
                           f"(--data-dir). {_WHAT_TO_GET[kind]}")
    if kind == "imagefolder":
        return _load_imagefolder(data_dir, split, opts)
    return _load_karpathy_family(kind, data_dir, split, opts)
