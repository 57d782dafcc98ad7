"""Pairwise comparison of cache entries (``analyze cka``), and the input helpers every analyze
command shares: reading and joining entries, choosing metrics, output files. Run folders and
aligned entry names come from ``pipeline.runs``.

Rows: entries are joined by sample id with ``pipeline.join.join_rows`` (one row per image; a
caption entry contributes each image's first caption), the design's rule for kernel metrics.
Images that are byte-identical copies under different ids (equal content hashes in the entries'
``content`` record) would be each other's nearest neighbours: ``analyze.duplicates = "drop"``
(the default) keeps the first id of each group of copies, ``"keep"`` keeps them all; both log a
warning naming them, and the outputs record it (``duplicates``). ``analyze.max_rows`` > 0 then
keeps a fixed random subset of the joined rows (seeded).

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
import inspect
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from analyze import plots
from analyze.nulls import calibrated_matrices
from extract.datasets import duplicate_groups
from pipeline.cache import Entry, entry_filename, find_entry, resolved_data_dir, scan_entries
from pipeline.config import CHOICES, PipelineConfig
from pipeline.errors import PipelineError
from pipeline.join import join_rows
from pipeline.languages import ENTRY_MARK, entry_name
from pipeline.runs import RunIntegrityError, check_aligned, is_aligned, report_dir, source_of
from pipeline.names import UnsafeNameError
from pipeline.runtime import finite_rows, make_dir, utc_now, write_json
from similarity.degenerate import degenerate
from similarity.metrics import METRICS, get_metric

log = logging.getLogger(__name__)

ASYMMETRIC = {"cycle_knn", "cknna"}  # registry metrics whose value depends on the argument order (a test
#                             sweeps METRICS to check that every other one is symmetric)


class AnalyzeError(PipelineError, ValueError):
    """Input that cannot be analysed as asked (too few rows, bad option values, missing layers)."""


# ----------------------------------------------------------------------------- metrics
def resolve_metrics(names: Sequence[str]) -> dict[str, Callable[..., float]]:
    """{name: metric} for registry names (``similarity.metrics.METRICS``); an unknown name is a
    MetricError (a PipelineError) naming close matches."""
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
            f"Lower --k (or --set analyze.k=N) below {n}, or use more rows (--max-rows 0 keeps all).")


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
    duplicates: dict = field(default_factory=dict)  # {"policy", "groups", "copies", "dropped", "examples"}

    @property
    def n(self) -> int:
        return len(self.ids)


def option_hint(key: str) -> str:
    """How a user sets an [analyze] key: ``--max-rows N (--set analyze.max_rows=N)``."""
    return f"--{key.split('.')[-1].replace('_', '-')} N (or --set {key}=N)"


def subset_rows(n: int, max_rows: int, seed: int, key: str = "analyze.max_rows") -> np.ndarray:
    """Sorted positions of a fixed random subset of ``max_rows`` of ``n`` rows (all when
    max_rows is 0 or >= n); ``key``: the config key the count comes from, for the error."""
    if max_rows < 0:
        raise AnalyzeError(f"{key} = {max_rows} is out of range: use a row count >= 0 (0 = all rows), "
                           f"e.g. {option_hint(key)}.")
    if max_rows == 0 or max_rows >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))


def check_finite(name: str, X: np.ndarray, ids: Sequence[str]) -> None:
    """An entry's features must be finite; name the first bad sample otherwise."""
    bad = ~finite_rows(X)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise AnalyzeError(f"Entry {name!r} has NaN or inf in {int(bad.sum())} rows (first: sample id {ids[first]!r}). "
                           f"Re-extract it (e.g. with --precision fp32) or drop those samples.")


def load_joined(cfg: PipelineConfig, names: Sequence[str], split: str | None = None,
                read: bool = True) -> Joined:
    """Open cache entries ``names`` of ``split`` (default ``analyze.split``), join them by sample
    id, keep the ``analyze.max_rows`` subset and (``read``) load their final features.

    Errors: CacheError (missing entry, with close matches), RunIntegrityError (an aligned entry
    its run's adapters did not write), JoinError (ids that do not join), AnalyzeError (NaN/inf)."""
    split = split or cfg.analyze.split
    names = list(dict.fromkeys(names))
    entries = {n: find_entry(cfg.data.cache, cfg.data.dataset, split, n, cfg.data.data_dir) for n in names}
    check_aligned(cfg.data.cache, entries.values())
    ids, rows = join_rows(list(entries.values()))
    unique, duplicates = _without_duplicates(cfg, entries.values(), ids)
    keep = unique[subset_rows(len(unique), cfg.analyze.max_rows, cfg.analyze.seed)]
    joined = Joined(entries, [ids[i] for i in keep], {n: r[keep] for n, r in zip(names, rows)}, duplicates=duplicates)
    if read:
        for n in names:
            joined.features[n] = read_rows(joined, n)
    return joined


