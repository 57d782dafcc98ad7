"""Saved adapters: writing them to a run folder and loading them back to embed new features.

A run folder (layout: ``pipeline.runs``) holds ``adapters.safetensors`` (the AlignModel state
dict: ``adapters.<modality>.*`` and ``log_scale``) and ``adapters.json``: the whole ``[train]``
section the adapters were built from (``"train"``), and per modality the source cache entry
(name, input dim, key, dataset fingerprint) and the train-split standardisation statistics
(mean, std). ``load_run`` rebuilds the model from that section, so a new adapter hyperparameter
needs only its ``TrainConfig`` field and its use in ``train.adapters``. It checks the weights
against the sha256 recorded in adapters.json and against the description, and ``Run.embed`` / ``Run.embed_entry`` refuse features from another
encoder. Format 1 files (a ``"model"`` dict of selected settings) still load.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.cache import Entry
from pipeline.config import TrainConfig
from pipeline.languages import base_entry
from pipeline.runs import ADAPTER_JSON, ADAPTER_WEIGHTS, file_sha256, verify_run
from pipeline.runtime import atomic_write, resolve_device, write_json
from train.adapters import AlignModel
from train.data import Stats, entry_dim
from train.errors import AdapterMismatchError, TrainError
from train.tokens import TokenView, token_info

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: "train" = every [train] setting; 1: "model" = a hand-picked subset
READABLE_FORMATS = (1, 2)


def _fingerprint(entry: Entry) -> str | None:
    for d in (entry.key, entry.provenance):
        for k in ("fingerprint", "dataset_fingerprint"):
            if d.get(k):
                return str(d[k])
    return None


def describe_sources(entries: Mapping[str, Entry], stats: Stats,
                     layers: Mapping[str, int | None] | None = None) -> dict:
    """modality -> {entry, layer, dim, key, fingerprint, mean, std} (JSON-ready); ``layer`` is the
    stored hidden layer the adapter reads (None = the entry's features), ``dim`` its width."""
    layers = layers or {}
    out = {m: {"entry": e.name, "layer": layers.get(m), "dim": entry_dim(e, layers.get(m)), "key": e.key,
               "fingerprint": _fingerprint(e), "mean": stats.mean[m].tolist(), "std": stats.std[m].tolist()}
           for m, e in entries.items()}
    for m, info in (token_info(entries) or {}).items():  # token adapters: {"width", "layout"} of the tokens
        out[m]["tokens"] = info
    return out


def save_adapters(run_dir: Path, model: AlignModel, tc: TrainConfig, sources: dict, extra: Mapping) -> str:
    """Write the weights and their description (``tc`` in full) atomically; returns the
    weights' sha256."""
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = atomic_write(run_dir / ADAPTER_WEIGHTS,
                           lambda p: save_file(state, p, metadata={"format": str(FORMAT_VERSION)}))
    sha = file_sha256(weights)
    doc = {"format": FORMAT_VERSION, "train": dataclasses.asdict(tc), "modalities": sources, "sha256": sha, **extra}
    write_json(run_dir / ADAPTER_JSON, doc)
    return sha


def train_config_of(doc: Mapping, where: str = ADAPTER_JSON) -> TrainConfig:
    """The TrainConfig an adapters.json document was written with: its ``"train"`` section
    (format 2) or ``"model"`` subset (format 1), over the defaults. Keys this version does not
    know are ignored with a warning (the weight check in ``load_run`` catches a real mismatch)."""
    stored = doc.get("train") if doc.get("format") == 2 else doc.get("model")
    if not isinstance(stored, Mapping):
        raise TrainError(f"{where!r} has no adapter settings ('train' or 'model'); it is not a fit-adapters file.")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(stored) - known)
    if unknown:
        log.warning("%s: ignoring settings this version does not know: %s", where, ", ".join(unknown))
    kept = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items() if k in known}  # JSON lists -> tuples
    return dataclasses.replace(TrainConfig(), **kept)


