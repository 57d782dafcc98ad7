"""The answer first: the summary at the top of ``analyze report`` (and what the commands print).

From a Platonic test result (``platonic.json``): the question, one sentence per side naming
each metric's delta with its 95% interval and what it means, what the controls say, and a
forest plot of the deltas (``plots.forest``: the trained delta and each control's delta with
their intervals, the zone where the after-score would not beat the shuffled-pairing null
shaded). Then the headline numbers: held-out retrieval and zero-shot accuracy of the trained
adapters next to the closed-form baselines and chance.

The same sentences are printed by ``analyze platonic`` and ``analyze report`` (``answer_lines``),
so the terminal, report.md and report.html start with the same answer.

Chance level of retrieval (a random ranking): text-to-image R@K = K / n_images; image-to-text
R@K = 1 - C(n_texts - c, K) / C(n_texts, K) for c captions per image (any of the image's c
captions in the top K), which is K / n_texts for one caption per image.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

from analyze import plots
from analyze.display import (MIN_INTERVAL_ROWS, ZEROSHOT_FIGURES, interval, interval_marks, marks_legend, method_label,
                             metric_label, number, recall_label, recall_marks, value_range)
from analyze.evalreport import saved_output
from pipeline.cache import CacheError, find_entry
from pipeline.config import PipelineConfig
from pipeline.runs import ADAPTERS_METHOD, RECALL_COLUMNS, RunFolder

SIDES = ("image", "text")
MEANING = {"supported": "closer to the reference", "not supported": "farther from the reference"}
FOREST_NAME = "summary-forest.png"


def question(result: Mapping) -> str:
    e = result["entries"]
    return (f"Question: after training, is each aligned side closer to the reference {e['reference']} than the "
            f"frozen encoders ({e['image']}, {e['text']}) were on average, m(K_repr, K_ref) > "
            f"mean(m(K_X, K_ref), m(K_Y, K_ref)), by more than chance?")


def _delta_text(metric: str, r: Mapping, side: str, n: int) -> str:
    d = r["delta"][side]
    marks = interval_marks(d["ci_lo"], d["ci_hi"], n, value_range(metric, difference=True))
    return f"{metric_label(metric)} {interval(d['delta'], d['ci_lo'], d['ci_hi'], signed=True, marks=marks)}"


def _state(d: Mapping) -> str:
    """What one delta says, in words (its verdict, and for inconclusive ones why)."""
    if d["verdict"] in MEANING:
        return MEANING[d["verdict"]]
    lo, hi = d.get("ci_lo"), d.get("ci_hi")
    if not (isinstance(lo, (int, float)) and math.isfinite(lo) and isinstance(hi, (int, float)) and math.isfinite(hi)):
        return "without an interval (no resamples)"
    return "above 0 but not above the shuffled-pairing null" if lo > 0 else "no clear change (the interval contains 0)"


def side_sentence(result: Mapping, side: str) -> str:
    """``Image side: closer to the reference under unbiased CKA +0.116 (0.076 to 0.155) and ...``."""
    groups: dict[str, list[str]] = {}
    for m, r in result["results"].items():
        groups.setdefault(_state(r["delta"][side]), []).append(_delta_text(m, r, side, result["n"]))
    parts = [f"{state} under {_join(items)}" for state, items in groups.items()]
    return f"{side.capitalize()} side: " + "; ".join(parts) + "."


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def overall(result: Mapping) -> str:
    """``Partly supported: 2 of 6 metric × side tests say closer to the reference.``"""
    verdicts = [r["delta"][s]["verdict"] for r in result["results"].values() for s in SIDES]
    up = sum(v == "supported" for v in verdicts)
    down = sum(v == "not supported" for v in verdicts)
    word = ("Supported" if up == len(verdicts) else "Partly supported" if up else
            "Not supported" if down else "Inconclusive")
    return (f"{word}: {up} of {len(verdicts)} metric × side tests find the aligned side closer to the reference, "
            f"{down} farther, {len(verdicts) - up - down} inconclusive.")


def controls_sentence(result: Mapping) -> str:
    """How often the trained delta exceeds every control, and which controls it does not exceed."""
    results = result["results"]
    beats = [r["delta"][s].get("beats_controls") for r in results.values() for s in SIDES]
    if all(b is None for b in beats):
        return "Controls: none were computed (analyze.controls), so nothing says whether training caused the change."
    names = list(dict.fromkeys(c for r in results.values() for c in r.get("controls", {})))
    tests = len(beats)
    short = []
    for c in names:
        not_exceeded = sum(1 for r in results.values() for s in SIDES
                           if c in r.get("controls", {}) and r["controls"][c]["delta"][s].get("exceeds") is False)
        short.append(f"{method_label(c)} in {not_exceeded}")
    n_beat = sum(b is True for b in beats)
    text = (f"Controls (embeddings of the same rows not trained with InfoNCE): the trained delta exceeds every "
            f"control in {n_beat} of {tests} metric × side tests; it does not exceed {_join(short)} of {tests}")
    if n_beat == 0:
        text += ", so what the trained adapters show, untrained or closed-form embeddings show as well"
    return text + "."


def caveat(result: Mapping) -> str:
    n = result["n"]
    text = (f"n = {n:,} {result.get('split', 'test')} rows, {result['bootstrap']} resamples for the 95% intervals, "
            f"{result['permutations']} shuffled pairings for the null; no correction for testing "
            f"{2 * len(result['results'])} metric × side pairs.")
    if n < MIN_INTERVAL_ROWS:
        text += f" With fewer than {MIN_INTERVAL_ROWS} rows the intervals and verdicts mean little."
    return text


def answer_lines(result: Mapping) -> list[str]:
    """The summary as plain lines (for the terminal and the top of the reports)."""
    lines = [overall(result), *(side_sentence(result, s) for s in SIDES), controls_sentence(result), caveat(result)]
    legend = marks_legend(lines)
    return lines + ([legend] if legend else [])


def forest_panels(result: Mapping) -> dict[str, list[dict]]:
    """plots.forest input: per side, one row per metric: the trained delta (coloured by its
    verdict), then each control's delta; the null zone shaded."""
    panels: dict[str, list[dict]] = {}
    for s in SIDES:
        rows = []
        for m, r in result["results"].items():
            t, d = r["terms"], r["delta"][s]
            before = (t["before_image"]["score"] + t["before_text"]["score"]) / 2
            null = t[f"after_{s}"].get("null_q95")
            points = [{"label": f"trained, {d['verdict']} (95% CI)", "value": d["delta"], "lo": d["ci_lo"],
                       "hi": d["ci_hi"], "color": plots.VERDICT_COLORS.get(d["verdict"], "#4d4d4d"), "big": True}]
            for j, (c, cr) in enumerate(r.get("controls", {}).items()):
                marker, colour = plots.POINT_STYLES[j % len(plots.POINT_STYLES)]
                cd = cr["delta"][s]
                points.append({"label": f"control: {method_label(c)}", "value": cd["delta"], "lo": cd.get("ci_lo"),
                               "hi": cd.get("ci_hi"), "color": colour, "marker": marker})
            rows.append({"label": metric_label(m), "null": None if null is None else null - before, "points": points})
        panels[f"{s} side"] = rows
    return panels


