"""Running one cell of a study, and its result file.

A cell runs only what it needs:

1. extraction of the encoders it uses (``train.image``, ``train.text``, ``train.modalities``,
   ``train.reference``, ``analyze.reference``): ``extract.run.extract`` with just those encoders,
   which computes what is missing, verifies what is cached and refuses an entry made for another
   request (e.g. a study axis over ``data.captions`` or ``extract.*`` that would otherwise read
   the first cell's entries: give such variants their own encoder names). The keys of the entries
   (data fingerprint, image content, extraction request) make the cell's data signature;
2. training, unless its run folder already holds a finished run (metrics.json) whose
   config.json has the cell's training configuration (:func:`study.grid.train_hash`), whose
   train entries are the ones it was trained on (their keys, recorded in adapters.json) and whose
   aligned entries exist: ``train.fit.fit_adapters``;
3. what ``study.evaluations`` lists: the Platonic test (``analyze.platonic.platonic_test``, no
   kernel figure) and zero-shot classification (``analyze.zeroshot.zero_shot``).

Its result is one JSON file, ``<study>/cells/<cell_id>.json``, written atomically when the cell
ends (done or failed): ``cell_id``, ``index``, ``values``, ``config_hash``, ``run``, ``status``,
``error`` (and ``traceback`` for an unexpected error), ``trained`` (False when the run was
reused), ``data`` (the data signature), ``by`` (the launch, host, pid and worker that ran it),
``seconds``, ``finished`` and ``row`` (the cells.csv row).
A cell whose file has status "done", the current ``config_hash`` and the current data signature
is finished; anything else (no file, failed, another hash, re-extracted data) runs again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analyze.compare import load_joined, metric_kwargs, resolve_metrics
from analyze.platonic import platonic_test
from analyze.zeroshot import zero_shot
from extract.run import extract
from pipeline.cache import CacheError, find_entry
from pipeline.staging import canonical_json
from pipeline.config import PipelineConfig, with_values
from pipeline.errors import PipelineError
from pipeline.runs import (ADAPTER_JSON, CONFIG, METRICS, aligned_name, is_aligned, modality_entries, read_run,
                           run_dir)
from pipeline.runtime import utc_now, write_json
from study.grid import Cell, train_hash
from study.table import flat_platonic, flat_zeroshot, retrieval_columns
from train.fit import fit_adapters

log = logging.getLogger(__name__)

CELLS_DIR = "cells"  # <study>/cells/<cell_id>.json
FORMAT = 1  # version of the cell result file


@dataclass
class Memo:
    """What a process of a study computes once and shares between cells: the data signature of
    each extraction request ({request: signature}; a worker starts from the signatures the launch
    computed, ``study.workers``), the error of a request that could not be extracted ({request:
    exception}: raised again for every cell that needs it) and the pre-training pair scores
    ({key: columns})."""

    signatures: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    pair_scores: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- result files
def cell_path(study_dir: Path, cell: Cell) -> Path:
    return study_dir / CELLS_DIR / f"{cell.cell_id}.json"


def read_result(path: Path) -> dict | None:
    """A cell result file, or None when absent or unreadable (a warning)."""
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        log.warning("ignoring unreadable cell result %s: %s", path, exc)
        return None
    return doc if isinstance(doc, dict) else None


def is_finished(doc: dict | None, cell: Cell, data: str | None = None) -> bool:
    """True when ``doc`` records this cell done with its current configuration hash (and, when
    given, the current data signature ``data``: see ``ensure_entries``)."""
    return (bool(doc) and doc.get("status") == "done" and doc.get("config_hash") == cell.config_hash
            and (data is None or doc.get("data") == data))


# ----------------------------------------------------------------------------- the three steps
def encoders_of(cfg: PipelineConfig) -> list[str]:
    """Encoder entries a cell reads (aligned ``<encoder>@<run>`` sources excluded)."""
    platonic = "platonic" in cfg.study.evaluations  # only the Platonic test reads analyze.reference
    names = [*modality_entries(cfg.train).values(), cfg.train.reference, cfg.analyze.reference if platonic else ""]
    return [n for n in dict.fromkeys(names) if n and not is_aligned(n)]


def extraction_config(cfg: PipelineConfig) -> tuple[PipelineConfig, str]:
    """The cell's extraction: ``cfg`` asking for just the encoders it reads (:func:`encoders_of`),
    and the request's identity (canonical JSON of its data and extract sections)."""
    names = encoders_of(cfg)
    options = {k: v for k, v in cfg.extract.encoder_options.items() if k in names}
    sub = with_values(cfg, {"extract.encoders": names, "extract.encoder_options": options})
    return sub, canonical_json({s: sub.to_dict()[s] for s in ("data", "extract")})


