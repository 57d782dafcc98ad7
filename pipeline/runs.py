"""The run-folder contract between ``fit-adapters`` (the writer) and ``analyze`` (the reader).

A run is one training of adapters. Its folder is ``<cache>/runs/<name>`` and holds:

    adapters.safetensors   best-epoch adapter weights (train.api)
    adapters.json          the [train] settings that define the adapters, sources, statistics
    config.json            the resolved pipeline configuration ({"source": ..., <sections>})
    history.csv            one row per epoch: loss, lr, temperature, val recall, val CKA
    metrics.json           a :class:`RunMetrics` record: test recall per method, best epoch, sizes
    curves.png             loss, recall and CKA curves over epochs
    subset.csv             a copy of the train.subset file the run trained on (only with a subset)

A run also writes, next to each source entry in the cache, an *aligned entry* named
``<encoder>@<run>`` (:func:`aligned_name`; :func:`source_of` parses it back). The name of a run
is ``train.name``, else ``<image>-<text>[-<extra>...]-<adapter>`` (:func:`default_run_name`).

Both stages use only this module for these names, so neither has to guess the other's layout.

Integrity (what makes a run trustworthy, and what readers check):

* A run folder is written whole: fit-adapters writes into a hidden sibling
  ``runs/.<name>.partial-<pid>`` (:func:`staging_dir`) and renames it into place at the end
  (:func:`commit`; an older run of that name is renamed aside, the new one renamed in, the old
  one removed: ``pipeline.storage.replace``). A ``kill -9`` leaves the old complete run or the
  new complete run; leftovers of dead writers are removed (or, in the instant between the two
  renames, the old run is put back) by :func:`recover`. The record of a failed (diverged) run
  never replaces a finished run (:func:`commit_failed`).
* Names: a run name and the aligned entries it writes are checked before any work
  (:func:`check_names`; ``pipeline.names.safe_name``).
* ``adapters.json`` records the sha256 of ``adapters.safetensors``, ``metrics.json`` and every
  aligned entry's key (``adapter_sha256``) record it too. :func:`verify_run` checks the folder
  and :func:`check_aligned` an aligned entry against its run; both raise
  :class:`RunIntegrityError` saying to rerun fit-adapters.
"""

from __future__ import annotations

import dataclasses
import json
import hashlib
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from pipeline.cache import Entry, entry_filename
from pipeline.config import TrainConfig
from pipeline.errors import PipelineError, did_you_mean
from pipeline.names import SEPARATOR, is_aligned, safe_name, source_of  # noqa: F401 (part of the run-folder contract)
from pipeline.runtime import make_dir, process_alive, write_json
from pipeline.storage import locked, replace

log = logging.getLogger(__name__)

RUNS_DIR = "runs"  # run folders live in <cache>/runs/<name>/
ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_JSON = "adapters.json"
CONFIG = "config.json"
SUBSET = "subset.csv"  # copy of train.subset (train.subset): what evaluating the run re-reads
HISTORY = "history.csv"
METRICS = "metrics.json"
CURVES = "curves.png"
ADAPTERS_METHOD = "infonce"  # the trained adapters' row in RunMetrics.test; the other rows are baselines
RECALL_COLUMNS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mean_R")  # per method
STAGING_MARK = ".partial-"  # runs/.<name>.partial-<pid>: a run being written by process <pid>
TRASH_MARK = ".old-"  # runs/<name>.old-<pid>: the replaced run, for an instant during commit (storage.replace)


class RunError(PipelineError, ValueError):
    """A run name that cannot be used, or a metrics record that cannot be read."""


class RunNotFoundError(RunError, FileNotFoundError):
    """No run folder of that name in the cache."""


class RunIntegrityError(RunError):
    """A run folder whose files come from different trainings, or an aligned entry written by
    another training of its run (the adapters' sha256 differ)."""


# ----------------------------------------------------------------------------- names
def modality_entries(tc: TrainConfig) -> dict[str, str]:
    """Ordered {modality: cache entry} a run trains: image, text, then ``tc.modalities`` (which
    may also replace ``image`` or ``text``)."""
    out = {"image": tc.image, "text": tc.text}
    out.update({str(k): str(v) for k, v in tc.modalities.items()})
    return out


