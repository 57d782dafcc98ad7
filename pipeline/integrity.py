"""Checksums of finished cache entries: recorded once when an entry is written, checked on every read.

Each entry holds a ``checksums`` record (one JSON string, see :class:`Checksums`):

    algorithm     "sha256" (hex digests cut to DIGEST_CHARS characters: 128 bits, for corruption,
                  not for adversaries)
    block_rows    rows per checksum block of the float arrays (BLOCK_ROWS)
    arrays        {"features": [digest of rows 0..R-1, of rows R..2R-1, ...], "layers/<k>": [...],
                   "ids": [digest of the ids], "content": [digest of the content record],
                   "tokens": [digest of the tokens of rows 0..R-1, ...] (token entries),
                   "token_lengths": [digest of the lengths]}
    attrs         digest of the ``key`` and ``skipped`` attributes

A float block's digest covers its bytes as little-endian float32 in C order, so it does not depend on
the storage format (HDF5 or Zarr) or its chunking. ``pipeline.cache.Entry`` reads whole blocks and
checks each before returning rows. Token arrays (``tokens``, stored flat as (total tokens, width) in
their own dtype, float16 by default) are checked in the same row blocks: block b covers the tokens of
rows [bR, (b+1)R), as little-endian bytes of the stored dtype (:func:`ragged_digests`). A flipped bit, a lost Zarr chunk (read back as the fill value) or
a truncated file gives :class:`DamagedEntryError` instead of wrong numbers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from pipeline.names import source_of
from pipeline.storage import DamagedEntryError

ALGORITHM = "sha256"
DIGEST_CHARS = 32  # hex characters kept of each digest (128 bits)
BLOCK_ROWS = 1024  # rows per checksum block of a float array


def repair_hint(name: str) -> str:
    """How a user recomputes entry ``name`` (an encoder entry, or ``<encoder>@<run>`` of fit-adapters)."""
    run = source_of(name)[1]
    if run is not None:
        return f"Rerun fit-adapters for run {run!r} to rewrite it."
    return ("Re-extract it: `extract --repair` (recomputes only damaged entries) or `extract --force` "
            "with the same options.")


def damaged(path, name: str, what: str) -> DamagedEntryError:
    return DamagedEntryError(f"Cache entry {name!r} ({str(path)!r}) is damaged: {what}. {repair_hint(name)}")


def digest(data) -> str:
    """Hex digest (DIGEST_CHARS characters) of bytes or a buffer."""
    return hashlib.new(ALGORITHM, data).hexdigest()[:DIGEST_CHARS]


def float_bytes(block: np.ndarray) -> np.ndarray:
    """The bytes a float block's digest covers: little-endian float32, C order, as a flat uint8
    view (no copy when the block already is that)."""
    return np.ascontiguousarray(block, dtype="<f4").reshape(-1).view(np.uint8)


def block_digests(array: np.ndarray, block_rows: int = BLOCK_ROWS) -> list[str]:
    """Digests of the (n, d) array's row blocks [0, R), [R, 2R), ... (at least one, for n = 0)."""
    n = array.shape[0]
    return [digest(float_bytes(array[s:s + block_rows])) for s in range(0, max(n, 1), block_rows)]


def ragged_bytes(block: np.ndarray, dtype: str) -> np.ndarray:
    """The bytes a token block's digest covers: little-endian ``dtype``, C order, flat uint8."""
    return np.ascontiguousarray(block, dtype=np.dtype(dtype).newbyteorder("<")).reshape(-1).view(np.uint8)


def lengths_digest(lengths: np.ndarray) -> str:
    """Digest of per-row token counts (little-endian int64)."""
    return digest(np.ascontiguousarray(lengths, dtype="<i8").view(np.uint8))


