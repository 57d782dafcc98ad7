"""The extract stage: run frozen encoders once over a dataset split and fill the feature cache.

``extract(cfg)`` is what ``extract`` on the command line calls. Per split it

1. checks every ``[extract]`` value, loads the split (``extract.datasets``) and resolves every
   requested encoder (``extract.encoders``), all before anything is written;
2. hashes the split's image files (``extract.datasets.content``: once, then cached by path, size
   and times) and opens one resumable ``EntryWriter`` per encoder (``pipeline.cache``; its
   staging folder is created only once the encoders have loaded) in the cache folder of this
   dataset and data folder: finished entries with the same request (encoder,
   options, data fingerprint, data folder, content) are verified against their checksums and
   reused, stale ones refused unless ``force``, damaged ones refused unless ``repair``;
3. decodes each image ONCE per batch in DataLoader workers (``extract.loader``), applies every
   distinct preprocessing the image encoders ask for, and feeds each encoder; captions are
   tokenized in the workers. With ``extract.decode`` gpu (auto on CUDA) the workers send JPEG
   bytes and the GPU decodes and resizes them (``extract.gpu_decode``; the decoder is in the key);
4. stages each finished chunk of rows, so an interrupted run resumes where it stopped and gives
   the same result as an uninterrupted one (batches never straddle chunks, so every row is
   computed in the same batch either way).

Several processes can share one extraction (``extract.sharding``): torchrun ranks (rank 0
assembles and checks every entry once, the other ranks wait and return the finished entries), or
``extract(cfg, shard=Shard(k, n))`` (``extract --shard K/N``, e.g. one SLURM array task):
independent processes; the last one to finish assembles, or ``merge(cfg)`` (``extract --merge``)
does, and names the missing chunks and the shard to rerun if any. Each process's note (shard,
host, device, timing) ends up in the entry's provenance under ``shards``.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from extract import datasets as D
from extract.checks import TokenCollisions, warn_duplicate_images
from extract.encoders import (EncoderSpec, check_tokens, forward_batch, forward_tokens, get_spec, has_layers,
                              image_pixels, load_encoder, token_grid)
from extract.gpu_decode import CPU, DECODES, GPU_NVJPEG, GpuDecoder, decode_key, effective_decoder, read_jpeg
from extract.loader import batches, loader_workers, make_loader
from extract.token_size import check_token_size
from extract.sharding import (IncompleteExtractionError, Shard, ShardError, Team, describe_missing, shard_totals,
                              team, torchrun_shard)
from pipeline.cache import (CACHE_FORMAT, FORMATS, Entry, EntryWriter, dataset_dir, entry_filename, entry_path,
                            open_entry, resolved_data_dir, staging_folders)
from pipeline.config import CHOICES, ConfigError, PipelineConfig
from pipeline.errors import did_you_mean
from pipeline.languages import entry_name
from pipeline.progress import Progress
from pipeline.runtime import PRECISIONS, autocast, resolve_device, utc_now, versions

__all__ = ["IncompleteExtractionError", "Shard", "extract", "merge", "resolve_spec", "resolve_specs", "splits_of",
           "torchrun_shard"]

log = logging.getLogger(__name__)

ON_ERROR = CHOICES["extract.on_error"]  # error, skip
LAYERS = CHOICES["extract.layers"]  # last, all
MODALITIES = ("image", "text")  # extraction order within a split


@dataclass
class _Job:
    """One encoder's work on one split."""

    spec: EncoderSpec
    writer: EntryWriter
    pending: set[int]
    encoder: torch.nn.Module | None = None
    buffers: dict | None = None  # chunk -> list of (features, layers, tokens (flat, lengths) | None)
    input_key: str = ""  # which collated input this encoder reads (set once loaded)
    token_width: int = 0  # width of its token vectors (token extraction: set by check_token_size)
    token_dtype: str = ""


# ----------------------------------------------------------------------------- the request

def _one_of(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}.{did_you_mean(value, choices)}")


