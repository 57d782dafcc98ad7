"""The report's evaluation sections: zero-shot classification, training-free matching,
CLIP_benchmark's figures beside the project's, the retrieval gallery and the cost table (called
by ``analyze.report.build_report``).

Zero-shot, matching and benchmark numbers are read from ``analyze zeroshot`` / ``analyze
matching`` / ``analyze benchmark`` outputs (``runs/<run>/zeroshot.json``, ``matching.json``,
``benchmark-*.json``) when they were made for the same cache, dataset, split and adapters (the
adapters' sha256); otherwise the section names the command that makes them, so building a
report never starts a long computation. ``doc`` is an ``analyze.report.Document`` (headings,
paragraphs, tables, figures, raw blocks).
"""

from __future__ import annotations

import json
import logging
import math

from analyze.compare import data_dir_of, output_dir
from analyze.display import count
from analyze.evalrun import MODALITIES, open_run
from analyze.gallery import build_gallery
from analyze.languages import OUTPUT as LANGUAGES_OUTPUT
from analyze.prompts import prompt_entry_path
from pipeline.cache import CacheError, find_entry, list_splits, open_entry
from pipeline.config import PipelineConfig
from pipeline.runs import read_run, run_name
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

TRAINING_FREE_NAMES = {"local_cka": "local CKA (training-free)", "relative": "ASIF relative (training-free)"}
PER_CLASS_ROWS = 30  # classes listed in the per-class accuracy table (most frequent first)
BENCHMARK_FILES = "benchmark-*.json"  # analyze benchmark's outputs (analyze.benchmark.output_name)
ZEROSHOT_NAMES = {"adapters": "trained adapters", "cca": "CCA", "procrustes": "PCA + Procrustes",
                  "relative": "ASIF relative (training-free)"}


def saved_output(cfg: PipelineConfig, run: str, filename: str) -> tuple[dict | None, str]:
    """(document, "") when runs/<run>/<filename> is current, else (None, why not)."""
    path = output_dir(cfg, "runs", run) / filename
    if not path.is_file():
        return None, "not computed yet"
    doc = json.loads(path.read_text(encoding="utf-8"))
    try:
        rv = open_run(cfg, run)
        # entries of the evaluated split rewritten after the result (re-extracted features) make it stale
        newer = any(rv.entry(cfg.analyze.split, m).path.stat().st_mtime > path.stat().st_mtime for m in rv.entries)
    except (PipelineError, OSError) as exc:
        return None, f"the run or its entries cannot be opened ({exc})"
    same = (doc.get("run_sha256") == rv.sha256 and not newer and doc.get("cache") == str(cfg.data.cache)
            and doc.get("data_dir") == data_dir_of(cfg)
            and doc.get("dataset") == cfg.data.dataset and doc.get("split") == cfg.analyze.split
            and doc.get("label_from", cfg.data.label_from) == cfg.data.label_from)  # zero-shot labels
    return (doc, "") if same else (None, "the saved result was made for other adapters, data or labels")


def training_free_rows(cfg: PipelineConfig, run: str, n_images: int | None) -> dict[str, dict]:
    """Retrieval rows of the training-free methods from matching.json, when it covers the
    whole split (``n_images`` test images), for the report's retrieval table."""
    doc, _ = saved_output(cfg, run, "matching.json")
    if doc is None or (n_images is not None and doc.get("n_images") != n_images):
        return {}
    return {TRAINING_FREE_NAMES.get(m, m): doc["retrieval"][m] for m in doc.get("training_free", [])}


def section_zeroshot(doc, cfg: PipelineConfig, run: str) -> None:
    doc.heading("Zero-shot classification")
    res, why = saved_output(cfg, run, "zeroshot.json")
    if res is None:
        doc.para(f"Not available ({why}): run `analyze zeroshot --run {run}` (with the same --config) first.")
        return
    ch = res["chance"]
    rows = [[ZEROSHOT_NAMES.get(m, m), r["top1"], r["top5"], r["balanced"]] for m, r in res["results"].items()]
    rows += [["chance (random ranking)", ch["top1"], ch["top5"], ch["balanced"]],
             ["majority class", ch["majority"], None, ch.get("majority_balanced")]]
    doc.table(["method", "top-1", "top-5", "balanced accuracy"], rows)
    a = res["results"]["adapters"]
    doc.para(f"{res['n']} {res['split']} images, {len(res['classes'])} classes (labels: {res['label_from']}), "
             f"{len(res['templates'])} prompt templates (e.g. \"{res['templates'][0]}\"): the trained adapters put the "
             f"true class first for {_f3(a['top1'])} of the images, against {_f3(ch['top1'])} by chance and "
             f"{_f3(ch['majority'])} for always answering the most frequent class; balanced accuracy "
             f"{_f3(a['balanced'])}.")
    per = sorted(a["per_class"].items(), key=lambda kv: (-kv[1]["n"], kv[0]))
    if "confusion" in res.get("figures", {}):
        absent = sorted(c.replace("_", " ") for c in res["classes"] if a["per_class"].get(c, {}).get("n", 0) == 0)
        blank = (f"; blank rows: classes without {res['split']} images ({', '.join(absent)}), still offered as "
                 f"answers" if absent else "")
        doc.figure(output_dir(cfg, "runs", run) / res["figures"]["confusion"],
                   f"Zero-shot confusion matrix of the trained adapters (rows: true class, each row's share of its "
                   f"images{blank})", "zeroshot-confusion.png")
    doc.table(["class", "test images", "top-1 (adapters)"],
              [[c.replace("_", " "), v["n"], v["top1"]] for c, v in per[:PER_CLASS_ROWS]])
    if len(per) > PER_CLASS_ROWS:
        doc.para(f"Per-class accuracy of the {PER_CLASS_ROWS} most frequent of {len(per)} classes; all are in zeroshot.json.")


