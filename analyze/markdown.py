"""Text put into generated Markdown (report.md, study.md, the retrieval gallery), escaped in one place.

Captions, file names and ids, labels, axis values, run and entry names come from data or
configuration; rendered as CommonMark (GitHub, most viewers), a ``<script>`` in any of them would
be live HTML. :func:`md_text` makes a string inert while keeping the Markdown it is part of (the
report's own code spans and emphasis) and staying readable in a terminal:

* ``&`` and ``<`` become ``&amp;`` and ``&lt;``: no raw HTML, autolink or entity can form
  (``>`` alone starts nothing inline and stays as it is);
* ``\\``, ``[`` and ``]`` are backslash-escaped: no link or image is made of user text, and a
  trailing backslash cannot escape the bracket that follows it;
* line breaks become spaces: a value never starts a block of its own (a heading, a list, a
  fence) or breaks a table row.

:func:`md_cell` adds ``|`` for table cells. Every Markdown writer uses these two
(``analyze.report.Document`` for report.md and study.md, ``analyze.gallery``).
"""

from __future__ import annotations

import re

_LINE_BREAK = re.compile(r"[\r\n\u2028\u2029]+")
_SPECIAL = {"&": "&amp;", "<": "&lt;", "\\": "\\\\", "[": "\\[", "]": "\\]"}
_SPECIAL_RE = re.compile("[" + re.escape("".join(_SPECIAL)) + "]")


def md_text(text: object) -> str:
    """``text`` (any object, as ``str``) safe to put into Markdown prose, a heading or alt text."""
    return _SPECIAL_RE.sub(lambda m: _SPECIAL[m.group(0)], _LINE_BREAK.sub(" ", str(text)))


def md_cell(text: object) -> str:
    """:func:`md_text` for a table cell (``|`` escaped too)."""
    return md_text(text).replace("|", "\\|")
