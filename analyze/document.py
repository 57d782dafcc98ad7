"""The report's document model: headings, paragraphs, tables, figures and boxes, written as
Markdown (every user text escaped, ``analyze.markdown``) and as self-contained HTML (figures
embedded as base64 PNG at the width they were made for). Used by ``analyze report`` and
``study``."""

from __future__ import annotations

import html
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence
from urllib.parse import quote

from analyze import plots
from analyze.markdown import md_cell, md_text


PAGE_STYLE = (
    f"body{{font-family:sans-serif;max-width:{plots.PAGE_PX}px;margin:1.2em auto;padding:0 16px;line-height:1.45;"
    "color:#222}h1{font-size:1.55em;margin:.3em 0}h2{margin-top:1.6em}"
    ".answer{border:2px solid #4a7ab5;background:#f5f8fc;padding:4px 14px 8px;margin:.8em -16px}"
    ".answer::after{content:'';display:block;clear:both}.side{float:right;margin:0 0 8px 20px}"
    ".answer h2{margin-top:.4em}.lead{font-size:1.12em;font-weight:bold}.note{font-size:90%;color:#555}"
    ".scroll{overflow-x:auto;max-width:100%}table{border-collapse:collapse;margin:.6em 0;font-size:14px}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}"
    "th{background:#f3f3f3;white-space:normal;min-width:4em}th[title]{cursor:help;text-decoration:underline dotted}"
    "td:first-child,th:first-child{text-align:left}figure{margin:.8em 0}figcaption{font-size:90%;color:#555}")


@dataclass
class Document:
    """A report as a list of blocks, rendered to Markdown and to self-contained HTML.

    HTML: the page is ``plots.PAGE_PX`` wide; tables scroll sideways inside their own box
    (never the page) and keep each cell on one line; a column given a raw key shows it as a
    tooltip (Markdown: a legend under the table); each figure is shown at its natural width,
    or the page width when wider (``display_width``)."""

    title: str
    folder: Path
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("h", level, text))

    def para(self, text: str, style: str = "") -> None:
        """A paragraph; style "lead" (bold, larger) or "note" (small print)."""
        self.blocks.append(("p", text, style))

    def table(self, columns: Sequence[str], rows: Sequence[Sequence], keys: Sequence[str] | None = None) -> None:
        """``keys``: the raw key of each column (shown as a tooltip / legend when it differs)."""
        keys = list(keys) if keys is not None else list(columns)
        self.blocks.append(("table", list(columns), [list(r) for r in rows], keys))

    def raw(self, markdown: str, html_text: str) -> None:
        """A block given ready-made in both formats (e.g. the gallery with embedded thumbnails)."""
        self.blocks.append(("raw", markdown, html_text))

    def box(self, title: str | None = None) -> None:
        """Open the answer box (closed by ``end_box``); HTML draws a frame, Markdown a heading."""
        self.blocks.append(("box", title))

    def end_box(self) -> None:
        self.blocks.append(("endbox",))

    def figure(self, path: str | Path, caption: str, name: str | None = None, side: bool = False) -> None:
        """Copy the PNG next to the report (as ``name``) and show it; ``side``: in the HTML, at the
        right of the text of the answer box it is in (Markdown keeps the order of the blocks)."""
        src = Path(path)
        dest = self.folder / (name or src.name)
        if src.resolve() != dest.resolve():
            shutil.copyfile(src, dest)
        self.blocks.append(("fig", dest, caption, side))

    def markdown(self) -> str:
        """The document as Markdown; every text is escaped (``analyze.markdown``), raw blocks
        come escaped by their maker."""
        out = [f"# {md_text(self.title)}", ""]
        for b in self.blocks:
            if b[0] == "h":
                out += ["#" * b[1] + " " + md_text(b[2]), ""]
            elif b[0] == "p":
                text = md_text(b[1])
                out += [f"**{text}**" if b[2] == "lead" else f"*{text}*" if b[2] == "note" else text, ""]
            elif b[0] == "table":
                cell = lambda v: md_cell(_cell(v))  # noqa: E731
                out += ["| " + " | ".join(map(cell, b[1])) + " |", "|" + "---|" * len(b[1])]
                out += ["| " + " | ".join(map(cell, r)) + " |" for r in b[2]] + [""]
                legend = [f"{c} = `{k}`" for c, k in zip(b[1], b[3]) if str(c) != str(k)]
                if legend:
                    out += ["Columns: " + "; ".join(legend) + ".", ""]
            elif b[0] == "fig":
                out += [f"![{md_text(b[2])}]({quote(b[1].name)})", "", f"*{md_text(b[2])}*", ""]
            elif b[0] == "raw":
                out += [b[1], ""]
            elif b[0] == "box" and b[1]:
                out += [f"## {b[1]}", ""]
        return "\n".join(out)

    def _html_order(self) -> list[tuple]:
        """The blocks with each side figure moved to the top of its box (it floats right of the text)."""
        out, box = [], None
        for b in self.blocks:
            if b[0] == "box":
                box = len(out) + 1
            elif b[0] == "endbox":
                box = None
            if b[0] == "fig" and b[3] and box is not None:
                out.insert(box, b)
                box += 1
            else:
                out.append(b)
        return out

    def html(self) -> str:
        e = html.escape
        body = [f"<h1>{e(self.title)}</h1>"]
        for b in self._html_order():
            if b[0] == "h":
                body.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                body.append(f'<p class="{b[2]}">{e(b[1])}</p>' if b[2] else f"<p>{e(b[1])}</p>")
            elif b[0] == "table":
                head = "".join(f'<th title="{e(str(k))}">{e(_cell(c))}</th>' if str(k) != str(c) else
                               f"<th>{e(_cell(c))}</th>" for c, k in zip(b[1], b[3]))
                rows = "".join("<tr>" + "".join(f"<td>{e(_cell(v))}</td>" for v in r) + "</tr>" for r in b[2])
                body.append(f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody>'
                            "</table></div>")
            elif b[0] == "raw":
                body.append(b[2])
            elif b[0] == "fig":
                width = display_width(b[1])
                side = f' class="side" style="width:{width}px"' if b[3] else ""
                body.append(f'<figure{side}><img src="{plots.png_base64(b[1])}" width="{width}" '
                            f'alt="{e(b[2])}"><figcaption>{e(b[2])}</figcaption></figure>')
            elif b[0] == "box":
                body.append('<section class="answer">' + (f"<h2>{e(b[1])}</h2>" if b[1] else ""))
            elif b[0] == "endbox":
                body.append("</section>")
        return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
                f"<meta name=\"viewport\" content=\"width=device-width\"><title>{e(self.title)}</title>"
                f"<style>{PAGE_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def display_width(png: Path) -> int:
    """CSS width a figure is shown at: its natural width, or the page width when wider (figures
    are made for the page, ``plots.MAX_INCHES``, so this shrinks them by well under 2x)."""
    return min(plots.png_size(png)[0], plots.PAGE_PX)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.3f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"  # counts with thousands separators
    return str(v)


def _fmt(v) -> str:
    return _cell(float(v)) if isinstance(v, (int, float)) else _cell(v)
