"""Image–caption datasets with stable sample ids: one registry of formats, one entry point.

:func:`load_split` reads one split of a dataset into a :class:`Split` (``split.py``): a list of
:class:`Item` (image id, image location, captions) sorted by id, an image decoder
(:meth:`Split.load_image`), caption rows under a caption policy (:meth:`Split.caption_rows`) and a
fingerprint. :func:`available_splits` lists a dataset's split names.

Each format is one module exposing one :class:`Format` (name, options, what to download,
``load``, ``splits``), gathered in :data:`FORMATS`; adding a format is one module and one line here:

``flickr30k``      Karpathy ``dataset_flickr30k.json`` or ``results_20130124.token`` + split lists
``coco``           Karpathy ``dataset_coco.json`` + COCO 2014 images; option ``restval="train"``
``imagefolder``    ``metadata.jsonl`` / ``metadata.csv`` in split folders (the HF imagefolder layout)
``hf:<id|path>``   a Hugging Face dataset (``save_to_disk`` folder or hub id)

The module docstring of each format says what it expects under ``data_dir``.

Options common to every format (config keys ``data.on_empty`` / ``data.missing``):

``on_empty`` (``"error"`` | ``"skip"``, default ``"error"``)
    With ``"error"``, an empty or whitespace-only caption makes :meth:`Split.caption_rows` raise
    :class:`DatasetError` naming the caption id. With ``"skip"`` such captions are dropped at load
    time (the others keep their original index k), and an image left without captions is removed
    from ``items`` and recorded in ``Split.skipped``.
``missing`` (``"error"`` | ``"skip"``, default ``"error"``)
    Every image file is checked for existence at load time (cheap: one stat per file).
    ``"error"`` raises :class:`DatasetError` listing the first missing files; ``"skip"`` removes
    those images from ``items`` and records them in ``Split.skipped``. Corrupt or truncated files
    are only found when decoded: :meth:`Split.load_image` raises :class:`ImageError`.

A format's own options come from the config table ``data.options`` (``--set data.options.KEY=VALUE``).

Split names: ``"validation"`` and ``"valid"`` are read as ``"val"`` (``Split.name`` is then ``"val"``).
Image ids may not contain ``#`` (caption ids are ``<image id>#<k>``): such a file is refused at load.

Content: :func:`content_hashes` (``content.py``) gives one digest of each item's image bytes, kept
between runs in a side file; extract puts their digest in every cache key, so changed images make
the entries stale.

Ordering: ``Split.items`` is sorted by image id (plain string order), whatever the file order,
so it is stable across runs, machines and formats. Captions keep file order (k).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import CHOICES
from pipeline.errors import close_matches, did_you_mean

from . import coco, flickr30k, hf, imagefolder
from .content import SIDE_FILE, content_digest, content_hashes, duplicate_groups
from .loading import IMAGE_EXTENSIONS, Format, Source, norm_split, ordered_splits, split_name
from .split import (
    CAPTION_ID_SEPARATOR, CAPTION_POLICIES, COMMON_OPTIONS, HF_ROW_PREFIX, CaptionRow, DatasetError, ImageError, Item,
    Split, option_hint, pad_square, to_rgb,
)

__all__ = [
    "CAPTION_ID_SEPARATOR", "CAPTION_POLICIES", "COMMON_OPTIONS", "DATASETS", "FORMATS", "HF_ROW_PREFIX",
    "IMAGE_EXTENSIONS", "SIDE_FILE", "CaptionRow", "DatasetError", "Format", "ImageError", "Item", "Split", "Source",
    "available_splits", "config_options", "content_digest", "content_hashes", "duplicate_groups", "load_split",
    "option_hint",
    "pad_square", "requested_splits", "to_rgb",
]

FORMATS: dict[str, Format] = {f.name: f for f in (flickr30k.FORMAT, coco.FORMAT, imagefolder.FORMAT, hf.FORMAT)}
DATASETS = tuple(f.usage for f in FORMATS.values())  # how each format is named: "flickr30k", "hf:<hub id ...>"
OPTION_CHOICES = CHOICES["data.on_empty"]  # values of on_empty and missing (the same two)


def _format_of(dataset: Any) -> Format:
    if not isinstance(dataset, str):
        raise DatasetError(f"dataset must be a string, got {dataset!r}.")
    fmt = FORMATS.get(dataset.partition(":")[0])
    if fmt is None or (":" in dataset and not fmt.argument):
        raise DatasetError(f"unknown dataset format {dataset!r}; choose one of {', '.join(DATASETS)}."
                           + did_you_mean(dataset, FORMATS))
    if fmt.argument and not dataset.partition(":")[2]:
        raise DatasetError(f"dataset {dataset!r} needs {fmt.argument} after '{fmt.name}:', "
                           f"e.g. '{fmt.name}:nlphuji/flickr30k'.")
    return fmt


def _source(dataset: Any, data_dir: str | Path, options: dict[str, Any]) -> tuple[Format, Source]:
    """The format and the checked source of a request (unknown names and options are errors)."""
    fmt = _format_of(dataset)
    allowed = COMMON_OPTIONS + fmt.options
    for key in options:
        if key not in allowed:
            close = close_matches(key, allowed, n=1)
            raise DatasetError(
                f"unknown option {key!r} for dataset {dataset!r}; allowed: {', '.join(COMMON_OPTIONS)} "
                f"({option_hint(COMMON_OPTIONS[0])}) and {', '.join(fmt.options)} ({option_hint(fmt.options[0])})."
                + (f" Did you mean: {', '.join(option_hint(c) for c in close)}?" if close else "")
            )
    opts = {"on_empty": "error", "missing": "error", **options}
    for key in COMMON_OPTIONS:
        if opts[key] not in OPTION_CHOICES:
            raise DatasetError(f"option {key}={opts[key]!r}: use {option_hint(key, 'error')} or {option_hint(key, 'skip')}.")
    data_dir = Path(data_dir).expanduser()
    if fmt.needs_folder and not data_dir.is_dir():
        raise DatasetError(f"data_dir {data_dir} is not a folder; name the folder that holds the {dataset} files "
                           f"with --set data.data_dir=DIR (extract also takes --data-dir DIR). {fmt.what_to_get}")
    return fmt, Source(dataset, data_dir, opts, allowed)


def load_split(dataset: str, data_dir: str | Path, split: str, **options: Any) -> Split:
    """Read one split of an image–caption dataset.

    dataset: a :data:`FORMATS` name: "flickr30k" | "coco" | "imagefolder" | "hf:<hub id or local path>".
    data_dir: the dataset folder (for hf: where a relative local path is also looked up).
    split: split name, e.g. "train", "val", "test" (COCO also "restval"); "validation" reads as "val".
    options: on_empty ("error"|"skip"), missing ("error"|"skip"); flickr30k: image_dir; coco: image_dir,
      restval ("split"|"train"); imagefolder: caption_column; hf: image_column, caption_column, split_column,
      id_column. See the format modules. Unknown options raise DatasetError.
    """
    fmt, source = _source(dataset, data_dir, options)
    if not isinstance(split, str) or not split:
        raise DatasetError(f"split must be a non-empty string such as 'train', got {split!r}.")
    return fmt.load(source, split_name(split, "the split asked for"))


def available_splits(dataset: str, data_dir: str | Path, **options: Any) -> list[str]:
    """The split names a dataset holds, usual ones first (train, restval, val, test, then others sorted).

    Same arguments as :func:`load_split` (without split); reads only the caption/metadata files
    (for hf: the split column or the DatasetDict member names).
    """
    fmt, source = _source(dataset, data_dir, options)
    return ordered_splits(fmt.splits(source))


def requested_splits(dataset: str, data_dir: str | Path, split: str, **options: Any) -> list[str]:
    """The splits a run over ``split`` covers: every split the dataset holds for "all", else ``split``
    (normalised) after checking that the dataset holds it; the error lists the ones it does hold."""
    available = available_splits(dataset, data_dir, **options)
    if split == "all":
        return available
    name = split_name(split, "the split asked for (--split)")
    if name not in available:
        raise DatasetError(f"split {split!r} is not a split of {dataset} in {data_dir}; it holds: "
                           f"{', '.join(available)} (or use all)." + did_you_mean(split, available))
    return [name]


def config_options(data: Any) -> dict[str, Any]:
    """load_split options from the [data] config section: on_empty, missing and the table data.options."""
    for key in COMMON_OPTIONS:
        if key in data.options:
            raise DatasetError(f"data.options.{key} is not a format option; set it as {option_hint(key, 'skip')}.")
    return {"on_empty": data.on_empty, "missing": data.missing, **dict(data.options)}
