"""Translated captions for the Flickr30k and COCO formats (option ``translations``).

Each value names one captions file and the image list it is aligned with, as Multi30k ships them
(https://github.com/multi30k/dataset): ``"CAPTIONS=IMAGES"``, e.g.
``"multi30k/data/task1/raw/train.de.gz=multi30k/data/task1/image_splits/train.txt"``. Line n of the
captions file (plain or ``.gz``, UTF-8, one caption per line) describes the image named on line n
of the image list (``1000092795.jpg``: the id is the file name stem). Several captions of one image
(Multi30k task 2's ``train.1.de`` ... ``train.5.de`` against the same list) add up. The language
is the file's last suffix before ``.gz`` (``train.de.gz`` -> ``de``, ``val.2.fr`` -> ``fr``), or given
as ``"LANG:CAPTIONS=IMAGES"``. Paths are relative to ``data_dir``. A list (or a comma-separated
string) takes several files; images outside the split being loaded are ignored.
"""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

from pipeline.languages import LanguageError, normalize

from .loading import Record, read_text, stem
from .split import DatasetError, option_hint

OPTION = "translations"  # the format option naming translated-captions files


def _entries(value: Any) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    raise DatasetError(f"option {OPTION} must be a string or a list of strings 'CAPTIONS=IMAGES', got {value!r}.")


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"translated captions file {path} does not exist ({option_hint(OPTION)}); paths are "
                           "relative to data_dir.")
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(path.read_bytes())
        except (OSError, EOFError) as exc:
            raise DatasetError(f"{path} is not a readable gzip file ({exc}); re-download it.") from None
        try:
            return data.decode("utf-8-sig").splitlines()
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{path} is not UTF-8 text once unzipped (byte {exc.start}); re-save it as UTF-8.") from None
    return read_text(path).splitlines()


def _language(captions: str) -> tuple[str, str]:
    """(language, captions path) of ``[LANG:]CAPTIONS``."""
    lang, sep, rest = captions.partition(":")
    if sep and "/" not in lang and len(lang) <= 12:
        return normalize(lang, f"option {OPTION}"), rest
    name = Path(captions).name
    name = name[:-3] if name.endswith(".gz") else name
    try:
        return normalize(name.rsplit(".", 1)[-1], f"option {OPTION} ({captions})"), captions
    except LanguageError:
        raise LanguageError(f"option {OPTION}: cannot tell the language of {captions!r} from its name; write "
                            f"'LANG:{captions}' (e.g. 'de:{captions}').") from None


def read(value: Any, data_dir: Path) -> dict[str, dict[str, list[str]]]:
    """{image id: {language: [captions]}} from the option's files (see the module docstring)."""
    out: dict[str, dict[str, list[str]]] = {}
    for spec in _entries(value):
        captions, sep, images = spec.rpartition("=")
        if not sep or not captions or not images:
            raise DatasetError(f"option {OPTION}: {spec!r} must be 'CAPTIONS=IMAGES' (a captions file and the "
                               "image list it is aligned with, as Multi30k's train.de.gz and image_splits/train.txt).")
        lang, captions = _language(captions)
        cap_lines, img_lines = _lines(data_dir / captions), [l for l in _lines(data_dir / images) if l.strip()]
        while cap_lines and not cap_lines[-1].strip():
            cap_lines.pop()
        if len(cap_lines) != len(img_lines):
            raise DatasetError(f"{data_dir / captions} has {len(cap_lines)} lines but its image list {data_dir / images} "
                               f"names {len(img_lines)} images; they must be aligned line by line.")
        for cap, img in zip(cap_lines, img_lines):
            if cap.strip():
                out.setdefault(stem(img.strip()), {}).setdefault(lang, []).append(cap.strip())
    return out


def attach(records: list[Record], options: dict, data_dir: Path) -> None:
    """Add the translations the option names to the records of one split."""
    if OPTION not in options:
        return
    found = read(options[OPTION], data_dir)
    for r in records:
        for lang, caps in found.get(r.id, {}).items():
            r.translations.setdefault(lang, []).extend(caps)