def default_run_name(tc: TrainConfig) -> str:
    """``tc.name``, else ``<image>-<text>[-<extra>...]-<adapter>`` (an ``@`` of an aligned source
    entry becomes ``+``, so the name stays a valid run name)."""
    if tc.name:
        return tc.name
    return "-".join([*modality_entries(tc).values(), tc.adapter]).replace(SEPARATOR, "+")


def run_name(tc: TrainConfig, run: str | None = None) -> str:
    """``run`` when given, else :func:`default_run_name`."""
    return run or default_run_name(tc)


def check_run_name(name: str) -> str:
    """A run name must be non-empty, free of ``@`` (it ends aligned entry names), must not
    start with ``.`` (hidden names are runs being written) and must be one safe, short folder name
    (``pipeline.names.safe_name``)."""
    if not isinstance(name, str) or not name or SEPARATOR in name or name.startswith("."):
        raise RunError(f"Run name {name!r} must be non-empty, must not contain {SEPARATOR!r} (aligned entries are "
                       f"named <encoder>{SEPARATOR}<run>) and must not start with '.'; pass another --name.")
    entry_filename(name, "run name")
    return name


def aligned_name(encoder: str, run: str) -> str:
    """The cache entry holding ``encoder``'s features mapped by run ``run``: ``<encoder>@<run>``
    (checked to be usable as a file name: UnsafeNameError when the two together are too long)."""
    name = f"{encoder}{SEPARATOR}{check_run_name(run)}"
    entry_filename(name, "aligned entry name (<encoder>@<run>; pass a shorter --name)")
    return name


def check_names(tc: TrainConfig) -> str:
    """The run name of ``tc`` after checking it and the names of the aligned entries it will
    write (before any work: a name that cannot be a file fails here, not after training)."""
    name = check_run_name(default_run_name(tc))
    for encoder in modality_entries(tc).values():
        aligned_name(encoder, name)
    return name


def runs_dir(cache: str | Path) -> Path:
    """``<cache>/runs``."""
    return Path(cache) / RUNS_DIR


def run_dir(cache: str | Path, name: str) -> Path:
    """``<cache>/runs/<name>`` (the name made file-safe as cache entries are, and checked)."""
    return runs_dir(cache) / entry_filename(name, "run name")


def report_dir(out: str | Path, dataset: str, split: str, *parts: str) -> Path:
    """``<analyze.out>/<dataset>/<split>/<parts...>`` (names made file-safe), not created: where
    analyze writes its outputs, e.g. ``parts = ("runs", <run>)`` for a run's platonic.json and
    zeroshot.json, which an export's model card reads."""
    path = Path(out) / entry_filename(dataset, "dataset name") / safe_name(split, "analyze.split")
    for p in parts:
        path = path / entry_filename(p, "output folder name")
    return path


# ----------------------------------------------------------------------------- metrics.json
def _recalls(values: Mapping) -> dict[str, float]:
    """{key: float}; null (a non-finite value written as JSON null) reads back as NaN."""
    return {str(k): math.nan if v is None else float(v) for k, v in values.items()}


