"""The run-folder contract between ``fit-adapters`` (the writer) and ``analyze`` (the reader).

A run is one training of adapters. Its folder is ``<cache>/runs/<name>`` and holds:

    adapters.safetensors   best-epoch adapter weights (train.api)
    adapters.json          the [train] settings that define the adapters, sources, statistics
    config.json            the resolved pipeline configuration ({"source": ..., <sections>})
    history.csv            one row per epoch: loss, lr, temperature, val recall, val CKA
    metrics.json           a :class:`RunMetrics` record: test recall per method, best epoch, sizes
    curves.png             loss, recall and CKA curves over epochs

A run also writes, next to each source entry in the cache, an *aligned entry* named
``<encoder>@<run>`` (:func:`aligned_name`; :func:`source_of` parses it back). The name of a run
is ``train.name``, else ``<image>-<text>[-<extra>...]-<adapter>`` (:func:`default_run_name`).

Both stages use only this module for these names, so neither has to guess the other's layout.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pipeline.cache import entry_filename
from pipeline.config import TrainConfig
from pipeline.errors import PipelineError, did_you_mean
from pipeline.runtime import write_json

log = logging.getLogger(__name__)

RUNS_DIR = "runs"  # run folders live in <cache>/runs/<name>/
ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_JSON = "adapters.json"
CONFIG = "config.json"
HISTORY = "history.csv"
METRICS = "metrics.json"
CURVES = "curves.png"
SEPARATOR = "@"  # aligned entry = <encoder>@<run>
ADAPTERS_METHOD = "infonce"  # the trained adapters' row in RunMetrics.test; the other rows are baselines
RECALL_COLUMNS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mean_R")  # per method


class RunError(PipelineError, ValueError):
    """A run name that cannot be used, or a metrics record that cannot be read."""


class RunNotFoundError(RunError, FileNotFoundError):
    """No run folder of that name in the cache."""


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
    """A run name must be non-empty and free of ``@`` (it ends aligned entry names)."""
    if not name or SEPARATOR in name:
        raise RunError(f"Run name {name!r} must be non-empty and must not contain {SEPARATOR!r} "
                       f"(aligned entries are named <encoder>{SEPARATOR}<run>); pass another --name.")
    return name


def aligned_name(encoder: str, run: str) -> str:
    """The cache entry holding ``encoder``'s features mapped by run ``run``: ``<encoder>@<run>``."""
    return f"{encoder}{SEPARATOR}{check_run_name(run)}"


def source_of(entry: str) -> tuple[str, str | None]:
    """``"resnet18@base"`` -> ("resnet18", "base"); a plain encoder entry -> (entry, None).
    Splits at the last ``@`` (run names never contain one)."""
    encoder, sep, run = entry.rpartition(SEPARATOR)
    return (encoder, run) if sep else (entry, None)


def is_aligned(entry: str) -> bool:
    """True for the aligned output of a run (``<encoder>@<run>``), False for an encoder's entry."""
    return source_of(entry)[1] is not None


def runs_dir(cache: str | Path) -> Path:
    """``<cache>/runs``."""
    return Path(cache) / RUNS_DIR


def run_dir(cache: str | Path, name: str) -> Path:
    """``<cache>/runs/<name>`` (the name made file-safe as cache entries are)."""
    return runs_dir(cache) / entry_filename(name)


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
    "raw_cka", "aligned_cka"} or None. Non-finite numbers are stored as JSON null.
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
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
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


def list_runs(cache: str | Path) -> list[RunFolder]:
    """Every run folder under ``<cache>/runs/`` (folders holding a config.json or metrics.json)."""
    root = runs_dir(cache)
    if not root.is_dir():
        return []
    return [read_run(p) for p in sorted(root.iterdir())
            if p.is_dir() and ((p / CONFIG).is_file() or (p / METRICS).is_file())]


def find_run(cache: str | Path, name: str) -> RunFolder:
    """The run folder ``<cache>/runs/<name>``; RunNotFoundError naming close matches otherwise."""
    path = run_dir(cache, name)
    if path.is_dir():
        return read_run(path)
    known = [r.name for r in list_runs(cache)]
    hint = did_you_mean(entry_filename(name), known) or (
        f" Runs: {', '.join(known)}." if known else " No runs yet: run fit-adapters first.")
    raise RunNotFoundError(f"No run folder {str(path)!r}.{hint}")
