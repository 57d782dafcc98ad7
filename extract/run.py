"""The extract stage: run frozen encoders once over a dataset split and fill the feature cache.

``extract(cfg)`` is what ``extract`` on the command line calls. Per split it

1. loads the split (``extract.datasets``) and resolves every requested encoder (``extract.encoders``);
2. opens one resumable ``EntryWriter`` per encoder (``pipeline.cache``): finished entries with the
   same request are reused, stale ones refused unless ``force``;
3. decodes each image ONCE per batch in DataLoader workers, applies every distinct preprocessing
   the image encoders ask for, and feeds each encoder; captions are tokenized in the workers;
4. stages each finished chunk of rows, so an interrupted run resumes where it stopped and gives
   the same result as an uninterrupted one (batches never straddle chunks, so every row is
   computed in the same batch either way).
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from extract import datasets as D
from extract.encoders import EncoderSpec, get_spec, image_transform, load_encoder
from pipeline.cache import Entry, EntryWriter, entry_path
from pipeline.config import PipelineConfig
from pipeline.runtime import autocast, default_workers, resolve_device, versions

log = logging.getLogger(__name__)

ON_ERROR = ("error", "skip")
LAYERS = ("last", "all")


# ----------------------------------------------------------------------------- worker side

class _Rows(Dataset):
    """Row i of a split, for one modality. Images: {prep: tensor} for every distinct preprocessing
    (the image is decoded once); texts: the caption string. A failed image is returned as its
    error message when skipping is allowed, else raised."""

    def __init__(self, split: D.Split, rows: Sequence, transforms: dict, skip_errors: bool):
        self.split, self.rows, self.transforms, self.skip_errors = split, rows, transforms, skip_errors

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        if not self.transforms:  # text
            return i, row.text
        try:
            image = self.split.load_image(i)
        except D.ImageError as exc:
            if not self.skip_errors:
                raise D.ImageError(exc.sample_id, exc.path, f"{exc.reason} (use --on-error skip to leave "
                                   "such images out, logged and recorded in the cache)") from None
            return i, str(exc)
        return i, {key: t(image) for key, t in self.transforms.items()}


class _Collate:
    """Stack image tensors per preprocessing, or tokenize captions per text encoder.
    Returns (row indices, inputs per key, {row index: skip reason})."""

    def __init__(self, tokenizers: dict[str, Callable] | None = None):
        self.tokenizers = tokenizers or {}

    def __call__(self, items):
        rows = [i for i, _ in items]
        if self.tokenizers:
            texts = [t for _, t in items]
            return rows, {name: tok(texts) for name, tok in self.tokenizers.items()}, {}
        skipped = {i: x for i, x in items if isinstance(x, str)}
        good = [x for _, x in items if not isinstance(x, str)]
        inputs = {k: torch.stack([g[k] for g in good]) for k in good[0]} if good else {}
        return [i for i in rows if i not in skipped], inputs, skipped


class _ChunkBatches:
    """Batch sampler: batches of ``batch_size`` rows that never straddle a cache chunk."""

    def __init__(self, chunks: Sequence[range], batch_size: int):
        self.batches = [list(c[s:s + batch_size]) for c in chunks for s in range(0, len(c), batch_size)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _worker_init(_):
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------- main side

@dataclass
class _Job:
    """One encoder's work on one split."""

    spec: EncoderSpec
    writer: EntryWriter
    pending: set[int]
    encoder: torch.nn.Module | None = None
    buffers: dict | None = None  # chunk -> list of (features, layers)
    input_key: str = ""  # which collated input this encoder reads (set once loaded)


def _key(spec: EncoderSpec, cfg: PipelineConfig, split: D.Split, modality_fields: dict) -> dict:
    return {"entry": spec.name, "encoder": spec.provenance(), "dataset": cfg.data.dataset, "split": split.name,
            "fingerprint": split.fingerprint(), "precision": cfg.extract.precision,
            "layers": cfg.extract.layers, **modality_fields}