def check_request(cfg: PipelineConfig) -> list[EncoderSpec]:
    """Every ``[extract]`` value (and the ``[data]`` values extraction reads) checked before any
    work starts, so a refused request leaves nothing behind (no staging folder, no manifest);
    returns the encoders' specs (``resolve_specs``). Reads no data."""
    x = cfg.extract
    if not x.encoders:
        raise ConfigError("No encoders asked for: pass --encoder NAME[,NAME...].")
    _one_of("extract.format", x.format, FORMATS)
    _one_of("extract.precision", x.precision, tuple(PRECISIONS))
    _one_of("extract.layers", x.layers, LAYERS)
    _one_of("extract.on_error", x.on_error, ON_ERROR)
    _one_of("extract.decode", x.decode, DECODES)
    _one_of("data.captions", cfg.data.captions, D.CAPTION_POLICIES)
    for name in ("batch_size", "chunk_rows"):
        if getattr(x, name) < 1:
            raise ConfigError(f"extract.{name} must be >= 1, got {getattr(x, name)}.")
    if x.workers < -1:
        raise ConfigError(f"extract.workers must be >= 0, or -1 for min(8, CPU cores - 1); got {x.workers}.")
    autocast(resolve_device(x.device), x.precision)  # refuses unknown devices and fp16 on CPU; not entered
    for name in x.encoders:
        entry_filename(name, "cache entry name of --encoder (for a local model: a shorter path, e.g. a symlink)")
    specs = resolve_specs(cfg)
    flat = [s.name for s in specs if not has_layers(s)]
    if x.layers == "all" and flat:
        raise ConfigError(f"--layers all: {', '.join(flat)} {'has' if len(flat) == 1 else 'have'} no hidden layers "
                          f"(sentence vectors only, no torch graph); extract {'it' if len(flat) == 1 else 'them'} in a "
                          f"separate run with --layers last.")
    if token_grid(x.tokens) is not None:
        _one_of("extract.token_dtype", x.token_dtype, CHOICES["extract.token_dtype"])
        if x.layers == "all":
            raise ConfigError("extract.layers = all and extract.tokens cannot be combined (one forward pass stores "
                              "one of them): extract the layers with --tokens none into another --cache.")
        if x.max_token_bytes < 0:
            raise ConfigError(f"extract.max_token_bytes must be >= 0, got {x.max_token_bytes}.")
        for spec in specs:
            check_tokens(spec)
    return specs


def resolve_specs(cfg: PipelineConfig) -> list[EncoderSpec]:
    """The requested encoders with their per-encoder options applied (unknown names fail here).

    Each keeps the name it was asked for, which names its cache entry: ``dinov2`` (an alias of
    ``dinov2-base``) is cached as ``dinov2``, so later stages refer to it the same way; the
    entry's key records the resolved weights."""
    options = cfg.extract.encoder_options
    unknown = set(options) - set(cfg.extract.encoders)
    if unknown:
        raise ConfigError(f"extract.encoder_options names encoders not being extracted: {sorted(unknown)}.")
    return [resolve_spec(name, options.get(name, {})) for name in cfg.extract.encoders]


def resolve_spec(name: str, options: Mapping[str, Any] | None = None) -> EncoderSpec:
    """The spec of encoder ``name`` with its options (``get_spec`` overrides), named ``name``: the
    name its cache entries carry (an alias keeps the name it was asked for)."""
    spec = get_spec(name, **(options or {}))
    return spec if spec.name == name else dataclasses.replace(spec, name=name)


def splits_of(cfg: PipelineConfig) -> list[str]:
    """extract.split ("all" = every split the dataset has), checked against the dataset's splits."""
    return D.requested_splits(cfg.data.dataset, cfg.data.data_dir, cfg.extract.split, **D.config_options(cfg.data))


def _load_split(cfg: PipelineConfig, name: str) -> D.Split:
    return D.load_split(cfg.data.dataset, cfg.data.data_dir, name, **D.config_options(cfg.data))


def _content(cfg: PipelineConfig, split: D.Split, us: Team | None = None) -> dict:
    """{"ids", "digests", "digest"}: the content hash of every image of the split (cached between
    runs in the dataset's cache folder) and their digest, which every key of the split records.
    Under torchrun rank 0 hashes first, so the other ranks find the hashes in the side file."""
    if us is not None and us.distributed and not us.leader:
        us.barrier()
    side = dataset_dir(cfg.data.cache, cfg.data.dataset, cfg.data.data_dir, write=True) / D.SIDE_FILE
    digests = D.content_hashes(split, side)
    if us is not None and us.distributed and us.leader:
        us.barrier()
    return {"ids": split.ids, "digests": digests, "digest": D.content_digest(split.ids, digests)}


