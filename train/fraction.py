"""``train.train_fraction``: a seeded, nested subset of the train pairs.

The unit is the sample (image) id, so every caption of a kept image stays and no image is
split between kept and dropped pairs. With n distinct image ids among the train pairs, sorted,
a permutation seeded by ``train.seed`` orders them and the first ``round(f * n)`` are kept:

    kept(f, seed) = sorted_ids[permutation(seed)[:round(f * n)]]

so for one seed the 25% subset lies inside the 50% subset, which lies inside 100%. The
permutation depends only on the ids and the seed (not on row order), and it comes from its own
generator, so the subset does not shift the training generator's draws.

A ``train.subset`` file (``train.subset``) is applied first: the fraction is then taken of the
subset's images (``train_mask``).

fit-adapters (``subset_train``) and the evaluation of a run (``subset_pairs``: ``analyze
zeroshot``, ``analyze matching``, whose baselines, ASIF anchors and local-CKA base are the run's
train pairs) cut the split with the same ``train_mask``; ``ids_digest`` of the kept image ids is
recorded in adapters.json (``train_images``) and checked when a run is evaluated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import numpy as np

from pipeline.integrity import strings_digest
from pipeline.join import Pairs, image_id
from train.errors import TrainError
from train.subset import Subset

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


def train_mask(image_ids, row_ids, fraction: float, seed: int, subset: Subset | None = None,
               where: str = "the train split") -> np.ndarray:
    """(n_pairs,) bool: the run's train pairs. ``image_ids`` / ``row_ids``: one per pair (its
    image's id, its caption row's id). The pairs ``subset`` names (all when None), then
    ``fraction`` of their images (``pair_mask`` on the kept pairs)."""
    image_ids = np.asarray(image_ids, dtype=object)
    mask = (subset.mask(image_ids, row_ids, where) if subset is not None
            else np.ones(len(image_ids), dtype=bool))
    if fraction != 1.0:
        mask[mask] = pair_mask(image_ids[mask], fraction, seed)
    return mask


def subset_train(first: "Entry", joined: tuple[np.ndarray, dict], fraction: float, seed: int,
                 subset: Subset | None = None, rows: "Entry | None" = None, where: str = "the train split"
                 ) -> tuple[np.ndarray, dict]:
    """``train.data``'s joined train split (pairs, retrieval) cut to ``subset`` and ``fraction``;
    ``first`` is the cache entry of the first modality (its row ids name the pairs' images),
    ``rows`` the last one (its row ids name the pairs: the caption rows; default ``first``)."""
    pairs, retrieval = joined
    if fraction == 1.0 and subset is None:
        return pairs, retrieval
    image_ids = np.asarray(first.ids)[pairs[:, 0]]
    row_ids = image_ids if rows is None else np.asarray(rows.ids)[pairs[:, -1]]
    return subset_split(pairs, retrieval, train_mask(image_ids, row_ids, fraction, seed, subset, where))


def subset_pairs(image: "Entry", pairs: Pairs, fraction: float, seed: int, subset: Subset | None = None,
                 text: "Entry | None" = None) -> Pairs:
    """The train pairs (``pipeline.join.join_pairs`` of ``image`` and the caption entry ``text``)
    that a run with ``train_fraction`` = fraction, ``seed`` and ``subset`` trained on:
    ``subset_train``'s rule (``text`` is needed with a subset: its row ids name the pairs)."""
    if fraction == 1.0 and subset is None:
        return pairs
    image_ids = np.asarray(image.ids)[pairs.image_rows[pairs.text_to_image]]
    row_ids = image_ids if text is None else np.asarray(text.ids)[pairs.text_rows]
    mask = train_mask(image_ids, row_ids, fraction, seed, subset)
    retrieval = {("image", "text"): (pairs.image_rows, pairs.text_rows, pairs.text_to_image)}
    _, cut = subset_split(np.zeros((len(mask), 0)), retrieval, mask)
    return Pairs(*(np.asarray(x, dtype=np.int64) for x in cut[("image", "text")]))


def ids_digest(pair_ids) -> dict:
    """{"n", "sha256"}: the distinct image ids of the train pairs (``pair_ids``, one per pair) and
    the digest of their sorted list, recorded by fit-adapters to recognise the same train pairs."""
    distinct = sorted({image_id(str(i)) for i in pair_ids})
    return {"n": len(distinct), "sha256": strings_digest(distinct)}
