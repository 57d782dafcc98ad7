"""How the reports show numbers: human labels for metric names and table columns, intervals
written ``0.116 (0.076 to 0.155)`` on one line, counts with thousands separators, and the marks
that say a value rests on too few rows.

Small samples. A value is marked, never hidden, when the rows behind it are too few for it to
mean much:

* recall at K (``R@K``) on fewer than ``RECALL_ROWS_PER_K`` x K test items: with 5 test images
  R@5 is 1 for any ranking, and below 10 K items R@K is close to that ceiling by chance
  (marked ``FEW_FOR_K``);
* any interval (bootstrap, jackknife or over repeats) computed from fewer than
  ``MIN_INTERVAL_ROWS`` rows (marked ``FEW_ROWS``);
* an interval that leaves the range the quantity can take (``value_range``: a score of a metric
  in ``SCORE_RANGE``, or a difference of two such scores), which resampling tiny samples
  produces (marked ``OUT_OF_RANGE``). The interval is shown as computed, with the mark.

``marks_legend`` writes the sentence that explains the marks used in a table.
"""

from __future__ import annotations

import math
import re
from typing import Iterable

RECALL_ROWS_PER_K = 10  # R@K is marked below this many test items per K
MIN_INTERVAL_ROWS = 20  # intervals from fewer rows (or repeats) are marked
FEW_FOR_K = "*"  # R@K on fewer than RECALL_ROWS_PER_K x K items
FEW_ROWS = "†"  # an interval from fewer than MIN_INTERVAL_ROWS rows
OUT_OF_RANGE = "‡"  # an interval that leaves the quantity's range

METRIC_LABELS = {"cka": "linear CKA", "unbiased_cka": "unbiased CKA", "rbf_cka": "RBF CKA",
                 "unbiased_rbf_cka": "unbiased RBF CKA", "mutual_knn": "mutual kNN", "cycle_knn": "cycle kNN",
                 "lcs_knn": "LCS kNN", "edit_distance_knn": "edit-distance kNN", "cknna": "CKNNA",
                 "svcca": "SVCCA", "cca": "CCA", "procrustes": "Procrustes", "kernel_alignment": "kernel alignment"}
# the values each metric can take (similarity.metrics): normalised HSICs and overlaps lie in [0, 1];
# the unbiased HSIC estimates can be negative (bounded by -1 by Cauchy-Schwarz on U-centred kernels)
SCORE_RANGE = {name: (0.0, 1.0) for name in METRIC_LABELS}
SCORE_RANGE.update({"unbiased_cka": (-1.0, 1.0), "unbiased_rbf_cka": (-1.0, 1.0), "cknna": (-1.0, 1.0)})
METHOD_LABELS = {"infonce": "trained adapters", "adapters": "trained adapters", "cca": "CCA",
                 "procrustes": "PCA + Procrustes", "relative": "ASIF relative", "chance": "chance",
                 "random": "untrained adapters", "local_cka": "local CKA"}
SIDE_LABELS = {"image": "image", "text": "text"}
RECALL = re.compile(r"^(i2t|t2i)_R@(\d+)$")
ZEROSHOT_FIGURES = {"top1": "top-1", "top5": "top-5", "balanced": "balanced accuracy", "majority": "majority class"}


def metric_label(name: str) -> str:
    return METRIC_LABELS.get(name, name.replace("_", " "))


def method_label(name: str) -> str:
    return METHOD_LABELS.get(name, name.replace("_", " "))


def recall_label(key: str, short: bool = False) -> str:
    """``i2t_R@10`` -> ``image→text R@10`` (``short``: ``i→t R@10``); ``mean_R`` -> ``mean recall``."""
    m = RECALL.match(key)
    way = {"i2t": ("image→text", "i→t"), "t2i": ("text→image", "t→i")}
    if m:
        return f"{way[m.group(1)][short]} R@{m.group(2)}"
    m = re.fullmatch(r"(i2t|t2i)_(medr|meanr)", key)
    if m:
        return f"{way[m.group(1)][short]} {'median' if m.group(2) == 'medr' else 'mean'} rank"
    return {"mean_R": "mean recall", "rsum": "RSUM"}.get(key, key)