def _provenance(cfg: PipelineConfig, split: D.Split, device: torch.device) -> dict:
    return {"versions": versions(), "config": cfg.to_dict(), "config_source": cfg.source,
            "host": platform.node(), "device": str(device), "source": split.source,
            "batch_size": cfg.extract.batch_size}


def _check(cfg: PipelineConfig) -> None:
    x = cfg.extract
    if x.on_error not in ON_ERROR:
        raise ValueError(f"extract.on_error must be one of {ON_ERROR}, got {x.on_error!r}.")
    if x.layers not in LAYERS:
        raise ValueError(f"extract.layers must be one of {LAYERS}, got {x.layers!r}.")
    if x.batch_size < 1 or x.chunk_rows < 1:
        raise ValueError("extract.batch_size and extract.chunk_rows must be >= 1.")
    if cfg.data.captions not in D.CAPTION_POLICIES:
        raise ValueError(f"data.captions must be one of {D.CAPTION_POLICIES}, got {cfg.data.captions!r}.")
    if not x.encoders:
        raise ValueError("No encoders asked for: pass --encoder NAME[,NAME...].")


def resolve_specs(cfg: PipelineConfig) -> list[EncoderSpec]:
    """The requested encoders with their per-encoder options applied (unknown names fail here)."""
    options = cfg.extract.encoder_options
    unknown = set(options) - set(cfg.extract.encoders)
    if unknown:
        raise ValueError(f"extract.encoder_options names encoders not being extracted: {sorted(unknown)}.")
    return [get_spec(name, **options.get(name, {})) for name in cfg.extract.encoders]


def splits_of(cfg: PipelineConfig) -> list[str]:
    if cfg.extract.split != "all":
        return [cfg.extract.split]
    return D.available_splits(cfg.data.dataset, cfg.data.data_dir)  # noqa


def extract(cfg: PipelineConfig, force: bool = False) -> list[Entry]:
    """Extract every requested encoder over every requested split; returns the finished entries."""
    _check(cfg)
    specs = resolve_specs(cfg)
    device = resolve_device(cfg.extract.device)
    entries = []
    for split_name in splits_of(cfg):
        split = D.load_split(cfg.data.dataset, cfg.data.data_dir, split_name,
                             on_empty=cfg.data.on_empty, missing=cfg.data.missing)
        for modality in ("image", "text"):
            chosen = [s for s in specs if s.modality == modality]
            if chosen:
                entries += _extract_modality(cfg, split, chosen, device, force)
    return entries


def _extract_modality(cfg: PipelineConfig, split: D.Split, specs: list[EncoderSpec],
                      device: torch.device, force: bool) -> list[Entry]:
    x = cfg.extract
    is_image = specs[0].modality == "image"
    rows = split.items if is_image else split.caption_rows(cfg.data.captions)
    ids = [r.id for r in rows]
    extra = {} if is_image else {"captions": cfg.data.captions}
    jobs = []
    for spec in specs:
        path = entry_path(cfg.data.cache, cfg.data.dataset, split.name, spec.name, x.format)
        writer = EntryWriter(path, spec.name, ids, _key(spec, cfg, split, extra), x.chunk_rows, force)
        jobs.append(_Job(spec, writer, set(writer.pending())))
    todo = sorted(set().union(*(j.pending for j in jobs)))
    timing = _run_jobs(cfg, split, rows, [j for j in jobs if j.pending], todo, device, is_image) if todo else {}
    out = []
    skipped = [{"id": i, "reason": r} for i, r in split.skipped]
    for job in jobs:
        entry = job.writer.finalize({**_provenance(cfg, split, device), **timing}, skipped)
        if entry is None:
            raise RuntimeError(f"{job.spec.name}: chunks are still missing after extraction "
                               f"(another process may be writing them); rerun to finish.")
        log.info("%s/%s/%s: %d rows -> %s", cfg.data.dataset, split.name, job.spec.name, entry.n, entry.path)
        out.append(entry)
    return out


