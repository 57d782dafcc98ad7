"""The aligned-entry name, ``<encoder>@<run>``, parsed in one place.

A leaf module so that the cache layer (which cannot import ``pipeline.runs``, itself built on the
cache) reads names the same way as the run-folder contract; ``pipeline.runs`` re-exports these
and builds names with ``aligned_name`` (which also checks the run name).
"""

from __future__ import annotations

SEPARATOR = "@"  # aligned entry = <encoder>@<run>


def source_of(entry: str) -> tuple[str, str | None]:
    """``"resnet18@base"`` -> ("resnet18", "base"); a plain encoder entry -> (entry, None).
    Splits at the last ``@`` (run names never contain one)."""
    encoder, sep, run = entry.rpartition(SEPARATOR)
    return (encoder, run) if sep else (entry, None)


def is_aligned(entry: str) -> bool:
    """True for the aligned output of a run (``<encoder>@<run>``), False for an encoder's entry."""
    return source_of(entry)[1] is not None
