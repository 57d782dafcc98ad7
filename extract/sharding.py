"""Several processes sharing one extraction: shards, torchrun ranks, their notes, and what to rerun.

A ``Shard(index, count)`` computes only the chunks c with ``c % count == index`` of every entry
(round-robin: near-equal shares, and each chunk is batched exactly as in a single run, so the
result is identical). Under torchrun (``WORLD_SIZE > 1``) rank r of w is Shard(r, w) on device
cuda:LOCAL_RANK (when CUDA is present and the device is auto/cuda); torch.distributed (NCCL on
GPUs, gloo on CPU) only provides barriers. Independent ``--shard K/N`` processes never talk.

Each process leaves a note (shard, host, device, timing) beside the staged chunks; when chunks
are missing, :func:`describe_missing` reads the notes to say which shard to rerun.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from pipeline.cache import CacheError, EntryWriter
from pipeline.errors import PipelineError
from pipeline.runtime import rank_device, resolve_device, utc_now

DIST_TIMEOUT_S = 6 * 3600  # seconds a torchrun rank may wait at a barrier for the slowest rank
MAX_LISTED = 5  # how many missing chunk ranges / shards an incomplete-merge error names


class ShardError(PipelineError, ValueError):
    """A --shard value that is malformed or cannot be combined with the other options."""


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
            raise ShardError(f"Shard {self.index}/{self.count} is invalid: need 0 <= K < N (K is 0-based), "
                             f"e.g. --shard 0/{max(self.count, 2)}.")

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """``"K/N"`` -> Shard(K, N), e.g. ``--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``."""
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        if not m:
            raise ShardError(f"--shard {text!r} must look like K/N with 0 <= K < N, e.g. 0/4.")
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


@dataclass
class Team:
    """The processes running one extraction: this one is ``shard``; ``distributed`` when they are
    torchrun ranks joined by torch.distributed (then rank 0 finalizes), else they never talk."""

    shard: Shard
    device: torch.device
    distributed: bool = False

    @property
    def leader(self) -> bool:
        return self.shard.index == 0

    @property
    def multi(self) -> bool:
        return self.shard.count > 1

    @property
    def label(self) -> str:
        """Prefix of progress bars and log lines ("" for a single process)."""
        if not self.multi:
            return ""
        return f"{'rank' if self.distributed else 'shard'} {self.shard} "

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier(device_ids=[self.device.index]) if self.device.type == "cuda" else dist.barrier()

    def note(self, chunks: int) -> dict:
        """The start of this process's note: who computes how many chunks, where, since when."""
        return {"shard": str(self.shard), "host": platform.node(), "pid": os.getpid(), "device": str(self.device),
                "started": utc_now(), "chunks": chunks}


@contextlib.contextmanager
def team(device_name: str, shard: Shard | None) -> Iterator[Team]:
    """Set up this process's share: torchrun rank (process group + cuda:LOCAL_RANK), an explicit
    shard, or the whole job. The process group is destroyed at the end if we created it."""
    ranked = torchrun_shard()
    if ranked is None:
        yield Team(shard or Shard(), resolve_device(device_name))
        return
    if shard is not None and shard.count > 1:
        raise ShardError(f"--shard {shard} under torchrun (WORLD_SIZE={ranked.count}): both split the work; "
                         "use torchrun alone, or --shard without torchrun.")
    import torch.distributed as dist

    device = rank_device(device_name)  # one GPU per rank
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=_dt.timedelta(seconds=DIST_TIMEOUT_S))
    try:
        yield Team(Shard(dist.get_rank(), dist.get_world_size()), device, distributed=True)
    finally:
        if created:
            dist.destroy_process_group()


def shard_totals(notes: dict, device: torch.device | None = None) -> dict:
    """Provenance of an entry computed by several processes: their notes under ``shards``, the
    devices used, and totals (rows computed by all, wall time of the slowest, items/s = rows /
    that time)."""
    shards = [n for _, n in sorted(notes.items())]
    rows = sum(n.get("rows_computed", 0) for n in shards)
    seconds = max([n.get("extract_seconds", 0.0) for n in shards] or [0.0])
    devices = sorted({n["device"] for n in shards if "device" in n}) or [str(device)]
    return {"device": ",".join(devices), "shards": shards, "rows_computed": rows, "extract_seconds": seconds,
            "items_per_s": rows / seconds if seconds else 0.0}


def _ranges(values: Sequence[int]) -> list[list[int]]:
    """Sorted runs of consecutive integers: [1, 3, 4, 5] -> [[1, 1], [3, 5]]."""
    runs: list[list[int]] = []
    for c in sorted(values):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return runs


def _owners(missing: Sequence[int], notes: dict) -> str:
    """The shards that own the ``missing`` chunks, each with what its note says about it."""
    counts = sorted({int(n["shard"].split("/")[1]) for n in notes.values() if "/" in str(n.get("shard"))})
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
    return "; ".join(owners[:MAX_LISTED]) + (f"; and {extra} more" if extra > 0 else "")


def describe_missing(writer: EntryWriter, missing: Sequence[int], notes: dict) -> str:
    """"chunks 1, 3-4 of 6 (rows 4-7, 12-19) are missing; they belong to shard 1/2 (started on
    host h at t, did not finish): rerun extract --shard 1/2" (as far as the notes tell)."""
    runs = _ranges(missing)
    more = f" and {len(runs) - MAX_LISTED} more ranges" if len(runs) > MAX_LISTED else ""
    chunks = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:MAX_LISTED]) + more
    spans = [(writer.rows(a)[0], writer.rows(b)[-1]) for a, b in runs[:MAX_LISTED]]
    rows = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans) + more
    text = f"{len(missing)} of {writer.num_chunks} chunks missing: chunks {chunks} (rows {rows})"
    owners = _owners(missing, notes)
    if not owners:
        return text + "; no shard left a record: rerun extract (--shard K/N computes chunks c with c % N == K)"
    return f"{text}; rerun extract {owners}"
