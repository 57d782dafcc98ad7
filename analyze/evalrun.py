"""A fit-adapters run opened for evaluation: its adapters, the raw features of the encoders it
was trained on (joined by sample id, per split), and the closed-form baselines refitted on the
same train pairs. Shared by ``analyze zeroshot``, ``analyze matching`` and the report's gallery.

The source entries are the ones the run's ``adapters.json`` names (not the current config), so
the adapters always see the encoder they were trained on. The train split is the run's train
pairs: a run trained on a fraction (``train.train_fraction``) gets the same subset fit-adapters
used (``train.fraction.subset_pairs``, checked against the ids digest in adapters.json), so the
baselines, ASIF's anchors and the local-CKA base all come from the pairs the run saw. Features
are standardised with the run's train statistics before the baselines see them, as in
fit-adapters, so the baselines here are the ones whose test recall ``metrics.json`` reports.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from analyze.compare import output_dir
from pipeline.cache import Entry, find_entry
from pipeline.config import PipelineConfig
from pipeline.runs import ADAPTER_WEIGHTS, SUBSET, find_run, run_name
from pipeline.errors import PipelineError
from pipeline.runtime import atomic_write
from pipeline.join import Pairs, join_pairs
from train.tokens import TokenView
from train.api import Run, load_run
from train.baselines import FROM_MOMENTS, Alignment, LinearMap, pair_moments
from train.fraction import ids_digest, subset_pairs
from train.subset import Subset, SubsetError, read_subset

MODALITIES = ("image", "text")
BASELINES_FILE = "baselines.npz"  # fitted baselines, next to the run's analysis outputs


class EvalError(PipelineError, ValueError):
    """A run or split that cannot be evaluated as asked."""


@dataclass
class SplitPairs:
    """One split's image and caption rows of a run's source entries, joined by sample id.

    image: (n_images, d_image) raw features, one row per image; text: (n_texts, d_text) raw
    features, one row per caption; text_to_image: (n_texts,) row of each caption's image;
    first_caption: (n_images,) row in ``text`` of each image's first caption.
    """

    name: str
    image_ids: list[str]
    text_ids: list[str]
    image: np.ndarray
    text: np.ndarray
    text_to_image: np.ndarray
    first_caption: np.ndarray


@dataclass
class RunView:
    """A run ready for evaluation. ``entries``: modality -> source entry name."""

    name: str
    path: Path
    run: Run
    cfg: PipelineConfig
    entries: dict[str, str]
    _splits: dict[str, SplitPairs] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.run.train.dim)

    @cached_property
    def sha256(self) -> str:
        """The adapters' sha256 (changes when the run is retrained): outputs record it to be
        recognised as stale."""
        return str(self.run.config.get("sha256") or
                   hashlib.sha256((self.path / ADAPTER_WEIGHTS).read_bytes()).hexdigest())

    def entry(self, split: str, modality: str) -> Entry:
        return find_entry(self.cfg.data.cache, self.cfg.data.dataset, split, self.entries[modality], self.cfg.data.data_dir)

    def layer(self, modality: str) -> int | None:
        """The stored hidden layer the run's adapter of ``modality`` reads (None = the features)."""
        return self.run.source(modality).get("layer")

    def token_length(self, modality: str) -> int | None:
        """Token slots per row the run's token adapter of ``modality`` was trained with (None: the
        run reads pooled features; ``train.tokens``)."""
        src = self.run.source(modality)
        return src["dim"] // (src["tokens"]["width"] + 1) if src.get("tokens") else None

    def _rows(self, entry: Entry, modality: str) -> np.ndarray:
        """What the run's adapter of ``modality`` reads of every row of ``entry``: padded token rows
        (token adapters), a hidden layer, or the pooled features."""
        length = self.token_length(modality)
        return TokenView(entry, length).features() if length else entry.features(self.layer(modality))

    def split(self, split: str) -> SplitPairs:
        """The joined image and caption rows of ``split`` (read once, then kept), from the hidden
        layers the adapters were trained on when the run chose layers; for ``train``, only the
        run's train pairs (``train_pairs``)."""
        if split not in self._splits:
            img, txt = self.entry(split, "image"), self.entry(split, "text")
            for m, e in (("image", img), ("text", txt)):
                self.run.check_entry(m, e)
            pairs = join_pairs(img, txt)
            if split == "train":
                pairs = self.train_pairs(img, pairs, txt)
            self._splits[split] = SplitPairs(
                split, [str(img.ids[r]) for r in pairs.image_rows], [str(txt.ids[r]) for r in pairs.text_rows],
                self._rows(img, "image")[pairs.image_rows], self._rows(txt, "text")[pairs.text_rows],
                pairs.text_to_image,
                pairs.first_caption)
        return self._splits[split]

    def train_pairs(self, image: Entry, pairs: Pairs, text: Entry | None = None) -> Pairs:
        """The run's train pairs among the joined train ``pairs`` (of ``image`` and the caption
        entry ``text``): its ``train.subset`` (the copy in the run folder) and ``train_fraction``
        subset, cut as fit-adapters cut them; EvalError when they are not the ids the run recorded."""
        tc = self.run.train
        subset = self.subset()
        kept = subset_pairs(image, pairs, tc.train_fraction, tc.seed, subset, text)
        recorded = self.run.config.get("train_images")
        if recorded:
            got = ids_digest(np.asarray(image.ids)[kept.image_rows])
            if got != recorded:
                raise EvalError(f"Run {self.name!r} was trained on {recorded.get('n')} train images, but the cached "
                                f"train split gives {got['n']} other ones for train.train_fraction = "
                                f"{tc.train_fraction:g}, seed {tc.seed} (the train entries changed since). Rerun "
                                f"fit-adapters --name {self.name} so that its baselines are fitted on its own pairs.")
        return kept

    def subset(self) -> Subset | None:
        """The subset file the run trained on (its copy in the run folder), None without one;
        EvalError when the copy is missing or is not the file the run recorded."""
        recorded = self.run.config.get("subset")
        if not recorded:
            return None
        copy = self.path / SUBSET
        try:
            subset = read_subset(copy)
        except SubsetError as exc:
            raise EvalError(f"Run {self.name!r} trained on a subset, but its copy cannot be read ({exc}). Rerun "
                            f"fit-adapters --name {self.name} --set train.subset=FILE.") from None
        if subset.sha256 != recorded.get("sha256"):
            raise EvalError(f"Run {self.name!r}: {copy} (sha256 {subset.sha256[:12]}) is not the subset the run "
                            f"trained on (sha256 {str(recorded.get('sha256'))[:12]}): the file was edited. Rerun "
                            f"fit-adapters --name {self.name} --set train.subset=FILE.")
        return subset

    def embed(self, modality: str, features: np.ndarray) -> np.ndarray:
        """(n, d_modality) raw features -> (n, dim) L2-normalised adapter outputs, float64."""
        return self.run.embed(modality, features, normalize=True).astype(np.float64)

    def standardize(self, modality: str, features: np.ndarray) -> torch.Tensor:
        """(n, d) raw features -> (n, d) float64 tensor standardised with the run's train statistics."""
        return self.run.stats.apply(modality, torch.as_tensor(np.asarray(features, np.float32))).double()

    @cached_property
    def baselines(self) -> dict[str, Alignment]:
        """name -> CCA / PCA + Procrustes fitted on the standardised train pairs (as fit-adapters
        fits them). The fits (a few eigendecompositions of d x d covariances) are kept in
        ``<analyze.out>/.../runs/<run>/baselines.npz`` for these adapters and train entries."""
        path = output_dir(self.cfg, "runs", self.name) / BASELINES_FILE
        tc = self.run.train
        stamp = json.dumps({"sha256": self.sha256, "train": [str(self.entry("train", m).path) for m in MODALITIES],
                            "pairs": {"train_fraction": tc.train_fraction, "seed": tc.seed, "rule": 2,
                                      "subset": (self.run.config.get("subset") or {}).get("sha256")},
                            "mtime": [self.entry("train", m).path.stat().st_mtime for m in MODALITIES]})
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                if str(z["stamp"]) == stamp:
                    return {name: Alignment(name, *(LinearMap(torch.from_numpy(z[f"{name}.{side}.mean"]),
                                                              torch.from_numpy(z[f"{name}.{side}.weight"]))
                                                    for side in "ab")) for name in FROM_MOMENTS}
        train = self.split("train")
        xa, xb = self.standardize("image", train.image), self.standardize("text", train.text)
        ia, ib = torch.as_tensor(train.text_to_image), torch.arange(xb.shape[0])
        moments = pair_moments(xa, xb, ia, ib)
        fitted = {name: fit(moments, self.dim) for name, fit in FROM_MOMENTS.items()}
        arrays = {f"{name}.{side}.{part}": getattr(getattr(al, side), part).cpu().numpy()
                  for name, al in fitted.items() for side in "ab" for part in ("mean", "weight")}

        def save(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, stamp=np.asarray(stamp), **arrays)

        atomic_write(path, save)
        return fitted

    def baseline_embed(self, method: str, modality: str, features: np.ndarray) -> np.ndarray:
        """(n, d_modality) raw features -> (n, k) L2-normalised embeddings of a baseline."""
        al = self.baselines[method]
        z = (al.a if modality == "image" else al.b)(self.standardize(modality, features)).numpy()
        return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def open_run(cfg: PipelineConfig, run: str | None = None) -> RunView:
    """The run ``run`` (default: train.name, else fit-adapters' default name) of ``cfg``'s cache."""
    name = run_name(cfg.train, run)
    try:
        info = find_run(cfg.data.cache, name)
    except FileNotFoundError as exc:
        raise EvalError(f"{exc} Train it first (fit-adapters --name {name}) or pass --run NAME.") from None
    loaded = load_run(info.path)
    missing = [m for m in MODALITIES if m not in loaded.config["modalities"]]
    if missing:
        raise EvalError(f"Run {name!r} has no {' or '.join(missing)} adapter (it has {', '.join(loaded.modalities)}).")
    entries = {m: loaded.config["modalities"][m]["entry"] for m in MODALITIES}
    return RunView(name, info.path, loaded, cfg, entries)
