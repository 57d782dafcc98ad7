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

Several processes can share one extraction. A ``Shard(index, count)`` computes only the chunks
c with ``c % count == index`` of every entry (round-robin: near-equal shares, and each chunk is
batched exactly as in a single run, so the result is identical):

- torchrun (``WORLD_SIZE > 1`` in the environment): rank r of w is Shard(r, w) on device
  cuda:LOCAL_RANK (when CUDA is present and the device is auto/cuda); torch.distributed (NCCL on
  GPUs, gloo on CPU) only provides barriers: after computing, rank 0 assembles and checks every
  entry once, the other ranks wait and return the finished entries;
- ``extract(cfg, shard=Shard(k, n))`` (``extract --shard K/N``, e.g. one SLURM array task):
  independent processes that never talk; the last one to finish assembles, or ``merge(cfg)``
  (``extract --merge``) does, and names the missing chunks and the shard to rerun if any.

Each process records a note (shard, host, device, timing) beside the staged chunks; they end up
in the entry's provenance under ``shards``. A rerun of any process computes only what is missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import logging
import os
import platform
import re
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from extract import datasets as D
from extract.encoders import EncoderSpec, get_spec, image_pixels, load_encoder, normalize_pixels
from pipeline.cache import PARTIAL_SUFFIX, CacheError, Entry, EntryWriter, entry_path, open_entry
from pipeline.config import PipelineConfig
from pipeline.runtime import autocast, default_workers, resolve_device, versions

log = logging.getLogger(__name__)

ON_ERROR = ("error", "skip")
LAYERS = ("last", "all")
DIST_TIMEOUT_S = 6 * 3600  # seconds a torchrun rank may wait at a barrier for the slowest rank
MAX_LISTED = 5  # how many missing chunk ranges / shards an incomplete-merge error names


class IncompleteExtractionError(CacheError):
    """``merge`` found entries whose chunks are not all staged (a shard failed or never ran)."""


@dataclass(frozen=True)
class Shard:
    """Process ``index`` (0-based) of ``count`` processes sharing one extraction.

    Shard k of n computes chunk c of every cache entry iff ``c % n == k`` (chunks of
    ``extract.chunk_rows`` rows, in the split's row order).
    """

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"Shard {self.index}/{self.count} is invalid: need 0 <= K < N (K is 0-based), "
                             f"e.g. --shard 0/{max(self.count, 2)}.")

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """``"K/N"`` -> Shard(K, N), e.g. ``--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``."""
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        if not m:
            raise ValueError(f"--shard {text!r} must look like K/N with 0 <= K < N, e.g. 0/4.")
        return cls(int(m.group(1)), int(m.group(2)))

    def owns(self, chunk: int) -> bool:
        return chunk % self.count == self.index

    @property
    def name(self) -> str:
        """Name of this shard's note in a staging folder: ``shard-K-of-N``."""
        return f"shard-{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def torchrun_shard() -> Shard | None:
    """Shard(RANK, WORLD_SIZE) when launched by torchrun with WORLD_SIZE > 1, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return Shard(int(os.environ.get("RANK", "0")), world) if world > 1 else None


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


def _provenance(cfg: PipelineConfig, split: D.Split, device: torch.device | str) -> dict:
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
    """The requested encoders with their per-encoder options applied (unknown names fail here).

    Each keeps the name it was asked for, which names its cache entry: ``dinov2`` (an alias of
    ``dinov2-base``) is cached as ``dinov2``, so later stages refer to it the same way; the
    entry's key records the resolved weights."""
    options = cfg.extract.encoder_options
    unknown = set(options) - set(cfg.extract.encoders)
    if unknown:
        raise ValueError(f"extract.encoder_options names encoders not being extracted: {sorted(unknown)}.")
    specs = [(name, get_spec(name, **options.get(name, {}))) for name in cfg.extract.encoders]
    return [spec if spec.name == name else dataclasses.replace(spec, name=name) for name, spec in specs]