def _split_for(cfg: PipelineConfig, split: D.Split, modality: str) -> D.Split:
    """The split as ``modality``'s entries see it: text in ``data.language`` (``Split.in_language``:
    only the images with captions in it; LanguageError listing the languages present otherwise)."""
    return split if modality == "image" else split.in_language(cfg.data.language, cfg.data.default_language)


def entry_name_of(cfg: PipelineConfig, spec: EncoderSpec) -> str:
    """The cache entry name of ``spec`` under ``cfg``: its name, ``<name>.lang-<code>`` for text in
    a language other than ``data.default_language`` (``pipeline.languages.entry_name``)."""
    if spec.modality == "image":
        return spec.name
    return entry_name(spec.name, cfg.data.language, cfg.data.default_language)


def _entry_request(cfg: PipelineConfig, split: D.Split, spec: EncoderSpec, content: dict, decoder: str = CPU):
    """(path, row ids, key) of one encoder's entry for one split; the key is what makes it stale:
    the encoder, the request options, and the data (the split's fingerprint of ids, file names and
    captions; the resolved data folder; the digest of the images' content hashes); for images the
    effective decoder (``gpu_decode.effective_decoder``)."""
    if spec.modality == "image":
        rows, extra = split.items, decode_key(decoder)
    else:
        split = _split_for(cfg, split, "text")
        rows, extra = split.caption_rows(cfg.data.captions), {"captions": cfg.data.captions}
        if split.language is not None:  # default-language keys stay as they were
            extra.update(language=split.language, language_fingerprint=split.language_fingerprint)
    name = entry_name_of(cfg, spec)
    path = entry_path(cfg.data.cache, cfg.data.dataset, split.name, name, cfg.extract.format,
                      cfg.data.data_dir, write=True)
    key = {"entry": name, "encoder": spec.provenance(), "dataset": cfg.data.dataset, "split": split.name,
           "fingerprint": split.fingerprint(), "data_dir": resolved_data_dir(cfg.data.data_dir),
           "content": content["digest"], "cache_format": CACHE_FORMAT, "precision": cfg.extract.precision,
           "layers": cfg.extract.layers, **extra}
    if token_grid(cfg.extract.tokens) is not None:  # pooled requests keep the keys they always had
        key.update(tokens=cfg.extract.tokens, token_dtype=cfg.extract.token_dtype, token_layout=check_tokens(spec))
    return path, [r.id for r in rows], key


def _writer(cfg: PipelineConfig, split: D.Split, spec: EncoderSpec, content: dict, force: bool = False,
            repair: bool = False, decoder: str = CPU) -> EntryWriter:
    path, ids, key = _entry_request(cfg, split, spec, content, decoder)
    record = {"ids": content["ids"], "digests": content["digests"]}
    return EntryWriter(path, key["entry"], ids, key, cfg.extract.chunk_rows, force, repair, record)


def _provenance(cfg: PipelineConfig, split: D.Split, device: torch.device | str) -> dict:
    return {"versions": versions(), "config": cfg.to_dict(), "config_source": cfg.source,
            "host": platform.node(), "device": str(device), "source": split.source,
            "batch_size": cfg.extract.batch_size}


def _multi_provenance(cfg: PipelineConfig, split: D.Split, notes: dict, device: torch.device | None = None) -> dict:
    totals = shard_totals(notes, device)
    return {**_provenance(cfg, split, totals["device"]), **totals}


def _skipped(split: D.Split) -> list[dict]:
    return [{"id": i, "reason": r} for i, r in split.skipped]


# ----------------------------------------------------------------------------- entry points

