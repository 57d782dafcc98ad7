"""One report per experiment (``analyze report``): Markdown plus self-contained HTML.

Written to ``<analyze.out>/<dataset>/<split>/runs/<run>/report.md`` and ``report.html``. The
Markdown references PNG files copied next to it; the HTML embeds the same figures as base64
PNG, so it can be mailed or archived alone. Sections: data (split sizes and fingerprints from
the cache), encoders (provenance), training curves, test retrieval with baselines and chance
level, metric heatmaps (from ``analyze cka``'s outputs, computed when absent or made with other
settings) and the Platonic test (from ``platonic.json``, run when absent or stale). Each
section says in one sentence what its numbers show; a section whose inputs do not exist says
so instead of failing. The page starts with the answer (``analyze.summary``: the Platonic
test in a few sentences and a forest plot, then the headline retrieval and zero-shot numbers);
the details follow. Chance levels: ``analyze.summary.chance_recall``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from analyze import display
from analyze.document import Document, _fmt  # Document: re-exported for study.report
from analyze.compare import compare_entries, data_dir_of, default_entries, output_dir
from analyze.evalreport import (section_benchmark, section_costs, section_gallery, section_languages, section_matching,
                                section_zeroshot, training_free_rows)
from analyze.pairs import modality
from analyze.platonic import SIDES, TERMS, platonic_test
from analyze.summary import (answer_lines, chance_recall, chance_row, recall_cell,  # noqa: F401 (chance_recall:
                             section_headline, section_summary, test_sizes)  # re-exported)
from pipeline.cache import CacheError, Entry, find_entry, list_entries, list_splits
from pipeline.config import PipelineConfig
from pipeline.join import JoinError, image_id
from pipeline.runs import (ADAPTERS_METHOD, RECALL_COLUMNS, RunFolder, RunIntegrityError, RunNotFoundError,
                           aligned_name, check_aligned, find_run, is_aligned, run_name, verify_run)
from pipeline.runtime import utc_now
from train.losses import loss_label

log = logging.getLogger(__name__)

RANK_COLUMNS = ("rsum", "i2t_medr", "t2i_medr", "i2t_meanr", "t2i_meanr")  # train.retrieval.SUMMARY_KEYS
PLATONIC_KEYS = ("metrics", "k", "max_rows", "duplicates", "seed", "bootstrap", "permutations", "controls",
                 "control_seeds")  # analyze settings that
#   must match for a saved platonic.json to be reused (the entries are compared too)


# ----------------------------------------------------------------------------- sections
def _entries_of(cfg: PipelineConfig, split: str) -> list[Entry]:
    return [find_entry(cfg.data.cache, cfg.data.dataset, split, n, cfg.data.data_dir)
            for n in list_entries(cfg.data.cache, cfg.data.dataset, split, cfg.data.data_dir)]


def _span(values: Sequence[int]) -> str:
    if not values:
        return "-"
    return f"{min(values):,}" if min(values) == max(values) else f"{min(values):,}-{max(values):,}"


def section_data(doc: Document, cfg: PipelineConfig) -> None:
    doc.heading("Data")
    splits = list_splits(cfg.data.cache, cfg.data.dataset, cfg.data.data_dir)
    if not splits:
        doc.para(f"Nothing is cached for dataset {cfg.data.dataset!r} under {cfg.data.cache!r}.")
        return
    rows, mixed = [], []
    for split in splits:
        entries = [e for e in _entries_of(cfg, split) if not is_aligned(e.name)]
        texts = [e for e in entries if modality(e) == "text"]
        per_image = [e.n / max(1, len({image_id(i) for i in e.ids})) for e in texts]
        fps = sorted({str(e.key["fingerprint"]) for e in entries if e.key.get("fingerprint")})
        if len(fps) > 1:
            mixed.append(split)
        rows.append([split, _span([e.n for e in entries if modality(e) == "image"]), _span([e.n for e in texts]),
                     f"{max(per_image):.1f}" if per_image else "-", len(entries), ", ".join(f[:12] for f in fps) or "-"])
    doc.table(["split", "images", "captions", "captions per image", "encoder entries", "fingerprint"], rows)
    main = next((r for r in rows if r[0] == cfg.analyze.split), rows[0])
    consistency = (f"splits {', '.join(mixed)} mix entries with different data fingerprints (extracted from "
                   f"different data)" if mixed else "within each split every entry has the same data fingerprint")
    doc.para(f"Dataset {cfg.data.dataset}: the {main[0]} split analysed here holds {main[1]} images and "
             f"{main[2]} captions; {consistency}.")


def section_encoders(doc: Document, cfg: PipelineConfig) -> None:
    doc.heading("Encoders")
    entries = [e for e in _entries_of(cfg, cfg.analyze.split) if not is_aligned(e.name)]
    if not entries:
        doc.para(f"No encoder entries in split {cfg.analyze.split!r}.")
        return
    rows = []
    for e in entries:
        enc = e.key.get("encoder") if isinstance(e.key.get("encoder"), dict) else {}
        rows.append([e.name, enc.get("modality", "-"), e.dim, enc.get("weights", "-"), enc.get("revision") or "-",
                     enc.get("pooling", "-"), len(e.layers) or "-", e.n])
    doc.table(["entry", "modality", "dim", "weights", "revision", "pooling", "layers stored", "rows"], rows)
    roles = f"image encoder {cfg.train.image}, text encoder {cfg.train.text}, reference {cfg.analyze.reference}"
    doc.para(f"{len(entries)} frozen encoders are cached for the {cfg.analyze.split} split; the experiment uses {roles}.")


def _history(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _num(v) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def section_training(doc: Document, run: RunFolder | None) -> None:
    doc.heading("Training")
    if run is None:
        doc.para("No run folder: train adapters with fit-adapters to get curves and retrieval numbers.")
        return
    if run.curves is not None:
        doc.figure(run.curves, f"Training curves of run {run.name}", "curves.png")
    if run.history is None:
        doc.para(f"Run {run.name} has no history.csv (still training, or interrupted).")
        return
    hist = _history(run.history)
    loss = [x for x in (_num(r.get("train_loss")) for r in hist) if x is not None]
    val = [(_num(r.get("val_mean_R")), r.get("epoch")) for r in hist]
    val = [(v, ep) for v, ep in val if v is not None]
    text = f"Run {run.name} trained for {len(hist)} epochs"
    if loss:
        text += f"; the train loss went from {loss[0]:.3f} to {loss[-1]:.3f}"
    if val:
        best, ep = max(val)
        text += f"; the best validation mean recall was {best:.3f} (epoch {ep})"
    doc.para(text + ".")


def section_retrieval(doc: Document, cfg: PipelineConfig, run: RunFolder | None) -> None:
    doc.heading("Retrieval (test split)")
    table = run.metrics.test if run and run.metrics else {}
    if not table:
        doc.para("No test retrieval metrics (metrics.json) for this run yet.")
        return
    sizes = test_sizes(cfg, run)
    extra = training_free_rows(cfg, run.name, sizes[0] if sizes else None) if cfg.analyze.split == "test" else {}
    columns = RECALL_COLUMNS + RANK_COLUMNS
    rows = [[display.method_label(method) + (" (collapsed)" if vals.get("collapsed") == 1 else ""),
             *(recall_cell(c, vals.get(c), sizes) for c in columns)]
            for method, vals in {**table, **extra}.items()]
    if sizes:
        chance = chance_row(*sizes)
        rows.append(["chance", *(chance.get(c) for c in columns)])
    rows = [[r[0], *r[1:len(RECALL_COLUMNS) + 1], *(display.number(v, 1) if isinstance(v, float) else v
                                                   for v in r[len(RECALL_COLUMNS) + 1:])] for r in rows]
    doc.table(["method", *(display.recall_label(c, short=True) for c in columns)], rows, ["method", *columns])
    legend = display.marks_legend(str(v) for r in rows for v in r)
    if legend:
        doc.para(legend, "note")
    tied = {m: v["ties"] for m, v in {**table, **extra}.items() if (v.get("ties") or 0) > 0}
    if tied:
        doc.para(_ties_sentence(tied, [m for m, v in table.items() if v.get("collapsed") == 1]))
    res = run.metrics.adapters
    if res is None:
        doc.para(f"The run's metrics have no {ADAPTERS_METHOD!r} row (the trained adapters); only baselines are shown.")
        return
    t = run.train
    loss = loss_label(t.get("loss", "infonce"), t.get("loss_direction", "symmetric"), t.get("normalize", True))
    text = f"The trained adapters (row {display.method_label(ADAPTERS_METHOD)!r}; loss: {loss})"
    if sizes and "i2t_R@10" in res and "t2i_R@10" in res:
        text += (f": held-out image-to-text R@10 is {res['i2t_R@10']:.2f} against {chance['i2t_R@10']:.2f} by chance, "
                 f"text-to-image R@10 {res['t2i_R@10']:.2f} against {chance['t2i_R@10']:.2f} "
                 f"({sizes[0]:,} images, {sizes[1]:,} captions)")
    others = {m: v.get("mean_R") for m, v in table.items()
              if m != ADAPTERS_METHOD and v.get("mean_R") is not None and math.isfinite(v["mean_R"])}
    if others and res.get("mean_R") is not None and math.isfinite(res["mean_R"]):
        best = max(others, key=others.get)
        word = "above" if res["mean_R"] > others[best] else "below"
        text += (f"; mean recall {res['mean_R']:.3f}, {word} the best baseline ({display.method_label(best)}, "
                 f"{others[best]:.3f})")
    doc.para(text + ". Chance: t2i R@K = K/n_images; i2t R@K = 1 - C(n_texts - c, K)/C(n_texts, K) for c captions per image. "
             "RSUM: the six recalls summed, in percent; medr / meanr: median / mean rank of the true item (1 = first).")


def _ties_sentence(tied: dict[str, float], collapsed: Sequence[str]) -> str:
    """What the ties in the retrieval table mean: the share of queries per method, and the
    methods whose embeddings collapsed."""
    shares = ", ".join(f"{m} {share:.1%}" for m, share in tied.items())
    text = (f"Ties count against the query (a wrong item scoring as high as the true one ranks above it); share of "
            f"queries whose true item is tied: {shares}.")
    if collapsed:
        text += (f" Collapsed embeddings (every row pointing the same way, so every score ties): "
                 f"{', '.join(collapsed)}; their recall is at its floor, not a measurement.")
    return text


def _reusable(path: Path, cfg: PipelineConfig, keys: Sequence[str], entries: Sequence[str]) -> dict | None:
    """The saved JSON output at ``path`` when it may be reused: made from the same cache,
    dataset, split, analyze settings ``keys`` and ``entries`` (in order), and newer than every
    entry's file (a retrained run rewrites its aligned entries). None otherwise."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    want, have = cfg.to_dict()["analyze"], saved.get("config", {}).get("analyze", {})
    names = saved.get("entries")
    same = (saved.get("cache") == str(cfg.data.cache) and saved.get("dataset") == cfg.data.dataset
            and saved.get("data_dir") == data_dir_of(cfg)
            and saved.get("split") == cfg.analyze.split and all(have.get(k) == want[k] for k in keys)
            and list(names.values() if isinstance(names, dict) else names or []) == list(entries))
    try:
        opened = [find_entry(cfg.data.cache, cfg.data.dataset, cfg.analyze.split, e, cfg.data.data_dir) for e in entries]
    except CacheError:
        return None
    check_aligned(cfg.data.cache, opened)  # saved numbers of aligned entries count only while their run matches
    return saved if same and all(e.path.stat().st_mtime <= path.stat().st_mtime for e in opened) else None