def splits_of(cfg: PipelineConfig) -> list[str]:
    if cfg.extract.split != "all":
        return [cfg.extract.split]
    return D.available_splits(cfg.data.dataset, cfg.data.data_dir)


@dataclass
class _Team:
    """The processes running one extraction: this one is ``shard``; ``distributed`` when they are
    torchrun ranks joined by torch.distributed (then rank 0 finalizes), else they never talk."""

    shard: Shard
    device: torch.device
    distributed: bool = False

    @property
    def leader(self) -> bool:
        return self.shard.index == 0

    @property
    def label(self) -> str:
        """Prefix of progress bars and log lines ("" for a single process)."""
        if self.shard.count == 1:
            return ""
        return f"{'rank' if self.distributed else 'shard'} {self.shard} "

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier(device_ids=[self.device.index]) if self.device.type == "cuda" else dist.barrier()


@contextlib.contextmanager
def _team(cfg: PipelineConfig, shard: Shard | None) -> Iterator[_Team]:
    """Set up this process's share: torchrun rank (process group + cuda:LOCAL_RANK), an explicit
    shard, or the whole job. The process group is destroyed at the end if we created it."""
    ranked = torchrun_shard()
    device = resolve_device(cfg.extract.device)
    if ranked is None:
        yield _Team(shard or Shard(), device)
        return
    if shard is not None and shard.count > 1:
        raise ValueError(f"--shard {shard} under torchrun (WORLD_SIZE={ranked.count}): both split the work; "
                         "use torchrun alone, or --shard without torchrun.")
    import torch.distributed as dist

    if device.type == "cuda" and cfg.extract.device in ("auto", "cuda"):  # one GPU per rank
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=_dt.timedelta(seconds=DIST_TIMEOUT_S))
    try:
        yield _Team(Shard(dist.get_rank(), dist.get_world_size()), device, distributed=True)
    finally:
        if created:
            dist.destroy_process_group()


def extract(cfg: PipelineConfig, force: bool = False, shard: Shard | None = None) -> list[Entry]:
    """Extract every requested encoder over every requested split; returns the finished entries.

    shard: compute only this share of the chunks (``extract --shard K/N``); entries are assembled
    only if all their chunks are staged by then (the last shard to finish does it, else run
    ``merge``), so a shard may return fewer entries than requested. Under torchrun
    (WORLD_SIZE > 1) the shard is the rank and every rank returns every finished entry.
    """
    _check(cfg)
    specs = resolve_specs(cfg)
    if force and shard is not None and shard.count > 1:
        raise ValueError(f"--force with --shard {shard} would let each shard discard the chunks of the others. "
                         "Delete the stale entries (the error without --force names them) before starting "
                         "the shards, or use torchrun, where only rank 0 discards.")
    entries = []
    with _team(cfg, shard) as team:
        for split_name in splits_of(cfg):
            split = D.load_split(cfg.data.dataset, cfg.data.data_dir, split_name,
                                 on_empty=cfg.data.on_empty, missing=cfg.data.missing)
            for modality in ("image", "text"):
                chosen = [s for s in specs if s.modality == modality]
                if chosen:
                    entries += _extract_modality(cfg, split, chosen, team, force)
    return entries