class RaggedDigests:
    """Row-block digests of a flat token array fed in row order, part by part (the whole array
    never needs to be in memory): block b covers the tokens of rows [bR, (b+1)R)."""

    def __init__(self, lengths: np.ndarray, dtype: str, block_rows: int = BLOCK_ROWS):
        offsets = np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))])
        n = len(lengths)
        self.bounds = [int(offsets[min(s, n)]) for s in range(0, max(n, 1) + block_rows, block_rows)]
        self.bounds = self.bounds[:max(1, -(-n // block_rows)) + 1]
        self.dtype, self.pos, self.block = dtype, 0, 0
        self.digests: list[str] = []
        self._h = hashlib.new(ALGORITHM)

    def _close_full(self) -> None:
        while self.block < len(self.bounds) - 1 and self.pos >= self.bounds[self.block + 1]:
            self.digests.append(self._h.hexdigest()[:DIGEST_CHARS])
            self._h, self.block = hashlib.new(ALGORITHM), self.block + 1

    def feed(self, part: np.ndarray) -> None:
        """Add the next ``part`` (m, width) of tokens."""
        start = 0
        self._close_full()
        while start < len(part):
            take = min(len(part) - start, self.bounds[self.block + 1] - self.pos)
            self._h.update(ragged_bytes(part[start:start + take], self.dtype))
            start, self.pos = start + take, self.pos + take
            self._close_full()

    def result(self) -> list[str]:
        self._close_full()
        if len(self.digests) != len(self.bounds) - 1:
            raise ValueError(f"{self.pos} tokens fed, {self.bounds[-1]} expected")
        return list(self.digests)


def ragged_digests(tokens: np.ndarray, lengths: np.ndarray, dtype: str, block_rows: int = BLOCK_ROWS) -> list[str]:
    """Row-block digests of a whole flat (total, width) token array (see :class:`RaggedDigests`)."""
    d = RaggedDigests(lengths, dtype, block_rows)
    d.feed(tokens)
    return d.result()


def strings_digest(values: Iterable[str]) -> str:
    """Digest of a list of strings (UTF-8, each followed by a newline)."""
    h = hashlib.new(ALGORITHM)
    for v in values:
        h.update(str(v).encode("utf-8") + b"\n")
    return h.hexdigest()[:DIGEST_CHARS]


@dataclass
class Checksums:
    """The checksum record of one entry (see the module docstring)."""

    block_rows: int = BLOCK_ROWS
    arrays: dict[str, list[str]] = field(default_factory=dict)
    attrs: str = ""
    algorithm: str = ALGORITHM

    def to_json(self) -> str:
        return json.dumps({"algorithm": self.algorithm, "block_rows": self.block_rows, "arrays": self.arrays,
                           "attrs": self.attrs}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Checksums":
        doc = json.loads(text)
        if doc.get("algorithm") != ALGORITHM or int(doc.get("block_rows", 0)) < 1:
            raise ValueError(f"unknown checksum algorithm {doc.get('algorithm')!r}")
        return cls(int(doc["block_rows"]), {k: list(v) for k, v in doc["arrays"].items()}, doc["attrs"])

    def block_range(self, start: int, stop: int) -> tuple[int, int]:
        """(first block, end block) covering rows [start, stop), start < stop."""
        return start // self.block_rows, -(-stop // self.block_rows)

    def check_blocks(self, array_name: str, data: np.ndarray, first_block: int, path, entry: str) -> None:
        """Check ``data`` (rows of whole blocks from block ``first_block`` on) against the record."""
        stored = self.arrays.get(array_name)
        if stored is None:
            raise damaged(path, entry, f"no checksum recorded for {array_name!r}")
        R = self.block_rows
        for b in range(-(-data.shape[0] // R)):
            k = first_block + b
            if k >= len(stored) or digest(float_bytes(data[b * R:(b + 1) * R])) != stored[k]:
                lo = k * R
                raise damaged(path, entry, f"rows {lo}-{lo + min(R, data.shape[0] - b * R) - 1} of {array_name!r} "
                                           "do not match their checksum (a lost Zarr chunk file, a changed byte, "
                                           "or a truncated file)")

    def check_ragged(self, array_name: str, data: np.ndarray, lengths: np.ndarray, first_block: int, dtype: str,
                     path, entry: str) -> None:
        """Check flat tokens ``data`` of whole row blocks from ``first_block`` on (``lengths``: the
        token counts of those rows) against the record."""
        stored = self.arrays.get(array_name)
        if stored is None:
            raise damaged(path, entry, f"no checksum recorded for {array_name!r}")
        R = self.block_rows
        offsets = np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))])
        for b in range(max(1, -(-len(lengths) // R))):
            k = first_block + b
            lo, hi = offsets[min(b * R, len(lengths))], offsets[min((b + 1) * R, len(lengths))]
            if k >= len(stored) or digest(ragged_bytes(data[lo:hi], dtype)) != stored[k]:
                raise damaged(path, entry, f"the tokens of rows {k * R}-{k * R + min(R, len(lengths) - b * R) - 1} "
                                           f"of {array_name!r} do not match their checksum (a lost Zarr chunk file, "
                                           "a changed byte, or a truncated file)")

    def check_value(self, name: str, value: str, path, entry: str) -> None:
        """Check a single-digest item (``ids``, ``content``, ``attrs``) against its stored digest."""
        stored = self.attrs if name == "attrs" else (self.arrays.get(name) or [None])[0]
        if stored != value:
            raise damaged(path, entry, f"its {name} do not match their checksum")