def section_matching(doc, cfg: PipelineConfig, run: str) -> None:
    doc.heading("Training-free matching")
    res, why = saved_output(cfg, run, "matching.json")
    if res is None:
        doc.para(f"Not available ({why}): run `analyze matching --run {run}` (with the same --config) first.")
        return
    rows = [[name, m["n"], m["seeds"], m["accuracy"], m["chance"], m["seconds"]] for name, m in res["matching"].items()]
    doc.table(["features", "rows", "known pairs", "matching accuracy", "chance", "seconds"], rows)
    raw = res["matching"]["raw"]
    doc.para(f"Seeded quadratic assignment ({res['kernel']} kernels, centred) matches images to captions of the "
             f"{res['split']} split from {raw['seeds']} known pairs without any training: {_f3(raw['accuracy'])} of the "
             f"other {raw['n'] - raw['seeds']} images get their own caption (chance {_f3(raw['chance'])}); the row "
             f"'adapters' matches the trained embeddings the same way. The retrieval table above has the training-free "
             f"rows (local CKA on {res['base_rows']} train pairs; ASIF on {res['anchors']} anchors) when they cover the split.")


def section_benchmark(doc, cfg: PipelineConfig, run: str) -> None:
    """CLIP_benchmark's figures (``analyze benchmark``, every current ``benchmark-*.json`` of the
    run) beside the project's on the same rows."""
    doc.heading("The field's benchmark suite (CLIP_benchmark)")
    folder = output_dir(cfg, "runs", run)
    rows, notes = [], []
    for path in sorted(folder.glob(BENCHMARK_FILES)):
        res, why = saved_output(cfg, run, path.name)
        if res is None:
            notes.append(f"{path.name}: {why}")
            continue
        where = f"{res['benchmark']} ({res['split']})"
        for task, r in res["results"].items():
            rows += [[where, task.removeprefix("zeroshot_"), f"{c['figure']} ({c['project_figure']})", c["clip_benchmark"],
                      c["project"], c["close_calls"]] for c in r["compare"]]
    if not rows:
        doc.para("Not available" + (f" ({'; '.join(notes)})" if notes else " (not computed yet)") +
                 f": run `analyze benchmark --run {run}` (the run's own split; `analyze benchmark DATASET "
                 f"--dataset-root DIR` for a dataset CLIP_benchmark knows), with the same --config.")
        return
    doc.table(["dataset (split)", "task", "CLIP_benchmark figure (project's)", "CLIP_benchmark", "project, same rows",
               "close calls"], rows)
    doc.para("LAION's CLIP_benchmark metric functions run on the run's aligned model (re-encoding the raw images "
             "and captions); the project's column is computed from the cached features (metrics.json's test recall, "
             "analyze zeroshot). image_retrieval_recall@K is text-to-image R@K, text_retrieval_recall@K image-to-text; "
             "acc1 / acc5 / mean_per_class_recall are top-1 / top-5 / balanced accuracy (acc5 is n/a below 5 classes). "
             "The two columns can differ only where a tie or a score difference under 1e-5 decides a hit (close calls): "
             "CLIP_benchmark breaks ties by torch.topk's order, the project by its fixed rule.")
    if notes:
        doc.para("Left out: " + "; ".join(notes) + ".")


def _f3(v) -> str:
    """A saved number with 3 decimals; "n/a" for null (older outputs store NaN as null) or NaN."""
    return f"{v:.3f}" if isinstance(v, (int, float)) and math.isfinite(v) else "n/a"