def merge(cfg: PipelineConfig) -> list[Entry]:
    """Assemble the entries whose chunks ``extract --shard K/N`` runs have staged (same config).

    Entries already finished are returned as they are. Raises IncompleteExtractionError naming,
    per entry, the missing chunks (and rows) and the shard(s) that must be rerun; the complete
    entries are assembled first either way.
    """
    _check(cfg)
    specs = resolve_specs(cfg)
    entries, problems = [], []
    for split_name in splits_of(cfg):
        split = D.load_split(cfg.data.dataset, cfg.data.data_dir, split_name,
                             on_empty=cfg.data.on_empty, missing=cfg.data.missing)
        for modality in ("image", "text"):
            for spec in (s for s in specs if s.modality == modality):
                path, ids, key = _entry_request(cfg, split, spec)
                where = f"{cfg.data.dataset}/{split.name}/{spec.name}"
                if not path.exists() and not path.with_name(path.name + PARTIAL_SUFFIX).exists():
                    problems.append(f"{where}: nothing staged at {path}{PARTIAL_SUFFIX}; run the shards "
                                    "(extract --shard K/N with the same options) first.")
                    continue
                writer = EntryWriter(path, spec.name, ids, key, cfg.extract.chunk_rows)
                notes = writer.notes()
                entry = writer.finalize(_multi_provenance(cfg, split, notes), _skipped(split))
                if entry is None:
                    problems.append(f"{where}: {_describe_missing(writer, writer.pending(), notes)}")
                else:
                    entries.append(entry)
    if problems:
        raise IncompleteExtractionError("Cannot merge, chunks are missing:\n  " + "\n  ".join(problems)
                                        + "\nRerun the named shard(s), then extract --merge again.")
    return entries


def _entry_request(cfg: PipelineConfig, split: D.Split, spec: EncoderSpec):
    """(path, row ids, key) of one encoder's entry for one split."""
    if spec.modality == "image":
        rows, extra = split.items, {}
    else:
        rows, extra = split.caption_rows(cfg.data.captions), {"captions": cfg.data.captions}
    path = entry_path(cfg.data.cache, cfg.data.dataset, split.name, spec.name, cfg.extract.format)
    return path, [r.id for r in rows], _key(spec, cfg, split, extra)


def _skipped(split: D.Split) -> list[dict]:
    return [{"id": i, "reason": r} for i, r in split.skipped]


def _extract_modality(cfg: PipelineConfig, split: D.Split, specs: list[EncoderSpec], team: _Team,
                      force: bool) -> list[Entry]:
    x = cfg.extract
    is_image = specs[0].modality == "image"
    rows = split.items if is_image else split.caption_rows(cfg.data.captions)
    if not team.leader:
        team.barrier()  # torchrun: rank 0 first sets up (and under --force discards) the entries
    jobs = []
    for spec in specs:
        path, ids, key = _entry_request(cfg, split, spec)
        writer = EntryWriter(path, spec.name, ids, key, x.chunk_rows, force and team.leader)
        jobs.append(_Job(spec, writer, {c for c in writer.pending() if team.shard.owns(c)}))
    if team.leader:
        team.barrier()
    todo = sorted(set().union(*(j.pending for j in jobs)))
    multi = team.shard.count > 1
    note = {"shard": str(team.shard), "host": platform.node(), "pid": os.getpid(), "device": str(team.device),
            "started": _now(), "chunks": len(todo)}
    if multi:
        for job in jobs:
            job.writer.write_note(team.shard.name, {**note, "state": "running"})
    timing = _run_jobs(cfg, split, rows, [j for j in jobs if j.pending], todo, team) if todo else {}
    if multi:
        for job in jobs:
            job.writer.write_note(team.shard.name, {**note, "rows_computed": 0, "extract_seconds": 0.0, **timing,
                                                    "state": "done", "finished": _now()})
    team.barrier()  # torchrun: every rank has staged its chunks
    if team.distributed and not team.leader:
        team.barrier()  # rank 0 assembles the entries
        return [open_entry(job.writer.path) for job in jobs]
    out = []
    for job in jobs:
        if multi:
            provenance = _multi_provenance(cfg, split, job.writer.notes(), team.device)
        else:
            provenance = {**_provenance(cfg, split, team.device), **timing}
            if job.encoder is not None:  # frozen parameter count, for the report's cost table
                provenance["parameters"] = sum(p.numel() for p in job.encoder.parameters())
        entry = job.writer.finalize(provenance, _skipped(split))
        if entry is None:
            missing = job.writer.pending()
            if not multi:
                raise RuntimeError(f"{job.spec.name}: chunks are still missing after extraction "
                                   f"(another process may be writing them); rerun to finish.")
            if team.distributed:
                raise RuntimeError(f"{job.spec.name}: after every rank finished, "
                                   f"{_describe_missing(job.writer, missing, job.writer.notes())}.")
            log.info("%s%s: %d chunks wait for other shards; the last shard or extract --merge assembles it",
                     team.label, job.spec.name, len(missing))
            continue
        log.info("%s/%s/%s: %d rows -> %s", cfg.data.dataset, split.name, job.spec.name, entry.n, entry.path)
        out.append(entry)
    team.barrier()  # torchrun: the entries are finished
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _multi_provenance(cfg: PipelineConfig, split: D.Split, notes: dict, device: torch.device | None = None) -> dict:
    """Provenance of an entry computed by several processes: their notes under ``shards`` and
    totals (rows computed by all, wall time of the slowest, items/s = rows / that time)."""
    shards = [n for _, n in sorted(notes.items())]
    rows = sum(n.get("rows_computed", 0) for n in shards)
    seconds = max([n.get("extract_seconds", 0.0) for n in shards] or [0.0])
    devices = sorted({n["device"] for n in shards if "device" in n}) or [str(device)]
    return {**_provenance(cfg, split, ",".join(devices)), "shards": shards, "rows_computed": rows,
            "extract_seconds": seconds, "items_per_s": rows / seconds if seconds else 0.0}


