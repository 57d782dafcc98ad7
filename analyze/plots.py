"""Shared matplotlib helpers for the analyze figures (Agg backend: no display needed).

Every function draws one figure, saves it as a PNG at ``path`` (parent folders created) and
returns the path; figures are closed after saving so long runs do not accumulate memory.
Titles are wrapped to the width of what they label (``_wrap``) and figures are saved with a
tight bounding box, so long entry and run names are never cut off. Figures are made for the
width they are shown at: a report page is ``PAGE_PX`` wide, so a figure is at most
``MAX_INCHES`` wide (panels wrap onto further rows instead of growing sideways) and the forest
plot of the Platonic deltas is drawn at exactly the width it is shown.
"""

from __future__ import annotations

import base64
import textwrap
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

from pipeline.plotting import literal_text  # noqa: E402

DPI = 110  # resolution of saved figures, dots per inch
CELL_INCHES = 0.55  # side of one heatmap cell, inches (figures grow with the number of entries)
ANNOTATE_MAX = 16  # heatmaps with at most this many rows and columns print the value in each cell
CHAR_WIDTH = 0.6  # average width of a character in units of the font size (DejaVu Sans), for wrapping
LONG_LABEL = 8  # tick labels longer than this many characters are rotated
PAGE_PX = 1240  # width of a report page's content (analyze.report.Document), CSS pixels
MAX_INCHES = PAGE_PX / DPI  # widest figure: shown at the page width without shrinking more than 2x
VERDICT_COLORS = {"supported": "#1a9641", "not supported": "#d7191c", "inconclusive": "#4d4d4d"}
POINT_STYLES = (("D", "#6baed6"), ("s", "#969696"), ("^", "#fd8d3c"), ("v", "#74c476"), ("P", "#9e9ac8"),
                ("X", "#e377c2"), ("h", "#8c564b"), ("*", "#bcbd22"), ("p", "#17becf"))  # marker, colour of the n-th series


def _wrap(text: str, inches: float, fontsize: float) -> str:
    """``text`` broken into lines that fit ``inches`` at ``fontsize`` points (72 points per inch)."""
    chars = max(12, int(inches * 72 / (fontsize * CHAR_WIDTH)))
    return "\n".join(textwrap.fill(line, chars) for line in str(text).split("\n"))


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.1)  # grows to hold every label
    plt.close(fig)
    return path


@literal_text
def heatmap(matrix: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], title: str,
            path: str | Path, *, xlabel: str = "", ylabel: str = "", vmin: float | None = None,
            vmax: float | None = None, mark: Sequence[tuple[int, int, str]] = ()) -> Path:
    """A labelled heatmap of ``matrix`` (r, c); NaN cells are left blank. Small matrices get the
    value printed in each cell. ``mark``: (row, col, label) cells outlined and named in a legend
    (e.g. the best and the last layer pair)."""
    matrix = np.asarray(matrix, dtype=float)
    r, c = matrix.shape
    char = 10 * CHAR_WIDTH / 72  # inches per tick-label character (10 pt)
    longest_col = max((len(str(s)) for s in col_labels), default=0)
    tilt = c > 3 or longest_col > LONG_LABEL
    left = 0.5 + char * max((len(str(s)) for s in row_labels), default=0)  # room for the row labels
    width = max(4.5, left + max(2.5, CELL_INCHES * c) + 1.2)  # + the colour bar
    title = _wrap(title, width - left, 12)  # centred over the cells, right of the row labels
    bottom = 0.6 + char * longest_col * (0.75 if tilt else 0.0)  # room for the (rotated) column labels
    height = bottom + max(2.5, CELL_INCHES * r) + 0.25 * (title.count("\n") + 1) + 0.3
    fig, ax = plt.subplots(figsize=(width, height))
    im = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(c), [str(s) for s in col_labels], rotation=45 if tilt else 0, ha="right" if tilt else "center")
    ax.set_yticks(range(r), [str(s) for s in row_labels])
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title, fontsize=12)
    if r <= ANNOTATE_MAX and c <= ANNOTATE_MAX:
        lo, hi = np.nanmin(matrix) if np.isfinite(matrix).any() else 0, np.nanmax(matrix) if np.isfinite(matrix).any() else 1
        mid = (lo + hi) / 2
        for i in range(r):
            for j in range(c):
                if np.isfinite(matrix[i, j]):
                    ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8,
                            color="black" if matrix[i, j] > mid else "white")
    for (i, j, label), color in zip(mark, ("red", "orange", "cyan", "magenta")):
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor=color, lw=2.5, label=label))
    if mark:
        ax.legend(loc="upper left", bbox_to_anchor=(1.25, 1.0), fontsize=8)
    return _save(fig, path)


