"""Cell rows and the summary over repeats.

A cell row (one line of ``cells.csv``) holds the cell's axis values (one column per axis, named
by its dotted key), ``run``, ``status`` ("done" | "failed"), ``error``, then every number the
cell produced, flattened generically so that new fields of the stages appear as new columns:

* test retrieval of the trained adapters: ``i2t_R@1`` ... ``t2i_R@10``, ``mean_R``; each other
  method of metrics.json (the closed-form baselines) as ``<method>.<column>``; chance level
  ``chance.mean_R`` (``analyze.report.chance_recall``) and the paired differences
  ``mean_R.vs_chance``, ``mean_R.vs_<method>``;
* every other number of the run's metrics.json as ``run.<path>`` (``run.sizes.train.pairs``,
  ``run.best_epoch``, ...);
* the pre-training similarity of the encoder pair: ``pair.<metric>`` (image vs text encoder on
  ``analyze.split``, the Freeze-Align criterion);
* zero-shot classification (``study.evaluations`` has "zeroshot"): ``zeroshot.<method>.<figure>``
  for the adapters, the baselines and ASIF (``relative``), figure = top1, top5, balanced; chance
  as ``zeroshot.chance.<figure>`` and ``zeroshot.chance.majority``;
* the Platonic test: platonic.json's ``"flat"`` columns when it has them, else the same names
  built from its ``"results"`` (:func:`flat_platonic`): ``<metric>.<term>`` (before_image ...
  after_text), ``<metric>.delta_<side>`` with ``_ci_lo`` / ``_ci_hi``, ``<metric>.p_<side>``,
  ``<metric>.verdict_<side>`` and any other number as ``<metric>.<term>_<field>``; plus
  ``<metric>.supported_<side>`` = 1.0 when the verdict is "supported", else 0.0.

The summary (:func:`summarize`) groups the finished cells by every axis except the repeat axis.
Per group: ``n`` (finished cells), ``failed``, and for every numeric column c the mean and the
sample standard deviation (ddof 1) over the group's finite values, ``c.mean`` and ``c.std``;
for the columns of :func:`wants_interval` (``mean_R``, ``mean_R.vs_*``, every delta and
excess, zero-shot top-1 and balanced accuracy) also the 95% t-interval over repeats,

    c.lo95, c.hi95 = mean -+ t_{0.975, m-1} * std / sqrt(m)     (m finite values; NaN when m < 2).
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from analyze.report import chance_recall
from pipeline.runs import ADAPTERS_METHOD, RECALL_COLUMNS, RunMetrics
from study.grid import is_number

CONFIDENCE = 0.95  # level of the intervals over repeats
LEAD = ("run", "status", "error")  # columns after the axes
INTERVAL = re.compile(r"(^mean_R$|^mean_R\.vs_|(delta|excess)_[A-Za-z0-9]+$|^zeroshot\.[^.]+\.(top1|balanced)$)")
ZEROSHOT_FIGURES = ("top1", "top5", "balanced")  # per method, as zeroshot.<method>.<figure>
SKIP_RUN_FIELDS = ("test", "run", "run_dir", "dataset", "device")  # metrics.json fields not copied as run.*


def flatten(doc: Any, prefix: str) -> dict[str, float]:
    """Every finite number (bools excluded) of a nested JSON document as ``{prefix.path: value}``;
    lists are skipped (draws, per-row values)."""
    out: dict[str, float] = {}
    if isinstance(doc, Mapping):
        for k, v in doc.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif is_number(doc):
        out[prefix] = float(doc)
    return out


def retrieval_columns(metrics: RunMetrics) -> dict[str, float]:
    """Test recall of the adapters, baselines as ``<method>.<column>``, chance and the paired
    differences; ``run.*`` for the rest of metrics.json."""
    row: dict[str, float] = {}
    ours = metrics.adapters or {}
    row.update({c: ours.get(c, math.nan) for c in RECALL_COLUMNS})
    sizes = metrics.sizes.get("test", {})
    n_img, n_txt = sizes.get("image"), sizes.get("text")
    if isinstance(n_img, int) and isinstance(n_txt, int) and n_img > 0 and n_txt > 0:
        chance = [chance_recall(c, n_img, n_txt) for c in RECALL_COLUMNS if c != "mean_R"]
        row["chance.mean_R"] = float(np.mean(chance))
        row["mean_R.vs_chance"] = row["mean_R"] - row["chance.mean_R"]
    for method, values in metrics.test.items():
        if method == ADAPTERS_METHOD:
            continue
        row.update({f"{method}.{c}": v for c, v in values.items()})
        if "mean_R" in values:
            row[f"mean_R.vs_{method}"] = row["mean_R"] - values["mean_R"]
    doc = {k: v for k, v in metrics.to_json().items() if k not in SKIP_RUN_FIELDS}
    row.update(flatten(doc, "run"))
    return row


def flat_platonic(doc: Mapping) -> dict[str, Any]:
    """The flat columns of a platonic.json document (see the module docstring)."""
    flat = dict(doc["flat"]) if isinstance(doc.get("flat"), Mapping) else _flat_from_results(doc.get("results", {}))
    for key in [k for k in flat if re.search(r"\.verdict_[A-Za-z0-9]+$", k)]:
        flat[key.replace(".verdict_", ".supported_")] = 1.0 if flat[key] == "supported" else 0.0
    if is_number(doc.get("n")):
        flat["platonic.n"] = float(doc["n"])
    return flat


def flat_zeroshot(doc: Mapping) -> dict[str, float]:
    """The columns of a zeroshot.json document (see the module docstring)."""
    flat = {f"zeroshot.{method}.{f}": float(r[f]) for method, r in doc.get("results", {}).items()
            for f in ZEROSHOT_FIGURES if is_number(r.get(f))}
    flat.update({f"zeroshot.chance.{f}": float(v) for f, v in doc.get("chance", {}).items() if is_number(v)})
    return flat


def _flat_from_results(results: Mapping) -> dict[str, Any]:
    """platonic.json ``results`` -> the names of ``analyze.platonic``'s flat columns."""
    flat: dict[str, Any] = {}
    for m, r in results.items():
        for term, t in r.get("terms", {}).items():
            flat[f"{m}.{term}"] = t.get("score")
            flat.update({f"{m}.{term}_{f}": v for f, v in flatten(t, "").items() if f not in ("score", "p_value")})
            if term.startswith("after_"):
                flat[f"{m}.p_{term[len('after_'):]}"] = t.get("p_value")
        for side, d in r.get("delta", {}).items():
            flat[f"{m}.delta_{side}"] = d.get("delta")
            flat.update({f"{m}.delta_{side}_{f}": v for f, v in flatten(d, "").items() if f != "delta"})
            flat[f"{m}.verdict_{side}"] = d.get("verdict", "")
        rest = {k: v for k, v in r.items() if k not in ("terms", "delta")}
        flat.update(flatten(rest, m))
    return flat


