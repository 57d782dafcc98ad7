"""Joining cache entries by sample id: never by position.

Ids: an image row carries the image id (``1000092795``); a caption row carries
``<image id>#<k>`` (policy ``all``) or the image id itself (one caption per image).
``image_id`` maps either to the image id.

Rows present in one entry but not the other are an error naming the first missing ids,
unless the other entry recorded them as skipped (a documented, logged skip): then they are
dropped with a warning.

Before any id is compared, the entries must come from the same data (:func:`check_same_data`):
the same dataset, data folder, split, split fingerprint and image content digest, as their keys
record them (``Entry.data``; an aligned entry ``<encoder>@<run>`` carries its source's). Entries
whose keys say nothing about their data (written by hand) are joined by id alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pipeline.cache import Entry
from pipeline.errors import PipelineError
from pipeline.languages import check_one_language

log = logging.getLogger(__name__)


class JoinError(PipelineError, ValueError):
    """Entries whose ids do not join."""


def _describe(data: dict) -> str:
    return (f"{data.get('dataset')} split {data.get('split')!r} from {data.get('data_dir')} "
            f"(fingerprint {str(data.get('fingerprint'))[:12]}, content {str(data.get('content'))[:12]})")


def check_same_data(entries: Sequence[Entry]) -> None:
    """JoinError naming both entries and both data sources unless every entry that records its
    data records the same (dataset, data folder, split, fingerprint, content); LanguageError when
    text entries of different caption languages are joined (``pipeline.languages``)."""
    check_one_language(entries)
    known = [(e, e.data) for e in entries if e.data is not None]
    for e, data in known[1:]:
        first, ref = known[0]
        if data != ref:
            raise JoinError(
                f"Cache entries {first.name!r} ({first.path}) and {e.name!r} ({e.path}) were extracted from "
                f"different data: {_describe(ref)} vs {_describe(data)}. Joining them would pair rows of "
                f"different images or captions; re-extract both from the same data (extract --force).")


def image_id(row_id: str) -> str:
    """``"1000092795#3"`` -> ``"1000092795"``; an image id is returned unchanged."""
    return row_id.split("#", 1)[0]


def _skipped_images(entry: Entry) -> set[str]:
    return {image_id(s["id"]) for s in entry.skipped}


def _missing_error(what: str, missing: Sequence[str], entry: Entry, n_total: int) -> JoinError:
    shown = ", ".join(repr(m) for m in list(missing)[:5])
    return JoinError(
        f"{len(missing)} of {n_total} {what} are missing from cache entry {entry.name!r} "
        f"({entry.path}); first: {shown}. The entries were extracted from different data "
        f"(dataset, split or caption policy); re-extract them from the same dataset.")


@dataclass(frozen=True)
class Pairs:
    """Row indices that pair an image entry with a caption entry.

    image_rows: (n_images,) rows of the image entry, one per image kept.
    text_rows: (n_texts,) rows of the text entry, one per caption kept.
    text_to_image: (n_texts,) index into ``image_rows`` of each caption's image.
    """

    image_rows: np.ndarray
    text_rows: np.ndarray
    text_to_image: np.ndarray

    @property
    def first_caption(self) -> np.ndarray:
        """(n_images,) text_rows index of each image's first caption (one row per image)."""
        first = np.full(len(self.image_rows), -1, dtype=np.int64)
        for t in range(len(self.text_to_image) - 1, -1, -1):
            first[self.text_to_image[t]] = t
        return first


def join_pairs(image: Entry, text: Entry) -> Pairs:
    """Pair captions with images by id; see the module docstring for the skip rule."""
    check_same_data([image, text])
    img_index = {i: r for r, i in enumerate(image.ids)}
    text_images = [image_id(t) for t in text.ids]
    img_skipped = _skipped_images(image)
    missing = [t for t, i in zip(text.ids, text_images) if i not in img_index and i not in img_skipped]
    if missing:
        raise _missing_error("captions' images", missing, image, len(text.ids))
    has_caption = set(text_images)
    txt_skipped = _skipped_images(text)
    orphans = [i for i in image.ids if i not in has_caption and i not in txt_skipped]
    if orphans:
        raise _missing_error("images' captions", orphans, text, len(image.ids))
    kept_images = [r for r, i in enumerate(image.ids) if i in has_caption]
    dropped = len(image.ids) - len(kept_images)
    position = {image.ids[r]: p for p, r in enumerate(kept_images)}
    text_rows = [r for r, i in enumerate(text_images) if i in position]
    dropped_t = len(text.ids) - len(text_rows)
    if dropped or dropped_t:
        log.warning("join %s x %s: dropped %d images and %d captions recorded as skipped",
                    image.name, text.name, dropped, dropped_t)
    if not text_rows:
        raise JoinError(f"Entries {image.name!r} and {text.name!r} share no samples.")
    return Pairs(np.asarray(kept_images, dtype=np.int64), np.asarray(text_rows, dtype=np.int64),
                 np.asarray([position[text_images[r]] for r in text_rows], dtype=np.int64))


def join_rows(entries: Sequence[Entry]) -> tuple[list[str], list[np.ndarray]]:
    """One row per image across several entries (image or caption entries alike).

    Caption entries contribute the first caption row of each image (lowest row index).
    Returns the common image ids (order of the first entry) and, per entry, the row
    indices that line up with them. Mismatches follow the skip rule above.
    """
    if not entries:
        raise JoinError("join_rows needs at least one entry.")
    check_same_data(entries)
    firsts: list[dict[str, int]] = []
    for e in entries:
        first: dict[str, int] = {}
        for r, i in enumerate(e.ids):
            first.setdefault(image_id(i), r)
        firsts.append(first)
    skipped = set().union(*(_skipped_images(e) for e in entries))
    common = [i for i in firsts[0] if all(i in f for f in firsts)]
    for e, f in zip(entries, firsts):
        missing = [i for f2 in firsts for i in f2 if i not in f and i not in skipped]
        if missing:
            raise _missing_error("images", sorted(set(missing)), e, len(set().union(*firsts)))
    if len(common) < max(len(f) for f in firsts):
        log.warning("join: kept %d images present in every entry (others recorded as skipped)", len(common))
    if not common:
        raise JoinError(f"Entries {[e.name for e in entries]} share no samples.")
    return common, [np.asarray([f[i] for i in common], dtype=np.int64) for f in firsts]