def _without_duplicates(cfg: PipelineConfig, entries, ids: Sequence[str]) -> tuple[np.ndarray, dict]:
    """(positions of the joined rows to keep, the ``duplicates`` record) under ``analyze.duplicates``:
    groups of ids with equal image content hashes (from the first entry that records them)."""
    policy = cfg.analyze.duplicates
    if policy not in CHOICES["analyze.duplicates"]:
        raise AnalyzeError(f"analyze.duplicates = {policy!r}: use one of {', '.join(CHOICES['analyze.duplicates'])}.")
    record = next((c for e in entries if (c := e.content())), None)
    position = {i: p for p, i in enumerate(ids)}
    groups = ([[i for i in g if i in position] for g in duplicate_groups(record["ids"], record["digests"])]
              if record else [])
    groups = [g for g in groups if len(g) > 1]
    drop = {position[i] for g in groups for i in g[1:]} if policy == "drop" else set()
    info = {"policy": policy, "groups": len(groups), "copies": sum(len(g) - 1 for g in groups),
            "dropped": len(drop), "examples": groups[:3]}
    if groups:
        shown = "; ".join(" = ".join(g) for g in groups[:3])
        log.warning("%d of %d rows are byte-identical copies of another image under a different id (e.g. %s): %s "
                    "(analyze.duplicates = %s)", info["copies"], len(ids), shown,
                    "dropped, one image of each group kept" if drop else
                    "kept; kNN and kernel scores count copies as neighbours", policy)
    return np.array([p for p in range(len(ids)) if p not in drop], dtype=np.int64), info


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


def degenerate_reasons(features: Mapping[str, np.ndarray], metrics: Mapping[str, Callable], k: int
                       ) -> dict[str, dict[str, str]]:
    """{metric: {name: why}} for the representations whose scores under that metric are not
    measurements (``similarity.degenerate``: constant features for every metric; a kNN graph
    decided by ties for the kNN metrics); each case logged once as a warning."""
    constant = {n: degenerate(X) for n, X in features.items()}
    tied: dict[str, str | None] = {}
    out: dict[str, dict[str, str]] = {}
    for m, fn in metrics.items():
        knn = accepts_k(fn)
        if knn and not tied:
            tied = {n: constant[n] or degenerate(X, k) for n, X in features.items()}
        found = {n: why for n, why in (tied if knn else constant).items() if why}
        if found:
            out[m] = found
    for n in features:
        hit = [m for m, found in out.items() if n in found]
        if hit:
            log.warning("%s: %s scores are not measurements: %s", n, ", ".join(hit),
                        "; ".join(sorted({out[m][n] for m in hit})))
    return out


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
    """Kernel heatmaps of several representations on the SAME random sample of ``rows`` rows
    (``analyze.kernel_rows``), all sorted by the clustering order of ``order_by`` (typically the
    reference). One panel per representation, ``centred_cosine_kernel`` of each."""
    n = check_paired(features)
    sample = subset_rows(n, rows, seed, key="analyze.kernel_rows")
    order = sample[cluster_order(features[order_by][sample])] if len(sample) > 2 else sample
    kernels = {name: centred_cosine_kernel(np.asarray(X, dtype=np.float64)[order]) for name, X in features.items()}
    title = title or f"Cosine kernels of centred features, {len(order)} rows, ordered by clustering of {order_by}"
    return plots.kernel_panels(kernels, title, path)


# ----------------------------------------------------------------------------- outputs
def output_dir(cfg: PipelineConfig, *parts: str) -> Path:
    """``<analyze.out>/<dataset>/<split>/<parts...>`` (``pipeline.runs.report_dir``: each part checked to
    be one safe folder name; created; FolderError when it cannot be written)."""
    return make_dir(report_dir(cfg.analyze.out, cfg.data.dataset, cfg.analyze.split, *parts),
                    "output folder (analyze.out, --out)")


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


