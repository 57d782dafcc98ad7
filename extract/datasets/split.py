"""What every dataset format produces: a :class:`Split` of :class:`Item` s, with its image decoder,
caption rows under a caption policy, and fingerprint; the errors; image conversion to RGB.

Nothing here knows a file format: the format modules (flickr30k, coco, imagefolder, hf) build
Splits, and every later stage only sees this module's types.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image, ImageFile, ImageOps

from pipeline.config import CHOICES
from pipeline.errors import PipelineError, did_you_mean
from pipeline.languages import absent_error, normalize

log = logging.getLogger(__name__)

CAPTION_POLICIES = CHOICES["data.captions"]  # caption-row policies of Split.caption_rows
CAPTION_ID_SEPARATOR = "#"  # caption ids are "<image id>#<k>", so image ids may not contain it
HF_ROW_PREFIX = "hf-row:"  # Item.image for hf datasets: "hf-row:<row index>"
MAX_LISTED = 5  # how many offending ids / files / lines an error message names
COMMON_OPTIONS = ("on_empty", "missing")  # load options of every format; the config keys data.<option>
_warned_truncated = False  # LOAD_TRUNCATED_IMAGES warning given once per process


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


def option_hint(option: str, value: str = "...") -> str:
    """How a user sets a load option: ``--set data.on_empty=skip`` for the options of every format
    (keys of the [data] config section), ``--set data.options.caption_column=...`` for a format's own."""
    key = option if option in COMMON_OPTIONS else f"options.{option}"
    return f"--set data.{key}={value}"


def listed(values: Iterable[Any], n: int = MAX_LISTED) -> str:
    """The first n values joined by ', ', with the total when there are more."""
    values = list(values)
    shown = ", ".join(map(str, values[:n]))
    return shown + (f", ... ({len(values)} in all)" if len(values) > n else "")


