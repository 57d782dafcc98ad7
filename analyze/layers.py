"""Layer x layer comparison of two cache entries (``analyze layers``).

Needs entries extracted with every hidden layer (``extract --layers all``: ``Entry.layers``).
For each metric it scores every (layer of A, layer of B) pair on the same joined rows and
reports both the best pair and the last-layer pair. Taking the maximum over many layer pairs
selects on noise, so the best score is biased upwards, more so the more layers there are
(deep encoders look more aligned): compare encoders by the last pair, or by a fixed layer
chosen in advance. With ``analyze.permutations`` > 0 the maximum is also calibrated against
its own null (``analyze.nulls.calibrated_layers``: the maximum over layer pairs of each
shuffled-pairing draw), so its p-value and calibrated score account for the selection;
the last pair is calibrated against its own cell's null. JSON: ``best`` and ``last`` gain
``calibrated``, ``threshold``, ``p_value``; ``calibrated_scores`` holds each cell against its
own null; CSV: columns ``calibrated``, ``threshold``, ``p_value`` per cell.
"""

from __future__ import annotations

import time
from typing import Callable, Mapping

import numpy as np

from analyze import plots
from analyze.compare import (AnalyzeError, check_k, header, load_joined, metric_kwargs, output_dir, read_rows,
                             resolve_metrics, write_csv)
from analyze.nulls import calibrated_layers
from pipeline.cache import Entry
from pipeline.config import PipelineConfig
from pipeline.runs import source_of
from pipeline.runtime import write_json

MAX_NOTE = ("The best pair is a maximum over {pairs} layer pairs, which inflates it (more so for deeper "
            "encoders); the last pair is the unselected comparison.")
CALIBRATED_NOTE = (" Calibrated against the maximum over layer pairs of {perms} shuffled pairings, the best pair "
                   "scores {calibrated:.3f} (p = {p:.3g}).")


def layer_scores(A: list[np.ndarray], B: list[np.ndarray], metric: Callable, k: int) -> np.ndarray:
    """(L_a, L_b) matrix: entry [i, j] = metric(A[i], B[j]); A, B: lists of (n, d_layer) arrays,
    rows paired."""
    kwargs = metric_kwargs(metric, k)
    return np.array([[metric(a, b, **kwargs) for b in B] for a in A], dtype=float).reshape(len(A), len(B))


def best_and_last(S: np.ndarray, layers_a: list[int], layers_b: list[int]) -> dict:
    """The best (max) and last-layer cells of a layer score matrix, with their layer indices."""
    i, j = np.unravel_index(int(np.nanargmax(S)), S.shape)
    return {"best": {"layer_a": layers_a[i], "layer_b": layers_b[j], "score": float(S[i, j])},
            "last": {"layer_a": layers_a[-1], "layer_b": layers_b[-1], "score": float(S[-1, -1])}}


def _need_layers(entry: Entry) -> list[int]:
    if not entry.layers:
        raise AnalyzeError(
            f"Entry {entry.name!r} ({entry.path}) has no per-layer features. Re-extract it with every hidden "
            f"layer: `extract --encoder {source_of(entry.name)[0]} --layers all --split <split> --force`.")
    return list(entry.layers)


def default_pair(cfg: PipelineConfig, pair: tuple[str, str] | None) -> tuple[str, str]:
    """``pair`` or the train config's (image, text) entries."""
    pair = tuple(pair) if pair else (cfg.train.image, cfg.train.text)
    if len(pair) != 2:
        raise AnalyzeError(f"--pair needs exactly two entries, e.g. --pair resnet18,gpt2; got {list(pair)}.")
    return pair


def compare_layers(cfg: PipelineConfig, pair: tuple[str, str] | None = None) -> dict:
    """``analyze layers``: layer x layer heatmaps of each metric in ``analyze.metrics`` for the
    pair (default ``train.image``, ``train.text``). Writes
    ``layers/<a>--<b>/<metric>.json|.csv|.png``; returns {"pair", "n", "metrics": {metric: doc}, "out"}."""
    a_name, b_name = default_pair(cfg, pair)
    joined = load_joined(cfg, [a_name, b_name], read=False)
    la, lb = _need_layers(joined.entries[a_name]), _need_layers(joined.entries[b_name])
    metrics = resolve_metrics(cfg.analyze.metrics)
    check_k(metrics, cfg.analyze.k, joined.n)
    A = [read_rows(joined, a_name, layer) for layer in la]
    B = [read_rows(joined, b_name, layer) for layer in lb]
    out = output_dir(cfg, "layers", f"{a_name}--{b_name}")
    docs: dict[str, Mapping] = {}
    for m, fn in metrics.items():
        t0 = time.perf_counter()
        S = layer_scores(A, B, fn, cfg.analyze.k)
        summary = best_and_last(S, la, lb)
        note, cells = MAX_NOTE.format(pairs=S.size), None
        if cfg.analyze.permutations:
            cal = calibrated_layers(m, fn, metric_kwargs(fn, cfg.analyze.k), A, B, S, cfg.analyze.permutations,
                                    cfg.analyze.seed)
            for which in ("best", "last"):
                summary[which].update({key: cal[which][key] for key in ("calibrated", "threshold", "p_value")})
            cells = cal["cells"]
            note += CALIBRATED_NOTE.format(perms=cfg.analyze.permutations, calibrated=cal["best"]["calibrated"],
                                           p=cal["best"]["p_value"])
        doc = {**header(cfg, "layers"), "metric": m, "entry_a": a_name, "entry_b": b_name, "n": joined.n,
               "layers_a": la, "layers_b": lb, "scores": S, **summary, "permutations": cfg.analyze.permutations,
               "calibrated_scores": cells["calibrated"] if cells else None,
               "note": note, "seconds": time.perf_counter() - t0}
        best, last = summary["best"], summary["last"]
        doc["figure"] = plots.heatmap(
            S, [str(i) for i in la], [str(j) for j in lb], f"{m}: {a_name} vs {b_name} layers (n={joined.n})",
            out / f"{m}.png", ylabel=f"{a_name} layer", xlabel=f"{b_name} layer",
            mark=[(la.index(best["layer_a"]), lb.index(best["layer_b"]), f"best {best['score']:.3f}"),
                  (len(la) - 1, len(lb) - 1, f"last {last['score']:.3f}")]).name
        write_json(out / f"{m}.json", doc)
        write_csv(out / f"{m}.csv", [{"metric": m, "layer_a": i, "layer_b": j, "score": float(S[p, q]),
                                      **({key: float(cells[key][p, q]) for key in cells} if cells else {})}
                                     for p, i in enumerate(la) for q, j in enumerate(lb)])
        docs[m] = doc
    return {"pair": [a_name, b_name], "n": joined.n, "metrics": docs, "out": out}
