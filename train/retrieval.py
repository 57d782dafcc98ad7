"""Cross-modal retrieval recall (the Flickr30k / COCO Karpathy-test protocol).

Image-to-text R@K: an image query is a hit when any of its captions ranks in the top K
among all captions. Text-to-image R@K: every caption is a query; a hit when its image ranks
in the top K among all images. Similarity is cosine.

Ties count against the query (the pessimistic rank). The 0-based rank of the correct item is
the number of WRONG candidates scoring at least as high as it: for text-to-image, the other
images scoring >= the caption's image; for image-to-text, the other images' captions scoring
>= the image's best-scoring own caption. A query hits at K when that rank is < K. So identical
embeddings for every image and caption give R@K = 0 for K < the number of wrong candidates,
never 1, and results never depend on sort order. Zero-shot accuracy (``analyze.zeroshot``), the
matching's retrieval rows and the report's gallery use the same rule. Without ties this is the
usual rank (CLIP_benchmark's and LAVIS's figures are then the same); with ties it is a lower
bound of theirs (``torch.topk`` orders tied scores arbitrarily).

Exact ties: similarities are dot products of unit rows rounded to multiples of 2^-26 in float64
(``similarity.metrics.ranking_units``), which are exact, so identical embeddings tie exactly
whatever the order of summation (block, device, BLAS kernel); the rounding moves a cosine by
about 1e-8. ``ranks_from_scores`` (a precomputed score matrix, for methods that are not a cosine
of embeddings) applies the rule to the scores as given.

Collapsed embeddings: ``retrieval_summary`` warns, and sets ``collapsed`` = 1.0, when the image
or the text embeddings all point the same way (every unit row within ``COLLAPSE_TOL`` of the
mean direction, in cosine); ``ties`` is the share of queries (both directions) whose correct
item ties a wrong candidate.

Queries are processed in blocks, so memory is O(block * candidates), e.g. 512 x 25,000
floats for 25,000 captions x 5,000 images.

Summary figures (``retrieval_summary``, same ranks and tie rule): RSUM = the sum of the six
recalls i2t/t2i R@1/5/10 in percent (0-600, as VSE++ and SCAN quote it), and the median and
mean rank of the correct item in each direction, 1-based (1 = ranked first; image-to-text uses
the best-ranked of the image's captions).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from pipeline.runtime import first_nonfinite_row
from similarity.metrics import ranking_units

log = logging.getLogger(__name__)

KS = (1, 5, 10)  # default recall cut-offs
SUMMARY_KEYS = ("rsum", "i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr",
                "ties", "collapsed")  # retrieval_summary's extra keys
BLOCK = 512  # queries scored at once (memory: BLOCK x candidates floats)
COLLAPSE_TOL = 1e-6  # embeddings are collapsed when every unit row has cosine >= 1 - this with their mean direction


def _as_tensor(x, device: torch.device | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Tensor on ``device``; floats stay float64 when given as float64, else become float32."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if dtype is None:
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    return t.to(device=device or t.device, dtype=dtype)


def _grid_units(x: torch.Tensor) -> torch.Tensor:
    """(n, d) finite -> float64 unit rows on the exact ranking grid (``ranking_units``); rows are
    first divided by their largest |entry| so huge but finite values do not overflow the norm.
    An all-zero row stays zero (similarity 0 to everything)."""
    x = x.double()
    peak = x.abs().amax(1, keepdim=True) if x.shape[1] else x.new_zeros((x.shape[0], 1))
    return ranking_units(x / peak.clamp_min(torch.finfo(torch.float64).tiny))


def _unit_rows(x: torch.Tensor, what: str) -> torch.Tensor:
    """``_grid_units`` of embeddings to rank; zero and non-finite rows are errors (their cosine
    similarity is undefined)."""
    if (row := first_nonfinite_row(x)) is not None:
        raise ValueError(f"recall_at_k: {what} contains non-finite values (NaN or inf), first in row {row}.")
    zero = (x == 0).all(1) if x.shape[1] else torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    if zero.any():
        raise ValueError(f"recall_at_k: {what} row {int(torch.nonzero(zero)[0])} is all zeros; "
                         f"cosine similarity is undefined.")
    return _grid_units(x)


def is_collapsed(units: torch.Tensor) -> bool:
    """True when n >= 2 unit rows (n, d) all point the same way: cosine >= 1 - COLLAPSE_TOL with
    their mean direction (identical rows, or identical up to rounding)."""
    if units.shape[0] < 2:
        return False
    mean = units.mean(0)
    norm = torch.linalg.vector_norm(mean)
    return bool(norm > 0 and (units @ (mean / norm)).min() >= 1 - COLLAPSE_TOL)


def cosine_scores(a, b) -> np.ndarray:
    """(n_a, n_b) float64 cosine similarities of the rows of a (n_a, d) and b (n_b, d) on the
    exact ranking grid: what the ranks here compare (equal rows give equal scores; an all-zero
    row scores 0 with everything). For callers that need the whole matrix (zero-shot classes,
    the gallery)."""
    A, B = _as_tensor(a), _as_tensor(b)
    for what, t in (("a", A), ("b", B)):
        if (row := first_nonfinite_row(t)) is not None:
            raise ValueError(f"cosine_scores: {what} contains non-finite values (NaN or inf), first in row {row}.")
    return (_grid_units(A) @ _grid_units(B.to(A.device)).T).cpu().numpy()


def _ranks_t2i(img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor, block: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_texts,) rank of each caption's image among all images (other images scoring >= it),
    and (n_texts,) bool: a wrong image ties it."""
    ranks, tied = [], []
    for s in range(0, txt.shape[0], block):
        scores = txt[s:s + block] @ img.T  # (b, n_images)
        true = scores.gather(1, t2i[s:s + block, None])  # (b, 1)
        ranks.append((scores >= true).sum(1) - 1)  # the true image itself scores == true
        tied.append((scores == true).sum(1) > 1)
    return torch.cat(ranks), torch.cat(tied)


