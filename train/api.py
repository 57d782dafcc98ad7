"""Saved adapters: writing them to a run folder and loading them back to embed new features.

A run folder holds ``adapters.safetensors`` (the AlignModel state dict: ``adapters.<modality>.*``
and ``log_scale``) and ``adapters.json``: the adapter settings, and per modality the source cache
entry (name, input dim, key, dataset fingerprint) and the train-split standardisation
statistics (mean, std). ``load_run`` checks the weights against that description, and
``Run.embed`` / ``Run.embed_entry`` refuse features from another encoder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.cache import Entry
from pipeline.config import TrainConfig
from train.adapters import AlignModel
from train.data import Stats, TrainError

ADAPTER_FILE = "adapters.safetensors"  # weights
ADAPTER_JSON = "adapters.json"  # settings, sources, standardisation statistics
FORMAT_VERSION = 1
MODEL_KEYS = ("adapter", "dim", "hidden", "bottleneck", "depth", "dropout", "temperature",
              "learnable_temperature", "standardize")  # TrainConfig fields that define the model


class AdapterMismatchError(TrainError):
    """Adapters applied to features (or a cache entry) they were not trained for."""


def _fingerprint(entry: Entry) -> str | None:
    for d in (entry.key, entry.provenance):
        for k in ("fingerprint", "dataset_fingerprint"):
            if d.get(k):
                return str(d[k])
    return None


def describe_sources(entries: Mapping[str, Entry], stats: Stats) -> dict:
    """modality -> {entry, dim, key, fingerprint, mean, std} (JSON-ready)."""
    return {m: {"entry": e.name, "dim": e.dim, "key": e.key, "fingerprint": _fingerprint(e),
                "mean": stats.mean[m].tolist(), "std": stats.std[m].tolist()} for m, e in entries.items()}


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_adapters(run_dir: Path, model: AlignModel, tc: TrainConfig, sources: dict, extra: Mapping) -> str:
    """Write the weights and their description atomically; returns the weights' sha256."""
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic(run_dir / ADAPTER_FILE, lambda p: save_file(state, p, metadata={"format": str(FORMAT_VERSION)}))
    sha = hashlib.sha256((run_dir / ADAPTER_FILE).read_bytes()).hexdigest()
    doc = {"format": FORMAT_VERSION, "model": {k: getattr(tc, k) for k in MODEL_KEYS},
           "modalities": sources, "sha256": sha, **extra}
    _atomic(run_dir / ADAPTER_JSON, lambda p: Path(p).write_text(json.dumps(doc, indent=1, default=str)))
    return sha


@dataclass
class Run:
    """Loaded adapters. ``config``: the adapters.json document."""

    run_dir: Path
    config: dict
    model: AlignModel
    stats: Stats

    @property
    def modalities(self) -> list[str]:
        return self.model.modalities

    def source(self, modality: str) -> dict:
        if modality not in self.config["modalities"]:
            raise AdapterMismatchError(f"Run {str(self.run_dir)!r} has no adapter for modality {modality!r}; "
                                       f"it has: {', '.join(self.modalities)}.")
        return self.config["modalities"][modality]

    @torch.no_grad()
    def embed(self, modality: str, features, normalize: bool = False) -> np.ndarray:
        """(n, d_modality) raw encoder features -> (n, dim) float32 aligned embeddings (the
        adapter output; L2-normalised rows when ``normalize``)."""
        src = self.source(modality)
        x = torch.as_tensor(np.asarray(features, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != src["dim"]:
            raise AdapterMismatchError(
                f"Adapter {modality!r} of run {str(self.run_dir)!r} was trained on {src['entry']!r} features "
                f"of dimension {src['dim']}, got an array of shape {tuple(x.shape)}. Use the run trained on "
                f"this encoder (or fit one: fit-adapters --{modality} <entry>).")
        self.model.eval()
        device = self.model.log_scale.device
        out = self.model(modality, self.stats.apply(modality, x.to(device)))
        if normalize:
            out = torch.nn.functional.normalize(out, dim=-1)
        return out.cpu().numpy()

    def check_entry(self, modality: str, entry: Entry) -> None:
        """Error unless ``entry`` comes from the encoder this modality's adapter was trained on."""
        src = self.source(modality)
        enc_a, enc_b = src["key"].get("encoder"), entry.key.get("encoder")
        if entry.name != src["entry"] or entry.dim != src["dim"] or (enc_a and enc_b and enc_a != enc_b):
            raise AdapterMismatchError(
                f"Cache entry {entry.name!r} ({entry.dim}-d, {entry.path}) is not the encoder adapter "
                f"{modality!r} of run {str(self.run_dir)!r} was trained on ({src['entry']!r}, {src['dim']}-d).")

    def modality_of(self, entry: Entry) -> str:
        """The modality whose adapter was trained on ``entry``'s encoder."""
        for m in self.modalities:
            if self.config["modalities"][m]["entry"] == entry.name:
                return m
        trained = ", ".join(f"{m}={s['entry']}" for m, s in self.config["modalities"].items())
        raise AdapterMismatchError(f"Run {str(self.run_dir)!r} has no adapter for entry {entry.name!r} "
                                   f"(trained on {trained}).")

    def embed_entry(self, entry: Entry, modality: str | None = None, normalize: bool = False) -> np.ndarray:
        """(n, dim) embeddings of every row of a cache entry, after checking its encoder."""
        modality = modality or self.modality_of(entry)
        self.check_entry(modality, entry)
        return self.embed(modality, entry.features(), normalize)


def load_run(run_dir: str | Path, device: str = "cpu") -> Run:
    """Load the adapters of a run folder (written by fit-adapters)."""
    run_dir = Path(run_dir)
    cfg_path, w_path = run_dir / ADAPTER_JSON, run_dir / ADAPTER_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise TrainError(f"{str(p)!r} not found: {str(run_dir)!r} is not a finished fit-adapters run folder.")
    doc = json.loads(cfg_path.read_text())
    if doc.get("format") != FORMAT_VERSION:
        raise TrainError(f"{str(cfg_path)!r} has format {doc.get('format')!r}; this version reads {FORMAT_VERSION}.")
    tc = dataclasses.replace(TrainConfig(), **doc["model"])
    mods = doc["modalities"]
    model = AlignModel({m: s["dim"] for m, s in mods.items()}, tc)
    state = load_file(str(w_path))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        dims = ", ".join(f"{m}={s['entry']} ({s['dim']}-d)" for m, s in mods.items())
        raise AdapterMismatchError(f"{str(w_path)!r} does not match {str(cfg_path)!r} (expected adapters for "
                                   f"{dims}): the weights come from another run or encoder. {exc}") from None
    stats = Stats({m: np.asarray(s["mean"], np.float32) for m, s in mods.items()},
                  {m: np.asarray(s["std"], np.float32) for m, s in mods.items()})
    return Run(run_dir, doc, model.to(device).eval(), stats)