def extract(cfg: PipelineConfig, force: bool = False, shard: Shard | None = None,
            repair: bool = False) -> list[Entry]:
    """Extract every requested encoder over every requested split; returns the finished entries.

    force: recompute stale entries (another request) and discard other requests' staging;
    repair: recompute finished entries that fail their checksums (damaged), keep the others.

    shard: compute only this share of the chunks (``extract --shard K/N``); entries are assembled
    only if all their chunks are staged by then (the last shard to finish does it, else run
    ``merge``), so a shard may return fewer entries than requested. Under torchrun
    (WORLD_SIZE > 1) the shard is the rank and every rank returns every finished entry.
    """
    specs = check_request(cfg)
    effective_decoder(cfg.extract.decode, resolve_device(cfg.extract.device))  # decode=gpu without CUDA: refused
    if force and shard is not None and shard.count > 1:
        raise ShardError(f"--force with --shard {shard} would let each shard discard the chunks of the others. "
                         "Delete the stale entries (the error without --force names them) before starting "
                         "the shards, or use torchrun, where only rank 0 discards.")
    entries = []
    with team(cfg.extract.device, shard) as us:
        for split_name in splits_of(cfg):
            split = _load_split(cfg, split_name)
            content = _content(cfg, split, us)
            if us.leader:
                warn_duplicate_images(f"{cfg.data.dataset}/{split.name}", content["ids"], content["digests"])
            for modality in MODALITIES:
                chosen = [s for s in specs if s.modality == modality]
                if chosen:
                    entries += _extract_modality(cfg, split, content, chosen, us, force, repair)
    return entries


def merge(cfg: PipelineConfig) -> list[Entry]:
    """Assemble the entries whose chunks ``extract --shard K/N`` runs have staged (same config).

    Entries already finished are returned as they are. Raises IncompleteExtractionError naming,
    per entry, the missing chunks (and rows) and the shard(s) that must be rerun; the complete
    entries are assembled first either way.
    """
    specs = check_request(cfg)
    decoder = effective_decoder(cfg.extract.decode, resolve_device(cfg.extract.device), computing=False)
    entries, problems = [], []
    for split_name in splits_of(cfg):
        split = _load_split(cfg, split_name)
        content = _content(cfg, split)
        for spec in sorted(specs, key=lambda s: MODALITIES.index(s.modality)):
            path, _, _ = _entry_request(cfg, split, spec, content, decoder)
            where = f"{cfg.data.dataset}/{split.name}/{spec.name}"
            if not path.exists() and not staging_folders(path):
                problems.append(f"{where}: nothing staged beside {path}; run the shards "
                                "(extract --shard K/N with the same options) first.")
                continue
            writer = _writer(cfg, split, spec, content, decoder=decoder)
            notes = writer.notes()
            entry = writer.finalize(_multi_provenance(cfg, split, notes), _skipped(_split_for(cfg, split, spec.modality)))
            if entry is None:
                problems.append(f"{where}: {describe_missing(writer, writer.pending(), notes)}")
            else:
                entries.append(entry)
    if problems:
        raise IncompleteExtractionError("Cannot merge, chunks are missing:\n  " + "\n  ".join(problems)
                                        + "\nRerun the named shard(s), then extract --merge again.")
    return entries


# ----------------------------------------------------------------------------- one modality

def _open_jobs(cfg: PipelineConfig, split: D.Split, content: dict, specs: list[EncoderSpec], us: Team,
               force: bool, repair: bool) -> list[_Job]:
    """One writer per encoder, each with the chunks this process must compute. Under torchrun
    rank 0 sets up (and under --force / --repair discards) the entries before the other ranks look."""
    if not us.leader:
        us.barrier()
    jobs, decoder = [], effective_decoder(cfg.extract.decode, us.device)
    for spec in specs:
        writer = _writer(cfg, split, spec, content, force and us.leader, repair, decoder)
        jobs.append(_Job(spec, writer, {c for c in writer.pending() if us.shard.owns(c)}))
    if us.leader:
        us.barrier()
    return jobs


