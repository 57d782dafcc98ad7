"""Running a study's cells: in this process, in N worker processes on this machine
(``study --jobs N``), or in the tasks of a SLURM job array (``study.slurm``).

One **launch** (one ``study`` command, with every worker it starts) first makes or verifies the
cache entries every cell reads, once per extraction request (:func:`prepare`; it writes their
data signatures to ``<study>/entries.json``), so that no two workers ever extract the same
entry. Then every worker loops over the **units**: the cells that share one training run
(cells differing only in ``analyze.*`` axes), in grid order. A worker claims a unit
(``study.claims``: an atomic file, a heartbeat), runs its unsettled cells one after the other
(``study.cells.run_cell``), rewrites ``cells.csv`` under the study folder's lock after each
cell, and releases the claim. When every unit left is claimed by a live worker it waits
(polling) for them to end, taking over any claim that goes stale; it returns when every cell
is **settled** for its launch: done (its result file holds the current configuration hash and
data signature) or failed during this launch (a failure of an earlier launch is retried).

Workers on this machine are spawned processes; each gets ``cores / N`` torch threads, and with
CUDA worker ``i`` sees only GPU ``i mod count`` of ``CUDA_VISIBLE_DEVICES`` (both set in its
environment before it starts). A SLURM task uses the cores and GPUs SLURM gave it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import sys
import time
import uuid
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for
from pathlib import Path
from typing import Iterator, Mapping

import torch

from analyze.compare import write_csv
from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.runtime import atomic_write, cpu_count, utc_now, write_json
from pipeline.storage import locked
from study.cells import Memo, cell_path, cell_row, ensure_entries, extraction_config, read_result, run_cell
from study.claims import HOST, try_claim
from study.grid import Cell, StudyError, expand, study_axes
from study.table import columns

log = logging.getLogger(__name__)

ENTRIES_FILE = "entries.json"  # <study>/entries.json: the data signatures of the launch's extraction requests
POLL_S = 1.0  # seconds between looks at the claims while waiting for other workers


@dataclass(frozen=True)
class Plan:
    """What every worker of one launch needs; it travels (pickled) to spawned processes and SLURM
    tasks. launch: the launch's id, recorded in every result file and claim."""

    config: PipelineConfig
    folder: Path
    launch: str


def new_launch() -> str:
    return uuid.uuid4().hex[:12]


def units(cells: list[Cell]) -> dict[str, list[Cell]]:
    """{run: its cells in grid order}, in the order of each run's first cell."""
    out: dict[str, list[Cell]] = {}
    for cell in cells:
        out.setdefault(cell.run, []).append(cell)
    return out


class Board:
    """The cells of a study and the state their result files give them now. A result file is read
    again only when it changed (size, modification time), so looking often is cheap.
    signatures: {extraction request: data signature} (a live reference: a Memo's)."""

    def __init__(self, config: PipelineConfig, folder: Path, signatures: Mapping[str, str]):
        self.cells = expand(config)
        self.axes = list(study_axes(config.study))
        self.folder = folder
        self.signatures = signatures
        self.requests = {c.cell_id: extraction_config(c.config)[1] for c in self.cells}
        self._docs: dict[str, tuple[tuple, dict | None]] = {}

    def doc(self, cell: Cell) -> dict | None:
        path = cell_path(self.folder, cell)
        try:
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            return None
        cached = self._docs.get(cell.cell_id)
        if cached is None or cached[0] != stamp:
            cached = (stamp, read_result(path))
            self._docs[cell.cell_id] = cached
        return cached[1]

    def state(self, cell: Cell) -> str:
        """"done" (current configuration and data), "failed" (current configuration) or "pending"."""
        doc = self.doc(cell)
        if not doc or doc.get("config_hash") != cell.config_hash:
            return "pending"
        if doc.get("status") == "failed":
            return "failed"
        done = doc.get("status") == "done" and doc.get("data") == self.signatures.get(self.requests[cell.cell_id])
        return "done" if done else "pending"

    def settled(self, cell: Cell, launch: str) -> bool:
        state = self.state(cell)
        return state == "done" or (state == "failed" and (self.doc(cell) or {}).get("by", {}).get("launch") == launch)

    def rows(self) -> list[dict]:
        """The cells.csv rows: a pending cell (also one done with older data) has no values."""
        return [cell_row(c, self.doc(c) if self.state(c) != "pending" else {"status": "pending"}) for c in self.cells]

    def write_table(self) -> None:
        """Rewrite cells.csv, atomically and under the study folder's lock (workers write it concurrently)."""
        rows = self.rows()
        ordered = [{c: r.get(c, "") for c in columns(rows, self.axes)} for r in rows]
        path = self.folder / "cells.csv"
        with locked(path):
            atomic_write(path, lambda tmp: write_csv(tmp, ordered))


# ----------------------------------------------------------------------------- entries first
def prepare(plan: Plan, memo: Memo) -> None:
    """Extract or verify every cell's entries, once per request (a request that fails makes its
    cells fail when they run), and write their data signatures to ``entries.json``."""
    failed = 0
    for cell in expand(plan.config):
        try:
            ensure_entries(cell.config, memo)
        except PipelineError as exc:
            failed += 1
            log.warning("the entries of cell %s cannot be made; it will fail: %s", cell.cell_id, exc)
    write_json(plan.folder / ENTRIES_FILE, {"launch": plan.launch, "written": utc_now(), "signatures": memo.signatures})


