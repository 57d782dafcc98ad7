"""Names that become paths, checked in one place; and the aligned-entry name, ``<encoder>@<run>``.

Every name the pipeline turns into a file or folder name (a split, a dataset, a cache entry, a run,
a study, a layer pair...) comes from data or configuration, so it passes :func:`safe_name` first: it
must be ONE path component (no ``/``, not ``.`` or ``..``, not hidden, no control character) and short enough that the suffixes the cache adds (``.zarr.partial-<request>``,
``.old-<pid>``, temporary names) stay within the 255-byte limit of common file systems. Anything
else is refused with :class:`UnsafeNameError` naming the value, where it came from and the rule,
so no name taken from data can make a path outside its folder.

A leaf module so that the cache layer (which cannot import ``pipeline.runs``, itself built on the
cache) reads names the same way as the run-folder contract; ``pipeline.runs`` re-exports the
aligned-name helpers and builds names with ``aligned_name`` (which also checks the run name).
"""

from __future__ import annotations

import unicodedata

from pipeline.errors import PipelineError

SEPARATOR = "@"  # aligned entry = <encoder>@<run>
MAX_NAME_BYTES = 200  # longest name (UTF-8 bytes) used as a file or folder name: the cache adds <= 30 bytes


class UnsafeNameError(PipelineError, ValueError):
    """A name from data or configuration that cannot be used as one file or folder name."""


def name_problem(name: str) -> str | None:
    """Why ``name`` is not one safe path component (None when it is)."""
    if not name:
        return "it is empty"
    if name in (".", ".."):
        return f"{name!r} names a folder itself, not a new one"
    if "/" in name:
        return "it contains a path separator '/', so it would reach into other folders"
    if name.startswith("."):
        return "it starts with '.' (hidden names are the cache's temporary files)"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "it contains a control character (a newline, tab or NUL)"
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        return f"it is {size} bytes long; at most {MAX_NAME_BYTES} fit in a file name with the cache's suffixes"
    return None


def safe_name(name: object, what: str, where: str = "") -> str:
    """``name`` when it can be used as ONE file or folder name (see the module docstring); else
    UnsafeNameError ``"<where>: <what> '<name>' cannot name a file or folder: <why>. ..."``.

    what: what the name is ("split name", "run name", "study.name", ...); where: the file and row
    (or option) it came from, to put the user onto it."""
    why = "it is not a string" if not isinstance(name, str) else name_problem(name)
    if why is None:
        return name
    shown = repr(name) if not isinstance(name, str) or len(name) <= 60 else repr(name[:57] + "...")
    raise UnsafeNameError(f"{where + ': ' if where else ''}{what} {shown} cannot name a file or folder: {why}. "
                          f"Use a short name of letters, digits, '-', '_' or '.' instead.")


def source_of(entry: str) -> tuple[str, str | None]:
    """``"resnet18@base"`` -> ("resnet18", "base"); a plain encoder entry -> (entry, None).
    Splits at the last ``@`` (run names never contain one)."""
    encoder, sep, run = entry.rpartition(SEPARATOR)
    return (encoder, run) if sep else (entry, None)


def is_aligned(entry: str) -> bool:
    """True for the aligned output of a run (``<encoder>@<run>``), False for an encoder's entry."""
    return source_of(entry)[1] is not None
