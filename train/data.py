"""Reading the cached features of every modality, joining them by sample id, and moving
them to the training device once.

Shapes: each modality ``m`` of a split keeps *all* rows of its cache entry as a float32 tensor
``features[m]`` (n_m, d_m) on the training device (standardised with train-split statistics),
and ``pairs`` (n_pairs, M) says which row of each modality forms pair ``p``:

* two modalities (image, text): one pair per caption row, ``join_pairs`` style. With the
  ``all`` caption policy an image appears in five pairs (once per caption).
* more than two modalities: one pair per image (``join_rows``; caption entries contribute
  their first caption).

Training batches index these device tensors with a device permutation: no disk reads and no
host-to-device copies per step.

When ``train.max_rows_in_memory`` is > 0 and the train split has more pairs than that, the train
split is a ``train.stream.StreamSplit`` instead: its features are read from the cache in
windows during training (see that module). Val and test stay in memory (they are small:
about 1,000 images each for Flickr30k and COCO's Karpathy split).

``train.subset`` (a file of pair ids: ``train.subset``) and ``train.train_fraction`` < 1 (a
seeded, nested subset of those pairs, by image id; ``train.fraction``) cut the train pairs
before anything else, so the statistics, the baselines and streaming all see only the kept pairs.

Standardisation statistics (per-column mean and std over the distinct rows each modality
contributes to the train pairs) are accumulated exactly in float64 over blocks of
``train.stream_block`` entry rows, in both paths alike, so both give the same numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np
import torch

from pipeline.cache import (AmbiguousDatasetError, CacheError, DamagedEntryError, Entry, OldFormatError,
                            OtherDatasetError, find_entry)
from pipeline.config import PipelineConfig
from pipeline.join import join_pairs, join_rows
from pipeline.languages import ENTRY_MARK, entry_name
from pipeline.runs import check_aligned, modality_entries, source_of
from train.errors import TrainError
from train.fraction import ids_digest, subset_train
from train.stream import (RunningMoments, StreamSplit, check_finite_rows, plan_stream, read_rows,
                          used_row_blocks)
from train.subset import Subset, read_subset
from train.tokens import token_views

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")  # train: fit; val: choose the epoch; test: final numbers
STD_FLOOR = 1e-6  # feature std below this is treated as constant (divided by 1 instead)
MIN_TRAIN_IMAGES = 2  # fewest distinct train images fit-adapters trains on (a positive needs a negative)


def open_entry_for(cfg: PipelineConfig, split: str, entry: str) -> Entry:
    """The cache entry of one split, with an error naming the split and the command to run. Under
    a ``data.language`` other than the default, a text encoder's entry is its ``<entry>.lang-<code>``
    (``pipeline.languages``): an error when only the default language's captions are cached."""
    plain_name = ENTRY_MARK not in entry and "@" not in entry  # not already a language or aligned entry
    name = entry_name(entry, cfg.data.language, cfg.data.default_language) if plain_name else entry
    if name == entry:
        return _open_entry(cfg, split, entry)
    try:
        return _open_entry(cfg, split, name)
    except TrainError:
        plain = _open_entry(cfg, split, entry)
        if (plain.key.get("encoder") or {}).get("modality") == "image":
            return plain
        raise TrainError(f"data.language = {cfg.data.language!r}, but split {split!r} has only the default "
                         f"language's captions of {entry!r}. Extract them: extract --encoder {entry} --split "
                         f"{split} --set data.language={cfg.data.language}.") from None


