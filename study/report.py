"""``study.md`` and ``study.html`` (self-contained: figures embedded as base64 PNG, the same
document model and style as ``analyze report``), and one sentence per research question.

Q1, can frozen encoders be aligned? Per setting (the cells sharing every axis but the repeat
axis), the held-out mean recall minus chance and minus each closed-form baseline (paired: same
cell, same train pairs), with the 95% t-interval over repeats; a setting counts as "above" when
the interval lies above 0, "below" when it lies below 0.

Q2, does alignment move the representations toward the reference? Per metric, side and
setting, the Platonic delta (after - mean of the two before-scores) with its 95% t-interval
over repeats, counted the same way; plus how many single cells the per-cell test calls
"supported", and, when platonic reports controls, how many settings have a trained-minus-control
excess above 0.

Without repeats (one cell per setting) there are no intervals; the sentences then count signs of
the point estimates and say so.

The page: the answers first (in a box), then the tables, each fitting a 1400 px window: held-out
retrieval per setting, the Platonic deltas per setting, then the cells; columns have human
labels with the raw summary.csv / cells.csv key as a tooltip (study.md: a legend under each
table), intervals read ``0.468 (0.451 to 0.485)`` on one line, values resting on too few rows
are marked (``analyze.display``); then the figures and the provenance.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Mapping, Sequence

from analyze.display import (FEW_FOR_K, FEW_ROWS, RECALL_ROWS_PER_K, column_label, interval, interval_marks,
                             marks_legend, method_label, metric_label, number, value_range)
from analyze.report import Document
from pipeline.runs import RECALL_COLUMNS
from pipeline.runtime import utc_now
from study.figures import delta_figure, quantities, varying
from study.grid import is_number

SIDES = ("image", "text")
SIDE_FIGURE_PX = 600  # width of the delta figure beside the answers, pixels


def _v(row: Mapping, key: str) -> float:
    x = row.get(key)
    return float(x) if is_number(x) else math.nan


def _ci(row: Mapping, col: str, marks: str = "") -> str:
    """``0.468 (0.451 to 0.485)`` (mean and 95% interval over repeats) or ``0.468`` without one."""
    m, lo, hi = _v(row, f"{col}.mean"), _v(row, f"{col}.lo95"), _v(row, f"{col}.hi95")
    if not math.isfinite(m):
        return "n/a"
    return interval(m, lo, hi, signed=".delta_" in col or ".vs_" in col or ".excess_" in col, marks=marks)


def _label(row: Mapping, keys: Sequence[str]) -> str:
    return ", ".join(f"{column_label(k)} {row[k]}" for k in keys) or "the single setting"


def classify(row: Mapping, col: str) -> str:
    """"above" | "below" | "undecided" from the interval over repeats; "above*" / "below*" /
    "undecided*" from the sign of the mean when there is no interval; "" when no value."""
    m, lo, hi = _v(row, f"{col}.mean"), _v(row, f"{col}.lo95"), _v(row, f"{col}.hi95")
    if not math.isfinite(m):
        return ""
    if math.isfinite(lo) and math.isfinite(hi):
        return "above" if lo > 0 else "below" if hi < 0 else "undecided"
    return "above*" if m > 0 else "below*" if m < 0 else "undecided*"


def _counts(labels: Sequence[str]) -> tuple[int, int, int, bool]:
    """(above, below, total, any without interval) over non-empty labels."""
    labels = [x for x in labels if x]
    return (sum(x.startswith("above") for x in labels), sum(x.startswith("below") for x in labels), len(labels),
            any(x.endswith("*") for x in labels))


def _repeats(settings: Sequence[Mapping], repeat: str) -> str:
    ns = sorted({int(r["n"]) for r in settings})
    what = repeat or "repeat"
    return f"{ns[0]} {what} values" if len(ns) == 1 else f"{ns[0]}-{ns[-1]} {what} values"


def _methods(summary: Sequence[Mapping]) -> list[str]:
    cols = summary[0] if summary else {}
    return [c[len("mean_R.vs_"):-len(".mean")] for c in cols
            if c.startswith("mean_R.vs_") and c.endswith(".mean") and c != "mean_R.vs_chance.mean"]


def answer_q1(summary: Sequence[Mapping], axes: Mapping[str, list], repeat: str) -> str:
    """One sentence: held-out mean recall against chance and the closed-form baselines."""
    settings = [r for r in summary if r.get("n", 0) > 0]
    if not settings:
        return "Q1 (can frozen encoders be aligned?): no cell finished, so the grid says nothing yet."
    keys = varying(axes, repeat)
    up, down, total, point = _counts([classify(r, "mean_R.vs_chance") for r in settings])
    best = max(settings, key=lambda r: _v(r, "mean_R.mean") if math.isfinite(_v(r, "mean_R.mean")) else -1)
    where = ("yes: the held-out mean recall lies above chance in every setting" if up == total and total else
             f"partly: the held-out mean recall lies above chance in {up} of {total} settings" if up else
             f"not shown: the held-out mean recall lies above chance in none of the {total} settings")
    how = (f"95% t-intervals over {_repeats(settings, repeat)}" if not point else
           "point estimates only: one cell per setting gives no interval")
    text = (f"Q1 (can frozen encoders be aligned?): {where} ({how}; "
            f"best: {_label(best, keys)}, mean recall {_ci(best, 'mean_R')} against chance "
            f"{_v(best, 'chance.mean_R.mean'):.3f}).")
    parts = []
    for method in _methods(summary):
        a, b, n, _ = _counts([classify(r, f"mean_R.vs_{method}") for r in settings])
        parts.append(f"above {method_label(method)} in {a}, below in {b}, indistinguishable in {n - a - b} of {n} "
                     "settings")
    if parts:
        text += ("\nAgainst the closed-form baselines fitted on the same train pairs, the trained adapters are "
                 + "; ".join(parts) + ".")
    return text


def _word(up: int, down: int, total: int) -> str:
    if total == 0:
        return "no data"
    if up == total:
        return "yes, in every test"
    if up * 2 >= total:
        return "mostly"
    if up:
        return "partly"
    return "no" if down else "undecided"


def answer_q2(summary: Sequence[Mapping], axes: Mapping[str, list], repeat: str, n_cells: int) -> str:
    """The Platonic deltas per side over metrics and settings, single-cell verdicts, and controls
    when present: a first line, then one line per side."""
    settings = [r for r in summary if r.get("n", 0) > 0]
    deltas = [q for q in quantities(summary) if q != "mean_R"]
    if not settings or not deltas:
        return "Q2 (does alignment move representations toward the reference?): no finished Platonic test yet."
    metrics = list(dict.fromkeys(q.split(".")[0] for q in deltas))
    cols = summary[0]
    clauses = []
    for side in SIDES:
        mine = [q for q in deltas if q.endswith(f".delta_{side}")]
        if not mine:
            continue
        up, down, total, point = _counts([classify(r, q) for q in mine for r in settings])
        means = ", ".join(f"{metric_label(q.split('.')[0])} {_mean_over(settings, q):+.3f}" for q in mine)
        sup = sum(_v(r, f"{q.split('.')[0]}.supported_{side}.mean") * r["n"] for q in mine for r in settings
                  if math.isfinite(_v(r, f"{q.split('.')[0]}.supported_{side}.mean")))
        clause = (f"{side.capitalize()} side: {_word(up, down, total)}: delta above 0 in {up} and below 0 in {down} of "
                  f"{total} metric × setting tests{' by sign only, no interval' if point else ''} (mean delta: {means}); "
                  f"the per-cell test says supported in {int(round(sup))} "
                  f"of {len(mine) * n_cells} metric × cell tests")
        excess = [c[:-len(".mean")] for c in cols if re.fullmatch(rf"[^.]+\.control_[^.]+\.excess_{side}\.mean", c)]
        if excess:
            a, b, n, _ = _counts([classify(r, c) for c in excess for r in settings])
            clause += (f"; trained minus control delta above 0 in {a}, below in {b} of {n} metric × control × "
                       f"setting tests")
        clauses.append(clause + ".")
    how = f"95% t-intervals over {_repeats(settings, repeat)}"
    return (f"Q2 (does alignment move representations toward the reference?) under "
            f"{', '.join(map(metric_label, metrics))}, {how}; the criterion compares each aligned side with the mean "
            "of the two frozen encoders' scores.\n" + "\n".join(clauses))


def _mean_over(settings: Sequence[Mapping], q: str) -> float:
    vals = [_v(r, f"{q}.mean") for r in settings]
    vals = [v for v in vals if math.isfinite(v)]
    return sum(vals) / len(vals) if vals else math.nan


# ----------------------------------------------------------------------------- the document
def _recall_marks(row: Mapping) -> str:
    """FEW_FOR_K when a cell's test split had fewer than RECALL_ROWS_PER_K x K images for the
    largest K in the mean recall."""
    k = max(int(c.split("@")[1]) for c in RECALL_COLUMNS if "@" in c)
    n = _v(row, "run.sizes.test.image.mean") if "run.sizes.test.image.mean" in row else _v(row, "run.sizes.test.image")
    return FEW_FOR_K if math.isfinite(n) and n < RECALL_ROWS_PER_K * k else ""


def _delta_marks(row: Mapping, col: str) -> str:
    """FEW_ROWS when the cells' Platonic test had fewer than MIN_INTERVAL_ROWS rows; OUT_OF_RANGE
    when the interval over repeats leaves the range of a difference of the metric's scores."""
    n = _v(row, "platonic.n.mean") if "platonic.n.mean" in row else _v(row, "platonic.n")
    lo, hi = _v(row, f"{col}.lo95"), _v(row, f"{col}.hi95")
    few = FEW_ROWS if math.isfinite(n) and n < 20 else ""
    return few + interval_marks(lo, hi, None, value_range(col.split(".")[0], difference=True))