def _extract_modality(cfg: PipelineConfig, split: D.Split, content: dict, specs: list[EncoderSpec], us: Team,
                      force: bool, repair: bool) -> list[Entry]:
    """Compute this process's chunks of every encoder of one modality, then assemble the entries
    whose chunks are all staged; returns the finished ones."""
    split = _split_for(cfg, split, specs[0].modality)
    rows = split.items if specs[0].modality == "image" else split.caption_rows(cfg.data.captions)
    jobs = _open_jobs(cfg, split, content, specs, us, force, repair)
    todo = sorted(set().union(*(j.pending for j in jobs)))
    inputs_by = _load_encoders([j for j in jobs if j.pending], us.device) if todo else {}
    if todo and token_grid(cfg.extract.tokens) is not None:
        check_token_size(cfg, rows, [j for j in jobs if j.pending], us)
    for job in jobs:  # staging only once the models have loaded: a failed load leaves nothing behind
        job.writer.open()
    note = us.note(len(todo))
    if us.multi:
        for job in jobs:
            job.writer.write_note(us.shard.name, {**note, "state": "running"})
    timing = _run_jobs(cfg, split, rows, [j for j in jobs if j.pending], todo, us, inputs_by) if todo else {}
    if us.multi:
        for job in jobs:
            job.writer.write_note(us.shard.name, {**note, "rows_computed": 0, "extract_seconds": 0.0, **timing,
                                                  "state": "done", "finished": utc_now()})
    us.barrier()  # torchrun: every rank has staged its chunks
    if us.distributed and not us.leader:
        us.barrier()  # rank 0 assembles the entries
        return [open_entry(job.writer.path) for job in jobs]
    out = [entry for job in jobs if (entry := _finish(cfg, split, job, us, timing)) is not None]
    us.barrier()  # torchrun: the entries are finished
    return out


def _finish(cfg: PipelineConfig, split: D.Split, job: _Job, us: Team, timing: dict) -> Entry | None:
    """Assemble one entry; None when a separate shard still has to stage chunks."""
    if us.multi:
        provenance = _multi_provenance(cfg, split, job.writer.notes(), us.device)
    else:
        provenance = {**_provenance(cfg, split, us.device), **timing}
        if job.encoder is not None:  # frozen parameter count, for the report's cost table
            provenance["parameters"] = sum(p.numel() for p in job.encoder.parameters())
    entry = job.writer.finalize(provenance, _skipped(split))
    if entry is None:
        missing = job.writer.pending()
        if not us.multi:
            raise IncompleteExtractionError(f"{job.spec.name}: chunks are still missing after extraction "
                                            "(another process may be writing them); rerun to finish.")
        if us.distributed:
            raise IncompleteExtractionError(f"{job.spec.name}: after every rank finished, "
                                            f"{describe_missing(job.writer, missing, job.writer.notes())}.")
        log.info("%s%s: %d chunks wait for other shards; the last shard or extract --merge assembles it",
                 us.label, job.spec.name, len(missing))
        return None
    log.info("%s/%s/%s: %d rows -> %s", cfg.data.dataset, split.name, job.spec.name, entry.n, entry.path)
    return entry


# ----------------------------------------------------------------------------- computing

def _load_encoders(jobs: list[_Job], device: torch.device) -> dict:
    """Load every job's encoder; returns the loader's inputs: {"transforms": {key: PIL -> uint8}}
    for images (one per distinct preprocessing) or {"tokenizers": {key: tokenizer}} for texts."""
    is_image = jobs[0].spec.modality == "image"
    for job in jobs:
        job.encoder = load_encoder(job.spec, device)
        job.buffers = {}
        # generic encoders settle their preprocessing at load time: read it from the loaded spec
        job.input_key = repr(job.encoder.spec.prep) if is_image else job.spec.name
    if is_image:
        return {"transforms": {j.input_key: image_pixels(j.encoder.spec.prep) for j in jobs}}
    return {"tokenizers": {j.input_key: j.encoder.tokenizer for j in jobs}}