def section_heatmaps(doc: Document, cfg: PipelineConfig) -> None:
    doc.heading("Representation similarity between cache entries")
    folder = output_dir(cfg, "cka")
    try:
        result = (_reusable(folder / "scores.json", cfg, ("metrics", "k", "max_rows", "duplicates", "seed"),
                            default_entries(cfg))
                  or compare_entries(cfg))
    except RunIntegrityError:
        raise  # an aligned entry its run did not write: refuse the report
    except (CacheError, JoinError, ValueError) as exc:
        doc.para(f"Not available: {exc}")
        return
    names = result["entries"]
    for m, S in result["scores"].items():
        doc.figure(folder / result["figures"][m], f"{m} between cache entries, n = {result['n']} rows", f"cka-{m}.png")
        pairs = [(S[i][j], names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))
                 if S[i][j] is not None]
        if pairs:
            hi, lo = max(pairs), min(pairs)
            doc.para(f"{m}: the most similar entries are {hi[1]} and {hi[2]} ({hi[0]:.3f}), the least similar "
                     f"{lo[1]} and {lo[2]} ({lo[0]:.3f}).")
    if "kernels" in result.get("figures", {}):
        doc.figure(folder / result["figures"]["kernels"], "Kernel heatmaps on a shared row sample", "cka-kernels.png")


