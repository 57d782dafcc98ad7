"""Training on a train split larger than memory: the features are streamed from the cache.

Used when ``train.max_rows_in_memory`` (C) is > 0 and the train split has more than C pairs
(see ``train.data.load_data``). What is held in memory:

* always (O(n) integers and strings, not features): every entry's ids (``Entry.ids``) and the
  pair index ``pairs`` (n_pairs, M) int64, the join of the entries by sample id, computed once
  from the ids (``pipeline.join``);
* features: a static training buffer of W = C / 2 pairs per modality (on the training device)
  and at most one more window of W pairs being read in a background thread (host memory), so
  at most C pairs' features at once, plus one read block of ``stream_block`` rows while reading.

An epoch: the pair list is cut into blocks of ``block`` consecutive pairs (a multiple of the
batch size; with the join order, consecutive pairs are consecutive caption rows, and their
images consecutive image rows when both entries are sorted by id, as ``extract`` writes them).
The block order is shuffled (a generator seeded by ``train.seed``, independent of the
training generator), consecutive shuffled blocks form windows of W pairs, and each window is
read with its rows looked up through the pair index: for every modality the window's distinct
entry rows (an image with five captions in the window is read once) are read in contiguous
runs of at most ``block`` rows, standardised with the train statistics, and the pairs
re-indexed into the window. The trainer copies the window into its static buffer, shuffles the
window's pairs and runs its usual steps; meanwhile the next window (also across the epoch
boundary) is read. Steps per epoch equal the in-memory run's, n_pairs // batch, because every
block but the split's last holds a multiple of the batch.

``StreamSplit.held`` counts the feature rows alive at any moment (weak-reference finalisers
on every window array); ``close`` logs the peak against the cap, and tests check the bound.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

import numpy as np
import torch

from pipeline.cache import Entry
from pipeline.config import TrainConfig
from pipeline.runtime import finite_rows
from train.errors import TrainError

log = logging.getLogger(__name__)

END = object()  # marks the end of an epoch in the window sequence


# --------------------------------------------------------------------------------- reading
def read_rows(entry: Entry, lo: int, hi: int) -> np.ndarray:
    """(hi - lo, d) float32 features of entry rows [lo, hi), the only disk read of the stream
    (tests wrap it to count rows). NaN/inf is an error naming the first bad row id."""
    x = entry.features(rows=slice(lo, hi))
    check_finite_rows(entry, x, lo)
    return x


def check_finite_rows(entry: Entry, x: np.ndarray, start: int = 0) -> None:
    """Error naming the first sample id of ``entry`` whose features hold NaN or inf; x holds the
    entry's rows ``start``, ``start + 1``, ..."""
    finite = finite_rows(x)
    if not finite.all():
        bad = start + int(np.flatnonzero(~finite)[0])
        raise TrainError(
            f"Cache entry {entry.name!r} ({entry.path}) has non-finite features (NaN or inf) in "
            f"{int((~finite).sum())} rows; first row id {entry.ids[bad]!r}. Re-extract it with "
            f"--force (and --precision fp32).")


def gather_rows(entry: Entry, rows: np.ndarray, block: int, out: np.ndarray) -> None:
    """out[i] = features of entry row rows[i], for sorted distinct ``rows`` (u,), out (u, d).

    Reads contiguous runs of at most ``block`` rows: a run starts at the next needed row and
    covers the needed rows below start + block, so scattered rows cost more reads, never more
    memory.
    """
    i, n = 0, len(rows)
    while i < n:
        lo = int(rows[i])
        j = int(np.searchsorted(rows, lo + block, side="left"))
        piece = read_rows(entry, lo, int(rows[j - 1]) + 1)
        out[i:j] = piece[rows[i:j] - lo]
        i = j


class RunningMoments:
    """Exact per-column mean and (population) std over row blocks, in float64.

    Blocks are merged with Chan et al.'s pairwise update of (count, mean, sum of squared
    deviations), which avoids the cancellation of sum(x^2) - n mean^2.
    """

    def __init__(self, dim: int):
        self.n = 0
        self.mean = np.zeros(dim, dtype=np.float64)
        self.m2 = np.zeros(dim, dtype=np.float64)

    def add(self, x: np.ndarray) -> None:
        """Add a block of rows x (k, dim)."""
        k = len(x)
        if k == 0:
            return
        x = np.asarray(x, dtype=np.float64)
        mean_b = x.mean(axis=0)
        m2_b = ((x - mean_b) ** 2).sum(axis=0)
        n = self.n + k
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (k / n)
        self.m2 = self.m2 + m2_b + delta ** 2 * (self.n * k / n)
        self.n = n

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.n, 1))


