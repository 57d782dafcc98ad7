"""Pairwise comparison of cache entries (``analyze cka``), and the input helpers every analyze
command shares: reading and joining entries, choosing metrics, run folders, output files.

Rows: entries are joined by sample id with ``pipeline.join.join_rows`` (one row per image; a
caption entry contributes each image's first caption), the design's rule for kernel metrics.
``analyze.max_rows`` > 0 keeps a fixed random subset of the joined rows (seeded).

Output layout, under ``<analyze.out>/<dataset>/<split>/``:

    cka/scores.json, scores.csv       pairwise scores, one matrix per metric (analyze cka)
    cka/<metric>.png                  heatmap of each score matrix
    cka/kernels.png                   kernel heatmaps on a row sample (analyze cka --kernels)
    pairs/pairs.json, .csv, .png      encoder-pair ranking (analyze pairs)
    layers/<a>--<b>/<metric>.json|.csv|.png   layer x layer scores (analyze layers)
    runs/<run>/platonic.json|.csv|.png, kernels.png   the hypothesis test (analyze platonic)
    runs/<run>/platonic_summary.csv                   its flat one-row summary (controls, calibrated)
    runs/<run>/report.md, report.html, *.png          the report (analyze report)
"""

from __future__ import annotations

import csv
import datetime as _dt
import difflib
import inspect
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from analyze import plots
from analyze.metrics import METRICS, get_metric
from analyze.nulls import calibrated_matrices
from pipeline.cache import Entry, entry_filename, find_entry, list_entries
from pipeline.config import PipelineConfig
from pipeline.join import join_rows
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

RUNS_FOLDER = "runs"  # fit-adapters run folders live in <cache>/runs/<run>/
RECALL_PREFIXES = ("i2t_R@", "t2i_R@")  # retrieval keys in a run's metrics.json (train.retrieval)
ASYMMETRIC = {"cycle_knn", "cknna"}  # registry metrics whose value depends on the argument order (a test
#                             sweeps METRICS to check that every other one is symmetric)
ADAPTER_METHODS = ("infonce", "adapters")  # names of the trained adapters' row in metrics.json "test"


class AnalyzeError(PipelineError, ValueError):
    """Input that cannot be analysed as asked (too few rows, bad option values, missing layers)."""


# ----------------------------------------------------------------------------- metrics
def resolve_metrics(names: Sequence[str]) -> dict[str, Callable[..., float]]:
    """{name: metric} for registry names (``analyze.metrics.METRICS``); an unknown name is a
    ValueError naming close matches."""
    if not names:
        raise AnalyzeError(f"No metric asked for; pass --metric NAME[,NAME...] (available: {', '.join(METRICS)}).")
    return {name: get_metric(name) for name in names}


def accepts_k(metric: Callable) -> bool:
    """True for metrics with a ``k`` (neighbours) parameter: the kNN family."""
    return "k" in inspect.signature(metric).parameters


def metric_kwargs(metric: Callable, k: int) -> dict:
    """The keyword arguments to pass: ``k`` only to metrics that accept it."""
    return {"k": k} if accepts_k(metric) else {}


def check_k(metrics: Mapping[str, Callable], k: int, n: int, what: str = "rows") -> None:
    """kNN metrics need 1 <= k < n; say which option to change otherwise."""
    knn = [m for m, f in metrics.items() if accepts_k(f)]
    if knn and not 1 <= k < n:
        raise AnalyzeError(
            f"k={k} neighbours needs at least k+1 {what}, but there are n={n} (metrics {', '.join(knn)}). "
            f"Lower --k (analyze.k) below {n}, or use more rows (analyze.max_rows = 0 keeps all).")


# ----------------------------------------------------------------------------- reading entries
@dataclass
class Joined:
    """Entries joined by sample id.

    ids: (n,) image ids, one per row. rows: per entry, (n,) row indices into that entry.
    features: per entry, (n, d_entry) float32 features in the order of ``ids``.
    """

    entries: dict[str, Entry]
    ids: list[str]
    rows: dict[str, np.ndarray]
    features: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.ids)


def subset_rows(n: int, max_rows: int, seed: int) -> np.ndarray:
    """Sorted positions of a fixed random subset of ``max_rows`` of ``n`` rows (all when
    max_rows is 0 or >= n)."""
    if max_rows < 0:
        raise AnalyzeError(f"max_rows must be >= 0 (0 = all rows), got {max_rows}.")
    if max_rows == 0 or max_rows >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))