# ----------------------------------------------------------------------------- columns
def columns(rows: Sequence[Mapping], axes: Sequence[str], lead: Sequence[str] = LEAD) -> list[str]:
    """Axes, ``lead`` (``run``, ``status``, ``error``), then every other key in first-seen order."""
    cols = list(axes) + list(lead)
    for r in rows:
        cols += [c for c in r if c not in cols]
    return cols


def numeric_columns(rows: Sequence[Mapping], exclude: Iterable[str]) -> list[str]:
    """Columns whose values in ``rows`` are all numbers or missing (at least one number)."""
    exclude = set(exclude)
    out = []
    for c in columns(rows, [], []):
        if c in exclude:
            continue
        values = [r.get(c) for r in rows]
        present = [v for v in values if v is not None and v != ""]
        if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
            out.append(c)
    return out


def wants_interval(column: str) -> bool:
    """``mean_R``, ``mean_R.vs_*`` and every ``..delta_<side>`` / ``..excess_<side>`` column."""
    return bool(INTERVAL.search(column))


# ----------------------------------------------------------------------------- statistics
def t_quantile(df: int, level: float = CONFIDENCE) -> float:
    """The two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


def describe(values: Iterable[float], interval: bool) -> dict[str, float]:
    """mean, std (ddof 1) and, with ``interval``, the t-interval lo95/hi95 of the finite values."""
    x = np.asarray([v for v in values if is_number(v)], dtype=float)
    m = len(x)
    mean = float(x.mean()) if m else math.nan
    std = float(x.std(ddof=1)) if m >= 2 else math.nan
    out = {"mean": mean, "std": std}
    if interval:
        half = t_quantile(m - 1) * std / math.sqrt(m) if m >= 2 else math.nan
        out.update({"lo95": mean - half, "hi95": mean + half})
    return out


def summarize(rows: Sequence[Mapping], axes: Sequence[str], repeat: str) -> list[dict]:
    """One row per setting of the axes other than ``repeat`` (first-seen order): the axis
    values, ``n``, ``failed``, ``<column>.mean``, ``<column>.std`` and, where
    :func:`wants_interval`, ``<column>.lo95``, ``<column>.hi95`` (module docstring)."""
    group_axes = [a for a in axes if a != repeat]
    done = [r for r in rows if r.get("status") == "done"]
    numeric = numeric_columns(done, list(axes) + list(LEAD))
    groups: dict[str, list[Mapping]] = {}
    settings: dict[str, dict] = {}
    for r in rows:
        key = repr([r.get(a) for a in group_axes])
        settings.setdefault(key, {a: r.get(a) for a in group_axes})
        groups.setdefault(key, [])
        if r.get("status") == "done":
            groups[key].append(r)
    out = []
    for key, setting in settings.items():
        members = groups[key]
        row = {**setting, "n": len(members), "failed": sum(1 for r in rows if repr([r.get(a) for a in group_axes]) == key
                                                         and r.get("status") != "done")}
        for c in numeric:
            stats = describe((r.get(c) for r in members), wants_interval(c))
            row.update({f"{c}.{k}": v for k, v in stats.items()})
        out.append(row)
    return out