@dataclass(frozen=True)
class Item:
    """One image of a split.

    id: stable image id (Flickr30k/COCO: file name stem; imagefolder: file_name without extension).
    image: absolute path of the image file, or ``"hf-row:<row>"`` for hf datasets.
    captions: the image's captions (the default language), stripped, in file order.
    translations: ((language code, captions), ...) of the other languages the image has
      (``caption_<lang>`` columns, a translated-captions file); not in the fingerprint.
    """

    id: str
    image: str
    captions: tuple[str, ...]
    translations: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class CaptionRow:
    """One text sample. id is ``"<image id>#<k>"`` under policy "all", the image id otherwise."""

    id: str
    image_id: str
    k: int  # which caption of the image (0-based, as in the source file)
    text: str


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
        self.language: str | None = None  # set by in_language: the language of the captions (None = default)
        self.language_fingerprint: str | None = None  # in_language: digest of the translated captions
        self._caption_ks = dict(caption_ks or {})  # only for items whose ks are not 0..n-1
        self._hf_images = hf_images  # datasets.Dataset with one image column, arrow format
        if rel_images is None:
            rel_images = [self._relative(it.image) for it in self.items]
        self._rel = {it.id: rel for it, rel in zip(self.items, rel_images)}  # id -> image name for fingerprint
        dups = [i for i, c in Counter(it.id for it in self.items).items() if c > 1]
        if dups:
            raise DatasetError(f"duplicate image ids in {source}: {listed(sorted(dups))}; each image may appear once.")

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

    def language_coverage(self, default: str = "en") -> dict[str, tuple[int, int]]:
        """{language: (images with a caption in it, images)}; the plain captions count as ``default``."""
        default, n = normalize(default, "data.default_language"), len(self.items)
        counts = Counter(lang for it in self.items for lang, caps in it.translations if caps and lang != default)
        return {default: (sum(1 for it in self.items if it.captions), n), **{k: (v, n) for k, v in counts.items()}}

    def in_language(self, language: str, default: str = "en") -> "Split":
        """The split as a text entry in ``language`` sees it: ``self`` for the default language;
        else the images that have captions in it, with those captions, and the others recorded in
        ``skipped`` ("no caption in <language>"), so joins with the image entries drop them with
        a warning. Its ``fingerprint()`` stays this split's (the same images and data);
        ``language_fingerprint`` covers the translated captions. LanguageError naming the
        languages present and their coverage when no image has ``language``."""
        language, default = normalize(language, "data.language"), normalize(default, "data.default_language")
        if language == default or language == self.language:
            return self
        items, missing = [], []
        for it in self.items:
            caps = next((c for lang, c in it.translations if lang == language), ())
            if caps:
                items.append(Item(it.id, it.image, tuple(caps)))
            else:
                missing.append((it.id, f"no caption in language {language!r}"))
        if not items:
            raise absent_error(language, self.language_coverage(default), f"{self.dataset} split {self.name!r}")
        out = Split(self.dataset, self.name, items, self.source, image_root=self.image_root,
                    rel_images=[self._rel.get(it.id) or self._relative(it.image) for it in items],
                    skipped=self.skipped + missing, hf_images=self._hf_images)
        out.language, out.language_fingerprint = language, out._compute_fingerprint()
        out._fingerprint = self.fingerprint()
        return out

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
        value = self.hf_image_value(row)
        if isinstance(value, dict) and value.get("bytes"):
            data = value["bytes"]
            return _decode(lambda: Image.open(io.BytesIO(data)), item.id, where)
        path = value.get("path") if isinstance(value, dict) else value
        if isinstance(path, str) and path:
            return _decode(lambda: Image.open(path), item.id, f"{where} ({path})")
        raise ImageError(item.id, where, "the row holds no image (neither bytes nor a path)")

    def image_bytes(self, i: int) -> bytes | None:
        """The encoded bytes of item i as stored (the file, or an hf row's bytes or file), undecoded;
        None when they cannot be read (missing file, empty row...): :meth:`load_image` then raises
        the ImageError that names the problem. For decoders outside PIL (``extract.gpu_decode``)."""
        item = self.items[i]
        path = item.image
        try:
            if self._hf_images is not None:
                value = self.hf_image_value(int(item.image[len(HF_ROW_PREFIX):]))
                if isinstance(value, dict) and value.get("bytes"):
                    return bytes(value["bytes"])
                path = value.get("path") if isinstance(value, dict) else value
                if not isinstance(path, str) or not path:
                    return None
            return Path(path).read_bytes()
        except (OSError, ValueError):
            return None

    def hf_image_value(self, row: int) -> Any:
        """The raw image cell of row ``row`` of an hf dataset: {"bytes", "path"} or a path string."""
        return self._hf_images[row].column(0)[0].as_py()

    def hf_identity(self) -> str | None:
        """For an hf dataset read from Arrow files: sha256 of the image column's name and the files'
        (resolved path, size, mtime_ns), which changes whenever those files do; else None."""
        files = [f.get("filename") for f in getattr(self._hf_images, "cache_files", None) or []]
        if not files or not all(files):
            return None
        stamps = []
        for f in files:
            st = os.stat(f)
            stamps.append([os.path.realpath(f), st.st_size, st.st_mtime_ns])
        blob = json.dumps([self._hf_images.column_names, stamps], sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

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
                + did_you_mean(policy, CAPTION_POLICIES)
            )
        rows: list[CaptionRow] = []
        for it in self.items:
            ks = self._caption_ks.get(it.id) or tuple(range(len(it.captions)))
            if not it.captions:
                raise DatasetError(f"image {it.id!r} has no caption ({self.source}); add one, or leave it out "
                                   f"with {option_hint('on_empty', 'skip')}.")
            for k, text in zip(ks, it.captions):
                if not text.strip():
                    raise DatasetError(
                        f"caption {it.id}{CAPTION_ID_SEPARATOR}{k} is empty or whitespace-only ({self.source}); "
                        f"fix it, or drop empty captions with {option_hint('on_empty', 'skip')}."
                    )
            if policy == "all":
                rows.extend(CaptionRow(f"{it.id}{CAPTION_ID_SEPARATOR}{k}", it.id, k, t) for k, t in zip(ks, it.captions))
            else:
                j = 0 if policy == "first" else max(range(len(it.captions)), key=lambda j: (len(it.captions[j]), -j))
                rows.append(CaptionRow(it.id, it.id, ks[j], it.captions[j]))
        return rows

    def fingerprint(self) -> str:
        """sha256 hex of canonical JSON of (dataset, split, [(id, relative image name, captions)...]).

        Independent of absolute paths, mtimes and the machine. Computed once per Split (items
        do not change after loading); every entry extracted from the split asks for it. Caches
        compare it, so its definition must not change (tests/compare_fingerprints.py checks).
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