def section_gallery(doc, cfg: PipelineConfig, run: str) -> None:
    doc.heading("Retrieval gallery")
    try:
        md, body = build_gallery(cfg, run)
    except (PipelineError, OSError) as exc:
        doc.para(f"Not available: {exc}")
        return
    doc.raw(md, body)


def _entry_cost(cfg: PipelineConfig, name: str) -> tuple[int | None, float, int]:
    """(frozen parameters or None, extraction seconds summed over splits, rows) of one encoder."""
    params, seconds, rows = None, 0.0, 0
    for split in list_splits(cfg.data.cache, cfg.data.dataset, cfg.data.data_dir):
        try:
            e = find_entry(cfg.data.cache, cfg.data.dataset, split, name, cfg.data.data_dir)
        except CacheError:
            continue
        params = e.provenance.get("parameters", params)
        seconds += float(e.provenance.get("extract_seconds") or 0.0)
        rows += e.n
    return params, seconds, rows


def section_costs(doc, cfg: PipelineConfig, run: str) -> None:
    doc.heading("Cost")
    try:
        rv = open_run(cfg, run)
    except PipelineError as exc:
        doc.para(f"Not available: {exc}")
        return
    rows = []
    names = [rv.entries[m] for m in MODALITIES] + ([cfg.analyze.reference] if cfg.analyze.reference else [])
    for name in dict.fromkeys(names):
        params, seconds, n = _entry_cost(cfg, name)
        if n:
            rows.append([f"frozen encoder {name}", count(params), "no", f"{seconds:.1f}",
                         f"extraction of {n:,} rows (all splits)"])
    trainable = sum(p.numel() for p in rv.run.model.parameters() if p.requires_grad)
    metrics = read_run(rv.path).metrics
    train_time, epochs, device = ((metrics.train_time_s, metrics.epochs_run, metrics.device) if metrics
                                  else (None, "-", "-"))
    rows.append([f"adapters ({rv.run.train.adapter}, d_e = {rv.dim})", count(trainable), "yes",
                 _seconds(train_time), f"training, {epochs} epochs on {device or '-'}"])
    prompts = prompt_entry_path(cfg.data.cache, cfg.data.dataset, rv.entries["text"])
    if prompts.exists():
        prov = open_entry(prompts).provenance
        rows.append(["zero-shot prompts", None, "no", _seconds(prov.get("extract_seconds")),
                     f"embedding {len(prov.get('texts', []))} prompts with {rv.entries['text']}"])
    for file, what in (("zeroshot.json", "analyze zeroshot"), ("matching.json", "analyze matching")):
        res, _ = saved_output(cfg, run, file)
        if res is not None:
            rows.append([what, None, "-", _seconds(res.get("seconds", sum(res.get("retrieval_seconds", {}).values()))),
                         "evaluation"])
    doc.table(["component", "parameters", "trainable", "seconds", "what the time covers"], rows)
    doc.para("Times come from provenance (cache entries, metrics.json, analysis outputs). Image encoders of one "
             "extraction share a single pass over the images (decoded once), so each records the time of that pass; "
             "'-' marks figures an older cache did not record (re-extract to record parameter counts).")


def _seconds(v) -> str:
    return f"{float(v):.1f}" if isinstance(v, (int, float)) else "-"


def section_languages(doc, cfg: PipelineConfig, run: str) -> None:
    """The report's per-language table, from languages.json (nothing when it was not computed)."""
    res, _ = saved_output(cfg, run, LANGUAGES_OUTPUT)
    if res is None:
        return
    doc.heading("Languages")
    table = []
    for code, row in res["languages"].items():
        r, z = row["retrieval"], row.get("zeroshot", {})
        table.append([code, f"{r['n_images']} / {r['split_images']}", r["i2t_R@1"], r["i2t_R@10"], r["t2i_R@1"],
                      r["t2i_R@10"], z.get("top1"), z.get("chance_top1")])
    doc.table(["language", "test images with it", "i2t R@1", "i2t R@10", "t2i R@1", "t2i R@10", "zero-shot top-1",
               "zero-shot chance"], table)
    doc.para("Retrieval in a language ranks only the test images that have captions in it (the count beside it); "
             "images without a translation are left out, not scored as misses. Zero-shot classifies every test image "
             "with that language's templates and class names; '-' means the prompts file has none for it.")


def chance_recall(n_images: int, k: int) -> float:
    """Chance image-to-text R@k with one caption per image: k / n."""
    return float(min(1.0, k / max(n_images, 1)))


def eval_sections(doc, cfg: PipelineConfig, run: str | None) -> None:
    """Every section of this module, in report order."""
    run = run_name(cfg.train, run)
    for section in (section_zeroshot, section_languages, section_matching, section_benchmark, section_gallery, section_costs):
        section(doc, cfg, run)