def platonic_result(cfg: PipelineConfig, run: str) -> tuple[dict | None, str]:
    """(the run's Platonic test, "") reusing a current platonic.json, else running the test;
    (None, why) when it cannot be made."""
    folder = output_dir(cfg, "runs", run)
    tc = cfg.train
    entries = [tc.image, tc.text, aligned_name(tc.image, run), aligned_name(tc.text, run), cfg.analyze.reference]
    try:
        return _reusable(folder / "platonic.json", cfg, PLATONIC_KEYS, entries) or platonic_test(cfg, run), ""
    except RunIntegrityError:
        raise
    except (CacheError, JoinError, ValueError) as exc:
        return None, str(exc)


def section_platonic(doc: Document, cfg: PipelineConfig, result: dict | None, why: str) -> None:
    doc.heading("Platonic test: the details")
    if result is None:
        doc.para(f"Not available: {why}")
        return
    folder = output_dir(cfg, "runs", result["run"])
    e, n = result["entries"], result["n"]
    doc.para(f"Question: is m(K_repr, K_ref) above the mean of m(K_X, K_ref) and m(K_Y, K_ref) by more than "
             f"chance? X = {e['image']}, Y = {e['text']}, repr = {e['image_aligned']} / {e['text_aligned']}, "
             f"ref = {e['reference']}; n = {n:,} test rows, {result['bootstrap']} resamples for 95% CIs, "
             f"{result['permutations']} shuffled pairings for the null.")
    scores, deltas = [], []
    for m, r in result["results"].items():
        t, d = r["terms"], r["delta"]
        score, diff = display.value_range(m), display.value_range(m, difference=True)
        scores.append([display.metric_label(m), *(display.interval(
            t[x]["score"], t[x]["ci_lo"], t[x]["ci_hi"], marks=display.interval_marks(t[x]["ci_lo"], t[x]["ci_hi"], n, score))
            for x in TERMS)])
        deltas.append([display.metric_label(m), *(display.interval(
            d[s]["delta"], d[s]["ci_lo"], d[s]["ci_hi"], signed=True,
            marks=display.interval_marks(d[s]["ci_lo"], d[s]["ci_hi"], n, diff)) for s in SIDES),
            *(_fmt(t[f"after_{s}"]["null_q95"]) for s in SIDES), *(d[s]["verdict"] for s in SIDES)])
    doc.table(["metric", *(t.replace("_", " ") for t in TERMS)], scores, ["metric", *TERMS])
    doc.table(["metric", "Δ image", "Δ text", "null 95th pct, after image", "null 95th pct, after text",
               "verdict, image", "verdict, text"], deltas,
              ["metric", *(f"delta_{s}" for s in SIDES), *(f"after_{s}.null_q95" for s in SIDES),
               *(f"verdict_{s}" for s in SIDES)])
    legend = display.marks_legend(str(v) for r in scores + deltas for v in r)
    if legend:
        doc.para(legend, "note")
    doc.figure(folder / result["figures"]["bars"], "Scores with 95% CIs; dashes: 95th percentile of the "
               "shuffled-pairing null", "platonic.png")
    if "kernels" in result["figures"]:
        doc.figure(folder / result["figures"]["kernels"], "K_X, K_Y, K_repr and K_ref on the same rows, same order",
                   "kernels.png")
    doc.para(result["headline"])
    for m, per_side in result["sentences"].items():
        for s in SIDES:
            doc.para(per_side[s])


