"""``train.train_fraction``: a seeded, nested subset of the train pairs.

The unit is the sample (image) id, so every caption of a kept image stays and no image is
split between kept and dropped pairs. With n distinct image ids among the train pairs, sorted,
a permutation seeded by ``train.seed`` orders them and the first ``round(f * n)`` are kept:

    kept(f, seed) = sorted_ids[permutation(seed)[:round(f * n)]]

so for one seed the 25% subset lies inside the 50% subset, which lies inside 100%. The
permutation depends only on the ids and the seed (not on row order), and it comes from its own
generator, so the subset does not shift the training generator's draws.

fit-adapters (``subset_train``) and the evaluation of a run (``subset_pairs``: ``analyze
zeroshot``, ``analyze matching``, whose baselines, ASIF anchors and local-CKA base are the run's
train pairs) cut the split with the same ``pair_mask``; ``ids_digest`` of the kept image ids is
recorded in adapters.json (``train_images``) and checked when a run is evaluated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import numpy as np

from pipeline.integrity import strings_digest
from pipeline.join import Pairs, image_id
from train.errors import TrainError

if TYPE_CHECKING:
    from pipeline.cache import Entry

SUBSET_STREAM = 0x7F4A  # mixed into the seed: the subset's generator is independent of training's


def kept_ids(ids, fraction: float, seed: int) -> np.ndarray:
    """The kept image ids (sorted) of the distinct ``ids`` for ``fraction`` in (0, 1] and ``seed``."""
    if not 0.0 < fraction <= 1.0:
        raise TrainError(f"train.train_fraction = {fraction!r} must be in (0, 1].")
    distinct = np.unique(np.asarray([image_id(str(i)) for i in ids], dtype=object).astype(str))
    keep = int(round(fraction * len(distinct)))
    if keep < 1:
        raise TrainError(f"train.train_fraction = {fraction:g} of {len(distinct)} train images keeps none; "
                         f"raise it to at least {1 / max(1, len(distinct)):.3g}.")
    order = np.random.default_rng([int(seed), SUBSET_STREAM]).permutation(len(distinct))
    return np.sort(distinct[order[:keep]])


def pair_mask(pair_ids, fraction: float, seed: int) -> np.ndarray:
    """(n_pairs,) bool: True for the pairs whose image id (of ``pair_ids``, one per pair, the
    first modality's row id) is kept. All True for fraction 1."""
    base = np.asarray([image_id(str(i)) for i in pair_ids], dtype=object).astype(str)
    if fraction == 1.0:
        return np.ones(len(base), dtype=bool)
    return np.isin(base, kept_ids(base, fraction, seed))


def subset_split(pairs: np.ndarray, retrieval: Mapping[tuple[str, str], tuple], mask: np.ndarray
                 ) -> tuple[np.ndarray, dict[tuple[str, str], tuple]]:
    """Keep the pairs where ``mask`` is True, in their order.

    pairs: (n_pairs, M) entry rows; retrieval: (a, b) -> (rows_a (n_a,), rows_b (n_b,), b_to_a
    (n_b,)) where, as ``train.data`` builds them, row p of modality b belongs to pair p
    (n_b = n_pairs). Returns the kept pairs and the retrieval rows restricted to them
    (modality a keeps the rows its kept b rows point to; b_to_a re-indexed)."""
    out = {}
    for key, (rows_a, rows_b, b_to_a) in retrieval.items():
        rows_a, rows_b, b_to_a = (np.asarray(x) for x in (rows_a, rows_b, b_to_a))
        if len(rows_b) != len(mask):
            raise TrainError(f"internal: retrieval rows of {key} ({len(rows_b)}) do not match the pairs ({len(mask)}).")
        used = np.unique(b_to_a[mask])
        out[key] = (rows_a[used], rows_b[mask], np.searchsorted(used, b_to_a[mask]))
    return pairs[mask], out


def subset_train(first: "Entry", joined: tuple[np.ndarray, dict], fraction: float, seed: int
                 ) -> tuple[np.ndarray, dict]:
    """``train.data``'s joined train split (pairs, retrieval) cut to ``fraction``; ``first`` is
    the cache entry of the first modality (its row ids name the pairs' images)."""
    pairs, retrieval = joined
    if fraction == 1.0:
        return pairs, retrieval
    mask = pair_mask(np.asarray(first.ids)[pairs[:, 0]], fraction, seed)
    return subset_split(pairs, retrieval, mask)


def subset_pairs(image: "Entry", pairs: Pairs, fraction: float, seed: int) -> Pairs:
    """The train pairs (``pipeline.join.join_pairs`` of ``image`` and a caption entry) that a run
    with ``train_fraction`` = fraction and ``seed`` trained on: ``subset_train``'s rule."""
    if fraction == 1.0:
        return pairs
    mask = pair_mask(np.asarray(image.ids)[pairs.image_rows[pairs.text_to_image]], fraction, seed)
    retrieval = {("image", "text"): (pairs.image_rows, pairs.text_rows, pairs.text_to_image)}
    _, cut = subset_split(np.zeros((len(mask), 0)), retrieval, mask)
    return Pairs(*(np.asarray(x, dtype=np.int64) for x in cut[("image", "text")]))


def ids_digest(pair_ids) -> dict:
    """{"n", "sha256"}: the distinct image ids of the train pairs (``pair_ids``, one per pair) and
    the digest of their sorted list, recorded by fit-adapters to recognise the same train pairs."""
    distinct = sorted({image_id(str(i)) for i in pair_ids})
    return {"n": len(distinct), "sha256": strings_digest(distinct)}
