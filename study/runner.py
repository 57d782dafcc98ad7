"""``study``: run a grid of cells and summarise it.

``run_study(cfg)`` expands ``[study.axes]`` (``study.grid``), checks every cell's whole
configuration (``study.checks``), makes or verifies the cache entries every cell reads (once
per extraction request, before any cell trains), runs every cell that is not finished
(``study.cells``: fit-adapters, the Platonic test, ...) with ``study.jobs`` workers on this
machine or as a SLURM job array (``study.launcher``; ``study.workers``, ``study.slurm``; cells
are claimed, ``study.claims``), shows the progress (``study.status``) and writes under
``<analyze.out>/<dataset>/<analyze.split>/studies/<study.name>/``:

    study.json    the study: axes, repeat axis, base configuration, cells and their status, the last launch
    entries.json  the data signatures of the entries the cells read (the last launch's extraction)
    cells/        one result file per cell (<cell_id>.json), written atomically when it ends
    claims/       one file per training being run (who runs it, a heartbeat); empty when nothing runs
    cells.csv     one row per cell (columns: study.table), rewritten after every cell
    summary.csv   one row per setting of the non-repeat axes: n, mean, std, 95% intervals
    fraction.png, pair.png, heatmap.png   when their axes vary (study.figures)
    study.md, study.html   tables, figures, one sentence per research question (study.report)

A failing cell is recorded (status "failed", its error) and the study goes on; a rerun retries
it. A killed study resumes: finished cells are skipped (their result file holds the current
configuration hash and data signature), the interrupted one runs again. The answer does not
depend on the launcher or the number of workers: each cell's result is computed from its own
configuration alone. ``summarize_study`` writes the tables and the report from the result files
alone (``study --summarize``, e.g. after a SLURM array), ``status_of`` says what is running.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from analyze.compare import output_dir, write_csv
from pipeline.config import PipelineConfig
from pipeline.runtime import atomic_write, utc_now, write_json
from study.cells import Memo, cell_path, is_finished, read_result
from study.checks import check_cells
from study.claims import HOST, list_claims
from study.figures import fraction_figure, heatmap_figure, pair_figure
from study.grid import Cell, StudyError, check_repeat, expand, study_axes
from study.report import answer_q1, answer_q2, build_report
from study.slurm import Submission, slurm_settings, submit
from study.status import Progress, snapshot, status_lines
from study.table import columns, summarize
from study.workers import Board, Plan, new_launch, prepare, read_signatures, run_local, units

log = logging.getLogger(__name__)


@dataclass
class StudyResult:
    """What ``run_study`` did. status: cell_id -> "done" | "failed" | "pending" (dry run, or not
    run yet); ran / trained: cells computed and trainings made by the launch; answers: the
    research-question sentences; submission: the SLURM jobs when the launch was submitted."""

    folder: Path
    cells: list[Cell]
    status: dict[str, str]
    ran: int = 0
    trained: int = 0
    seconds: float = 0.0
    answers: list[str] = field(default_factory=list)
    summary: list[dict] = field(default_factory=list)
    html: Path | None = None
    submission: Submission | None = None
    errors: dict[str, str] = field(default_factory=dict)  # cell_id -> error of each failed cell

    @property
    def failed(self) -> int:
        return sum(s == "failed" for s in self.status.values())

    @property
    def pending(self) -> int:
        return sum(s == "pending" for s in self.status.values())


def study_dir(cfg: PipelineConfig) -> Path:
    """``<analyze.out>/<dataset>/<analyze.split>/studies/<study.name>`` (created)."""
    return output_dir(cfg, "studies", cfg.study.name)


def _write_table(path: Path, rows: list[dict], cols: list[str]) -> None:
    ordered = [{c: r.get(c, "") for c in cols} for r in rows]
    atomic_write(path, lambda tmp: write_csv(tmp, ordered))


def _grid(cfg: PipelineConfig) -> tuple[list[Cell], dict, str]:
    """The cells (every cell's configuration checked), the axes and the repeat axis; no work."""
    cells = expand(cfg)
    check_cells(cells)
    axes = study_axes(cfg.study)
    repeat = check_repeat(cfg.study.repeat, axes)
    if cfg.study.repeat and not repeat:
        log.warning("study.repeat = %r is not an axis: every setting has one cell and no interval", cfg.study.repeat)
    s = cfg.study
    if s.jobs < 1:
        raise StudyError(f"study.jobs = {s.jobs} is out of range: it must be >= 1 (cells run at once).")
    if not s.claim_timeout > 0:
        raise StudyError(f"study.claim_timeout = {s.claim_timeout} is out of range: it must be > 0 seconds.")
    if s.launcher == "slurm":
        slurm_settings(s)
    return cells, axes, repeat


def _study_doc(folder: Path) -> dict:
    try:
        doc = json.loads((folder / "study.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _refuse_other_running(folder: Path, cells: list[Cell], timeout: float) -> None:
    """A StudyError when a live worker in this folder runs cells of another configuration."""
    ids = {c.cell_id for c in cells}
    for claim in list_claims(folder, timeout):
        other = [c for c in claim.cells if c not in ids]
        if not claim.stale and other:
            raise StudyError(f"Study folder {str(folder)!r} is being run with another configuration: {claim.owner} "
                             f"runs cell {other[0]!r}, which this configuration does not have. Wait for it to end "
                             f"(study --status), or give this configuration its own --name.")


def _refuse_other_configuration(folder: Path, cells: list[Cell]) -> dict:
    """study.json; a StudyError when there is none or it lists other cells than this configuration."""
    doc = _study_doc(folder)
    if not doc:
        raise StudyError(f"No study has run in {str(folder)!r} (no study.json): run `study` with this configuration "
                         f"first.")
    recorded = {c.get("cell_id") for c in doc.get("cells", []) if isinstance(c, dict)}
    ours = {c.cell_id for c in cells}
    if recorded != ours:
        differ = sorted(ours - recorded)
        raise StudyError(f"{str(folder / 'study.json')!r} was written by another configuration ("
                         f"{len(differ)} of this configuration's {len(ours)} cells are not in it, e.g. "
                         f"{differ[0] if differ else sorted(recorded - ours)[0]!r}). Pass the configuration it was "
                         f"run with (it names {doc.get('config_source', '?')!r}), or run `study` to run this one.")
    return doc


def run_study(cfg: PipelineConfig, progress: bool | None = None, dry_run: bool = False) -> StudyResult:
    """Run (or, with ``dry_run``, only list) the study of ``cfg.study``; see the module docstring.
    progress: a bar on a terminal / plain lines in a log (None), a bar (True) or nothing (False).
    With ``study.launcher = "slurm"`` the launch is submitted and the result has ``submission``
    (the tables are written by ``summarize_study`` once it has run), unless nothing is left to run."""
    t0 = time.perf_counter()
    cells, axes, repeat = _grid(cfg)  # every check before any work
    folder = study_dir(cfg)
    if dry_run:  # the configuration hashes only: no extraction, so no data signatures
        docs = {c.cell_id: read_result(cell_path(folder, c)) for c in cells}
        return StudyResult(folder, cells, {c.cell_id: "done" if is_finished(docs[c.cell_id], c) else "failed" if
                                           (docs[c.cell_id] or {}).get("status") == "failed" else "pending"
                                           for c in cells})
    _refuse_other_running(folder, cells, cfg.study.claim_timeout)
    plan = Plan(cfg, folder, new_launch())
    launch = {"id": plan.launch, "started": utc_now(), "launcher": cfg.study.launcher, "host": HOST, "pid": os.getpid()}
    if cfg.study.launcher == "slurm":
        board = Board(cfg, folder, read_signatures(folder))  # no extraction here: the first job does it
        left = [r for r, group in units(cells).items() if not all(board.settled(c, plan.launch) for c in group)]
        if left:
            sub = submit(plan, min(slurm_settings(cfg.study)["array_size"], len(left)))
            launch.update(prep_job=sub.prep_job, array_job=sub.array_job, tasks=sub.tasks, logs=str(sub.logs))
            _write_study_json(cfg, folder, cells, axes, repeat, {c.cell_id: board.state(c) for c in cells}, launch)
            return StudyResult(folder, cells, {c.cell_id: board.state(c) for c in cells}, submission=sub)
        log.info("study %s: every cell is finished; nothing to submit", cfg.study.name)
        return _finish(cfg, board, axes, repeat, _study_doc(folder).get("launch") or launch, t0)
    memo = Memo()
    prepare(plan, memo)  # entries first: every request extracted or verified once, before any cell trains
    board = Board(cfg, folder, memo.signatures)
    launch["workers"] = cfg.study.jobs
    _write_study_json(cfg, folder, cells, axes, repeat, {c.cell_id: board.state(c) for c in cells}, launch)
    left = sum(not board.settled(c, plan.launch) for c in cells)
    log.info("study %s: %d cells, %d finished, %d to run", cfg.study.name, len(cells), len(cells) - left, left)
    with Progress(board, plan.launch, cfg.study.name, progress):
        run_local(plan, cfg.study.jobs, memo)
    return _finish(cfg, board, axes, repeat, launch, t0)


def summarize_study(cfg: PipelineConfig) -> StudyResult:
    """``study --summarize``: cells.csv, summary.csv, figures, study.md and study.html from the
    cells' result files (and the data signatures of the last launch); runs nothing."""
    t0 = time.perf_counter()
    cells, axes, repeat = _grid(cfg)
    folder = study_dir(cfg)
    doc = _refuse_other_configuration(folder, cells)
    board = Board(cfg, folder, read_signatures(folder))
    return _finish(cfg, board, axes, repeat, doc.get("launch") or {}, t0)


def status_of(cfg: PipelineConfig) -> list[str]:
    """``study --status``: the lines saying what is done, failed, running and left (study.status)."""
    cells, _, _ = _grid(cfg)
    folder = study_dir(cfg)
    doc = _refuse_other_configuration(folder, cells)
    board = Board(cfg, folder, read_signatures(folder))
    return [*status_lines(cfg.study.name, snapshot(board, cfg.study.claim_timeout), doc.get("launch")),
            f"folder: {folder}"]


def _finish(cfg: PipelineConfig, board: Board, axes: dict, repeat: str, launch: dict, t0: float) -> StudyResult:
    """The tables, figures, study.json and report from the result files as they are now."""
    cells, folder = board.cells, board.folder
    result = StudyResult(folder, cells, {c.cell_id: board.state(c) for c in cells})
    docs = {c.cell_id: board.doc(c) or {} for c in cells}
    result.errors = {i: str(d.get("error", "")) for i, d in docs.items() if result.status[i] == "failed"}
    mine = [d for d in docs.values() if launch.get("id") and d.get("by", {}).get("launch") == launch.get("id")]
    result.ran, result.trained = len(mine), sum(bool(d.get("trained")) for d in mine)
    rows = board.rows()
    cols = list(axes)
    _write_table(folder / "cells.csv", rows, columns(rows, cols))
    summary = summarize(rows, cols, repeat)
    _write_table(folder / "summary.csv", summary, columns(summary, [a for a in cols if a != repeat], ["n", "failed"]))
    result.summary = summary
    result.answers = [answer_q1(summary, axes, repeat), answer_q2(summary, axes, repeat, sum(
        r["status"] == "done" for r in rows))]
    figures = _figures(folder, summary, axes, repeat, result)
    result.seconds = time.perf_counter() - t0
    _write_study_json(cfg, folder, cells, axes, repeat, result.status, launch, result)
    workers = (f"SLURM array of {launch.get('tasks')} tasks" if launch.get("launcher") == "slurm" else
               f"{launch.get('workers', 1)} worker{'s' if launch.get('workers', 1) != 1 else ''}")
    done = sum(s == "done" for s in result.status.values())
    intro = (f"Config: {cfg.source}; dataset {cfg.data.dataset}, analysis split {cfg.analyze.split}, cache "
             f"{cfg.data.cache}. Grid: {' x '.join(f'{k} {v}' for k, v in axes.items())} = {len(cells)} cells "
             f"({done} done, {result.failed} failed, {result.pending} not run); repeat axis: {repeat or 'none'}. "
             f"The last launch ({workers}) ran {result.ran} cells ({result.trained} trainings); the cells' own "
             f"times (all launches) sum to {sum(d.get('seconds', 0.0) or 0.0 for d in docs.values()):.0f} s.")
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
                      status: dict, launch: dict, result: StudyResult | None = None) -> None:
    doc = {"name": cfg.study.name, "updated": utc_now(), "config_source": cfg.source, "axes": axes,
           "variants": cfg.study.variants, "repeat": repeat, "config": cfg.to_dict(), "launch": launch,
           "cells": [{"cell_id": c.cell_id, "values": c.values, "run": c.run, "config_hash": c.config_hash,
                      "status": status.get(c.cell_id, "pending")} for c in cells]}
    if result is not None:
        doc.update(seconds=result.seconds, ran=result.ran, trained=result.trained, answers=result.answers,
                   outputs=["cells.csv", "summary.csv", "study.md", "study.html"])
    write_json(folder / "study.json", doc)