@dataclass(frozen=True)
class RunMetrics:
    """The content of metrics.json, written by fit-adapters and read by analyze.

    test: method -> {"i2t_R@1", ..., "t2i_R@10", "mean_R"} test recall in [0, 1]; the method
    ``ADAPTERS_METHOD`` ("infonce") is the trained adapters, the others are baselines (cca,
    procrustes). val_best: the best epoch's validation row (recall, and ``cka_<modality>`` with
    a reference). sizes: split -> {"pairs": n, <modality>: rows}; train also has
    "pairs_before_fraction" (``train_fraction`` < 1 keeps a subset). reference: {"entry", "split",
    "raw_cka", "aligned_cka"} or None. adapter_sha256: the adapters these numbers were measured
    with. Non-finite numbers are stored as JSON null.
    """

    run: str
    test: dict[str, dict[str, float]]
    best_epoch: int = 0
    epochs_run: int = 0
    dataset: str = ""
    val_best: dict[str, float] = field(default_factory=dict)
    sizes: dict[str, dict[str, int]] = field(default_factory=dict)
    reference: dict | None = None
    run_dir: str = ""
    device: str = ""
    streamed: bool = False
    processes: int = 1
    temperature: float | None = None
    train_time_s: float | None = None
    tracking: dict | None = None  # the Platonic criterion on val at the best epoch (train.tracking)
    adapter_sha256: str = ""  # sha256 of the run's adapters.safetensors ("" in runs of older versions)
    train_fraction: float = 1.0  # train.train_fraction: share of the train images used (sizes: pairs kept)

    @property
    def adapters(self) -> dict[str, float] | None:
        """Test recall of the trained adapters (None when the record has none)."""
        return self.test.get(ADAPTERS_METHOD)

    @property
    def mean_R(self) -> float | None:
        """Test mean recall of the trained adapters; None when absent or not finite."""
        value = (self.adapters or {}).get("mean_R")
        return value if value is not None and math.isfinite(value) else None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> "RunMetrics":
        """Read a metrics.json document; unknown keys are ignored, missing optional ones default."""
        if not isinstance(doc, Mapping) or not isinstance(doc.get("test"), Mapping):
            raise RunError("metrics.json has no 'test' section (method -> recall); is it a fit-adapters run?")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in doc.items() if k in known}
        values["test"] = {str(m): _recalls(r) for m, r in doc["test"].items() if isinstance(r, Mapping)}
        values["val_best"] = _recalls(doc.get("val_best") or {})
        values.setdefault("run", "")
        return cls(**values)

    def write(self, path: str | Path) -> Path:
        return write_json(path, self.to_json())


# ----------------------------------------------------------------------------- run folders
def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:  # a broken run never stops a listing
        log.warning("ignoring unreadable %s: %s", path, exc)
        return None


@dataclass(frozen=True)
class RunFolder:
    """What a reader finds in ``<cache>/runs/<name>/`` (files may be missing: a run still
    training has no metrics.json). config: config.json as a dict ({} if absent);
    metrics: the RunMetrics record or None."""

    name: str
    path: Path
    config: dict
    metrics: RunMetrics | None

    @property
    def train(self) -> dict:
        """The run's [train] section (empty when config.json is missing)."""
        return self.config.get("train", {}) if isinstance(self.config, dict) else {}

    @property
    def image(self) -> str | None:
        return self.train.get("image")

    @property
    def text(self) -> str | None:
        return self.train.get("text")

    @property
    def dataset(self) -> str | None:
        data = self.config.get("data", {}) if isinstance(self.config, dict) else {}
        return data.get("dataset") or (self.metrics.dataset if self.metrics else None) or None

    @property
    def curves(self) -> Path | None:
        return self.path / CURVES if (self.path / CURVES).is_file() else None

    @property
    def history(self) -> Path | None:
        return self.path / HISTORY if (self.path / HISTORY).is_file() else None

    @property
    def mean_R(self) -> float | None:
        return self.metrics.mean_R if self.metrics else None


def read_run(path: str | Path) -> RunFolder:
    """Read a run folder, tolerating missing files."""
    path = Path(path)
    doc = _read_json(path / METRICS)
    metrics = None
    if doc is not None:
        try:
            metrics = RunMetrics.from_json(doc)
        except (RunError, TypeError, ValueError) as exc:
            log.warning("ignoring %s: %s", path / METRICS, exc)
    return RunFolder(path.name, path, _read_json(path / CONFIG) or {}, metrics)


def _is_leftover(path: Path) -> bool:
    """A staging folder (``.<name>.partial-<pid>``) or a replaced run (``<name>.old-<pid>``)."""
    return path.name.startswith(".") or _pid_of(path, TRASH_MARK) is not None


def list_runs(cache: str | Path) -> list[RunFolder]:
    """Every run folder under ``<cache>/runs/`` (folders holding a config.json or metrics.json;
    runs being written are not listed)."""
    root = runs_dir(cache)
    if not root.is_dir():
        return []
    for p in list(root.iterdir()):
        if not p.name.startswith(".") and _pid_of(p, TRASH_MARK) is not None:
            recover(root / p.name.rpartition(TRASH_MARK)[0])  # a run moved aside by a killed commit
    return [read_run(p) for p in sorted(root.iterdir())
            if p.is_dir() and not _is_leftover(p) and ((p / CONFIG).is_file() or (p / METRICS).is_file())]