def data_dir_of(cfg: PipelineConfig) -> str | None:
    """The resolved data folder an output was computed from (None when the cache picks the only one),
    recorded in every output so that one made from another data folder is never reused."""
    return str(resolved_data_dir(cfg.data.data_dir)) if cfg.data.data_dir else None


def header(cfg: PipelineConfig, command: str) -> dict:
    """Provenance fields shared by every JSON output."""
    a = cfg.analyze
    return {"command": f"analyze {command}", "created": utc_now(), "dataset": cfg.data.dataset, "split": a.split,
            "cache": str(cfg.data.cache), "data_dir": data_dir_of(cfg), "max_rows": a.max_rows, "seed": a.seed, "k": a.k,
            "config_source": cfg.source, "config": cfg.to_dict()}


# ----------------------------------------------------------------------------- analyze cka
def default_entries(cfg: PipelineConfig) -> list[str]:
    """``analyze.entries``, else every finished entry of the split: an error when there is none, or
    when one cannot be read (damaged, truncated, older cache format): naming them, never dropping
    them silently; aligned entries their run cannot vouch for are left out with a warning
    (:func:`_vouched`), and so are the text entries of caption languages other than
    ``data.language`` (``<encoder>.lang-<code>``). Passing ``--entries`` compares the named entries only."""
    if cfg.analyze.entries:
        return list(cfg.analyze.entries)
    names, bad = scan_entries(cfg.data.cache, cfg.data.dataset, cfg.analyze.split, cfg.data.data_dir)
    if bad:
        shown = "; ".join(f"{p.name}: {why}" for p, why in bad)
        raise AnalyzeError(f"{len(bad)} cache entr{'y' if len(bad) == 1 else 'ies'} of {cfg.data.dataset}/"
                           f"{cfg.analyze.split} cannot be read ({shown}). Recompute them (extract --repair), "
                           f"or compare the readable ones only with --entries {','.join(names) or 'A,B'}.")
    if not names:
        raise AnalyzeError(f"No cache entries for {cfg.data.dataset}/{cfg.analyze.split} under {str(cfg.data.cache)!r}; "
                           f"run `extract --split {cfg.analyze.split}` first, or pass --cache/--dataset/--split.")
    own = entry_name("x", cfg.data.language, cfg.data.default_language)[1:]  # "" or ".lang-<code>"
    names = [n for n in names if ENTRY_MARK not in n or n.endswith(own) and own]
    return _vouched(cfg, names)


def _vouched(cfg: PipelineConfig, names: list[str]) -> list[str]:
    """``names`` without the aligned entries their run cannot vouch for (a broken, diverged or
    retrained run folder, or a source re-extracted since): each is left out with a warning naming
    it and why, so one broken run never stops a comparison of the others. Naming such an entry in
    ``--entries`` gives the error instead."""
    kept = []
    for name in names:
        if is_aligned(name):
            group = [n for n in (name, source_of(name)[0]) if n in names]
            try:
                check_aligned(cfg.data.cache, [find_entry(cfg.data.cache, cfg.data.dataset, cfg.analyze.split, n,
                                                          cfg.data.data_dir) for n in group])
            except (RunIntegrityError, UnsafeNameError) as exc:
                log.warning("leaving out cache entry %s: %s", name, exc)
                continue
        kept.append(name)
    return kept


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
    doc = {**header(cfg, "cka"), "n": joined.n, "entries": names, "duplicates": joined.duplicates,
           "dims": {n: joined.entries[n].dim for n in names}, "scores": scores, "seconds": seconds,
           "k_used": {m: (a.k if accepts_k(f) else None) for m, f in metrics.items()}, "figures": {}}
    cal = {}
    if a.calibrate:
        kwargs = {m: metric_kwargs(f, a.k) for m, f in metrics.items()}
        cal = calibrated_matrices(joined.features, metrics, kwargs, scores, a.permutations, a.seed)
        doc.update({"permutations": a.permutations, **{key: {m: c[key] for m, c in cal.items()}
                                                        for key in ("calibrated", "threshold", "p_value")}})
    flagged = degenerate_reasons(joined.features, metrics, a.k)
    for m, found in flagged.items():  # a score of a degenerate entry is NaN (JSON null), its reason in "degenerate"
        bad = np.array([n in found for n in names])
        for S in [scores[m]] + [cal[m][key] for key in ("calibrated", "threshold", "p_value") if cal]:
            S[bad, :] = np.nan
            S[:, bad] = np.nan
    doc["degenerate"] = flagged
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