def _ranks_i2t(img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor, block: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_images,) rank of each image's best-scoring caption (other images' captions scoring
    >= it), and (n_images,) bool: a wrong caption ties it."""
    ranks, tied = [], []
    for s in range(0, img.shape[0], block):
        scores = img[s:s + block] @ txt.T  # (b, n_texts)
        own = t2i[None, :] == torch.arange(s, s + scores.shape[0], device=img.device)[:, None]
        best = scores.masked_fill(~own, float("-inf")).amax(1, keepdim=True)  # (b, 1)
        ranks.append(((scores >= best) & ~own).sum(1))
        tied.append(((scores == best) & ~own).any(1))
    return torch.cat(ranks), torch.cat(tied)


def _prepare(image_emb, text_emb, text_to_image) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validated unit-row image (n_images, d) and text (n_texts, d) tensors and text_to_image (n_texts,)."""
    img = _as_tensor(image_emb)
    txt = _as_tensor(text_emb, img.device, img.dtype)
    t2i = _as_tensor(text_to_image, img.device, torch.long)
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
        raise ValueError(f"image_emb (n_images, d) and text_emb (n_texts, d) must share d; "
                         f"got {tuple(img.shape)} and {tuple(txt.shape)}.")
    _check_t2i(t2i, img.shape[0], txt.shape[0])
    return _unit_rows(img, "image_emb"), _unit_rows(txt, "text_emb"), t2i


def _check_t2i(t2i: torch.Tensor, n_images: int, n_texts: int) -> None:
    if t2i.shape != (n_texts,):
        raise ValueError(f"text_to_image must have shape ({n_texts},), got {tuple(t2i.shape)}.")
    if len(t2i) and (t2i.min() < 0 or t2i.max() >= n_images):
        raise ValueError(f"text_to_image values must lie in [0, {n_images}).")
    if n_images == 0 or n_texts == 0:
        raise ValueError("recall_at_k needs at least one image and one caption.")
    if torch.bincount(t2i, minlength=n_images).min() == 0:
        raise ValueError("Every image needs at least one caption (text_to_image misses some rows).")


def _recalls(ranks: dict[str, torch.Tensor], ks) -> dict[str, float]:
    out = {f"{way}_R@{k}": float((r < k).double().mean()) for way, r in ranks.items() for k in ks}
    out["mean_R"] = float(np.mean(list(out.values())))
    return out