def _grid(n: int, panel_inches: float) -> tuple[int, int]:
    """(rows, columns) of ``n`` panels of width ``panel_inches`` in a figure at most MAX_INCHES wide."""
    cols = max(1, min(n, int(MAX_INCHES // panel_inches)))
    return -(-n // cols), cols


@literal_text
def kernel_panels(kernels: Mapping[str, np.ndarray], title: str, path: str | Path) -> Path:
    """(m, m) kernel matrices, one panel per representation (rows of panels at most
    ``MAX_INCHES`` wide), each with its own colour scale (the rows are expected to be in the
    same order in every panel)."""
    names = list(kernels)
    side = 3.0
    rows, cols = _grid(len(names), side)
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols, (side + 0.3) * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        im = ax.imshow(kernels[name], cmap="magma", interpolation="nearest")
        ax.set_title(_wrap(name, side - 0.6, 9), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(_wrap(title, side * cols, 10), fontsize=10)
    return _save(fig, path)


@literal_text
def grouped_bars(groups: Mapping[str, Sequence[dict]], title: str, path: str | Path) -> Path:
    """One panel per group (e.g. per metric), one bar per item.

    groups: {panel title: [{"label", "value", "lo", "hi", "null_q95" (optional), "color"
    (optional)}, ...]}. Bars show ``value`` with error bars [lo, hi]; a black dash marks
    ``null_q95`` (the null distribution's 95th percentile) over its bar. NaN or None bounds
    draw no error bar / dash."""
    names = list(groups)
    panel = min(MAX_INCHES, max(3.6, 0.45 * max(len(v) for v in groups.values()) + 0.8))
    rows, cols = _grid(len(names), panel)
    fig, axes = plt.subplots(rows, cols, figsize=(panel * cols, 3.8 * rows + 0.3), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        items = groups[name]
        x = np.arange(len(items))
        vals = np.array([it["value"] for it in items], dtype=float)
        bounds = np.array([[_num(it.get("lo")), _num(it.get("hi"))] for it in items], dtype=float)
        err = np.nan_to_num(np.stack([vals - bounds[:, 0], bounds[:, 1] - vals]), nan=0.0)
        ax.bar(x, vals, yerr=np.clip(err, 0, None), capsize=4,
               color=[it.get("color", "tab:blue") for it in items], alpha=0.85)
        nulls = [(i, _num(it.get("null_q95"))) for i, it in enumerate(items)]
        nulls = [(i, q) for i, q in nulls if np.isfinite(q)]
        for n, (i, q) in enumerate(nulls):
            ax.hlines(q, i - 0.4, i + 0.4, colors="black", linestyles="--", lw=1.5,
                      label="shuffled-pairing null, 95th pct" if n == 0 else None)
        ax.set_xticks(x, [it["label"] for it in items], rotation=30, ha="right", fontsize=8)
        ax.set_title(_wrap(name, panel - 0.5, 12))
        ax.axhline(0, color="grey", lw=0.5)
        if nulls:
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(_wrap(title, panel * cols, 10), fontsize=10)
    return _save(fig, path)


@literal_text
def forest(panels: Mapping[str, Sequence[dict]], path: str | Path, width_px: int = PAGE_PX,
           xlabel: str = "delta = after - mean(before image, before text)") -> Path:
    """A forest plot drawn at exactly ``width_px`` pixels wide: one panel per group (e.g. per
    side), one row per item (a metric, a setting), one or more points per row, each with its
    95% interval; a vertical line marks 0 (the criterion).

    panels: {panel title: [{"label": row label, "null": optional value at or below which the
    row is within the shuffled-pairing null (shaded), "points": [{"label": legend entry,
    "value", "lo", "hi", "color", "marker" (default "o"), "big" (bool: drawn larger)}, ...]},
    ...]}. The points of a row are stacked top to bottom in the order given."""
    names = list(panels)
    n_rows = max(len(v) for v in panels.values())
    n_pts = max((len(row["points"]) for v in panels.values() for row in v), default=1)
    step = min(0.22, 0.8 / max(1, n_pts))  # vertical distance between the points of a row, in rows
    row_h = 0.2 + 0.1 * n_pts  # inches per row
    fig, axes = plt.subplots(1, len(names), figsize=(width_px / DPI, 1.3 + row_h * n_rows), squeeze=False,
                             sharey=True, layout="constrained")
    handles: dict = {}
    for ax, name in zip(axes[0], names):
        rows = panels[name]
        values = [0.0]
        for i, row in enumerate(rows):
            y = -i
            null = _num(row.get("null"))
            if np.isfinite(null):
                h = ax.fill_betweenx([y - 0.45, y + 0.45], -2.0, null, color="#bdbdbd", alpha=0.35, lw=0)
                handles.setdefault("within the shuffled-pairing null (95th pct)", h)
                values.append(null)
            pts = row["points"]
            for j, pt in enumerate(pts):
                yp = y + step * ((len(pts) - 1) / 2 - j)
                lo, hi, v = _num(pt.get("lo")), _num(pt.get("hi")), _num(pt.get("value"))
                big = pt.get("big", False)
                if np.isfinite(lo) and np.isfinite(hi):
                    ax.hlines(yp, lo, hi, color=pt.get("color", "black"), lw=2.6 if big else 1.3)
                h = ax.plot([v], [yp], marker=pt.get("marker", "o"), ms=8 if big else 5, ls="",
                            color=pt.get("color", "black"), markeredgecolor="white", markeredgewidth=0.5)[0]
                handles.setdefault(pt["label"], h)
                values += [x for x in (lo, hi, v) if np.isfinite(x)]
        ax.axvline(0, color="black", lw=0.9)
        ax.set_yticks([-i for i in range(len(rows))], [row["label"] for row in rows], fontsize=10)
        ax.set_ylim(-n_rows + 0.5, 0.5)
        span = max(values) - min(values) or 1.0
        ax.set_xlim(min(values) - 0.06 * span, max(values) + 0.06 * span)
        ax.set_title(name, fontsize=11)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.tick_params(axis="x", labelsize=9)
        ax.grid(axis="x", alpha=0.25)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=min(4, len(handles)),
               fontsize=8.5, frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)  # no tight bounding box: exactly width_px wide
    plt.close(fig)
    return path


def _num(v) -> float:
    return float("nan") if v is None else float(v)


@literal_text
def scatter(x: Sequence[float], y: Sequence[float], labels: Sequence[str], title: str, path: str | Path,
            *, xlabel: str, ylabel: str) -> Path:
    """A labelled scatter plot (one point per item)."""
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    ax.scatter(x, y, color="tab:blue")
    for xi, yi, label in zip(x, y, labels):
        ax.annotate(str(label), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(_wrap(title, 5.5, 12), fontsize=12)
    ax.grid(alpha=0.3)
    return _save(fig, path)


@literal_text
def concept_counts(before: Mapping[str, int], after: Mapping[str, int], title: str, path: str | Path,
                   width_px: int = PAGE_PX // 2) -> Path:
    """Pairs per concept before (the pool's candidates) and after curation (chosen): one row of
    two horizontal bars per concept, in the order given, drawn ``width_px`` wide (half a report
    page: the size it is shown at) and 0.18 inch per concept tall; the x axis is logarithmic when
    the counts span more than 30x."""
    names = list(before)
    inches = width_px / DPI
    fig, ax = plt.subplots(figsize=(inches, 0.9 + 0.18 * max(len(names), 3)))
    y = np.arange(len(names))[::-1]
    b = np.array([before[n] for n in names], dtype=float)
    a = np.array([after.get(n, 0) for n in names], dtype=float)
    ax.barh(y + 0.2, b, height=0.4, color="#bdbdbd", label="pool (candidates)")
    ax.barh(y - 0.2, a, height=0.4, color="tab:blue", label="curated")
    positive = np.concatenate([b[b > 0], a[a > 0]])
    if positive.size and positive.max() > 30 * positive.min():
        ax.set_xscale("log")  # tick labels as plain numbers: mathtext is off (pipeline.plotting)
        ax.set_xlim(left=0.5)  # a count of 1 still shows as a bar
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yticks(y, [n if len(n) <= 24 else n[:23] + "…" for n in names], fontsize=6)
    ax.set_ylim(-0.7, len(names) - 0.3)
    ax.set_xlabel("pairs", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(_wrap(title, inches - 0.5, 9), fontsize=9)
    return _save(fig, path)


def png_base64(path: str | Path) -> str:
    """``data:image/png;base64,...`` URI of a PNG file (for self-contained HTML)."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def png_size(path: str | Path) -> tuple[int, int]:
    """(width, height) in pixels from a PNG file's IHDR header."""
    head = Path(path).read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG file")
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
