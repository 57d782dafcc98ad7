"""Shared matplotlib helpers for the analyze figures (Agg backend: no display needed).

Every function draws one figure, saves it as a PNG at ``path`` (parent folders created) and
returns the path; figures are closed after saving so long runs do not accumulate memory.
Titles are wrapped to the width of what they label (``_wrap``) and figures are saved with a
tight bounding box, so long entry and run names are never cut off.
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

from pipeline.plotting import literal_text  # noqa: E402

DPI = 110  # resolution of saved figures, dots per inch
CELL_INCHES = 0.55  # side of one heatmap cell, inches (figures grow with the number of entries)
ANNOTATE_MAX = 16  # heatmaps with at most this many rows and columns print the value in each cell
CHAR_WIDTH = 0.6  # average width of a character in units of the font size (DejaVu Sans), for wrapping
LONG_LABEL = 8  # tick labels longer than this many characters are rotated


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


@literal_text
def kernel_panels(kernels: Mapping[str, np.ndarray], title: str, path: str | Path) -> Path:
    """Side-by-side (m, m) kernel matrices, one panel per representation, each with its own
    colour scale (the rows are expected to be in the same order in every panel)."""
    names = list(kernels)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        im = ax.imshow(kernels[name], cmap="magma", interpolation="nearest")
        ax.set_title(_wrap(name, 2.8, 9), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(_wrap(title, 3.6 * len(names), 10), fontsize=10)
    return _save(fig, path)


@literal_text
def grouped_bars(groups: Mapping[str, Sequence[dict]], title: str, path: str | Path) -> Path:
    """One panel per group (e.g. per metric), one bar per item.

    groups: {panel title: [{"label", "value", "lo", "hi", "null_q95" (optional), "color"
    (optional)}, ...]}. Bars show ``value`` with error bars [lo, hi]; a black dash marks
    ``null_q95`` (the null distribution's 95th percentile) over its bar. NaN or None bounds
    draw no error bar / dash."""
    names = list(groups)
    panel = max(4.0, 1.1 * max(len(v) for v in groups.values()))
    fig, axes = plt.subplots(1, len(names), figsize=(panel * len(names) + 0.5, 4.0), squeeze=False)
    for ax, name in zip(axes[0], names):
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
    fig.suptitle(_wrap(title, panel * len(names), 10), fontsize=10)
    return _save(fig, path)


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


def png_base64(path: str | Path) -> str:
    """``data:image/png;base64,...`` URI of a PNG file (for self-contained HTML)."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")