def forest_figure(result: Mapping, folder: Path, width_px: int) -> Path:
    return plots.forest(forest_panels(result), Path(folder) / FOREST_NAME, width_px)


def forest_caption(result: Mapping) -> str:
    return (f"Platonic delta per metric (after-score minus the mean of the two frozen encoders' scores; 0 = no "
            f"change) with its 95% interval, coloured by verdict; under each, the controls' deltas on the same "
            f"rows; shaded: deltas whose after-score would not beat the shuffled-pairing null. "
            f"Reference {result['entries']['reference']}, n = {result['n']:,}.")


# ----------------------------------------------------------------------------- chance level
def chance_recall(key: str, n_images: int, n_texts: int) -> float:
    """Expected R@K of a random ranking (see the module docstring); ``mean_R`` averages them."""
    way, k = key.split("_R@")
    k = int(k)
    if way == "t2i":
        return min(1.0, k / n_images)
    c = max(1, round(n_texts / n_images))
    if k >= n_texts - c + 1:
        return 1.0
    miss = 1.0
    for j in range(k):  # P(none of the c captions in the top k) = C(n-c, k) / C(n, k)
        miss *= (n_texts - c - j) / (n_texts - j)
    return 1.0 - miss


def chance_row(n_images: int, n_texts: int) -> dict[str, float]:
    """Retrieval figures of a random ranking: every recall column, mean recall, RSUM and mean ranks."""
    chance = {c: chance_recall(c, n_images, n_texts) for c in RECALL_COLUMNS if c != "mean_R"}
    chance["mean_R"] = sum(chance.values()) / len(chance)
    chance["rsum"] = 100 * sum(v for c, v in chance.items() if c != "mean_R")
    chance["t2i_meanr"] = (n_images + 1) / 2  # uniform rank among n_images
    chance["i2t_meanr"] = (n_texts + 1) / (max(1, round(n_texts / n_images)) + 1)  # best of c uniform ranks
    return chance