def read_signatures(folder: Path) -> dict[str, str]:
    """The data signatures the last launch's :func:`prepare` wrote ({} when none)."""
    try:
        doc = json.loads((folder / ENTRIES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    sig = doc.get("signatures") if isinstance(doc, dict) else None
    return {str(k): str(v) for k, v in sig.items()} if isinstance(sig, dict) else {}


# ----------------------------------------------------------------------------- one worker
def work(plan: Plan, worker: int = 0, memo: Memo | None = None) -> int:
    """One worker's loop (module docstring); returns the number of cells it ran. ``memo``: this
    process's (the launch's own, in process), else one seeded from ``entries.json``."""
    memo = memo or Memo(signatures=read_signatures(plan.folder))
    board = Board(plan.config, plan.folder, memo.signatures)
    timeout = plan.config.study.claim_timeout
    by = {"launch": plan.launch, "host": HOST, "pid": os.getpid(), "worker": worker}
    ran = 0
    while True:
        left = {run: cells for run, cells in units(board.cells).items()
                if not all(board.settled(c, plan.launch) for c in cells)}
        if not left:
            return ran
        progressed = False
        for run, cells in left.items():
            claim = try_claim(plan.folder, run, {"launch": plan.launch, "worker": worker,
                                                 "cells": [c.cell_id for c in cells]}, timeout)
            if claim is None:
                continue
            progressed = True
            with claim:
                for cell in cells:
                    if board.settled(cell, plan.launch):  # finished between the look and the claim
                        continue
                    run_cell(cell, plan.folder, memo, by)
                    ran += 1
                    board.write_table()
        if not progressed:
            time.sleep(min(POLL_S, timeout / 10))


# ----------------------------------------------------------------------------- workers on this machine
def placements(config: PipelineConfig, n: int) -> list[tuple[dict[str, str], int]]:
    """(environment, torch threads) of each of ``n`` local workers: ``cores // n`` threads each (at
    most ``OMP_NUM_THREADS`` when it is set) and, when training runs on CUDA, GPU ``i mod count``
    of ``CUDA_VISIBLE_DEVICES``."""
    threads = max(1, cpu_count() // n)
    cap = os.environ.get("OMP_NUM_THREADS", "")
    if cap.isdigit() and int(cap) >= 1:
        threads = min(threads, int(cap))
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    device = config.train.device
    if device.startswith("cuda:") and n > 1:
        raise StudyError(f"train.device = {device!r} with study.jobs = {n}: every worker would train on the same "
                         "GPU. Use --set train.device=cuda (or auto): worker i then takes GPU i mod count.")
    gpus: list[str] = []
    if device in ("auto", "cuda") and torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        gpus = [g.strip() for g in visible.split(",") if g.strip()] or [str(i) for i in range(torch.cuda.device_count())]
    return [({**env, **({"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} if gpus else {})}, threads) for i in range(n)]


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set (what a process started inside inherits), restored after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _spawned(plan: Plan, worker: int, threads: int, level: int) -> None:
    """A spawned worker process: its threads, its logging, then :func:`work`."""
    logging.basicConfig(level=level, format=f"%(levelname)s worker {worker} %(name)s: %(message)s")
    torch.set_num_threads(threads)
    try:
        work(plan, worker)
    except PipelineError as exc:
        print(f"Error: worker {worker}: {exc}", file=sys.stderr)
        sys.exit(1)


def run_local(plan: Plan, jobs: int, memo: Memo) -> None:
    """Run the launch's cells with ``jobs`` workers (module docstring); one worker runs in this
    process. More jobs than units left start only as many workers as there are units. A worker
    that dies (killed) leaves its claim, which the others take over; whatever is left when they
    have all ended is run here."""
    board = Board(plan.config, plan.folder, memo.signatures)
    left = [r for r, cells in units(board.cells).items() if not all(board.settled(c, plan.launch) for c in cells)]
    n = min(jobs, len(left))
    if n < jobs:
        log.info("study.jobs = %d but %d trainings to run: starting %d workers", jobs, len(left), max(n, 1))
    if n <= 1:
        work(plan, 0, memo)
        return
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: threads and GPU chosen before torch works
    procs = []
    try:
        for i, (env, threads) in enumerate(placements(plan.config, n)):
            with _environment(env):
                proc = ctx.Process(target=_spawned, args=(plan, i, threads, logging.getLogger().level),
                                   name=f"study-worker-{i}")
                proc.start()
            procs.append(proc)
        running = {p.sentinel: p for p in procs}
        while running:
            for sentinel in wait_for(list(running)):
                proc = running.pop(sentinel)
                proc.join()  # reaped at once, so that its claim reads as stale to the other workers
                if proc.exitcode:
                    log.warning("%s ended with status %s; the other workers take its claim over",
                                proc.name, proc.exitcode)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join()
    work(plan, n, memo)


# ----------------------------------------------------------------------------- SLURM tasks (study.slurm)
def prepare_task(plan: Plan) -> int:
    """The first SLURM job: :func:`prepare`; returns the number of extraction requests made."""
    memo = Memo()
    prepare(plan, memo)
    return len(memo.signatures)


def array_task(plan: Plan, index: int) -> int:
    """A task of the training array: a worker with every core SLURM gave it; returns the cells it ran."""
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s task {index} %(name)s: %(message)s")
    torch.set_num_threads(cpu_count())
    return work(plan, index)
