"""Ranking candidate (image, text) encoder pairs before any training (``analyze pairs``).

Freeze-Align (CVPR 2025) picks the encoder pair to align by how similar their frozen
representations already are on paired samples. Here every image entry is scored against
every text entry of the split (aligned ``<entry>@<run>`` entries left out; modality from
``Entry.key["encoder"]["modality"]``) with each metric of ``analyze.metrics``, ranked by the
first. Where fit-adapters runs exist for a pair (``<cache>/runs/*/``), their test mean recall
is shown next to the score, with the Spearman rank correlation over runs when they cover >= 3
distinct encoder pairs (runs of one pair share one score: they say nothing about the ranking).
"""

from __future__ import annotations

import logging
import math

from analyze import plots
from analyze.compare import (AnalyzeError, check_k, default_entries, header, load_joined, metric_kwargs, output_dir,
                             resolve_metrics, write_csv)
from pipeline.cache import find_entry
from pipeline.config import PipelineConfig
from pipeline.runs import RunIntegrityError, is_aligned, list_runs, verify_run
from pipeline.runtime import write_json

log = logging.getLogger(__name__)

MIN_PAIRS_FOR_CORRELATION = 3  # Spearman's rho is reported only when runs cover this many distinct encoder pairs


def modality(entry) -> str | None:
    """"image" | "text" from the extract stage's key (``key["encoder"]["modality"]``), else None."""
    enc = entry.key.get("encoder") if isinstance(entry.key, dict) else None
    return enc.get("modality") if isinstance(enc, dict) else None


def candidates(cfg: PipelineConfig) -> tuple[list[str], list[str], list[str]]:
    """(image entries, text entries, entries left out) of ``analyze.split`` (or ``analyze.entries``);
    an unreadable entry is an error naming it, as in ``analyze cka`` (never dropped silently)."""
    names = default_entries(cfg)
    images, texts, other = [], [], []
    for name in names:
        if is_aligned(name):  # aligned outputs of a run, not a candidate encoder
            other.append(name)
            continue
        mod = modality(find_entry(cfg.data.cache, cfg.data.dataset, cfg.analyze.split, name, cfg.data.data_dir))
        (images if mod == "image" else texts if mod == "text" else other).append(name)
    if not images or not texts:
        raise AnalyzeError(
            f"analyze pairs needs at least one image and one text entry in {cfg.data.dataset}/{cfg.analyze.split} "
            f"(found image: {images or 'none'}, text: {texts or 'none'}); extract both modalities first.")
    return images, texts, other


def spearman(x, y) -> float | None:
    """Spearman's rank correlation, None when undefined (fewer than 2 points or a constant side)."""
    from scipy.stats import spearmanr

    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    rho = spearmanr(x, y).statistic
    return float(rho) if math.isfinite(rho) else None


def _missing(n_pairs: int, n_runs: int) -> str:
    """Why no rank correlation is given, in terms of what is missing."""
    found = f"found {n_pairs} pair{'s' if n_pairs != 1 else ''} with {n_runs} run{'s' if n_runs != 1 else ''}"
    if n_pairs < MIN_PAIRS_FOR_CORRELATION:
        return (f"rank correlation needs runs with test metrics for >= {MIN_PAIRS_FOR_CORRELATION} distinct encoder "
                f"pairs ({found}); run fit-adapters --image IMAGE --text TEXT for more pairs")
    return f"rank correlation is undefined: every run has the same test mean_R or every pair the same score ({found})"


def _verified(run) -> bool:
    """True when the run's metrics.json describes its adapters (``verify_run``); a broken run
    folder is left out with a warning naming it, so it never stops the ranking of the others."""
    try:
        verify_run(run.path, run.name)
    except RunIntegrityError as exc:
        log.warning("leaving out run %s: %s", run.name, exc)
        return False
    return True


def rank_pairs(cfg: PipelineConfig) -> dict:
    """``analyze pairs``: score, rank and (where runs exist) relate to retrieval. Writes
    ``pairs/pairs.json``, ``pairs/pairs.csv`` and, when runs exist, ``pairs/pairs.png``.
    Returns the JSON document plus ``out``."""
    a = cfg.analyze
    images, texts, left_out = candidates(cfg)
    metrics = resolve_metrics(a.metrics)
    rank_by = next(iter(metrics))
    joined = load_joined(cfg, images + texts)
    check_k(metrics, a.k, joined.n)
    F = joined.features
    runs = [r for r in list_runs(cfg.data.cache)
            if r.mean_R is not None and (r.dataset or cfg.data.dataset) == cfg.data.dataset and _verified(r)]
    rows = []
    for im in images:
        for tx in texts:
            row = {"image": im, "text": tx}
            for m, fn in metrics.items():
                row[m] = float(fn(F[im], F[tx], **metric_kwargs(fn, a.k)))
            matched = [r for r in runs if (r.image, r.text) == (im, tx)]
            row["runs"] = [{"run": r.name, "test_mean_R": r.mean_R} for r in matched]
            row["best_test_mean_R"] = max((r.mean_R for r in matched), default=None)
            rows.append(row)
    rows.sort(key=lambda r: -r[rank_by] if math.isfinite(r[rank_by]) else math.inf)
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    points = [(row[rank_by], run["test_mean_R"], run["run"]) for row in rows for run in row["runs"]]
    n_pairs = sum(1 for row in rows if row["runs"])
    rho = spearman([p[0] for p in points], [p[1] for p in points]) if n_pairs >= MIN_PAIRS_FOR_CORRELATION else None
    out = output_dir(cfg, "pairs")
    doc = {**header(cfg, "pairs"), "n": joined.n, "rank_by": rank_by, "metrics": list(metrics),
           "images": images, "texts": texts, "left_out": left_out, "pairs": rows,
           "runs_used": len(points), "pairs_used": n_pairs, "spearman_rho": rho,
           "spearman_note": (f"Spearman rank correlation between {rank_by} and test mean_R over {len(points)} runs "
                             f"of {n_pairs} encoder pairs" if rho is not None else _missing(n_pairs, len(points))),
           "figure": None}
    if points:
        title = f"{rank_by} before training vs test mean recall after" + (f" (Spearman rho {rho:.2f})" if rho is not None else "")
        doc["figure"] = plots.scatter([p[0] for p in points], [p[1] for p in points], [p[2] for p in points], title,
                                      out / "pairs.png", xlabel=f"{rank_by}(image, text) on {a.split}",
                                      ylabel="test mean_R").name
    write_json(out / "pairs.json", doc)
    write_csv(out / "pairs.csv", [{"rank": r["rank"], "image": r["image"], "text": r["text"],
                                   **{m: r[m] for m in metrics},
                                   "best_test_mean_R": r["best_test_mean_R"] if r["best_test_mean_R"] is not None else "",
                                   "runs": " ".join(x["run"] for x in r["runs"])} for r in rows])
    return {**doc, "out": out}