def _run_jobs(cfg: PipelineConfig, split: D.Split, rows: Sequence, jobs: list[_Job], todo: list[int],
              us: Team, inputs_by: dict) -> dict:
    """Compute chunks ``todo`` of every job (each job only its pending ones; their encoders loaded,
    ``inputs_by`` from :func:`_load_encoders`); returns timing facts for the provenance."""
    x = cfg.extract
    is_image = jobs[0].spec.modality == "image"
    chunk_ranges = [jobs[0].writer.rows(c) for c in todo]
    workers = loader_workers(x.workers, text_on_cpu=not is_image and us.device.type == "cpu")
    gpu = is_image and effective_decoder(x.decode, us.device) == GPU_NVJPEG
    decode = GpuDecoder(split, {j.input_key: j.encoder.spec.prep for j in jobs}, us.device) if gpu else None
    loader = make_loader(split, rows, chunk_ranges, x.batch_size, workers, us.device, **inputs_by,
                         read_encoded=read_jpeg if gpu else None)
    names = ",".join(j.spec.name for j in jobs)
    started = time.perf_counter()
    done, warm = 0, None  # rows computed; (time, rows) after the first batch: start-up excluded from steady rate
    skipped: dict[int, dict[str, str]] = {}  # chunk -> {id: reason}
    collisions = {} if is_image else {j.input_key: TokenCollisions(j.spec.name) for j in jobs}
    with Progress(sum(len(r) for r in chunk_ranges), f"{us.label}extract {split.name} {names}",
                  "img" if is_image else "txt", enabled=False if us.distributed and not us.leader else None) as bar, \
            torch.inference_mode():
        for batch, batch_skipped in batches(loader, x.on_error == "skip", decode):
            chunk = min(batch.rows + list(batch_skipped)) // x.chunk_rows
            skipped.setdefault(chunk, {}).update({rows[i].id: reason for i, reason in batch_skipped.items()})
            for key, seen in collisions.items():
                seen.add([rows[i].text for i in batch.rows], batch.inputs.get(key))
            for job in jobs:
                if chunk in job.pending and batch.rows:
                    job.buffers.setdefault(chunk, []).append(
                        _forward(job, batch.inputs[job.input_key], x, x.layers == "all"))
            bar.update(len(batch.rows) + len(batch_skipped))
            done += len(batch.rows) + len(batch_skipped)
            warm = warm or (time.perf_counter(), done)
            if max(batch.rows + list(batch_skipped)) == jobs[0].writer.rows(chunk)[-1]:  # chunk complete
                for job in jobs:
                    if chunk in job.pending:
                        _flush(job, chunk, skipped.get(chunk, {}), x.layers == "all")
                skipped.pop(chunk, None)
    seconds = time.perf_counter() - started
    for seen in collisions.values():
        seen.warn(f"{us.label}{cfg.data.dataset}/{split.name}")
    log.info("%sextracted %s on %s/%s in %.1fs", us.label, names, cfg.data.dataset, split.name, seconds)
    steady = (done - warm[1]) / max(time.perf_counter() - warm[0], 1e-9) if warm and done > warm[1] else 0.0
    return {"extract_seconds": seconds, "rows_computed": done, "items_per_s": done / max(seconds, 1e-9),
            "steady_items_per_s": steady, **(decode.stats() if decode else {})}


def _forward(job: _Job, batch, x, all_layers: bool):
    """((b, d) features, [(b, d_k) per layer], tokens) as numpy for one batch of one encoder (uint8
    pixels from the workers are scaled and normalised on the model's device: ``forward_batch``);
    tokens: (flat (t, w) in extract.token_dtype, (b,) lengths) of the real tokens, or None."""
    grid = token_grid(x.tokens)
    if grid is None:
        features, layers = forward_batch(job.encoder, batch, x.precision, all_layers)
        return features.cpu().numpy(), [layer.cpu().numpy() for layer in layers or []], None
    features, tokens, mask = forward_tokens(job.encoder, batch, x.precision, grid)
    flat = tokens[mask].to(getattr(torch, x.token_dtype)).cpu().numpy()
    return features.cpu().numpy(), [], (flat, mask.sum(1).cpu().numpy())


def _flush(job: _Job, chunk: int, skipped: dict[str, str], all_layers: bool) -> None:
    """Stage one finished chunk of one encoder from its buffered batches."""
    parts = job.buffers.pop(chunk, [])
    tokens = None
    if parts:
        features = np.concatenate([p[0] for p in parts])
        layers = [np.concatenate([p[1][k] for p in parts]) for k in range(len(parts[0][1]))] if all_layers else []
        if parts[0][2] is not None:
            tokens = (np.concatenate([p[2][0] for p in parts]), np.concatenate([p[2][1] for p in parts]))
    else:  # every row of the chunk was skipped
        features, layers = np.zeros((0, job.encoder.dim), np.float32), []
        if job.token_width:
            tokens = (np.zeros((0, job.token_width), job.token_dtype), np.zeros(0, np.int64))
    job.writer.write_chunk(chunk, features, layers, skipped, tokens)