def find_run(cache: str | Path, name: str) -> RunFolder:
    """The run folder ``<cache>/runs/<name>``; RunNotFoundError naming close matches otherwise."""
    path = run_dir(cache, name)
    recover(path)
    if path.is_dir():
        return read_run(path)
    known = [r.name for r in list_runs(cache)]
    hint = did_you_mean(entry_filename(name), known) or (
        f" Runs: {', '.join(known)}." if known else " No runs yet: run fit-adapters first.")
    raise RunNotFoundError(f"No run folder {str(path)!r}.{hint}")


# ----------------------------------------------------------------------------- writing a run whole
def _pid_of(path: Path, mark: str) -> int | None:
    """The writer's pid in a leftover's name (``...<mark><pid>``), None for other names."""
    head, sep, tail = path.name.rpartition(mark)
    return int(tail) if sep and head and tail.isdigit() else None


def recover(final: Path, clean: bool = False) -> None:
    """Undo what a killed fit-adapters left next to run folder ``final``: if ``final`` is missing
    because the writer died between the two renames of :func:`commit`, the replaced run
    (``<name>.old-<pid>``) is put back; with ``clean`` (the next writer of that name), staging
    folders and replaced runs of dead writers are deleted. Folders of live processes are left
    alone."""
    root = final.parent
    if not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        for mark, prefix in ((TRASH_MARK, final.name), (STAGING_MARK, "." + final.name)):
            pid = _pid_of(path, mark)
            if pid is None or path.name != f"{prefix}{mark}{pid}" or process_alive(pid):
                continue
            if mark == TRASH_MARK and not final.exists():
                os.replace(path, final)
                log.warning("run %s: an interrupted fit-adapters had moved it aside; restored it", final)
            elif clean:
                shutil.rmtree(path, ignore_errors=True)


def staging_dir(cache: str | Path, name: str) -> Path:
    """A new, empty hidden folder ``<cache>/runs/.<name>.partial-<pid>`` to write run ``name``
    into (leftovers of killed writers of that name are removed first)."""
    final = run_dir(cache, check_run_name(name))
    make_dir(final.parent, "runs folder of the cache (data.cache, --cache)")
    recover(final, clean=True)
    path = final.with_name(f".{final.name}{STAGING_MARK}{os.getpid()}")
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    return path


def commit(staging: Path, cache: str | Path, name: str) -> Path:
    """Rename the finished ``staging`` folder to ``<cache>/runs/<name>``, replacing an older run
    of that name only now (under the runs folder's lock); returns the run folder."""
    final = run_dir(cache, name)
    with locked(final):
        replace(staging, final)
    _sync_folder(final.parent)
    return final


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # the renames themselves reach the disk
    finally:
        os.close(fd)


def is_finished(path: str | Path) -> bool:
    """True for a run folder of a training that ran to the end (it has metrics.json); the record
    a diverged run leaves (config, history, maybe a checkpoint) is not finished."""
    return (Path(path) / METRICS).is_file()


def commit_failed(staging: Path, cache: str | Path, name: str) -> bool:
    """Commit the record of a run that failed (diverged), as :func:`commit` does, unless a
    finished run of that name exists: a failed retrain never replaces a complete run (the record
    is then discarded). Returns whether the record was committed."""
    final = run_dir(cache, name)
    with locked(final):
        recover(final)
        if is_finished(final):
            discard(staging)
            return False
        replace(staging, final)
    _sync_folder(final.parent)
    return True


def discard(staging: Path) -> None:
    """Remove a staging folder that will not be committed (nothing when already renamed)."""
    shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------- verifying a run