def _run_jobs(cfg: PipelineConfig, split: D.Split, rows: Sequence, jobs: list[_Job], todo: list[int],
              device: torch.device, is_image: bool) -> dict:
    """Compute the pending chunks of every job; returns timing facts for the provenance."""
    x = cfg.extract
    for job in jobs:
        job.encoder = load_encoder(job.spec, device)
        job.buffers = {}
        # generic encoders settle their preprocessing at load time: read it from the loaded spec
        job.input_key = repr(job.encoder.spec.prep) if is_image else job.spec.name
    chunk_ranges = [jobs[0].writer.rows(c) for c in todo]
    if is_image:
        transforms = {j.input_key: image_transform(j.encoder.spec.prep) for j in jobs}
        collate = _Collate()
    else:
        transforms = {}
        collate = _Collate({j.input_key: j.encoder.tokenizer for j in jobs})
    workers = default_workers() if x.workers < 0 else x.workers
    loader = DataLoader(_Rows(split, rows, transforms, x.on_error == "skip"),
                        batch_sampler=_ChunkBatches(chunk_ranges, x.batch_size), collate_fn=collate,
                        num_workers=workers, pin_memory=device.type == "cuda",
                        worker_init_fn=_worker_init if workers else None,
                        persistent_workers=False, prefetch_factor=4 if workers else None)
    names = ",".join(j.spec.name for j in jobs)
    all_layers = x.layers == "all"
    started = time.perf_counter()
    with tqdm(total=sum(len(r) for r in chunk_ranges), desc=f"{split.name} {names}",
              unit="img" if is_image else "txt", dynamic_ncols=True) as bar, torch.inference_mode():
        skipped: dict[int, dict[str, str]] = {}
        for batch_rows, inputs, batch_skipped in loader:
            first = batch_rows[0] if batch_rows else next(iter(batch_skipped))
            chunk = first // x.chunk_rows
            skipped.setdefault(chunk, {}).update({rows[i].id: reason for i, reason in batch_skipped.items()})
            for job in jobs:
                if chunk not in job.pending:
                    continue
                if batch_rows:
                    job.buffers.setdefault(chunk, []).append(
                        _forward(job, inputs[job.input_key], device, x.precision, all_layers))
            bar.update(len(batch_rows) + len(batch_skipped))
            last_row = max(batch_rows + list(batch_skipped))
            if last_row == jobs[0].writer.rows(chunk)[-1]:  # chunk complete: stage it
                for job in jobs:
                    if chunk in job.pending:
                        _flush(job, chunk, skipped.get(chunk, {}), all_layers)
                skipped.pop(chunk, None)
    seconds = time.perf_counter() - started
    log.info("extracted %s on %s/%s in %.1fs", names, cfg.data.dataset, split.name, seconds)
    return {"extract_seconds": seconds, "rows_computed": bar.n, "items_per_s": bar.n / max(seconds, 1e-9)}


def _forward(job: _Job, batch, device: torch.device, precision: str, all_layers: bool):
    if isinstance(batch, dict):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    else:
        batch = batch.to(device, non_blocking=True)
    with autocast(device, precision):
        features = job.encoder(batch)
        layers = job.encoder(batch, all_layers=True) if all_layers else []
    return features.float().cpu().numpy(), [layer.float().cpu().numpy() for layer in layers]


def _flush(job: _Job, chunk: int, skipped: dict[str, str], all_layers: bool) -> None:
    parts = job.buffers.pop(chunk, [])
    if parts:
        features = np.concatenate([p[0] for p in parts])
        layers = [np.concatenate([p[1][k] for p in parts]) for k in range(len(parts[0][1]))] if all_layers else []
    else:  # every row of the chunk was skipped
        features, layers = np.zeros((0, job.encoder.dim), np.float32), []
    job.writer.write_chunk(chunk, features, layers, skipped)