# ----------------------------------------------------------------------------- report sections
def section_summary(doc, result: dict | None, why: str) -> None:
    """The answer box: question, answer per side, controls, caveat, forest plot of the deltas."""
    doc.box("Summary: the Platonic test")
    if result is None:
        doc.para(f"No answer yet: the Platonic test is not available ({why}).")
        doc.end_box()
        return
    lines = answer_lines(result)
    doc.para(question(result))
    doc.para(lines[0], "lead")
    for line in lines[1:-1]:
        doc.para(line)
    doc.para(lines[-1], "note")
    doc.figure(forest_figure(result, doc.folder, plots.PAGE_PX), forest_caption(result))
    doc.end_box()




def section_headline(doc, cfg: PipelineConfig, run: str, info: RunFolder | None) -> None:
    """Held-out retrieval and zero-shot accuracy of the trained adapters, the baselines and chance."""
    doc.heading("Headline numbers")
    test = info.metrics.test if info and info.metrics else {}
    zs, _ = saved_output(cfg, run, "zeroshot.json")
    if not test and zs is None:
        doc.para("No retrieval metrics (fit-adapters) or zero-shot results (analyze zeroshot) for this run yet.")
        return
    sizes = test_sizes(cfg, info) if test else None
    zres = zs["results"] if zs else {}
    methods = {ADAPTERS_METHOD: "adapters", "cca": "cca", "procrustes": "procrustes"}
    methods.update({m: m for m in list(test) + list(zres) if m not in methods and m not in methods.values()})
    recall = ["mean_R", "i2t_R@1", "i2t_R@10", "t2i_R@1", "t2i_R@10"]
    figures = ["top1", "balanced"] if zs else []
    rows = []
    for rkey, zkey in methods.items():
        r, z = test.get(rkey), zres.get(zkey)
        if r is None and z is None:
            continue
        rows.append([method_label(rkey), *(r.get(c) if r else None for c in recall),
                     *(z.get(f) if z else None for f in figures)])
    chance = chance_row(*sizes) if sizes else {}
    zch = zs["chance"] if zs else {}
    rows.append(["chance", *(chance.get(c) for c in recall), *(zch.get(f) for f in figures)])
    if zs:
        rows.append(["majority class", *(None for _ in recall), zch.get("majority"), zch.get("majority_balanced")])
    rows = [[row[0], *(recall_cell(c, v, sizes) for c, v in zip(recall, row[1:]))] + row[1 + len(recall):]
            for row in rows]
    doc.table(["method", *(recall_label(c) for c in recall), *(f"zero-shot {ZEROSHOT_FIGURES[f]}" for f in figures)],
              rows, ["method", *recall, *(f"zeroshot.{f}" for f in figures)])
    what = []
    if sizes:
        what.append(f"retrieval over {sizes[0]:,} test images and {sizes[1]:,} captions")
    if zs:
        what.append(f"zero-shot classification of {zs['n']:,} {zs['split']} images into {len(zs['classes'])} classes "
                    f"(labels: {zs['label_from']})")
    legend = marks_legend(str(v) for row in rows for v in row)
    doc.para("Held-out " + " and ".join(what) + ". Details below." + (f" {legend}" if legend else ""), "note")


def recall_cell(key: str, value, sizes: tuple[int, int] | None):
    """A recall value with the small-sample mark when the ranking had too few items for R@K."""
    items = None if sizes is None else sizes[1] if key.startswith("i2t") else sizes[0]
    mark = recall_marks(key, items)
    return f"{number(value)}{mark}" if mark and isinstance(value, (int, float)) else value


def test_sizes(cfg: PipelineConfig, run: RunFolder) -> tuple[int, int] | None:
    """(n_images, n_texts) of the test split: the run's recorded sizes, else the cache entries."""
    sizes = run.metrics.sizes.get("test", {}) if run.metrics else {}
    if isinstance(sizes.get("image"), int) and isinstance(sizes.get("text"), int):
        return sizes["image"], sizes["text"]
    try:
        img = find_entry(cfg.data.cache, cfg.data.dataset, "test", run.image or cfg.train.image, cfg.data.data_dir)
        txt = find_entry(cfg.data.cache, cfg.data.dataset, "test", run.text or cfg.train.text, cfg.data.data_dir)
    except CacheError:
        return None
    return img.n, txt.n