def used_row_blocks(read, n: int, used: np.ndarray, block: int) -> Iterator[np.ndarray]:
    """Blocks of the rows an entry contributes to the train pairs.

    read(lo, hi) -> (hi - lo, d) rows; used: (n,) bool mask. Yields (k, d) arrays, entry rows
    [lo, lo + block) filtered by ``used``. The in-memory and streaming paths both feed these
    blocks to ``RunningMoments``, so their statistics are bit-identical.
    """
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        yield read(lo, hi)[used[lo:hi]]


# --------------------------------------------------------------------------------- accounting
class HeldRows:
    """Thread-safe count of feature rows alive per modality, with the peak of the largest."""

    def __init__(self):
        self._lock = threading.RLock()
        self.rows: dict[str, int] = {}
        self.peak = 0

    def add(self, modality: str, n: int) -> None:
        with self._lock:
            self.rows[modality] = self.rows.get(modality, 0) + n
            self.peak = max(self.peak, self.rows[modality])

    def track(self, modality: str, array: np.ndarray) -> np.ndarray:
        """Count ``array``'s rows until it is garbage-collected."""
        self.add(modality, len(array))
        weakref.finalize(array, self.add, modality, -len(array))
        return array

    @property
    def now(self) -> int:
        with self._lock:
            return max(self.rows.values(), default=0)


# --------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class StreamPlan:
    """block: pairs per block (a multiple of the batch); window: blocks per window;
    cap: ``train.max_rows_in_memory``."""

    block: int
    window: int
    cap: int

    @property
    def window_pairs(self) -> int:
        """Most pairs in one window (the size of the training buffer)."""
        return self.block * self.window


