"""The study's figures (matplotlib, PNG), drawn from the summary rows (``study.table.summarize``).

* ``fraction.png`` when ``train.train_fraction`` varies: ``mean_R`` and every
  ``<metric>.delta_<side>`` against the fraction, one panel per quantity, one line per setting
  of the other axes (the repeat axis excluded), error bars = the 95% t-interval over repeats;
  chance (mean_R) and 0 (deltas) dashed.
* ``pair.png`` when the encoder pair varies (``train.image`` or ``train.text`` is an axis):
  test ``mean_R`` against the pre-training similarity of the pair (``pair.cka``, else the first
  ``pair.*`` column), one point per setting, with Spearman's rho over settings (the Freeze-Align
  criterion: a more similar pair aligns better).
* ``heatmap.png`` when at least two categorical axes (any non-numeric value) vary: mean_R over
  the first two, averaged over the other axes' settings.
* ``deltas.png`` (the study page's answer box): per side, one row per setting, one point per
  metric: the mean Platonic delta over repeats with its 95% t-interval (``plots.forest``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from analyze import plots  # noqa: E402
from analyze.display import column_label, metric_label  # noqa: E402
from analyze.pairs import spearman  # noqa: E402
from pipeline.plotting import literal_text  # noqa: E402
from study.grid import is_number  # noqa: E402

FRACTION = "train.train_fraction"
PAIR_AXES = ("train.image", "train.text")
PANEL_INCHES = (3.7, 3.0)  # width, height of one panel: three fit the report page (analyze.plots.MAX_INCHES)
DPI = 110


def varying(axes: Mapping[str, list], repeat: str) -> list[str]:
    """Axes other than ``repeat`` with more than one value."""
    return [a for a, v in axes.items() if a != repeat and len(v) > 1]


def _num(x) -> float:
    return float(x) if is_number(x) else math.nan


def _label(setting: Mapping, keys: Sequence[str]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={setting[k]}" for k in keys) or "all"


def quantities(summary: Sequence[Mapping]) -> list[str]:
    """``mean_R`` then every ``<metric>.delta_<side>`` with a mean in the summary (controls excluded)."""
    cols = [c[:-len(".mean")] for c in (summary[0] if summary else {}) if c.endswith(".mean")]
    deltas = [c for c in cols if c.count(".") == 1 and c.split(".")[1].startswith("delta_")
              and not c.endswith(("_ci_lo", "_ci_hi"))]
    return (["mean_R"] if "mean_R" in cols else []) + deltas


@literal_text
def fraction_figure(summary: Sequence[Mapping], axes: Mapping[str, list], repeat: str, path: Path) -> Path | None:
    """``fraction.png`` (module docstring); None when the fraction does not vary."""
    if FRACTION not in varying(axes, repeat):
        return None
    others = [a for a in varying(axes, repeat) if a != FRACTION]
    names = quantities(summary)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, grid = plt.subplots(rows, cols, figsize=(PANEL_INCHES[0] * cols, PANEL_INCHES[1] * rows), squeeze=False)
    lines: dict[str, list[Mapping]] = {}
    for r in summary:
        lines.setdefault(_label(r, others), []).append(r)
    for ax, q in zip(grid.flat, names):
        for label, members in lines.items():
            members = sorted(members, key=lambda r: _num(r[FRACTION]))
            x = np.array([_num(r[FRACTION]) for r in members])
            y = np.array([_num(r.get(f"{q}.mean")) for r in members])
            lo = np.array([_num(r.get(f"{q}.lo95")) for r in members])
            hi = np.array([_num(r.get(f"{q}.hi95")) for r in members])
            err = np.nan_to_num(np.stack([y - lo, hi - y]), nan=0.0).clip(min=0)
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
        if q == "mean_R":
            chance = [_num(r.get("chance.mean_R.mean")) for r in summary]
            if any(math.isfinite(c) for c in chance):
                ax.axhline(np.nanmean(chance), color="grey", ls="--", lw=1, label="chance")
        else:
            ax.axhline(0.0, color="grey", ls="--", lw=1)
        ax.set(title=column_label(q), xlabel="train fraction", xscale="log" if len(axes[FRACTION]) > 3 else "linear")
        ax.set_xticks(sorted({_num(v) for v in axes[FRACTION]}))
        ax.grid(alpha=0.3)
    for ax in list(grid.flat)[len(names):]:
        ax.axis("off")
    grid.flat[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"Against the train fraction (mean over {repeat or 'cells'}; bars: 95% t-interval)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


@literal_text
def pair_figure(summary: Sequence[Mapping], axes: Mapping[str, list], repeat: str, path: Path
                ) -> tuple[Path | None, float | None, str | None]:
    """``pair.png`` (module docstring): (path, Spearman's rho, x column); (None, None, None)
    when the pair does not vary."""
    if not any(a in varying(axes, repeat) for a in PAIR_AXES):
        return None, None, None
    pair_cols = [c[:-len(".mean")] for c in (summary[0] if summary else {}) if c.startswith("pair.") and c.endswith(".mean")]
    if not pair_cols:
        return None, None, None
    x_col = "pair.cka" if "pair.cka" in pair_cols else pair_cols[0]
    points = [(_num(r.get(f"{x_col}.mean")), _num(r.get("mean_R.mean")), _label(r, varying(axes, repeat)))
              for r in summary]
    points = [p for p in points if math.isfinite(p[0]) and math.isfinite(p[1])]
    if not points:
        return None, None, x_col
    rho = spearman([p[0] for p in points], [p[1] for p in points])
    title = f"mean_R vs {x_col} before training" + (f" (Spearman rho {rho:.2f})" if rho is not None else "")
    out = plots.scatter([p[0] for p in points], [p[1] for p in points], [p[2] for p in points], title, path,
                        xlabel=f"{x_col[len('pair.'):]}(image encoder, text encoder)", ylabel="test mean_R")
    return out, rho, x_col


def categorical(axes: Mapping[str, list], repeat: str) -> list[str]:
    """Varying axes with a non-numeric value."""
    return [a for a in varying(axes, repeat) if any(not is_number(v) for v in axes[a])]


@literal_text
def heatmap_figure(summary: Sequence[Mapping], axes: Mapping[str, list], repeat: str, path: Path) -> Path | None:
    """``heatmap.png`` of mean_R over the first two categorical axes; None with fewer than two."""
    cats = categorical(axes, repeat)
    if len(cats) < 2:
        return None
    a, b = cats[:2]
    ra, rb = [str(v) for v in axes[a]], [str(v) for v in axes[b]]
    acc = np.zeros((len(ra), len(rb)))
    count = np.zeros_like(acc)
    for r in summary:
        v = _num(r.get("mean_R.mean"))
        if math.isfinite(v):
            i, j = ra.index(str(r[a])), rb.index(str(r[b]))
            acc[i, j] += v
            count[i, j] += 1
    matrix = np.where(count > 0, acc / np.maximum(count, 1), np.nan)
    return plots.heatmap(matrix, ra, rb, "test mean_R (mean over seeds and other axes)", path, xlabel=b, ylabel=a)


def delta_figure(summary: Sequence[Mapping], axes: Mapping[str, list], repeat: str, path: Path,
                 width_px: int) -> Path | None:
    """``deltas.png`` (module docstring), ``width_px`` wide; None without a Platonic delta."""
    deltas = [q for q in quantities(summary) if q != "mean_R"]
    settings = [r for r in summary if r.get("n", 0) > 0]
    if not deltas or not settings:
        return None
    keys = varying(axes, repeat)
    metrics = list(dict.fromkeys(q.split(".")[0] for q in deltas))
    panels = {}
    for side in ("image", "text"):
        rows = []
        for r in settings:
            points = []
            for j, m in enumerate(metrics):
                q = f"{m}.delta_{side}"
                if f"{q}.mean" in r:
                    marker, colour = plots.POINT_STYLES[j % len(plots.POINT_STYLES)]
                    points.append({"label": metric_label(m), "value": r[f"{q}.mean"], "lo": r.get(f"{q}.lo95"),
                                   "hi": r.get(f"{q}.hi95"), "color": colour, "marker": marker})
            rows.append({"label": ", ".join(str(r[k]) for k in keys) or "all cells", "points": points})
        panels[f"{side} side"] = rows
    return plots.forest(panels, path, width_px, xlabel="delta (mean, 95% t-interval)")