def _open_entry(cfg: PipelineConfig, split: str, entry: str) -> Entry:
    try:
        e = find_entry(cfg.data.cache, cfg.data.dataset, split, entry, cfg.data.data_dir)
    except (AmbiguousDatasetError, DamagedEntryError, OldFormatError, OtherDatasetError):
        raise  # their message already says what to do
    except CacheError as exc:
        raise TrainError(
            f"fit-adapters needs entry {entry!r} for the {split!r} split of dataset "
            f"{cfg.data.dataset!r} in cache {cfg.data.cache!r}. Run `extract --cache {cfg.data.cache} "
            f"--encoder {source_of(entry)[0]} --split {split}` first. ({exc})") from None
    check_aligned(cfg.data.cache, [e])  # an aligned entry as a source: its run must have written it
    made_for = e.key.get("captions") if isinstance(e.key, dict) else None
    if made_for is not None and made_for != cfg.data.captions:  # the run would record a policy it did not use
        raise TrainError(f"Text entry {entry!r} of split {split!r} was extracted with data.captions = {made_for!r}, "
                         f"but this run asks for {cfg.data.captions!r}. Re-extract it (`extract --encoder "
                         f"{source_of(entry)[0]} --captions {cfg.data.captions} --force`) or train with "
                         f"--set data.captions={made_for}.")
    if e.n == 0:
        raise TrainError(f"Cache entry {entry!r} of split {split!r} ({e.path}) is empty (0 rows); "
                         f"re-extract it (`extract --encoder {source_of(entry)[0]} --split {split} --force`).")
    return e


def read_features(entry: Entry, layer: int | None = None) -> np.ndarray:
    """(n, d) float32 features of an entry (or its stored hidden layer ``layer``); NaN/inf is an
    error naming the first bad row id."""
    x = entry.features(layer)
    check_finite_rows(entry, x)
    return x


def entry_dim(entry: Entry, layer: int | None = None) -> int:
    """Feature dimension of an entry's ``features`` or of its hidden layer ``layer``."""
    return entry.dim if layer is None else int(entry.features(layer, slice(0, 1)).shape[1])



@dataclass(frozen=True)
class Retrieval:
    """Rows of the retrieval protocol for one pair of modalities (a, b).

    rows_a: (n_a,) entry rows of modality a (one per image); rows_b: (n_b,) entry rows of
    modality b (one per caption); b_to_a: (n_b,) index into ``rows_a`` of each caption's image.
    """

    rows_a: torch.Tensor
    rows_b: torch.Tensor
    b_to_a: torch.Tensor


@dataclass
class SplitData:
    """One split on the training device.

    features: modality -> (n_m, d_m) float32, standardised, every row of the source entry.
    pairs: (n_pairs, M) long, the entry row of each modality (column order = ``modalities``).
    retrieval: (modality a, modality b) -> Retrieval rows for every pair of modalities.
    entries: modality -> source cache Entry.
    """

    name: str
    modalities: list[str]
    features: dict[str, torch.Tensor]
    pairs: torch.Tensor
    retrieval: dict[tuple[str, str], Retrieval]
    entries: dict[str, Entry]

    @property
    def n_pairs(self) -> int:
        return int(self.pairs.shape[0])

    @property
    def device(self) -> torch.device:
        return self.pairs.device

    def windows(self):
        """The trainer's view of an epoch: one window holding every pair, (n_pairs, M) rows
        into ``features`` (the streaming split yields several)."""
        yield self.pairs

    def close(self) -> None:
        """Nothing to release (the streaming split stops its reader here)."""