_SHA_MEMO: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: hash each file once


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (remembered per path, size and modification time)."""
    path = Path(path)
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _SHA_MEMO:
        with open(path, "rb") as fh:
            _SHA_MEMO[memo] = hashlib.file_digest(fh, "sha256").hexdigest()
    return _SHA_MEMO[memo]


def rerun_hint(path: Path, name: str) -> str:
    """The command that rewrites run ``name`` (its entries from config.json when readable)."""
    train = read_run(path).train if path.is_dir() else {}
    opts = "".join(f" --{m} {train[m]}" for m in ("image", "text") if train.get(m))
    return f"Rerun `fit-adapters{opts or ' ...'} --name {name}` to rewrite the run and its aligned entries."


def verify_run(path: str | Path, name: str | None = None) -> str:
    """The sha256 of a finished run's adapters, after checking that ``adapters.safetensors``
    matches the hash recorded in ``adapters.json`` and, when metrics.json records one, there.
    RunIntegrityError otherwise (files of two trainings side by side, or a modified file)."""
    path = Path(path)
    name = name or path.name
    doc = _read_json(path / ADAPTER_JSON)
    if doc is None or not (path / ADAPTER_WEIGHTS).is_file():
        raise RunIntegrityError(f"Run {name!r} ({path}) has no readable {ADAPTER_JSON} and {ADAPTER_WEIGHTS}: it is "
                                f"not a finished fit-adapters run. {rerun_hint(path, name)}")
    recorded = doc.get("sha256")
    if not recorded:
        raise RunIntegrityError(f"Run {name!r} ({path}): {ADAPTER_JSON} records no sha256 of the adapters (written "
                                f"by an old version), so its outputs cannot be checked. {rerun_hint(path, name)}")
    actual = file_sha256(path / ADAPTER_WEIGHTS)
    if actual != recorded:
        raise RunIntegrityError(
            f"Run {name!r} ({path}): {ADAPTER_WEIGHTS} (sha256 {actual[:12]}) is not the file {ADAPTER_JSON} "
            f"describes (sha256 {recorded[:12]}): the folder mixes two trainings or a file was modified. "
            f"{rerun_hint(path, name)}")
    metrics = _read_json(path / METRICS) or {}
    if metrics.get("adapter_sha256") and metrics["adapter_sha256"] != recorded:
        raise RunIntegrityError(
            f"Run {name!r} ({path}): {METRICS} was measured with other adapters (sha256 "
            f"{str(metrics['adapter_sha256'])[:12]}) than {ADAPTER_WEIGHTS} ({recorded[:12]}). {rerun_hint(path, name)}")
    return recorded


def check_aligned(cache: str | Path, entries: Iterable[Entry]) -> None:
    """Refuse aligned entries (``<encoder>@<run>``) that their run's current adapters did not
    write: the ``adapter_sha256`` in the entry's key must equal the run folder's (checked with
    :func:`verify_run`), and when its source entry is among ``entries`` too (a before/after
    comparison), the source must still be the entry it was computed from (its key: encoder
    settings, data, extraction request). Plain encoder entries pass. RunIntegrityError naming the
    entry, the run and the command to rerun."""
    entries = list(entries)
    by_name = {e.name: e for e in entries}
    for entry in entries:
        run = source_of(entry.name)[1]
        if run is None:
            continue
        path = run_dir(cache, run)
        recover(path)
        if not path.is_dir():
            raise RunIntegrityError(
                f"Aligned entry {entry.name!r} ({entry.path}) belongs to run {run!r}, but there is no run folder "
                f"{str(path)!r} (deleted, renamed, or its fit-adapters was interrupted). {rerun_hint(path, run)} "
                f"Or delete the entry.")
        sha = verify_run(path, run)
        recorded = entry.key.get("adapter_sha256") if isinstance(entry.key, Mapping) else None
        if recorded != sha:
            raise RunIntegrityError(
                f"Aligned entry {entry.name!r} ({entry.path}) was written by another training of run {run!r} "
                f"(adapter sha256 {str(recorded)[:12]}; the run's adapters: {sha[:12]}): a fit-adapters run was "
                f"interrupted, or the run was retrained without rewriting this entry. {rerun_hint(path, run)}")
        source = by_name.get(source_of(entry.name)[0])
        was = entry.key.get("source") if isinstance(entry.key, Mapping) else None  # None: written by hand
        if source is not None and was is not None and was != source.key:
            now = source.key
            changed = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
            raise RunIntegrityError(
                f"Aligned entry {entry.name!r} was computed from {source.name!r} as it was extracted then; "
                f"{source.name!r} has been re-extracted since ({', '.join(changed)} changed), so comparing them "
                f"would mix two extractions. {rerun_hint(path, run)}")
