"""``study``: run a grid of cells and summarise it.

``run_study(cfg)`` expands ``[study.axes]`` (``study.grid``), runs every cell that is not
finished (``study.cells``: extraction of what is missing, fit-adapters, the Platonic test), one
after the other with a progress bar, and writes under
``<analyze.out>/<dataset>/<analyze.split>/studies/<study.name>/``:

    study.json    the study: axes, repeat axis, base configuration, cells and their status
    cells/        one result file per cell (<cell_id>.json), written atomically when it ends
    cells.csv     one row per cell (columns: study.table), rewritten after every cell
    summary.csv   one row per setting of the non-repeat axes: n, mean, std, 95% intervals
    fraction.png, pair.png, heatmap.png   when their axes vary (study.figures)
    study.md, study.html   tables, figures, one sentence per research question (study.report)

A failing cell is recorded (status "failed", its error) and the study goes on; a rerun retries
it. A killed study resumes: finished cells are skipped (their result file holds the current
configuration hash), the interrupted one runs again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from analyze.compare import output_dir, write_csv
from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.runtime import atomic_write, utc_now, write_json
from study.cells import Memo, cell_path, cell_row, ensure_entries, is_finished, read_result, run_cell
from study.figures import fraction_figure, heatmap_figure, pair_figure
from study.grid import Cell, check_repeat, expand, study_axes
from study.report import answer_q1, answer_q2, build_report
from study.table import columns, summarize

log = logging.getLogger(__name__)


@dataclass
class StudyResult:
    """What ``run_study`` did. status: cell_id -> "done" | "failed" | "pending" (dry run);
    ran: cells computed by this call; answers: the research-question sentences."""

    folder: Path
    cells: list[Cell]
    status: dict[str, str]
    ran: int = 0
    trained: int = 0
    seconds: float = 0.0
    answers: list[str] = field(default_factory=list)
    summary: list[dict] = field(default_factory=list)
    html: Path | None = None

    @property
    def failed(self) -> int:
        return sum(s == "failed" for s in self.status.values())


def study_dir(cfg: PipelineConfig) -> Path:
    """``<analyze.out>/<dataset>/<analyze.split>/studies/<study.name>`` (created)."""
    return output_dir(cfg, "studies", cfg.study.name)


def _write_table(path: Path, rows: list[dict], cols: list[str]) -> None:
    ordered = [{c: r.get(c, "") for c in cols} for r in rows]
    atomic_write(path, lambda tmp: write_csv(tmp, ordered))


def _done(doc: dict | None, cell, memo: Memo, dry_run: bool) -> bool:
    """Whether a cell is finished: its result is done for its configuration and for the data it
    reads now (extracting what is missing; entries that cannot be made leave the cell to run and
    record the error). A dry run checks the configuration only and extracts nothing."""
    if dry_run:
        return is_finished(doc, cell)
    try:
        data = ensure_entries(cell.config, memo)
    except PipelineError:
        return False
    return is_finished(doc, cell, data)


def run_study(cfg: PipelineConfig, progress: bool | None = None, dry_run: bool = False) -> StudyResult:
    """Run (or, with ``dry_run``, only list) the study of ``cfg.study``; see the module docstring.
    progress: a tqdm bar over cells; None = only on a terminal."""
    t0 = time.perf_counter()
    cells = expand(cfg)  # every check before any work
    axes = study_axes(cfg.study)
    repeat = check_repeat(cfg.study.repeat, axes)
    if cfg.study.repeat and not repeat:
        log.warning("study.repeat = %r is not an axis: every setting has one cell and no interval", cfg.study.repeat)
    folder = study_dir(cfg)
    docs = {c.cell_id: read_result(cell_path(folder, c)) for c in cells}
    memo = Memo()
    todo = [c for c in cells if not _done(docs[c.cell_id], c, memo, dry_run)]
    pending = {c.cell_id for c in todo}
    result = StudyResult(folder, cells, {c.cell_id: "done" if c.cell_id not in pending else
                                         "failed" if (docs[c.cell_id] or {}).get("status") == "failed" else "pending"
                                         for c in cells})
    log.info("study %s: %d cells, %d finished, %d to run", cfg.study.name, len(cells), len(cells) - len(todo), len(todo))
    if dry_run:
        return result
    _write_study_json(cfg, folder, cells, axes, repeat, result.status)
    cols = list(axes)
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc=f"study {cfg.study.name}", unit="cell",
               disable=None if progress is None else not progress)
    try:
        for cell in todo:
            bar.set_postfix_str(cell.cell_id, refresh=True)
            docs[cell.cell_id] = doc = run_cell(cell, folder, memo)
            result.status[cell.cell_id] = doc["status"]
            result.ran += 1
            result.trained += bool(doc.get("trained"))
            rows = [cell_row(c, docs[c.cell_id] or {"status": "pending"}) for c in cells]
            _write_table(folder / "cells.csv", rows, columns(rows, cols))
            bar.update()
    finally:
        bar.close()
    rows = [cell_row(c, docs[c.cell_id]) for c in cells]
    _write_table(folder / "cells.csv", rows, columns(rows, cols))
    summary = summarize(rows, cols, repeat)
    _write_table(folder / "summary.csv", summary, columns(summary, [a for a in cols if a != repeat], ["n", "failed"]))
    result.summary = summary
    result.answers = [answer_q1(summary, axes, repeat), answer_q2(summary, axes, repeat, sum(
        r["status"] == "done" for r in rows))]
    figures = _figures(folder, summary, axes, repeat, result)
    result.seconds = time.perf_counter() - t0
    _write_study_json(cfg, folder, cells, axes, repeat, result.status, result)
    intro = (f"Config: {cfg.source}; dataset {cfg.data.dataset}, analysis split {cfg.analyze.split}, cache "
             f"{cfg.data.cache}. Grid: {' x '.join(f'{k} {v}' for k, v in axes.items())} = {len(cells)} cells "
             f"({len(cells) - result.failed} done, {result.failed} failed); repeat axis: {repeat or 'none'}. "
             f"This call ran {result.ran} cells ({result.trained} trainings) in {result.seconds:.0f} s; the cells' "
             f"own times (all calls) sum to {sum((d or {}).get('seconds', 0.0) for d in docs.values()):.0f} s.")
    result.html = build_report(folder, f"Study {cfg.study.name}: {cfg.data.dataset}", intro, result.answers,
                               summary, rows, axes, repeat, figures)
    return result


def _figures(folder: Path, summary: list[dict], axes: dict, repeat: str, result: StudyResult) -> list[tuple[Path, str]]:
    out = []
    path = fraction_figure(summary, axes, repeat, folder / "fraction.png")
    if path:
        out.append((path, "Test mean recall and every Platonic delta against the train fraction; one line per "
                          "setting of the other axes; bars: 95% t-interval over repeats."))
    path, rho, x_col = pair_figure(summary, axes, repeat, folder / "pair.png")
    if path:
        rho_text = f"Spearman's rho = {rho:.2f}" if rho is not None else "rho undefined"
        out.append((path, f"Test mean recall against {x_col} of the frozen encoder pair before training "
                          f"(the Freeze-Align criterion); {rho_text} over settings."))
        result.answers.append(f"Pair choice: across settings, {x_col} before training and test mean recall after "
                              f"have {rho_text}.")
    path = heatmap_figure(summary, axes, repeat, folder / "heatmap.png")
    if path:
        out.append((path, "Test mean recall over the first two categorical axes (mean over the other axes)."))
    return out


def _write_study_json(cfg: PipelineConfig, folder: Path, cells: list[Cell], axes: dict, repeat: str,
                      status: dict, result: StudyResult | None = None) -> None:
    doc = {"name": cfg.study.name, "updated": utc_now(), "config_source": cfg.source, "axes": axes,
           "variants": cfg.study.variants, "repeat": repeat, "config": cfg.to_dict(),
           "cells": [{"cell_id": c.cell_id, "values": c.values, "run": c.run, "config_hash": c.config_hash,
                      "status": status.get(c.cell_id, "pending")} for c in cells]}
    if result is not None:
        doc.update(seconds=result.seconds, ran=result.ran, trained=result.trained, answers=result.answers,
                   outputs=["cells.csv", "summary.csv", "study.md", "study.html"])
    write_json(folder / "study.json", doc)