def _setting_keys(axes: Mapping[str, list], repeat: str) -> list[str]:
    return varying(axes, repeat) or [a for a in axes if a != repeat]


def retrieval_table(summary: Sequence[Mapping], axes: Mapping[str, list], repeat: str) -> tuple[list, list, list]:
    """(labels, rows, keys) of held-out retrieval per setting: the varying axes, n, mean recall
    with its interval over repeats, chance, each baseline's mean recall and the difference
    trained minus baseline."""
    keys = _setting_keys(axes, repeat)
    methods = _methods(summary)
    cols = [*keys, "n", "mean_R", "chance.mean_R", *(f"{m}.mean_R" for m in methods), *(f"mean_R.vs_{m}" for m in methods)]
    rows = []
    for r in summary:
        rows.append([*(r.get(k) for k in keys), r.get("n"), _ci(r, "mean_R", _recall_marks(r)),
                     number(_v(r, "chance.mean_R.mean")), *(number(_v(r, f"{m}.mean_R.mean")) for m in methods),
                     *(_ci(r, f"mean_R.vs_{m}") for m in methods)])
    return [column_label(c) if c != "n" else "cells" for c in cols], rows, cols


def delta_table(summary: Sequence[Mapping], axes: Mapping[str, list], repeat: str) -> tuple[list, list, list]:
    """(labels, rows, keys) of every Platonic delta per setting, mean (95% interval over repeats)."""
    keys = _setting_keys(axes, repeat)
    deltas = [q for q in quantities(summary) if q != "mean_R"]
    rows = [[*(r.get(k) for k in keys), *(_ci(r, q, _delta_marks(r, q)) for q in deltas)] for r in summary]
    cols = [*keys, *deltas]
    return [column_label(c) for c in cols], rows, cols