def _describe_missing(writer: EntryWriter, missing: Sequence[int], notes: dict) -> str:
    """"chunks 1, 3-4 of 6 (rows 4-7, 12-19) are missing; they belong to shard 1/2 (started on
    host h at t, did not finish): rerun extract --shard 1/2" (as far as the notes tell)."""
    runs: list[list[int]] = []
    for c in sorted(missing):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    more = f" and {len(runs) - MAX_LISTED} more ranges" if len(runs) > MAX_LISTED else ""
    chunks = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:MAX_LISTED]) + more
    spans = [(writer.rows(a)[0], writer.rows(b)[-1]) for a, b in runs[:MAX_LISTED]]
    rows = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans) + more
    text = f"{len(missing)} of {writer.num_chunks} chunks missing: chunks {chunks} (rows {rows})"
    counts = sorted({int(n["shard"].split("/")[1]) for n in notes.values() if "/" in str(n.get("shard"))})
    if not counts:
        return text + "; no shard left a record: rerun extract (--shard K/N computes chunks c with c % N == K)"
    owners = []
    for count in counts:
        for index in sorted({c % count for c in missing}):
            shard = Shard(index, count)
            n = notes.get(shard.name)
            state = ("never started" if n is None else
                     f"started on {n.get('host')} at {n.get('started')}, did not finish" if n.get("state") != "done"
                     else f"finished on {n.get('host')} at {n.get('finished')}, but its chunks are gone")
            owners.append(f"--shard {shard} ({state})")
    extra = len(owners) - MAX_LISTED
    listed = "; ".join(owners[:MAX_LISTED]) + (f"; and {extra} more" if extra > 0 else "")
    return f"{text}; rerun extract {listed}"