@dataclass
class Run:
    """Loaded adapters. ``config``: the adapters.json document; ``train``: the [train] settings
    the model was rebuilt from."""

    run_dir: Path
    config: dict
    train: TrainConfig
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
            which = "features" if src.get("layer") is None else f"hidden layer {src['layer']}"
            raise AdapterMismatchError(
                f"Adapter {modality!r} of run {str(self.run_dir)!r} was trained on {src['entry']!r} {which} "
                f"of dimension {src['dim']}, got an array of shape {tuple(x.shape)}. Use the run trained on "
                f"this encoder (or fit one: fit-adapters --{modality} <entry>).")
        self.model.eval()
        device = self.model.log_scale.device
        out = self.model(modality, self.stats.apply(modality, x.to(device)))
        if normalize:
            out = torch.nn.functional.normalize(out, dim=-1)
        return out.cpu().numpy()

    def check_entry(self, modality: str, entry: Entry) -> None:
        """Error unless ``entry`` comes from the encoder (and has the layer) this modality's
        adapter was trained on; that encoder's entry of another caption language
        (``<entry>.lang-<code>``, ``pipeline.languages``) is the same encoder."""
        src = self.source(modality)
        layer = src.get("layer")
        if layer is not None and layer not in entry.layers:
            raise AdapterMismatchError(
                f"Adapter {modality!r} of run {str(self.run_dir)!r} reads hidden layer {layer} of {src['entry']!r}, "
                f"which cache entry {entry.name!r} ({entry.path}) does not store; extract it with --layers all.")
        dim = entry_dim(entry, layer)
        if src.get("tokens"):  # token adapters read the tokens; their width must match
            if not entry.has_tokens:
                entry.token_lengths()  # CacheError: pooled features only, with the extract command
            dim, src = entry.token_width, {**src, "dim": src["tokens"]["width"]}
        enc_a, enc_b = src["key"].get("encoder"), entry.key.get("encoder")
        if base_entry(entry.name) != base_entry(src["entry"]) or dim != src["dim"] or (enc_a and enc_b and enc_a != enc_b):
            changed = sorted(k for k in set(enc_a or {}) | set(enc_b or {}) if (enc_a or {}).get(k) != (enc_b or {}).get(k))
            what = (f"; its encoder settings changed since training ({', '.join(changed)}): it was re-extracted. "
                    f"Retrain the run, or re-extract with the settings it was trained on" if changed and
                    base_entry(entry.name) == base_entry(src["entry"]) and dim == src["dim"] else "")
            raise AdapterMismatchError(
                f"Cache entry {entry.name!r} ({dim}-d, {entry.path}) is not the encoder adapter "
                f"{modality!r} of run {str(self.run_dir)!r} was trained on ({src['entry']!r}, {src['dim']}-d){what}.")

    def modality_of(self, entry: Entry) -> str:
        """The modality whose adapter was trained on ``entry``'s encoder."""
        for m in self.modalities:
            if self.config["modalities"][m]["entry"] == entry.name:
                return m
        trained = ", ".join(f"{m}={s['entry']}" for m, s in self.config["modalities"].items())
        raise AdapterMismatchError(f"Run {str(self.run_dir)!r} has no adapter for entry {entry.name!r} "
                                   f"(trained on {trained}).")

    def embed_entry(self, entry: Entry, modality: str | None = None, normalize: bool = False) -> np.ndarray:
        """(n, dim) embeddings of every row of a cache entry (of the hidden layer the adapter was
        trained on, if any), after checking its encoder."""
        modality = modality or self.modality_of(entry)
        self.check_entry(modality, entry)
        src = self.source(modality)
        if src.get("tokens"):  # padded token rows of the length the run was trained with
            entry = TokenView(entry, src["dim"] // (src["tokens"]["width"] + 1))
        return self.embed(modality, entry.features(src.get("layer")), normalize)


def load_run(run_dir: str | Path, device: str = "cpu") -> Run:
    """Load the adapters of a run folder (written by fit-adapters) onto ``device`` ("auto", "cpu", "cuda", ...;
    ``pipeline.runtime.resolve_device``). RunIntegrityError when
    adapters.safetensors is not the file whose sha256 adapters.json (or metrics.json) records."""
    run_dir = Path(run_dir)
    cfg_path, w_path = run_dir / ADAPTER_JSON, run_dir / ADAPTER_WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise TrainError(f"{str(p)!r} not found: {str(run_dir)!r} is not a finished fit-adapters run folder.")
    doc = json.loads(cfg_path.read_text())
    if doc.get("format") not in READABLE_FORMATS:
        raise TrainError(f"{str(cfg_path)!r} has format {doc.get('format')!r}; this version reads "
                         f"{', '.join(map(str, READABLE_FORMATS))}.")
    if doc.get("sha256"):
        verify_run(run_dir)  # RunIntegrityError when the weights are not the file adapters.json describes
    else:
        log.warning("%s records no sha256 of the adapters (an old run): the weights cannot be checked", cfg_path)
    tc, model, stats = build_adapters(doc, w_path, str(cfg_path))
    return Run(run_dir, doc, tc, model.to(resolve_device(device)).eval(), stats)


def build_adapters(doc: Mapping, weights: Path, where: str = ADAPTER_JSON) -> tuple[TrainConfig, AlignModel, Stats]:
    """(settings, AlignModel with the weights of ``weights``, standardisation) from an adapters.json
    document ``doc`` (``where`` names it in errors); AdapterMismatchError when the weights do not
    fit it. ``load_run`` uses it, and so does an exported aligned model (``aligned``)."""
    tc = train_config_of(doc, where)
    mods = doc["modalities"]
    tokens = {m: s["tokens"] for m, s in mods.items() if s.get("tokens")} or None
    model = AlignModel({m: s["dim"] for m, s in mods.items()}, tc, tokens)
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own SafetensorError for a damaged or foreign file
        raise AdapterMismatchError(f"{str(weights)!r} is not a readable safetensors file ({exc}); "
                                   f"rerun fit-adapters to rewrite the run.") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        dims = ", ".join(f"{m}={s['entry']} ({s['dim']}-d)" for m, s in mods.items())
        raise AdapterMismatchError(f"{str(weights)!r} does not match {where!r} (expected adapters for "
                                   f"{dims}): the weights come from another run or encoder. {exc}") from None
    stats = Stats({m: np.asarray(s["mean"], np.float32) for m, s in mods.items()},
                  {m: np.asarray(s["std"], np.float32) for m, s in mods.items()})
    return tc, model, stats
