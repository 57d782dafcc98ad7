"""The one rule every figure writer follows: user text is drawn literally.

Titles, axis and tick labels and legends hold text from data and configuration (entry, run and
class names, axis values, captions). matplotlib parses ``$...$`` in any text as mathtext, so
``$\\undefinedmacro$`` in a class name would crash a command and ``cat $5 and $`` would render as
math. Every function that draws a figure is decorated with :func:`literal_text`, which draws it
(creation and saving) under ``text.parse_math = False``; no figure of this project uses mathtext.
(``tests/test_hostile_text.py`` checks that every function creating a figure carries it.)

matplotlib is imported on first use, so importing this module costs nothing.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

LITERAL_TEXT = {"text.parse_math": False}  # matplotlib rc settings every figure is drawn with
F = TypeVar("F", bound=Callable)


def literal_text(draw: F) -> F:
    """Decorator for a function that draws a figure: it runs under :data:`LITERAL_TEXT`."""
    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        import matplotlib  # noqa: PLC0415  (on first use: fit-adapters imports this module eagerly)

        with matplotlib.rc_context(LITERAL_TEXT):
            return draw(*args, **kwargs)
    return wrapper  # type: ignore[return-value]