def ensure_entries(cfg: PipelineConfig, memo: Memo) -> str:
    """Extract, or verify, the cell's encoder entries (module docstring); returns the cell's data
    signature: a digest of the keys of every entry it reads. Once per extraction request (a
    request that fails raises the same error again)."""
    sub, request = extraction_config(cfg)
    if request in memo.errors:
        raise memo.errors[request]
    if request not in memo.signatures:
        try:
            keys = sorted((e.key.get("split", ""), e.name, canonical_json(e.key)) for e in extract(sub))
        except PipelineError as exc:
            memo.errors[request] = exc
            raise
        memo.signatures[request] = hashlib.sha256(canonical_json(keys).encode()).hexdigest()[:16]
    return memo.signatures[request]


def _trained_on_current_entries(cfg: PipelineConfig, folder: Path) -> bool:
    """True when every train entry recorded in the run's adapters.json has the key it has now."""
    try:
        sources = json.loads((folder / ADAPTER_JSON).read_text(encoding="utf-8"))["modalities"]
        return all(find_entry(cfg.data.cache, cfg.data.dataset, "train", s["entry"], cfg.data.data_dir).key == s["key"]
                   for s in sources.values())
    except (OSError, ValueError, KeyError, TypeError, CacheError):
        return False


def finished_run(cfg: PipelineConfig, run: str):
    """The run's RunMetrics when its folder holds a finished training of this configuration
    (same training hash, aligned entries present), else None."""
    folder = run_dir(cfg.data.cache, run)
    if not (folder / METRICS).is_file() or not (folder / CONFIG).is_file():
        return None
    info = read_run(folder)
    if info.metrics is None or train_hash(info.config) != train_hash(cfg) or not _trained_on_current_entries(cfg, folder):
        return None
    try:
        for name in (cfg.train.image, cfg.train.text):
            find_entry(cfg.data.cache, cfg.data.dataset, cfg.analyze.split, aligned_name(name, run), cfg.data.data_dir)
    except CacheError:
        return None
    return info.metrics


def pair_columns(cfg: PipelineConfig, memo: Memo) -> dict[str, float]:
    """``pair.<metric>``: each analyze metric between the frozen image and text encoders on
    ``analyze.split`` (rows joined by image id), computed once per pair and settings."""
    a, tc = cfg.analyze, cfg.train
    key = (str(cfg.data.cache), cfg.data.dataset, a.split, tc.image, tc.text, a.metrics, a.k, a.max_rows, a.seed)
    if key not in memo.pair_scores:
        joined = load_joined(cfg, [tc.image, tc.text])
        X, Y = joined.features[tc.image], joined.features[tc.text]
        memo.pair_scores[key] = {f"pair.{m}": float(fn(X, Y, **metric_kwargs(fn, a.k)))
                                 for m, fn in resolve_metrics(a.metrics).items()}
    return memo.pair_scores[key]


def compute_cell(cell: Cell, memo: Memo) -> tuple[dict, bool, str]:
    """Run the cell's steps; returns (its measured columns, whether it trained, its data signature)."""
    cfg = cell.config
    data = ensure_entries(cfg, memo)
    metrics = finished_run(cfg, cell.run)
    trained = metrics is None
    if trained:
        metrics = fit_adapters(cfg, progress=False).metrics
    row = {**retrieval_columns(metrics), **pair_columns(cfg, memo)}
    if "platonic" in cfg.study.evaluations:
        row.update(flat_platonic(platonic_test(cfg, cell.run, kernels=False)))
    if "zeroshot" in cfg.study.evaluations:
        row.update(flat_zeroshot(zero_shot(cfg, cell.run)))
    return row, trained, data


def run_cell(cell: Cell, study_dir: Path, memo: Memo, by: dict | None = None) -> dict:
    """Run one cell and write its result file; an error is recorded (status "failed") and not
    raised, except KeyboardInterrupt / SystemExit, which stop the study (the cell runs again
    next time). ``by``: who ran it (launch, host, pid, worker), recorded as is. Returns the
    result document."""
    t0 = time.perf_counter()
    doc: dict[str, Any] = {"format": FORMAT, "cell_id": cell.cell_id, "index": cell.index, "values": cell.values,
                           "config_hash": cell.config_hash, "run": cell.run, "by": dict(by or {})}
    try:
        row, trained, data = compute_cell(cell, memo)
        doc.update(status="done", error="", trained=trained, data=data, row=row)
    except Exception as exc:  # noqa: BLE001 - one failing cell must not stop the study
        expected = isinstance(exc, PipelineError)
        doc.update(status="failed", error=f"{type(exc).__name__}: {exc}", trained=None, row={})
        if not expected:  # a bug, not a bad setting: keep the traceback
            doc["traceback"] = traceback.format_exc()
        log.error("cell %s failed: %s", cell.cell_id, doc["error"], exc_info=not expected)
    doc.update(seconds=time.perf_counter() - t0, finished=utc_now())
    path = cell_path(study_dir, cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, doc)
    log.info("cell %s %s in %.1f s", cell.cell_id, doc["status"], doc["seconds"])
    return doc


def cell_row(cell: Cell, doc: dict) -> dict:
    """The cells.csv row of a result document: axes, run, status, error, then its columns."""
    return {**cell.values, "run": cell.run, "status": doc.get("status", ""), "error": doc.get("error", ""),
            **(doc.get("row") or {})}
