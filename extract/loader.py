"""The input side of extraction: a DataLoader over one split's rows, batched by cache chunk.

Images are decoded ONCE per row in the DataLoader workers and turned into uint8 pixels for every
distinct preprocessing the image encoders ask for (normalisation happens later, on the model's
device); captions are tokenized in the workers, once per text encoder. Batches never straddle a
cache chunk, so a resumed run batches every row exactly as an uninterrupted one.

An unreadable image does not raise inside a worker (DataLoader would re-raise it as a bare
``RuntimeError`` with the worker's traceback): the worker returns a marker, and :func:`batches`
applies the on-error policy in the main process, raising the dataset's ``ImageError`` or
recording the skip, the same with 0 workers or many.

GPU decoding (``extract.gpu_decode``): with a ``read_encoded`` hook the workers leave the images
it accepts (plain JPEGs) undecoded and send their bytes (:class:`EncodedImage`, packed per batch
into one uint8 tensor, :class:`Encoded`); every other image goes the CPU way above. The main
process finishes such batches with the ``prepare`` hook of :func:`batches` before the on-error
policy is applied, so fallbacks raise and skip exactly as the CPU path does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from extract import datasets as D
from pipeline.runtime import cpu_count, default_workers

PREFETCH_BATCHES = 4  # batches each worker prepares ahead
SKIP_HINT = "use --on-error skip to leave such images out, logged and recorded in the cache"


@dataclass(frozen=True)
class Unreadable:
    """What a worker sends back instead of an image it cannot decode (plain fields: picklable)."""

    sample_id: str
    path: str
    reason: str

    def error(self, hint: str = "") -> D.ImageError:
        return D.ImageError(self.sample_id, self.path, f"{self.reason} ({hint})" if hint else self.reason)


@dataclass(frozen=True)
class EncodedImage:
    """What a worker sends for an image left for the main process to decode: the file's bytes and
    the EXIF orientation to apply after decoding (1 = as stored ... 8, the EXIF values)."""

    data: bytes
    orientation: int


@dataclass
class Encoded:
    """A batch's encoded images: their bytes end to end in ``data`` (1-D uint8, one shared-memory
    block per batch rather than one per image) and ``spans`` {row: (start, end, orientation)}."""

    data: torch.Tensor
    spans: dict[int, tuple[int, int, int]]

    @classmethod
    def pack(cls, items: Sequence[tuple[int, EncodedImage]]) -> "Encoded":
        spans, start = {}, 0
        for i, image in items:
            spans[i] = (start, start + len(image.data), image.orientation)
            start += len(image.data)
        return cls(torch.frombuffer(bytearray(b"".join(x.data for _, x in items)), dtype=torch.uint8), spans)

    def image(self, row: int) -> tuple[torch.Tensor, int]:
        """(1-D uint8 bytes of one image (a view), its orientation)."""
        start, end, orientation = self.spans[row]
        return self.data[start:end], orientation


class Rows(Dataset):
    """Row i of a split, for one modality: ``(i, {prep key: (3, h, w) uint8})`` for images (decoded
    once for every preprocessing), ``(i, caption)`` for texts, ``(i, Unreadable)`` for an image
    that cannot be decoded, ``(i, EncodedImage)`` for one that ``read_encoded(split, i)`` accepts
    (GPU decoding; it returns None for images the CPU path must decode)."""

    def __init__(self, split: D.Split, rows: Sequence, transforms: dict[str, Callable],
                 read_encoded: Callable | None = None):
        self.split, self.rows, self.transforms, self.read_encoded = split, rows, transforms, read_encoded

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        if not self.transforms:  # text
            return i, self.rows[i].text
        encoded = self.read_encoded(self.split, i) if self.read_encoded else None
        if encoded is not None:
            return i, encoded
        try:
            image = self.split.load_image(i)
        except D.ImageError as exc:
            return i, Unreadable(exc.sample_id, exc.path, exc.reason)
        return i, {key: t(image) for key, t in self.transforms.items()}


@dataclass
class Batch:
    """Collated rows: the row indices that have inputs, their inputs per key (a stacked
    (b, 3, h, w) uint8 tensor per preprocessing, or a tokenizer's output per text encoder),
    the rows that could not be read, and the rows left encoded for the main process (None
    when there are none; ``prepare`` in :func:`batches` turns them into inputs)."""

    rows: list[int]
    inputs: dict
    unreadable: dict[int, Unreadable]
    encoded: Encoded | None = None


class Collate:
    """Stack image tensors per preprocessing, or tokenize captions per text encoder."""

    def __init__(self, tokenizers: dict[str, Callable] | None = None):
        self.tokenizers = tokenizers or {}

    def __call__(self, items) -> Batch:
        if self.tokenizers:
            texts = [t for _, t in items]
            return Batch([i for i, _ in items], {name: tok(texts) for name, tok in self.tokenizers.items()}, {})
        bad = {i: x for i, x in items if isinstance(x, Unreadable)}
        encoded = [(i, x) for i, x in items if isinstance(x, EncodedImage)]
        good = [(i, x) for i, x in items if isinstance(x, dict)]
        inputs = {k: torch.stack([x[k] for _, x in good]) for k in good[0][1]} if good else {}
        return Batch([i for i, _ in good], inputs, bad, Encoded.pack(encoded) if encoded else None)


class ChunkBatches:
    """Batch sampler: batches of ``batch_size`` rows that never straddle a cache chunk."""

    def __init__(self, chunks: Sequence[range], batch_size: int):
        self.batches = [list(c[s:s + batch_size]) for c in chunks for s in range(0, len(c), batch_size)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _worker_init(_) -> None:
    torch.set_num_threads(1)


def loader_workers(configured: int, text_on_cpu: bool = False) -> int:
    """DataLoader workers per process: the configured number, or for -1 ``default_workers()``
    (min(8, cores - 1)); under torchrun min(8, cores / LOCAL_WORLD_SIZE - 1), the machine's cores
    shared by its ranks (e.g. 8 per rank on 96 cores and 8 GPUs, 1 on 16 cores). Text on a CPU
    model gets 0: tokenising is cheap, and a worker process would take cores from the model."""
    if configured >= 0:
        return configured
    if text_on_cpu:
        return 0
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(0, min(default_workers(), cpu_count() // local - 1))


def make_loader(split: D.Split, rows: Sequence, chunks: Sequence[range], batch_size: int, workers: int,
                device: torch.device, transforms: dict[str, Callable] | None = None,
                tokenizers: dict[str, Callable] | None = None, read_encoded: Callable | None = None) -> DataLoader:
    """A DataLoader of :class:`Batch` es over ``rows`` (a split's items or caption rows) restricted
    to the row ranges ``chunks``: images through ``transforms`` ({key: PIL -> uint8 tensor}), or
    captions through ``tokenizers`` ({key: list[str] -> inputs}); ``read_encoded`` (picklable)
    leaves the images it accepts encoded (see :class:`Rows`)."""
    return DataLoader(Rows(split, rows, transforms or {}, read_encoded), batch_sampler=ChunkBatches(chunks, batch_size),
                      collate_fn=Collate(tokenizers), num_workers=workers, pin_memory=device.type == "cuda",
                      worker_init_fn=_worker_init if workers else None, persistent_workers=False,
                      prefetch_factor=PREFETCH_BATCHES if workers else None)


def batches(loader: DataLoader, skip_unreadable: bool,
            prepare: Callable[[Batch], Batch] | None = None) -> Iterator[tuple[Batch, dict[int, str]]]:
    """The loader's batches with the on-error policy applied: ``(batch, {row index: skip reason})``.
    An unreadable image raises its ``ImageError`` (naming the option that skips it) unless
    ``skip_unreadable``; then it is skipped with the error's message as reason. ``prepare``
    (GPU decoding) first turns a batch's encoded images into inputs, adding its own unreadable rows."""
    for batch in loader:
        if prepare is not None:
            batch = prepare(batch)
        if batch.unreadable and not skip_unreadable:
            raise batch.unreadable[min(batch.unreadable)].error(SKIP_HINT)
        yield batch, {i: str(bad.error()) for i, bad in batch.unreadable.items()}
