"""The Platonic criterion tracked during training, on the validation split.

At every evaluation epoch, for each metric m in ``train.track_metrics`` (registry names of
``analyze.metrics``; kNN metrics use k = ``analyze.k``) and each side s in {image, text}:

    after_s = m(adapter_s(val features of s), reference)
    delta_s = after_s - (before_image + before_text) / 2,   before_s = m(val features of s, reference)

with the val rows joined by image id (one row per image, a caption entry's first caption),
exactly the rows and quantities ``analyze platonic`` uses on its split. The before-scores use
the encoders' own (unstandardised) features, as ``analyze platonic`` does, and are computed
once. No resampling: this is the curve, the test with intervals is ``analyze platonic``.

history.csv columns (NaN on epochs without evaluation): ``val_<m>_after_image``,
``val_<m>_after_text``, ``val_<m>_delta_image``, ``val_<m>_delta_text``; metrics.json
``tracking`` holds the before-scores and the values at the best epoch; curves.png draws the
deltas in its last panel. Needs the reference entry (``train.reference``) on the val split.

Cost per evaluation: one embedding of the val rows and, per metric, two metric calls on
n_val rows (linear CKA O(n d^2); mutual kNN O(n^2 d)).
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Mapping, Sequence

import torch

from similarity.metrics import METRICS, get_metric
from pipeline.config import PipelineConfig
from pipeline.errors import did_you_mean
from train.adapters import AlignModel
from train.data import TrainData
from train.errors import TrainError
from train.evaluate import Reference, embed

log = logging.getLogger(__name__)

SIDES = ("image", "text")


def check_track_metrics(names: Sequence[str]) -> None:
    """Every name must be a registry metric (analyze.metrics.METRICS)."""
    for name in names:
        if name not in METRICS:
            raise TrainError(f"train.track_metrics: unknown metric {name!r}.{did_you_mean(name, METRICS)} "
                             f"Available: {', '.join(METRICS)}.")


def columns(metric: str) -> list[str]:
    """history.csv columns of one tracked metric."""
    return [f"val_{metric}_{q}_{s}" for q in ("after", "delta") for s in SIDES]


class Tracker:
    """Scores the aligned val embeddings against the reference; see the module docstring.

    raw: side -> (n, d_side) unstandardised val features (rows lined up with the reference);
    std: side -> (n, d_side) the same rows standardised (the adapters' input)."""

    def __init__(self, reference: Reference, data: TrainData, metrics: Sequence[str], k: int):
        val = data.splits["val"]
        self.reference, self.k = reference, k
        self.std = {s: val.features[s][reference.rows[s]] for s in SIDES}
        self.raw = {s: self._unstandardise(data, s, x) for s, x in self.std.items()}
        n = reference.features.shape[0]
        self.metrics = {}
        for name in metrics:
            fn = get_metric(name)
            knn = "k" in inspect.signature(fn).parameters
            if knn and not 1 <= k < n:
                log.warning("tracking: %s needs k=%d < n=%d val rows; not tracked", name, k, n)
                continue
            self.metrics[name] = (fn, {"k": k} if knn else {})
        self.before = {m: {s: self._score(m, self.raw[s]) for s in SIDES} for m in self.metrics}

    @staticmethod
    def _unstandardise(data: TrainData, side: str, x: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(data.stats.mean[side], device=x.device)
        std = torch.as_tensor(data.stats.std[side], device=x.device)
        return x * std + mean

    def _score(self, metric: str, x: torch.Tensor) -> float:
        fn, kwargs = self.metrics[metric]
        return float(fn(x, self.reference.features, device=str(x.device), **kwargs))

    def row(self, model: AlignModel) -> dict[str, float]:
        """The history columns for the model's current weights."""
        emb = {s: embed(model, s, self.std[s]) for s in SIDES}
        out = {}
        for m, before in self.before.items():
            base = (before["image"] + before["text"]) / 2
            after = {s: self._score(m, emb[s]) for s in SIDES}
            out.update({f"val_{m}_after_{s}": after[s] for s in SIDES})
            out.update({f"val_{m}_delta_{s}": after[s] - base for s in SIDES})
        return out

    def summary(self, best_row: Mapping[str, float]) -> dict:
        """metrics.json ``tracking``: settings, before-scores, and the tracked values of ``best_row``
        (the best epoch's history row)."""
        return {"split": "val", "reference": self.reference.name, "k": self.k, "n": int(self.reference.features.shape[0]),
                "before": self.before,
                "best": {m: {c: best_row.get(c) for c in columns(m)} for m in self.metrics}}


def make_tracker(cfg: PipelineConfig, data: TrainData, reference: Reference | None) -> Tracker | None:
    """A Tracker for ``train.track_metrics``, or None when nothing is tracked (no metrics, no
    reference, or a run with other modalities than image and text)."""
    names = cfg.train.track_metrics
    if not names or reference is None:
        return None
    if set(reference.rows) != set(SIDES):
        log.warning("tracking needs the image and text modalities; not tracked")
        return None
    return Tracker(reference, data, names, cfg.analyze.k)


SIDE_COLOURS = {"image": "tab:blue", "text": "tab:orange"}  # one colour per side, in every panel
METRIC_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))  # line style and marker per metric


def plot_deltas(ax, history: Sequence[Mapping]) -> bool:
    """Draw every ``val_<m>_delta_<side>`` history column on ``ax``: the colour says the side
    (image blue, text orange), the line style and marker the metric; False when the history
    has none."""
    keys = [k for k in (history[0] if history else {}) if k.startswith("val_") and "_delta_" in k]
    metrics = list(dict.fromkeys(k[4:].rsplit("_delta_", 1)[0] for k in keys))
    for key in keys:
        metric, side = key[4:].rsplit("_delta_", 1)
        pts = [(r["epoch"], r[key]) for r in history if not math.isnan(r.get(key, math.nan))]
        ls, marker = METRIC_STYLES[metrics.index(metric) % len(METRIC_STYLES)]
        if pts:
            ax.plot(*zip(*pts), ls=ls, marker=marker, ms=3, markevery=max(1, len(pts) // 12),
                    color=SIDE_COLOURS.get(side, "tab:grey"), label=f"{metric}, {side}")
    if keys:
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(title="val Platonic delta: after - mean(before)", xlabel="epoch")
        ax.legend(fontsize=7, ncol=2)
    return bool(keys)