def check_finite(name: str, X: np.ndarray, ids: Sequence[str]) -> None:
    """An entry's features must be finite; name the first bad sample otherwise."""
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise AnalyzeError(f"Entry {name!r} has NaN or inf in {int(bad.sum())} rows (first: sample id {ids[first]!r}). "
                           f"Re-extract it (e.g. with --precision fp32) or drop those samples.")


def load_joined(cfg: PipelineConfig, names: Sequence[str], split: str | None = None,
                read: bool = True) -> Joined:
    """Open cache entries ``names`` of ``split`` (default ``analyze.split``), join them by sample
    id, keep the ``analyze.max_rows`` subset and (``read``) load their final features.

    Errors: CacheError (missing entry, with close matches), JoinError (ids that do not join),
    AnalyzeError (NaN/inf)."""
    split = split or cfg.analyze.split
    names = list(dict.fromkeys(names))
    entries = {n: find_entry(cfg.data.cache, cfg.data.dataset, split, n) for n in names}
    ids, rows = join_rows(list(entries.values()))
    keep = subset_rows(len(ids), cfg.analyze.max_rows, cfg.analyze.seed)
    joined = Joined(entries, [ids[i] for i in keep], {n: r[keep] for n, r in zip(names, rows)})
    if read:
        for n in names:
            joined.features[n] = read_rows(joined, n)
    return joined


def read_rows(joined: Joined, name: str, layer: int | None = None) -> np.ndarray:
    """(n, d) features (or hidden layer ``layer``) of one joined entry, checked finite."""
    X = joined.entries[name].features(layer)[joined.rows[name]]
    check_finite(name if layer is None else f"{name} layer {layer}", X, joined.ids)
    return X


def check_paired(features: Mapping[str, np.ndarray]) -> int:
    """All representations must have the same number of rows (paired samples); returns n."""
    counts = {name: int(np.shape(X)[0]) for name, X in features.items()}
    if len(set(counts.values())) > 1:
        shown = ", ".join(f"{k}: {v}" for k, v in counts.items())
        raise AnalyzeError(f"Representations have different row counts ({shown}); join them by sample id first "
                           f"(pipeline.join.join_rows, which load_joined uses).")
    return next(iter(counts.values()), 0)