def summarize_ranks(ranks: dict[str, torch.Tensor], ks=KS, tied: dict[str, torch.Tensor] | None = None
                    ) -> dict[str, float]:
    """Recall@K (``recall_at_k``'s keys), RSUM and the median / mean 1-based rank both ways
    from 0-based ranks {"i2t": (n_images,), "t2i": (n_texts,)}; with ``tied`` (same keys, bool
    per query) also ``ties``, the share of all queries whose correct item ties a wrong one."""
    out = _recalls(ranks, ks)
    out["rsum"] = 100.0 * sum(v for k, v in out.items() if k != "mean_R")
    for way, r in ranks.items():
        one_based = r.double().cpu().numpy() + 1
        out[f"{way}_medr"] = float(np.median(one_based))  # the middle value, or the mean of the two middle ones
        out[f"{way}_meanr"] = float(one_based.mean())
    if tied is not None:
        out["ties"] = float(sum(int(t.sum()) for t in tied.values()) / sum(len(t) for t in tied.values()))
    return out


@torch.no_grad()
def ranks_from_scores(scores, text_to_image) -> dict[str, torch.Tensor]:
    """0-based pessimistic ranks (the number of wrong candidates scoring >= the correct one)
    from a score matrix, as given (no rounding).

    scores: (n_images, n_texts), higher = more similar (any method); text_to_image: (n_texts,).
    Returns {"i2t": (n_images,) rank of each image's best-scoring caption among all captions,
    "t2i": (n_texts,) rank of each caption's image among all images}."""
    S = _as_tensor(scores)
    if S.ndim != 2 or not torch.isfinite(S).all():
        raise ValueError(f"scores must be a finite (n_images, n_texts) matrix, got shape {tuple(S.shape)}.")
    t2i = _as_tensor(text_to_image, S.device, torch.long)
    _check_t2i(t2i, S.shape[0], S.shape[1])
    own = t2i[None, :] == torch.arange(S.shape[0], device=S.device)[:, None]  # (n_images, n_texts)
    best = S.masked_fill(~own, float("-inf")).amax(1, keepdim=True)
    true = S.gather(0, t2i[None, :])  # (1, n_texts)
    return {"i2t": ((S >= best) & ~own).sum(1), "t2i": (S >= true).sum(0) - 1}


@torch.no_grad()
def recall_at_k(image_emb, text_emb, text_to_image, ks=KS, block: int = BLOCK) -> dict[str, float]:
    """Recall@K both ways.

    image_emb: (n_images, d); text_emb: (n_texts, d) (numpy arrays or tensors; computed on
    ``image_emb``'s device, in float64); text_to_image: (n_texts,) integer row of each caption's
    image. Returns fractions in [0, 1] under ``i2t_R@K`` and ``t2i_R@K`` for each K in ``ks``,
    plus ``mean_R``, the mean of all of them. Ties count against the query (module docstring).
    """
    img, txt, t2i = _prepare(image_emb, text_emb, text_to_image)
    return _recalls({"i2t": _ranks_i2t(img, txt, t2i, block)[0], "t2i": _ranks_t2i(img, txt, t2i, block)[0]}, ks)


@torch.no_grad()
def retrieval_summary(image_emb, text_emb, text_to_image, ks=KS, block: int = BLOCK) -> dict[str, float]:
    """``recall_at_k``'s figures plus RSUM, median / mean ranks, ``ties`` (share of queries whose
    correct item ties a wrong candidate) and ``collapsed`` (1.0 when the image or text embeddings
    all point the same way, with a warning; else 0.0): ``SUMMARY_KEYS``. One ranking pass; same
    inputs, tie rule and memory bound."""
    img, txt, t2i = _prepare(image_emb, text_emb, text_to_image)
    (ri, ti), (rt, tt) = _ranks_i2t(img, txt, t2i, block), _ranks_t2i(img, txt, t2i, block)
    out = summarize_ranks({"i2t": ri, "t2i": rt}, ks, {"i2t": ti, "t2i": tt})
    collapsed = [f"{what} ({len(units)} rows)" for what, units in (("image", img), ("text", txt))
                 if is_collapsed(units)]
    if collapsed:
        log.warning("retrieval: collapsed embeddings, every row pointing the same way: %s. Their scores tie, and "
                    "ties count against the query, so recall sits at its floor.", ", ".join(collapsed))
    out["collapsed"] = float(bool(collapsed))
    return out
