"""The project's one error base and the "did you mean" helper every lookup uses.

Every domain error derives from :class:`PipelineError`; the command-line tools print a
``PipelineError`` as one clean line (exit status 1) and let anything else raise with its
traceback, so a programming bug is never disguised as a user error. Subclasses keep a
built-in base (``ValueError``, ``KeyError``, ...) as a second parent where callers used to
catch that.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class PipelineError(Exception):
    """Base of every expected, user-facing error (bad input, stale cache, missing weights...)."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


def close_matches(name: object, choices: Iterable[object], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """Up to ``n`` entries of ``choices`` that look like ``name`` (difflib ratio >= cutoff)."""
    return difflib.get_close_matches(str(name), [str(c) for c in choices], n=n, cutoff=cutoff)


def did_you_mean(name: object, choices: Iterable[object], n: int = 3, cutoff: float = 0.6) -> str:
    """`` Did you mean: a, b?`` (leading space) for close matches of ``name``, else ``""``."""
    hits = close_matches(name, choices, n=n, cutoff=cutoff)
    return f" Did you mean: {', '.join(hits)}?" if hits else ""
