"""Which encoder layer each modality's adapter is trained on (``train.image_layer`` / ``text_layer``).

Values: ``"last"`` (default) trains on the entry's ``features``; an integer k on the stored hidden
layer ``layers/<k>`` (0-based, shallow to deep; needs ``extract --layers all``); ``"auto"`` picks,
among the stored layers, the one whose features are most similar to the other modality's.

The "auto" rule follows STRUCTURE (Gröger, Wen, Le & Brbić, NeurIPS 2025, arXiv 2506.16895, §
"layer selection"): align the layer pair with the highest representational similarity across
modalities instead of the last layers. Here the similarity is ``train.layer_metric`` (any name in
``similarity.metrics.METRICS``; by default mutual k-NN with k = 10, the measure of Huh et al. 2024
that the paper uses) between the raw features of the two layers on the train split: one row per
image (captions: the first one), at most ``train.layer_rows`` rows (a fixed random subset, seed
0, so the choice does not change with ``train.seed``). Every candidate pair is scored: when
both sides are "auto" that is the full (image layers x text layers) table; a fixed side is a
single row or column of it. Ties go to the deeper pair. Only the train split is used, so the
choice is part of training and val/test stay untouched.

The choice and the whole table are written to adapters.json (``"layers"``) by the trainer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from pipeline.cache import Entry
from pipeline.config import PipelineConfig, TrainConfig
from pipeline.errors import did_you_mean
from pipeline.join import join_rows
from pipeline.runs import modality_entries
from similarity.metrics import METRICS
from train.errors import ConfigValueError, TrainError

log = logging.getLogger(__name__)

LAST, AUTO = "last", "auto"
LAYER_SEED = 0  # subset of train images the layer metric sees (independent of train.seed)


def layer_setting(tc: TrainConfig, modality: str) -> str | int:
    """The configured layer of a modality: image_layer, text_layer, "last" for extra modalities."""
    return {"image": tc.image_layer, "text": tc.text_layer}.get(modality, LAST)


def check_layers(tc: TrainConfig) -> None:
    """ConfigValueError for a layer value that is not last / auto / k >= 0, or an unknown metric."""
    for key in ("image_layer", "text_layer"):
        value = getattr(tc, key)
        if isinstance(value, str) and value not in (LAST, AUTO):
            if value.lstrip("-").isdigit():
                raise ConfigValueError(f"train.{key} = {value!r} is a string; write the layer as a number "
                                       f"(--set train.{key}={value}).")
            raise ConfigValueError(f"train.{key} = {value!r}: use \"last\", \"auto\" or a layer number.")
        if isinstance(value, int) and value < 0:
            raise ConfigValueError(f"train.{key} = {value} is out of range: layers are numbered from 0.")
    if tc.layer_metric not in METRICS:
        hint = did_you_mean(tc.layer_metric, METRICS)
        raise ConfigValueError(f"Unknown train.layer_metric = {tc.layer_metric!r}.{hint} "
                               f"Choose one of: {', '.join(METRICS)}.")
    if tc.layer_rows < 2:
        raise ConfigValueError(f"train.layer_rows = {tc.layer_rows} is out of range (at least 2 rows).")


@dataclass
class LayerChoice:
    """modality -> stored layer index (None = the entry's features); for "auto", the score table.

    table: {"metric", "rows", "image_layers", "text_layers", "scores"} where scores[i][j] is the
    metric between image layer image_layers[i] and text layer text_layers[j] (None in a list =
    the entry's features), or None when no side was "auto".
    """

    layers: dict[str, int | None]
    table: dict | None = None

    def to_json(self) -> dict:
        return {"layers": self.layers, "table": self.table}


def _fixed(entry: Entry, value: str | int, key: str) -> list[int | None]:
    """Candidate layers of one side: [None] for last, [k], or every stored layer for auto."""
    if value == LAST:
        return [None]
    if not entry.layers:
        raise TrainError(f"train.{key} = {value!r} needs hidden layers, but entry {entry.name!r} ({entry.path}) "
                         f"stores none. Re-extract it with `extract --layers all --force --encoder ...`.")
    if value == AUTO:
        return list(entry.layers)
    if value not in entry.layers:
        raise TrainError(f"train.{key} = {value}: entry {entry.name!r} stores layers "
                         f"{entry.layers[0]}..{entry.layers[-1]} (0-based, shallow to deep).")
    return [int(value)]


def _subset(n: int, limit: int) -> np.ndarray:
    """Sorted rows 0..n-1, or a fixed random subset of ``limit`` of them."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(LAYER_SEED).choice(n, size=limit, replace=False))


def score_table(image: Entry, text: Entry, image_layers: list, text_layers: list, metric: str, rows: int,
                device: str = "cpu") -> tuple[np.ndarray, int]:
    """(len(image_layers), len(text_layers)) metric scores on one row per image (at most ``rows``),
    and the number of rows used. Each layer is read once."""
    _, (ri, rt) = join_rows([image, text])
    keep = _subset(len(ri), rows)
    ri, rt = ri[keep], rt[keep]
    fn = METRICS[metric]
    xs = [image.features(layer)[ri] for layer in image_layers]
    ys = [text.features(layer)[rt] for layer in text_layers]
    scores = np.array([[fn(x, y, device=device) for y in ys] for x in xs], dtype=np.float64)
    return scores, len(ri)


def choose_layers(cfg: PipelineConfig, train_entries: dict[str, Entry], device: str = "cpu") -> LayerChoice:
    """Resolve every modality's layer on the train split's entries (modality -> Entry)."""
    tc = cfg.train
    layers: dict[str, int | None] = {m: None for m in modality_entries(tc)}
    cand = {m: _fixed(train_entries[m], layer_setting(tc, m), f"{m}_layer") for m in ("image", "text")
            if m in train_entries and layer_setting(tc, m) != LAST}
    for m, c in cand.items():
        layers[m] = c[0]
    if AUTO not in (tc.image_layer, tc.text_layer):
        return LayerChoice(layers)
    il = cand.get("image", [None])
    tl = cand.get("text", [None])
    scores, n = score_table(train_entries["image"], train_entries["text"], il, tl, tc.layer_metric,
                            tc.layer_rows, device)
    flat = np.flatnonzero(scores == np.nanmax(scores))  # ties: the deepest pair (last in row-major order)
    i, j = np.unravel_index(flat[-1], scores.shape)
    layers["image"], layers["text"] = il[i], tl[j]
    table = {"metric": tc.layer_metric, "rows": n, "image_layers": il, "text_layers": tl,
             "scores": scores.tolist()}
    log.info("layer choice by %s on %d train images: image layer %s, text layer %s (score %.4f; deepest pair %.4f)",
             tc.layer_metric, n, il[i], tl[j], scores[i, j], scores[-1, -1])
    return LayerChoice(layers, table)