# ----------------------------------------------------------------------------- the command
def _check_run(cfg: PipelineConfig, run: str, info: RunFolder | None) -> None:
    """RunIntegrityError when the run folder mixes trainings or one of its aligned entries (of
    any split) was written by other adapters; saved outputs are reused only after this check."""
    if info is not None:
        verify_run(info.path, run)
    for split in list_splits(cfg.data.cache, cfg.data.dataset, cfg.data.data_dir):
        for name in (aligned_name(cfg.train.image, run), aligned_name(cfg.train.text, run)):
            try:
                entry = find_entry(cfg.data.cache, cfg.data.dataset, split, name, cfg.data.data_dir)
            except CacheError:
                continue  # absent: the sections say so
            check_aligned(cfg.data.cache, [entry])


@dataclass
class ReportFiles:
    """What ``build_report`` wrote, and the summary lines at its top (for the terminal)."""

    md: Path
    html: Path
    summary: list[str]


def build_report(cfg: PipelineConfig, run: str | None = None) -> ReportFiles:
    """``analyze report``: write report.md and report.html for one run (default: ``train.name``
    or fit-adapters' default name). Order: the answer (summary box), the headline numbers, then
    the details."""
    run = run_name(cfg.train, run)
    try:
        info = find_run(cfg.data.cache, run)
    except RunNotFoundError as exc:
        log.warning("%s", exc)
        info = None
    _check_run(cfg, run, info)
    folder = output_dir(cfg, "runs", run)
    doc = Document(f"Experiment report: {cfg.data.dataset}, run {run}", folder)
    result, why = platonic_result(cfg, run)
    section_summary(doc, result, why)
    section_headline(doc, cfg, run, info)
    section_platonic(doc, cfg, result, why)
    section_retrieval(doc, cfg, info)
    section_zeroshot(doc, cfg, run)
    section_languages(doc, cfg, run)
    section_training(doc, info)
    section_matching(doc, cfg, run)
    section_benchmark(doc, cfg, run)
    section_data(doc, cfg)
    section_encoders(doc, cfg)
    section_heatmaps(doc, cfg)
    section_gallery(doc, cfg, run)
    section_costs(doc, cfg, run)
    doc.heading("Provenance")
    doc.para(f"Generated {utc_now()} by `analyze report` (config: {cfg.source}; cache: {cfg.data.cache}; "
             f"analysis split: {cfg.analyze.split}; metrics: {', '.join(cfg.analyze.metrics)}).")
    md, page = folder / "report.md", folder / "report.html"
    md.write_text(doc.markdown(), encoding="utf-8")
    page.write_text(doc.html(), encoding="utf-8")
    return ReportFiles(md, page, answer_lines(result) if result else [f"No Platonic test: {why}"])
