"""Claims: which worker runs which training of a study, across processes and machines.

A worker claims a unit of work (the cells that share one training run, see
``study.workers``) by creating ``<study>/claims/<run>.json`` with ``O_CREAT | O_EXCL``, which
succeeds for exactly one process, also on NFS. The file holds who claimed it: ``host``,
``pid``, ``worker``, ``launch`` (the id of the ``study`` command that started the worker),
``cells`` and ``claimed`` (UTC). Its **heartbeat** is the file's modification time: the owner
touches it every ``timeout / HEARTBEATS`` seconds from a thread, through the file descriptor
it created, so an owner whose claim was taken over never touches the new owner's file; it
deletes the file when the unit ends (done or failed: the result files say which).

A claim is **stale** when its owner is gone: the same host and its process no longer exists,
or a heartbeat older than ``timeout`` seconds (``study.claim_timeout``; another host, a hung
process). A stale claim is taken over under the claims folder's lock: renamed away, then
created again with ``O_EXCL``, so two workers that both see it stale never both get it. A
heartbeat compares the owner's clock with the reader's: hosts are assumed to agree to well
under the timeout (NTP), and the timeout must exceed the file system's attribute cache (NFS
caches modification times for up to a minute by default; the default timeout is 300 s).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.runtime import dumps_json, process_alive, utc_now
from pipeline.storage import locked

log = logging.getLogger(__name__)

CLAIMS_DIR = "claims"  # <study>/claims/<run>.json
HEARTBEATS = 10  # heartbeats per timeout
HOST = socket.gethostname()


class ClaimError(PipelineError):
    """The claims folder cannot be used (not writable, not a folder)."""


@dataclass(frozen=True)
class ClaimInfo:
    """A claim file as read by anyone. age: seconds since its heartbeat; stale: see the module
    docstring (reason says why)."""

    path: Path
    doc: dict
    age: float
    stale: bool
    reason: str = ""
    inode: int = 0

    @property
    def owner(self) -> str:
        return f"{self.doc.get('host', '?')}:{self.doc.get('pid', '?')}"

    @property
    def cells(self) -> list[str]:
        cells = self.doc.get("cells")
        return [str(c) for c in cells] if isinstance(cells, list) else []


@dataclass
class Claim:
    """A claim this process holds; a context manager that heartbeats while open and releases on exit."""

    path: Path
    fd: int
    interval: float
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Claim:
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat {self.path.name}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                os.utime(self.fd)  # the inode this process created, wherever it is now
            except OSError as err:  # pragma: no cover - the folder vanished under us
                log.warning("heartbeat of claim %s failed: %s", self.path, err)
            if self.lost:
                log.warning("claim %s was taken over by another worker (this one missed heartbeats for longer "
                            "than study.claim_timeout); both compute the same cells and write the same results",
                            self.path)
                return

    @property
    def lost(self) -> bool:
        """True when the claim file is no longer the one this process created."""
        try:
            return os.stat(self.path).st_ino != os.fstat(self.fd).st_ino
        except OSError:
            return True

    def release(self) -> None:
        """Stop the heartbeat and delete the claim file (unless another worker took it over)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.lost:
            self.path.unlink(missing_ok=True)
        os.close(self.fd)


def claims_dir(study_dir: Path) -> Path:
    return Path(study_dir) / CLAIMS_DIR


def read_claim(path: Path, timeout: float) -> ClaimInfo | None:
    """The claim at ``path`` (None when there is none). A file still being written (no valid JSON
    yet) is a live claim of an unknown owner until its heartbeat is older than ``timeout``."""
    try:
        st = os.stat(path)
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        doc = {}
    doc = doc if isinstance(doc, dict) else {}
    age = max(0.0, time.time() - st.st_mtime)
    pid = doc.get("pid")
    if doc.get("host") == HOST and isinstance(pid, int) and not process_alive(pid):
        return ClaimInfo(path, doc, age, True, f"its process {pid} on this host has ended", st.st_ino)
    if age > timeout:
        return ClaimInfo(path, doc, age, True, f"no heartbeat for {age:.0f} s (study.claim_timeout = {timeout:g} s)",
                         st.st_ino)
    return ClaimInfo(path, doc, age, False, "", st.st_ino)


def list_claims(study_dir: Path, timeout: float) -> list[ClaimInfo]:
    """Every claim in the study folder, live and stale."""
    folder = claims_dir(study_dir)
    found = [read_claim(p, timeout) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    return [c for c in found if c is not None]


def _create(path: Path, doc: dict) -> int | None:
    """The file descriptor of a new claim file holding ``doc``; None when the file exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    except OSError as exc:
        raise ClaimError(f"Cannot create the claim {str(path)!r}: {exc.strerror}.") from None
    os.write(fd, (dumps_json(doc) + "\n").encode("utf-8"))
    os.fsync(fd)
    return fd


def _remove_stale(path: Path, held: ClaimInfo) -> bool:
    """Move the stale claim ``held`` out of the way (under the lock); False when the file moved was
    another one (its hung owner woke, released, and a new claim appeared): that one is put back."""
    tomb = path.with_name(f".{path.name}.stale-{os.getpid()}")
    try:
        os.replace(path, tomb)
    except FileNotFoundError:
        return True
    try:
        if os.stat(tomb).st_ino != held.inode:
            try:
                os.link(tomb, path)
            except FileExistsError:
                pass
            return False
        log.warning("taking over %s from %s: %s", path.name, held.owner, held.reason)
        return True
    finally:
        tomb.unlink(missing_ok=True)


def try_claim(study_dir: Path, key: str, doc: dict, timeout: float) -> Claim | None:
    """Claim ``key`` (a safe file name) for this process, taking a stale claim over; None when a
    live claim of another worker holds it. ``doc`` is recorded with host, pid and time."""
    folder = claims_dir(study_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ClaimError(f"Cannot create the claims folder {str(folder)!r}: {exc.strerror}.") from None
    path = folder / f"{key}.json"
    record = {**doc, "host": HOST, "pid": os.getpid(), "claimed": utc_now(), "heartbeat_s": timeout / HEARTBEATS}
    fd = _create(path, record)
    if fd is None:
        held = read_claim(path, timeout)
        if held is not None and not held.stale:
            return None
        with locked(path):  # takeovers one at a time; a fresh O_EXCL create still wins or loses cleanly
            held = read_claim(path, timeout)
            if held is not None and not held.stale:
                return None
            if held is not None and not _remove_stale(path, held):
                return None
            fd = _create(path, record)
        if fd is None:
            return None
    return Claim(path, fd, timeout / HEARTBEATS)