def column_label(key: str) -> str:
    """A human name for a flat column key of the study and Platonic tables (the key itself is
    shown next to it as a tooltip or in a legend). Unknown keys come back with dots and
    underscores as spaces."""
    if key in ("mean_R", "rsum") or RECALL.match(key):
        return recall_label(key)
    parts = key.split(".")
    if parts[0] == "mean_R" and len(parts) == 2 and parts[1].startswith("vs_"):
        return f"mean recall − {method_label(parts[1][3:])}"
    if len(parts) == 2 and parts[1] == "mean_R":
        return f"{method_label(parts[0])} mean recall"
    if parts[0] == "zeroshot" and len(parts) == 3:
        return f"zero-shot {ZEROSHOT_FIGURES.get(parts[2], parts[2])} ({method_label(parts[1])})"
    if parts[0] in METRIC_LABELS and len(parts) >= 2:
        return f"{metric_label(parts[0])} {_quantity(parts[1:])}"
    if len(parts) == 2 and parts[0] in ("train", "extract", "data", "analyze", "study"):
        return parts[1].replace("_", " ")
    return key.replace("_", " ").replace(".", " ")


def _quantity(parts: list[str]) -> str:
    """``["delta_image"]`` -> ``Δ image``; ``["control_cca", "excess_text"]`` -> ``trained − CCA, text``."""
    last = parts[-1]
    m = re.fullmatch(r"(delta|excess|before|after|calibrated_delta|verdict|p|supported)_([A-Za-z0-9]+)", last)
    if not m:
        return " ".join(p.replace("_", " ") for p in parts)
    what, side = m.groups()
    if len(parts) == 2 and parts[0].startswith("control_"):
        control = method_label(parts[0][len("control_"):])
        return f"trained − {control}, {side}" if what == "excess" else f"{control} {what} {side}"
    return {"delta": f"Δ {side}", "calibrated_delta": f"calibrated Δ {side}", "p": f"p {side}",
            "supported": f"supported {side}"}.get(what, f"{what} {side}")


def number(v, digits: int = 3, signed: bool = False) -> str:
    """A float with ``digits`` decimals (``+`` in front of positive values when ``signed``);
    ``n/a`` for missing or non-finite values; integers with thousands separators."""
    if v is None or v == "":
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if not math.isfinite(v):
        return "n/a"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def count(n) -> str:
    """``12345`` -> ``12,345``; anything that is not a whole number as it is."""
    if isinstance(n, float) and n.is_integer():
        n = int(n)
    return f"{n:,}" if isinstance(n, int) and not isinstance(n, bool) else ("-" if n is None else str(n))


def interval(value, lo, hi, digits: int = 3, signed: bool = False, marks: str = "") -> str:
    """``0.116 (0.076 to 0.155)``, or the value alone when the interval is missing; ``marks``
    (see the module docstring) follow the closing parenthesis."""
    text = number(value, digits, signed)
    if _finite(lo) and _finite(hi):
        text += f" ({number(lo, digits)} to {number(hi, digits)})"
    return text + marks


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def value_range(metric: str, difference: bool = False) -> tuple[float, float]:
    """The range of a score of ``metric`` or, with ``difference``, of a difference of two
    scores (hi - lo on either side); (-inf, inf) for a metric without a known range."""
    lo, hi = SCORE_RANGE.get(metric, (-math.inf, math.inf))
    return (lo - hi, hi - lo) if difference else (lo, hi)


def interval_marks(lo, hi, rows: int | None, bounds: tuple[float, float] = (-math.inf, math.inf)) -> str:
    """The marks of one interval: ``FEW_ROWS`` when made from fewer than ``MIN_INTERVAL_ROWS``
    rows, ``OUT_OF_RANGE`` when it leaves ``bounds`` (a tolerance of 1e-9 for rounding)."""
    marks = ""
    if _finite(lo) and _finite(hi):
        if rows is not None and rows < MIN_INTERVAL_ROWS:
            marks += FEW_ROWS
        if lo < bounds[0] - 1e-9 or hi > bounds[1] + 1e-9:
            marks += OUT_OF_RANGE
    return marks


def recall_marks(key: str, items: int | None) -> str:
    """``FEW_FOR_K`` when ``key`` is R@K and the ranking was over fewer than
    ``RECALL_ROWS_PER_K`` x K items."""
    m = RECALL.match(key)
    return FEW_FOR_K if m and items is not None and items < RECALL_ROWS_PER_K * int(m.group(2)) else ""


def marks_legend(marks: Iterable[str]) -> str:
    """The sentence explaining the marks that occur in ``marks`` (empty when none do)."""
    text = "".join(marks)
    parts = []
    if FEW_FOR_K in text:
        parts.append(f"{FEW_FOR_K} R@K on fewer than {RECALL_ROWS_PER_K} x K test items: close to its ceiling by chance")
    if FEW_ROWS in text:
        parts.append(f"{FEW_ROWS} from fewer than {MIN_INTERVAL_ROWS} rows: the value and its interval mean little")
    if OUT_OF_RANGE in text:
        parts.append(f"{OUT_OF_RANGE} interval leaves the range the quantity can take (too few rows to resample)")
    return ("Marks: " + "; ".join(parts) + ".") if parts else ""