def plan_stream(tc: TrainConfig, n_pairs: int) -> StreamPlan:
    """Block and window sizes for ``tc`` (see the module docstring); errors when the cap cannot
    hold two windows of one batch."""
    cap, batch = tc.max_rows_in_memory, min(tc.batch_size, n_pairs)
    if cap < 2 * batch:
        raise TrainError(
            f"train.max_rows_in_memory = {cap} is too small for streaming: it must hold two windows (the one "
            f"training and the one being read) of at least one batch, i.e. >= 2 x batch_size = {2 * batch}. "
            f"Raise it (e.g. --set train.max_rows_in_memory={max(2 * batch, 100_000)}) or set it to 0 to load "
            f"everything.")
    if tc.stream_block < 1:
        raise TrainError(f"train.stream_block = {tc.stream_block} must be >= 1 (pairs per cache read).")
    half = cap // 2
    block = math.ceil(tc.stream_block / batch) * batch
    if block > half:
        block = half // batch * batch
    return StreamPlan(block=block, window=half // block, cap=cap)


# --------------------------------------------------------------------------------- the split
@dataclass
class _Window:
    """One window on the host: features modality -> (u_m, d_m) standardised float32 (distinct
    rows), pairs (k, M) int64 rows into them."""

    features: dict[str, np.ndarray]
    pairs: np.ndarray


class StreamSplit:
    """The train split, streamed. Same reading interface as ``train.data.SplitData`` for the
    trainer (``modalities``, ``n_pairs``, ``device``, ``features``, ``windows()``), the
    baselines (``iter_pairs``) and the aligned entries (``iter_rows``).

    pairs: (n_pairs, M) int64 entry rows of each pair (host); retrieval: as SplitData's (host
    tensors); stats: the train statistics; features: modality -> static (W, d_m) training
    buffer on ``device``, filled by ``windows()``.
    """

    def __init__(self, name: str, modalities: list[str], entries: Mapping[str, Entry], pairs: np.ndarray,
                 retrieval: dict, stats, device: torch.device, plan: StreamPlan, seed: int):
        self.name, self.modalities, self.entries = name, list(modalities), dict(entries)
        self.pairs, self.retrieval, self.stats, self.device, self.plan = pairs, retrieval, stats, device, plan
        self.held = HeldRows()
        self._order_rng = np.random.default_rng([seed, 0x5EED])  # block order only (not the training gen)
        self._features: dict[str, torch.Tensor] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._next: Future | None = None
        self._sequence: Iterator | None = None

    @property
    def n_pairs(self) -> int:
        return int(self.pairs.shape[0])

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.n_pairs / self.plan.block)

    @property
    def features(self) -> dict[str, torch.Tensor]:
        """modality -> (W, d_m) static buffer on the training device (zeros until a window)."""
        if self._features is None:
            w = min(self.plan.window_pairs, self.n_pairs)
            self._features = {m: torch.zeros((w, e.dim), device=self.device) for m, e in self.entries.items()}
            for m in self.modalities:
                self.held.add(m, w)
        return self._features

    # -- reading windows ------------------------------------------------------------------
    def _window_sequence(self) -> Iterator:
        """Pair-index arrays of the windows of every epoch, forever; END after each epoch."""
        b = self.plan.block
        while True:
            order = self._order_rng.permutation(self.n_blocks)
            for s in range(0, len(order), self.plan.window):
                yield np.concatenate([np.arange(k * b, min((k + 1) * b, self.n_pairs))
                                      for k in order[s:s + self.plan.window]])
            yield END

    def read_window(self, idx: np.ndarray) -> _Window:
        """The window of pairs ``idx`` (k,): distinct rows per modality, standardised."""
        pairs = self.pairs[idx]
        local = np.empty_like(pairs)
        feats = {}
        for j, m in enumerate(self.modalities):
            rows, local[:, j] = np.unique(pairs[:, j], return_inverse=True)
            x = self.held.track(m, np.empty((len(rows), self.entries[m].dim), dtype=np.float32))
            gather_rows(self.entries[m], rows, self.plan.block, x)
            self._standardise(m, x)
            feats[m] = x
        return _Window(feats, local)

    def _standardise(self, modality: str, x: np.ndarray) -> None:
        """In place, the float32 operations of ``Stats.apply``, (x - mean) / std, each correctly
        rounded, so the result is bit-identical. numpy, not torch: this runs in the reader
        thread, where a torch op would start a second OpenMP thread pool that competes with
        the training steps for the cores (slower steps, measured: README "Large caches and several GPUs")."""
        np.subtract(x, self.stats.mean[modality], out=x)
        np.divide(x, self.stats.std[modality], out=x)

    def _read_next(self):
        item = next(self._sequence)
        return item if item is END else self.read_window(item)

    def _submit(self) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"stream-{self.name}")
            self._sequence = self._window_sequence()
        self._next = self._pool.submit(self._read_next)

    def windows(self) -> Iterator[torch.Tensor]:
        """One epoch: yields (k, M) long tensors on the device, rows into ``features``, which hold
        that window until the next one is requested. The next window is read meanwhile."""
        buffers = self.features
        if self._next is None:
            self._submit()
        while True:
            item = self._next.result()
            self._next = None
            if item is END:
                self._submit()  # read the next epoch's first window during evaluation
                return
            for m, x in item.features.items():
                buffers[m][:len(x)].copy_(torch.from_numpy(x))
            pairs = torch.from_numpy(item.pairs).to(self.device)
            del item, x  # the host window is released before the next read starts
            self._submit()
            yield pairs

    def close(self) -> None:
        """Stop the background reader (waits for a read in flight) and free the training
        buffers; a later ``windows()`` starts again (with new buffers)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            log.info("streamed %s: at most %d feature rows held per modality (cap %d)", self.name,
                     self.held.peak, self.plan.cap)
        self._pool = self._next = self._sequence = None
        if self._features is not None:
            for m, buf in self._features.items():
                self.held.add(m, -buf.shape[0])
            self._features = None

    # -- sequential passes (baselines, aligned entries) -----------------------------------------
    def iter_pairs(self, modalities: Iterable[str]) -> Iterator[tuple[torch.Tensor, ...]]:
        """Standardised features of the pairs in order, one block at a time: per block a tuple
        of (k, d_m) tensors on the device, one per modality in ``modalities``."""
        cols = [self.modalities.index(m) for m in modalities]
        for s in range(0, self.n_pairs, self.plan.block):
            win = self.read_window(np.arange(s, min(s + self.plan.block, self.n_pairs)))
            yield tuple(torch.from_numpy(win.features[self.modalities[j]][win.pairs[:, j]]).to(self.device)
                        for j in cols)

    def iter_rows(self, modality: str) -> Iterator[tuple[int, torch.Tensor]]:
        """Every row of a modality's entry, standardised: (start, (k, d) tensor on the device)."""
        entry = self.entries[modality]
        for lo in range(0, entry.n, self.plan.block):
            x = self.held.track(modality, read_rows(entry, lo, min(lo + self.plan.block, entry.n)))
            self._standardise(modality, x)
            yield lo, torch.from_numpy(x).to(self.device)