def _legend(doc: Document, rows: Sequence[Sequence]) -> None:
    text = marks_legend(str(v) for r in rows for v in r)
    if text:
        doc.para(text, "note")


def build_report(folder: Path, title: str, intro: str, answers: Sequence[str], summary: Sequence[Mapping],
                 cells: Sequence[Mapping], axes: Mapping[str, list], repeat: str,
                 figures: Sequence[tuple[Path, str]]) -> Path:
    """Write ``study.md`` and ``study.html`` in ``folder``; returns the HTML path."""
    doc = Document(title, folder)
    doc.box("Answers")
    for a in answers:
        for line in a.split("\n"):
            doc.para(line)
    doc.para(f"Intervals: 95% t-intervals over {repeat or 'repeats'} (one cell per {repeat or 'repeat'} value); "
             "deltas: the Platonic criterion after - mean(before image, before text) on the test split.", "note")
    path = delta_figure(summary, axes, repeat, folder / "deltas.png", SIDE_FIGURE_PX)
    if path:
        rows = ", ".join(column_label(k) for k in varying(axes, repeat)) or "all cells"
        doc.figure(path, f"Platonic delta per setting (rows: {rows}) and metric, mean over {repeat or 'cells'} "
                         "with its 95% t-interval; 0 = no change.", side=True)
    doc.end_box()
    doc.heading("Retrieval per setting")
    labels, rows, keys = retrieval_table(summary, axes, repeat)
    doc.table(labels, rows, keys)
    _legend(doc, rows)
    labels, rows, keys = delta_table(summary, axes, repeat)
    if len(keys) > len(_setting_keys(axes, repeat)):
        doc.heading("Platonic deltas per setting")
        doc.table(labels, rows, keys)
        _legend(doc, rows)
    if figures:
        doc.heading("Figures")
        for path, caption in figures:
            doc.figure(path, caption)
    doc.heading("Cells")
    keys = list(axes)
    deltas = [q for q in quantities(summary) if q != "mean_R"]
    cols = [*keys, "status", "mean_R", *deltas, "run"]
    doc.table([column_label(c) for c in cols],
              [[*(c.get(k) for k in keys), c.get("status"), number(c.get("mean_R")),
                *(number(c.get(q), signed=True) for q in deltas), c.get("run")] for c in cells], cols)
    failed = [c for c in cells if c.get("status") != "done"]
    if failed:
        doc.heading("Failed cells")
        for c in failed:
            doc.para(f"{_label(c, keys)}: {c.get('error') or 'no result'}")
    doc.heading("Provenance")
    doc.para(f"Generated {utc_now()} by `study`. {intro} Every column: summary.csv and cells.csv.")
    (folder / "study.md").write_text(doc.markdown(), encoding="utf-8")
    html = folder / "study.html"
    html.write_text(doc.html(), encoding="utf-8")
    return html
