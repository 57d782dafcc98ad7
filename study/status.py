"""What a study is doing, read from its folder: cells done, failed, running and left.

``study --status`` prints it (with who holds each claim and the last launch: its workers or its
SLURM jobs); a running launch shows it as it goes (:class:`Progress`): a tqdm bar on a terminal,
otherwise a plain line on stderr whenever a cell ends and at least every ``LINE_EVERY_S``
seconds, with the elapsed time and an ETA (left cells times the launch's mean time per cell,
which counts every worker), so that a log is never silent for long.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from study.claims import ClaimInfo, list_claims
from study.workers import Board

LINE_EVERY_S = 30.0  # the longest silence of the plain progress lines
POLL_S = 1.0  # seconds between looks at the study folder


@dataclass
class Snapshot:
    """Counts over the cells. failed: cells whose result is failed (of one launch, when counted for
    it; older failures are then left: the launch retries them); running: live claims, one cell
    each; stale: claims whose owner is gone (the next worker takes them over)."""

    total: int
    done: int
    failed: list = field(default_factory=list)  # [(cell, error)]
    running: list[ClaimInfo] = field(default_factory=list)
    stale: list[ClaimInfo] = field(default_factory=list)

    @property
    def left(self) -> int:
        return max(0, self.total - self.done - len(self.failed) - len(self.running))


def snapshot(board: Board, timeout: float, launch: str | None = None) -> Snapshot:
    """The study's state now (see :class:`Snapshot`)."""
    done, failed = 0, []
    for cell in board.cells:
        state = board.state(cell)
        doc = board.doc(cell) or {}
        done += state == "done"
        if state == "failed" and (launch is None or doc.get("by", {}).get("launch") == launch):
            failed.append((cell, str(doc.get("error", ""))))
    ids = {c.cell_id for c in board.cells}
    claims = [c for c in list_claims(board.folder, timeout) if set(c.cells) & ids or not c.cells]
    return Snapshot(len(board.cells), done, failed, [c for c in claims if not c.stale], [c for c in claims if c.stale])


def clock(seconds: float) -> str:
    """``1:05`` or ``2:03:10``."""
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def counts(snap: Snapshot) -> str:
    return (f"{snap.total} cells: {snap.done} done, {len(snap.failed)} failed, {len(snap.running)} running, "
            f"{snap.left} left")


def status_lines(name: str, snap: Snapshot, launch: dict | None) -> list[str]:
    """What ``study --status`` prints: the counts, each claim, each failed cell, the last launch."""
    lines = [f"study {name}: {counts(snap)}"]
    for c in snap.running:
        lines.append(f"  running  {c.path.stem} on {c.owner} (worker {c.doc.get('worker', '?')}), claimed "
                     f"{c.doc.get('claimed', '?')}, heartbeat {c.age:.0f} s ago; cells: {', '.join(c.cells)}")
    for c in snap.stale:
        lines.append(f"  stale    {c.path.stem} claimed by {c.owner}: {c.reason}; the next worker takes it over")
    for cell, error in snap.failed:
        lines.append(f"  failed   {cell.cell_id}: {error}")
    if launch:
        where = (f"SLURM: extraction job {launch.get('prep_job')}, training array {launch.get('array_job')} "
                 f"({launch.get('tasks')} tasks; squeue -j {launch.get('array_job')}; logs {launch.get('logs')})"
                 if launch.get("launcher") == "slurm" else
                 f"{launch.get('workers')} worker{'s' if launch.get('workers') != 1 else ''} on {launch.get('host')}")
        lines.append(f"last launch {launch.get('id')}, started {launch.get('started')}: {where}")
    return lines


class Progress:
    """The progress display of a launch while its workers run (module docstring); a context manager.
    show: True = a bar, False = nothing, None = a bar on a terminal, plain lines otherwise."""

    def __init__(self, board: Board, launch: str, name: str, show: bool | None):
        self.board, self.launch, self.name = board, launch, name
        self.mode = "bar" if show or (show is None and sys.stderr.isatty()) else "lines" if show is None else "off"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None
        self._shown: int | None = None

    def __enter__(self) -> Progress:
        if self.mode == "off":
            return self
        self.t0 = self._last_line = time.perf_counter()
        snap = self._snap()
        self.start_settled = self._settled(snap)
        if self.mode == "bar":
            self._bar = tqdm(total=snap.total, initial=self.start_settled, desc=f"study {self.name}", unit="cell")
        self._show(snap, force=True)
        self._thread = threading.Thread(target=self._loop, name="study progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.mode == "off":
            return
        self._stop.set()
        self._thread.join()
        self._show(self._snap(), force=True)
        if self._bar is not None:
            self._bar.close()

    def _snap(self) -> Snapshot:
        return snapshot(self.board, self.board.cells[0].config.study.claim_timeout, self.launch)

    @staticmethod
    def _settled(snap: Snapshot) -> int:
        return snap.done + len(snap.failed)

    def _loop(self) -> None:
        while not self._stop.wait(POLL_S):
            self._show(self._snap())

    def line(self, snap: Snapshot) -> str:
        elapsed = time.perf_counter() - self.t0
        ran = self._settled(snap) - self.start_settled
        eta = clock(elapsed / ran * (snap.left + len(snap.running))) if ran > 0 else "unknown"
        return f"study {self.name}: {counts(snap)}; elapsed {clock(elapsed)}, ETA {eta}"

    def _show(self, snap: Snapshot, force: bool = False) -> None:
        settled = self._settled(snap)
        if self._bar is not None:
            self._bar.n = settled
            self._bar.set_postfix_str(f"{len(snap.running)} running, {len(snap.failed)} failed", refresh=True)
            return
        now = time.perf_counter()
        if force or settled != self._shown or now - self._last_line >= LINE_EVERY_S:
            print(self.line(snap), file=sys.stderr, flush=True)
            self._shown, self._last_line = settled, now