@dataclass
class Stats:
    """Per-modality standardisation from the train split: x' = (x - mean) / std.

    mean, std: modality -> (d_m,) float32 numpy arrays (mean 0, std 1 when disabled).
    """

    mean: dict[str, np.ndarray]
    std: dict[str, np.ndarray]

    def apply(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """(n, d_m) -> (n, d_m) standardised, on x's device."""
        mean = torch.as_tensor(self.mean[modality], device=x.device)
        std = torch.as_tensor(self.std[modality], device=x.device)
        return (x - mean) / std


@dataclass
class TrainData:
    """Every split plus the train-split statistics. dims: modality -> input dimension;
    layers: modality -> the stored hidden layer read (None = the entry's features)."""

    splits: dict[str, SplitData]
    stats: Stats
    dims: dict[str, int]
    layers: dict[str, int | None] = field(default_factory=dict)
    train_pairs_total: int = 0  # train pairs before train.train_fraction was applied
    train_images: dict = field(default_factory=dict)  # {"n", "sha256"} of the kept train image ids (ids_digest)
    subset: Subset | None = None  # the train.subset file read (None: no subset)

    @property
    def modalities(self) -> list[str]:
        return list(self.dims)

    @property
    def streaming(self) -> bool:
        """True when the train split is streamed from the cache."""
        return isinstance(self.splits.get("train"), StreamSplit)

    def close(self) -> None:
        """Stop background readers (streaming)."""
        for sd in self.splits.values():
            sd.close()


def _join(entries: Mapping[str, Entry]) -> tuple[np.ndarray, dict[tuple[str, str], tuple]]:
    """(n_pairs, M) entry rows per pair, and retrieval rows (numpy) per modality pair."""
    mods = list(entries)
    if len(mods) == 2:
        p = join_pairs(entries[mods[0]], entries[mods[1]])
        pairs = np.stack([p.image_rows[p.text_to_image], p.text_rows], axis=1)
        return pairs, {(mods[0], mods[1]): (p.image_rows, p.text_rows, p.text_to_image)}
    _, rows = join_rows([entries[m] for m in mods])
    pairs = np.stack(rows, axis=1)
    n = len(pairs)
    retrieval = {(a, b): (rows[i], rows[j], np.arange(n))
                 for i, a in enumerate(mods) for j, b in enumerate(mods) if i < j}
    return pairs, retrieval


def _stats(blocks: Mapping[str, Iterable[np.ndarray]], dims: Mapping[str, int], standardize: bool,
           entries: Mapping[str, Entry]) -> Stats:
    """Per-modality statistics from blocks of train rows (``used_row_blocks``): exact float64
    mean and population std; a std below ``STD_FLOOR`` becomes 1. Disabled: mean 0, std 1.
    A modality whose every column is constant over the train rows is an error (nothing to align:
    e.g. identical captions, or captions made identical by the tokenizer's truncation)."""
    mean, std = {}, {}
    for m, d in dims.items():
        if standardize:
            acc = RunningMoments(d)
            for x in blocks[m]:
                acc.add(x)
            if acc.n and (acc.std < STD_FLOOR).all():
                raise TrainError(
                    f"Every train row of {entries[m].name!r} ({m}) has the same features ({acc.n} rows, std < "
                    f"{STD_FLOOR:g} in every column): there is nothing to align. Check that its inputs differ "
                    f"(identical captions, or captions cut to the same text by the tokenizer's length limit: "
                    f"the extract log warns about those).")
            mu, sd = acc.mean, np.where(acc.std < STD_FLOOR, 1.0, acc.std)
        else:
            mu, sd = np.zeros(d), np.ones(d)
        mean[m], std[m] = mu.astype(np.float32), sd.astype(np.float32)
    return Stats(mean, std)


def _used_mask(n: int, rows: np.ndarray) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[rows] = True
    return mask


def _check_dims(split: str, entries: Mapping[str, Entry], dims: Mapping[str, int],
                layers: Mapping[str, int | None]) -> None:
    for m, e in entries.items():
        if entry_dim(e, layers[m]) != dims[m]:
            raise TrainError(f"Entry {e.name!r} has {entry_dim(e, layers[m])}-d features in split {split!r} but "
                             f"{dims[m]}-d in 'train'; the splits were extracted with different encoders. "
                             f"Re-extract with --force.")


def load_data(cfg: PipelineConfig, device: torch.device, *, splits: tuple[str, ...] = SPLITS,
              stream: bool | None = None, layers: Mapping[str, int | None] | None = None) -> TrainData:
    """Open, check, join and standardise ``splits`` (must include train); features end up on
    ``device``, except a streamed train split (read during training).

    stream: None = stream the train split when ``train.max_rows_in_memory`` > 0 and the split
    has more pairs than that; True/False forces it (True needs max_rows_in_memory > 0).
    layers: modality -> stored hidden layer to read instead of the entry's features (None or
    absent = features); see ``train.layers``. Not with a streamed train split.
    """
    tc = cfg.train
    names = modality_entries(tc)
    layers = {m: (layers or {}).get(m) for m in names}
    entries = {s: {m: open_entry_for(cfg, s, e) for m, e in names.items()} for s in splits}
    if tc.adapter == "token":  # token rows, padded (train.tokens); not standardised
        entries = token_views(entries)
    joined = {s: _join(entries[s]) for s in splits}
    total = len(joined["train"][0])
    first, last = next(iter(names)), list(names)[-1]
    subset = load_subset(cfg)
    joined["train"] = subset_train(entries["train"][first], joined["train"], tc.train_fraction, tc.seed, subset,
                                   entries["train"][last], f"the train split of {cfg.data.dataset!r} ({cfg.data.cache})")
    if tc.train_fraction != 1.0 or subset is not None:
        log.info("train.subset = %r, train.train_fraction = %g: %d of %d train pairs", tc.subset, tc.train_fraction,
                 len(joined["train"][0]), total)
    dims = {m: entry_dim(e, layers[m]) for m, e in entries["train"].items()}
    for s in splits:
        _check_dims(s, entries[s], dims, layers)
    train_pairs = joined["train"][0]
    train_images = ids_digest(np.asarray(entries["train"][first].ids)[train_pairs[:, 0]])
    if train_images["n"] < MIN_TRAIN_IMAGES:
        cuts = ([f"train.subset = {tc.subset!r}"] if subset is not None else []) + (
            [f"train.train_fraction = {tc.train_fraction:g}"] if tc.train_fraction != 1.0 else [])
        kept = (f"{' and '.join(cuts)} keep{'s' if len(cuts) == 1 else ''} {train_images['n']} train image(s) "
                f"({len(train_pairs)} of {total} pairs)" if cuts else f"the train split has {train_images['n']} image(s)")
        raise TrainError(f"{kept}; training (InfoNCE needs negatives) and the closed-form baselines need at least "
                         f"{MIN_TRAIN_IMAGES} train images. Raise train.train_fraction, use a larger subset or add "
                         f"train data.")
    if stream is None:
        stream = 0 < tc.max_rows_in_memory < len(train_pairs)
    if stream and tc.max_rows_in_memory <= 0:
        raise TrainError("Streaming the train split needs train.max_rows_in_memory > 0 (pairs held at once): "
                         "pass --max-rows-in-memory PAIRS (or --set train.max_rows_in_memory=PAIRS).")
    if stream and any(v is not None for v in layers.values()):
        raise TrainError("A streamed train split reads the entries' last-layer features only; set "
                         "train.image_layer/text_layer = \"last\" or raise train.max_rows_in_memory.")
    used = {m: _used_mask(entries["train"][m].n, train_pairs[:, j]) for j, m in enumerate(names)}
    raw = {s: None if (s == "train" and stream) else {m: read_features(e, layers[m]) for m, e in entries[s].items()}
           for s in splits}

    def train_blocks(m: str) -> Iterable[np.ndarray]:  # lazy: nothing is read unless standardising
        e = entries["train"][m]
        read = (lambda lo, hi: read_rows(e, lo, hi)) if stream else (lambda lo, hi: raw["train"][m][lo:hi])
        return used_row_blocks(read, e.n, used[m], max(1, tc.stream_block))

    stats = _stats({m: train_blocks(m) for m in names}, dims, tc.standardize and tc.adapter != "token",
                   entries["train"])
    out = {}
    for s in splits:
        pairs, retrieval = joined[s]
        if s == "train" and stream:
            ret = {k: Retrieval(*(torch.as_tensor(np.asarray(r), dtype=torch.long) for r in v))
                   for k, v in retrieval.items()}
            plan = plan_stream(tc, len(pairs))
            log.info("streaming the train split: %d pairs, windows of %d pairs in blocks of %d (cap %d)",
                     len(pairs), plan.window_pairs, plan.block, plan.cap)
            out[s] = StreamSplit(s, list(names), entries[s], pairs, ret, stats, device, plan, tc.seed)
            continue
        feats = {m: stats.apply(m, torch.from_numpy(x).to(device)) for m, x in raw[s].items()}
        ret = {k: Retrieval(*(torch.as_tensor(np.asarray(r), dtype=torch.long, device=device) for r in v))
               for k, v in retrieval.items()}
        out[s] = SplitData(s, list(names), feats, torch.as_tensor(pairs, dtype=torch.long, device=device),
                           ret, entries[s])
        raw[s] = None
    return TrainData(out, stats, dims, layers, total, train_images, subset)


def load_subset(cfg: PipelineConfig) -> Subset | None:
    """The ``train.subset`` file, checked against the config's dataset (None when unset)."""
    if not cfg.train.subset:
        return None
    subset = read_subset(cfg.train.subset)
    subset.check_dataset(cfg.data.dataset)
    return subset