# ----------------------------------------------------------------------------- pairwise scores
def pairwise_scores(features: Mapping[str, np.ndarray], metrics: Mapping[str, Callable], k: int
                    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Score every pair of representations with every metric.

    features: {name: (n, d_name)}, rows paired. Returns ({metric: (e, e) matrix, entry [i, j] =
    metric(features[i], features[j])}, {metric: seconds}). Symmetric metrics are computed for
    i <= j and mirrored; those in ``ASYMMETRIC`` for every ordered pair."""
    n = check_paired(features)
    check_k(metrics, k, n)
    names = list(features)
    out, seconds = {}, {}
    for m, fn in metrics.items():
        t0 = time.perf_counter()
        S = np.full((len(names), len(names)), np.nan)
        for i, a in enumerate(names):
            for j, b in enumerate(names):
                if j >= i or m in ASYMMETRIC:
                    S[i, j] = fn(features[a], features[b], **metric_kwargs(fn, k))
                else:
                    S[i, j] = S[j, i]
        out[m], seconds[m] = S, time.perf_counter() - t0
    return out, seconds


def centred_cosine_kernel(X: np.ndarray) -> np.ndarray:
    """(m, d) -> (m, m) cosine similarity of the column-centred rows (the kernel shown in the
    heatmaps: centring removes the shared mean direction, normalising the row norms, so
    panels of different encoders are comparable)."""
    Z = X - X.mean(axis=0, keepdims=True)
    Z = Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)
    return Z @ Z.T


def cluster_order(X: np.ndarray) -> np.ndarray:
    """(m,) row order of average-linkage clustering on cosine distance of the centred rows:
    similar samples end up next to each other, so block structure shows in a kernel heatmap."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    D = 1.0 - centred_cosine_kernel(X)
    D = np.clip((D + D.T) / 2, 0, None)
    np.fill_diagonal(D, 0.0)
    return leaves_list(linkage(squareform(D, checks=False), method="average"))


def kernel_figure(features: Mapping[str, np.ndarray], order_by: str, rows: int, seed: int,
                  path: str | Path, title: str = "") -> Path:
    """Kernel heatmaps of several representations on the SAME random sample of ``rows`` rows,
    all sorted by the clustering order of ``order_by`` (typically the reference). One panel
    per representation, ``centred_cosine_kernel`` of each."""
    n = check_paired(features)
    sample = subset_rows(n, rows, seed)
    order = sample[cluster_order(features[order_by][sample])] if len(sample) > 2 else sample
    kernels = {name: centred_cosine_kernel(np.asarray(X, dtype=np.float64)[order]) for name, X in features.items()}
    title = title or f"Cosine kernels of centred features, {len(order)} rows, ordered by clustering of {order_by}"
    return plots.kernel_panels(kernels, title, path)


# ----------------------------------------------------------------------------- outputs
def output_dir(cfg: PipelineConfig, *parts: str) -> Path:
    """``<analyze.out>/<dataset>/<split>/<parts...>`` (created)."""
    path = Path(cfg.analyze.out) / entry_filename(cfg.data.dataset) / cfg.analyze.split
    for p in parts:
        path = path / entry_filename(p)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _jsonable(obj: Any) -> Any:
    """NaN/inf -> None (strict JSON), numpy scalars/arrays -> Python, Paths -> str."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | Path, doc: Mapping) -> Path:
    path = Path(path)
    path.write_text(json.dumps(_jsonable(doc), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return path


def write_csv(path: str | Path, rows: Sequence[Mapping]) -> Path:
    """Rows of dicts; columns = union of keys in first-seen order; floats with 6 decimals."""
    path = Path(path)
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({c: (f"{v:.6f}" if isinstance(v, float) and math.isfinite(v) else
                            "" if isinstance(v, float) else v) for c, v in r.items()})
    return path


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def header(cfg: PipelineConfig, command: str) -> dict:
    """Provenance fields shared by every JSON output."""
    a = cfg.analyze
    return {"command": f"analyze {command}", "created": now(), "dataset": cfg.data.dataset, "split": a.split,
            "cache": str(cfg.data.cache), "max_rows": a.max_rows, "seed": a.seed, "k": a.k,
            "config_source": cfg.source, "config": cfg.to_dict()}


# ----------------------------------------------------------------------------- analyze cka
def default_entries(cfg: PipelineConfig) -> list[str]:
    """``analyze.entries``, else every finished entry of the split (an error when none)."""
    names = list(cfg.analyze.entries) or list_entries(cfg.data.cache, cfg.data.dataset, cfg.analyze.split)
    if not names:
        raise AnalyzeError(f"No cache entries for {cfg.data.dataset}/{cfg.analyze.split} under {str(cfg.data.cache)!r}; "
                           f"run `extract --split {cfg.analyze.split}` first, or pass --cache/--dataset/--split.")
    return names


def compare_entries(cfg: PipelineConfig, kernels: bool = False) -> dict:
    """``analyze cka``: pairwise scores between cache entries of ``analyze.split``.

    Entries: ``analyze.entries`` (default: every entry of the split); metrics: ``analyze.metrics``.
    Writes ``cka/scores.json``, ``cka/scores.csv``, ``cka/<metric>.png`` and, with ``kernels``,
    ``cka/kernels.png``. With ``analyze.calibrate`` every score is also calibrated against
    ``analyze.permutations`` shuffled pairings (``analyze.nulls``): JSON ``calibrated``,
    ``threshold``, ``p_value`` (each {metric: (e, e) matrix}) and CSV columns of the same names. Returns the JSON document (plus ``out``: the folder)."""
    a = cfg.analyze
    names = default_entries(cfg)
    if len(names) < 2:
        raise AnalyzeError(f"analyze cka compares at least two entries; got {names}. Pass --entries A,B[,...].")
    metrics = resolve_metrics(a.metrics)
    joined = load_joined(cfg, names)
    scores, seconds = pairwise_scores(joined.features, metrics, a.k)
    out = output_dir(cfg, "cka")
    doc = {**header(cfg, "cka"), "n": joined.n, "entries": names,
           "dims": {n: joined.entries[n].dim for n in names}, "scores": scores, "seconds": seconds,
           "k_used": {m: (a.k if accepts_k(f) else None) for m, f in metrics.items()}, "figures": {}}
    cal = {}
    if a.calibrate:
        kwargs = {m: metric_kwargs(f, a.k) for m, f in metrics.items()}
        cal = calibrated_matrices(joined.features, metrics, kwargs, scores, a.permutations, a.seed)
        doc.update({"permutations": a.permutations, **{key: {m: c[key] for m, c in cal.items()}
                                                        for key in ("calibrated", "threshold", "p_value")}})
    rows = [{"metric": m, "entry_a": x, "entry_b": y, "score": float(S[i, j]), "n": joined.n,
             **({key: float(cal[m][key][i, j]) for key in ("calibrated", "threshold", "p_value")} if cal else {})}
            for m, S in scores.items() for i, x in enumerate(names) for j, y in enumerate(names)]
    for m, S in scores.items():
        doc["figures"][m] = plots.heatmap(S, names, names, f"{m} between cache entries ({cfg.data.dataset} "
                                          f"{a.split}, n={joined.n})", out / f"{entry_filename(m)}.png").name
    if kernels:
        ref = a.reference if a.reference in names else names[0]
        doc["figures"]["kernels"] = kernel_figure(joined.features, ref, a.kernel_rows, a.seed,
                                                  out / "kernels.png").name
    write_json(out / "scores.json", doc)
    write_csv(out / "scores.csv", rows)
    return {**doc, "out": out}


# ----------------------------------------------------------------------------- run folders
@dataclass
class RunInfo:
    """What analyze reads from a fit-adapters run folder ``<cache>/runs/<run>/``.

    config: the resolved pipeline config (config.json), metrics: metrics.json (empty if
    absent), image/text: the train entries, curves/history: paths or None."""

    name: str
    path: Path
    config: dict
    metrics: dict
    image: str | None
    text: str | None
    curves: Path | None
    history: Path | None

    @property
    def retrieval(self) -> dict[str, dict[str, float]]:
        return retrieval_table(self.metrics)

    @property
    def adapters_method(self) -> str | None:
        """The retrieval-table row of the trained adapters (``infonce``; else the first row)."""
        table = self.retrieval
        return next((m for m in ADAPTER_METHODS if m in table), next(iter(table), None))

    @property
    def mean_R(self) -> float | None:
        """Test mean recall of the trained adapters."""
        method = self.adapters_method
        return self.retrieval[method].get("mean_R") if method else None


def run_name(cfg: PipelineConfig, run: str | None = None) -> str:
    """``run`` if given, else ``train.name``, else fit-adapters' default ``<image>-<text>-<adapter>``."""
    if run:
        return run
    from train.outputs import default_run_name

    return default_run_name(cfg)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return {}


def read_run(path: str | Path) -> RunInfo:
    """Read a run folder, tolerating missing files (a run still training has no metrics.json)."""
    path = Path(path)
    config = _read_json(path / "config.json")
    train = config.get("train", config) if isinstance(config, dict) else {}
    metrics = _read_json(path / "metrics.json")
    pngs = sorted(path.glob("*.png"))
    curves = path / "curves.png" if (path / "curves.png").is_file() else (pngs[0] if pngs else None)
    history = path / "history.csv" if (path / "history.csv").is_file() else None
    return RunInfo(path.name, path, config, metrics, train.get("image"), train.get("text"), curves, history)


def list_runs(cache: str | Path) -> list[RunInfo]:
    """Every run folder under ``<cache>/runs/`` (folders with a config.json or metrics.json)."""
    root = Path(cache) / RUNS_FOLDER
    if not root.is_dir():
        return []
    return [read_run(p) for p in sorted(root.iterdir())
            if p.is_dir() and ((p / "config.json").is_file() or (p / "metrics.json").is_file())]


def find_run(cache: str | Path, name: str) -> RunInfo:
    """The run folder ``<cache>/runs/<name>``; FileNotFoundError naming close matches otherwise."""
    path = Path(cache) / RUNS_FOLDER / entry_filename(name)
    if path.is_dir():
        return read_run(path)
    known = [r.name for r in list_runs(cache)]
    close = difflib.get_close_matches(entry_filename(name), known, n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else (f" Runs: {', '.join(known)}." if known else
                                                                 " No runs yet: run fit-adapters first.")
    raise FileNotFoundError(f"No run folder {str(path)!r}.{hint}")


def _recall_keys(d: Mapping) -> bool:
    return any(str(k).startswith(RECALL_PREFIXES) or k == "mean_R" for k in d)


def retrieval_table(metrics: Mapping) -> dict[str, dict[str, float]]:
    """{method: {"i2t_R@1": ..., "mean_R": ...}} from a run's metrics.json, tolerant of its
    nesting: uses the ``test`` section when present; a mapping that holds recall keys is a
    method (named by its key; top-level recall keys are the adapters), searched two levels deep."""
    node = metrics.get("test", metrics) if isinstance(metrics, Mapping) else {}
    if not isinstance(node, Mapping):
        return {}
    table: dict[str, dict[str, float]] = {}

    def recalls(d: Mapping) -> dict[str, float]:
        return {k: float(v) for k, v in d.items()
                if (str(k).startswith(RECALL_PREFIXES) or k == "mean_R") and isinstance(v, (int, float))}

    if _recall_keys(node):
        table["adapters"] = recalls(node)
    for key, value in node.items():
        if isinstance(value, Mapping):
            if _recall_keys(value):
                table[str(key)] = recalls(value)
            else:
                for sub, v in value.items():
                    if isinstance(v, Mapping) and _recall_keys(v):
                        table[str(sub)] = recalls(v)
    return table