def _run_jobs(cfg: PipelineConfig, split: D.Split, rows: Sequence, jobs: list[_Job], todo: list[int],
              team: _Team) -> dict:
    """Compute chunks ``todo`` of every job (each job only its pending ones); returns timing facts
    for the provenance."""
    x = cfg.extract
    device = team.device
    is_image = jobs[0].spec.modality == "image"
    for job in jobs:
        job.encoder = load_encoder(job.spec, device)
        job.buffers = {}
        # generic encoders settle their preprocessing at load time: read it from the loaded spec
        job.input_key = repr(job.encoder.spec.prep) if is_image else job.spec.name
    chunk_ranges = [jobs[0].writer.rows(c) for c in todo]
    if is_image:
        transforms = {j.input_key: image_pixels(j.encoder.spec.prep) for j in jobs}  # uint8
        collate = _Collate()
    else:
        transforms = {}
        collate = _Collate({j.input_key: j.encoder.tokenizer for j in jobs})
    workers = _workers(x.workers, text_on_cpu=not is_image and device.type == "cpu")
    loader = DataLoader(_Rows(split, rows, transforms, x.on_error == "skip"),
                        batch_sampler=_ChunkBatches(chunk_ranges, x.batch_size), collate_fn=collate,
                        num_workers=workers, pin_memory=device.type == "cuda",
                        worker_init_fn=_worker_init if workers else None,
                        persistent_workers=False, prefetch_factor=4 if workers else None)
    names = ",".join(j.spec.name for j in jobs)
    all_layers = x.layers == "all"
    started = time.perf_counter()
    with tqdm(total=sum(len(r) for r in chunk_ranges), desc=f"{team.label}{split.name} {names}",
              unit="img" if is_image else "txt", dynamic_ncols=True,
              disable=team.distributed and not team.leader) as bar, torch.inference_mode():
        skipped: dict[int, dict[str, str]] = {}
        done = 0  # rows computed (bar.n stays 0 when the bar is disabled)
        warm = None  # (time, rows) once the first batch is through: start-up excluded from steady rate
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
            done += len(batch_rows) + len(batch_skipped)
            warm = warm or (time.perf_counter(), done)
            last_row = max(batch_rows + list(batch_skipped))
            if last_row == jobs[0].writer.rows(chunk)[-1]:  # chunk complete: stage it
                for job in jobs:
                    if chunk in job.pending:
                        _flush(job, chunk, skipped.get(chunk, {}), all_layers)
                skipped.pop(chunk, None)
    seconds = time.perf_counter() - started
    log.info("%sextracted %s on %s/%s in %.1fs", team.label, names, cfg.data.dataset, split.name, seconds)
    steady = (done - warm[1]) / max(time.perf_counter() - warm[0], 1e-9) if warm and done > warm[1] else 0.0
    return {"extract_seconds": seconds, "rows_computed": done, "items_per_s": done / max(seconds, 1e-9),
            "steady_items_per_s": steady}


def _workers(configured: int, text_on_cpu: bool = False) -> int:
    """DataLoader workers per process: the configured number, or for -1 ``default_workers()``
    (min(8, cores - 1)); under torchrun min(8, cores / LOCAL_WORLD_SIZE - 1), the machine's cores
    shared by its ranks (e.g. 8 per rank on 96 cores and 8 GPUs, 1 on 16 cores). Text on a CPU
    model gets 0: tokenising is cheap, and a worker process would take cores from the model
    (measured with benchmarks/bench_extract.py on 2 cores: 0.91 of the bare forward vs 0.77)."""
    if configured >= 0:
        return configured
    if text_on_cpu:
        return 0
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    if local == 1:
        return default_workers()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores // local - 1))


def _forward(job: _Job, batch, device: torch.device, precision: str, all_layers: bool):
    if isinstance(batch, dict):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    else:  # uint8 pixels from the workers: scale and normalise on the model's device
        batch = normalize_pixels(batch.to(device, non_blocking=True), job.encoder.spec.prep)
    with autocast(device, precision):
        features, layers = job.encoder.encode(batch, all_layers)
    return features.cpu().numpy(), [layer.cpu().numpy() for layer in layers or []]


def _flush(job: _Job, chunk: int, skipped: dict[str, str], all_layers: bool) -> None:
    parts = job.buffers.pop(chunk, [])
    if parts:
        features = np.concatenate([p[0] for p in parts])
        layers = [np.concatenate([p[1][k] for p in parts]) for k in range(len(parts[0][1]))] if all_layers else []
    else:  # every row of the chunk was skipped
        features, layers = np.zeros((0, job.encoder.dim), np.float32), []
    job.writer.write_chunk(chunk, features, layers, skipped)
