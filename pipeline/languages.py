"""Caption languages: one home for the rules every stage shares (docs/languages.md).

- Codes are normalised once (:func:`normalize`): ``pt_BR``, ``pt-br`` and ``PT-BR`` are all
  ``pt-br``; ``de.utf8`` (Tux Paint) is ``de``; ``sr@latin`` is ``sr-latin``.
- Data carries a language as a column ``caption_<lang>`` beside ``caption`` (which holds
  ``data.default_language``, "en" unless the config says otherwise). :func:`column_language`
  reads the code out of a column name.
- A text entry of the default language keeps the name and key it always had (old caches stay
  valid); another language's entry is named ``<encoder>.lang-<code>`` (:func:`entry_name`) and
  its key records ``language``. :func:`base_entry` gives the encoder's entry name back.
- Text entries of two languages are never joined (:func:`check_one_language`), as two caption
  policies are not.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

from pipeline.errors import PipelineError, did_you_mean

CAPTION_PREFIX = "caption_"  # a metadata column caption_<lang> holds that language's captions
ENTRY_MARK = ".lang-"  # <encoder>.lang-<code>: the text entry of a non-default language
_CODE = re.compile(r"^[a-z]{2,3}(-[a-z0-9]{2,8})*$")  # BCP-47-like: de, pt-br, zh-tw, ca-valencia


class LanguageError(PipelineError, ValueError):
    """A language code, column or request that does not fit the data (the message lists what does)."""


def normalize(code: object, where: str = "") -> str:
    """``"pt_BR"`` -> ``"pt-br"``; ``"de.utf8"`` -> ``"de"``; LanguageError for a code that is not
    a language code (2-3 letters, optional ``-region`` parts)."""
    text = str(code).strip().lower() if isinstance(code, str) else ""
    for suffix in (".utf8", ".utf-8"):
        text = text[: -len(suffix)] if text.endswith(suffix) else text
    text = text.replace("_", "-").replace("@", "-")
    if not _CODE.match(text):
        raise LanguageError(f"{where + ': ' if where else ''}{code!r} is not a language code; use an ISO 639 code "
                            f"such as en, de, pt-br or zh-tw (underscores and case are normalised).")
    return text


def column_language(column: str) -> str | None:
    """The language of a metadata column ``caption_<lang>`` (normalised), None for other columns."""
    if not isinstance(column, str) or not column.startswith(CAPTION_PREFIX) or column == CAPTION_PREFIX:
        return None
    try:
        return normalize(column[len(CAPTION_PREFIX):])
    except LanguageError:
        return None


def entry_name(encoder: str, language: str, default: str) -> str:
    """The cache entry name of ``encoder``'s captions in ``language``: the encoder name for the
    default language, ``<encoder>.lang-<code>`` for another."""
    language, default = normalize(language, "data.language"), normalize(default, "data.default_language")
    return encoder if language == default else f"{encoder}{ENTRY_MARK}{language}"


def base_entry(name: str) -> str:
    """``"minilm.lang-de"`` -> ``"minilm"``; other names unchanged."""
    return name.split(ENTRY_MARK, 1)[0] if ENTRY_MARK in name else name


def key_language(key: Mapping) -> str | None:
    """The language a text entry's key records (None: the dataset's default language)."""
    while isinstance(key, Mapping) and "language" not in key and isinstance(key.get("source"), Mapping):
        key = key["source"]
    return key.get("language") if isinstance(key, Mapping) else None


def _modality(key: Mapping) -> str | None:
    while isinstance(key, Mapping) and "encoder" not in key and isinstance(key.get("source"), Mapping):
        key = key["source"]
    enc = key.get("encoder") if isinstance(key, Mapping) else None
    return enc.get("modality") if isinstance(enc, Mapping) else None


def coverage_text(coverage: Mapping[str, tuple[int, int]]) -> str:
    """``{"de": (50, 100)}`` -> ``"de 50/100 (50%)"``, most covered first."""
    items = sorted(coverage.items(), key=lambda kv: (-kv[1][0], kv[0]))
    return ", ".join(f"{lang} {n}/{total} ({100 * n / max(total, 1):.0f}%)" for lang, (n, total) in items)


def absent_error(language: str, coverage: Mapping[str, tuple[int, int]], where: str) -> LanguageError:
    """The error for a language no row of the data has: every language present, with its coverage."""
    return LanguageError(
        f"{where} has no captions in language {language!r}; languages present (images with a caption): "
        f"{coverage_text(coverage) or 'none'}. Pick one with --set data.language=CODE, or add caption_{language} "
        f"columns to the metadata." + did_you_mean(language, coverage))


def check_one_language(entries: Iterable) -> None:
    """LanguageError when text entries (objects with ``name`` and ``key``) record different
    languages: their rows are captions in different languages and must not be paired as one set."""
    seen: dict[str | None, str] = {}
    for e in entries:
        if _modality(e.key) != "image":
            seen.setdefault(key_language(e.key), e.name)
    if len(seen) > 1:
        shown = ", ".join(f"{name!r} ({lang or 'default language'})" for lang, name in seen.items())
        raise LanguageError(f"text entries of different languages cannot be joined: {shown}. Use the entries of one "
                            f"language (--set data.language=CODE names it).")
