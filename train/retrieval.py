"""Cross-modal retrieval recall (the Flickr30k / COCO Karpathy-test protocol).

Image-to-text R@K: an image query is a hit when any of its captions ranks in the top K
among all captions. Text-to-image R@K: every caption is a query; a hit when its image ranks
in the top K among all images. Similarity is cosine.

Ties: the rank of a candidate is the number of candidates with a *strictly greater* score
(0 = best), and a query hits at K when that rank is < K. A tie with the correct item therefore
counts in the query's favour, and results never depend on sort order.

Queries are processed in blocks, so memory is O(block * candidates), e.g. 512 x 25,000
floats for 25,000 captions x 5,000 images.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

KS = (1, 5, 10)  # default recall cut-offs
BLOCK = 512  # queries scored at once (memory: BLOCK x candidates floats)


def _as_tensor(x, device: torch.device | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Tensor on ``device``; floats stay float64 when given as float64, else become float32."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if dtype is None:
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    return t.to(device=device or t.device, dtype=dtype)


def _unit_rows(x: torch.Tensor, what: str) -> torch.Tensor:
    """(n, d) -> rows of unit length. Rows are first divided by their largest |entry| so huge
    but finite values do not overflow the norm; zero and non-finite rows are errors (their
    cosine similarity is undefined and, under the tie rule, would score as perfect hits)."""
    if not torch.isfinite(x).all():
        raise ValueError(f"recall_at_k: {what} contains non-finite values (NaN or inf).")
    peak = x.abs().amax(1, keepdim=True) if x.shape[1] else x.new_zeros((x.shape[0], 1))
    if x.shape[0] and peak.min() == 0:
        raise ValueError(f"recall_at_k: {what} row {int(torch.nonzero(peak[:, 0] == 0)[0])} is all zeros; "
                         f"cosine similarity is undefined.")
    return F.normalize(x / peak, dim=-1)


def _ranks_t2i(img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor, block: int) -> torch.Tensor:
    """(n_texts,) rank of each caption's image among all images."""
    out = []
    for s in range(0, txt.shape[0], block):
        scores = txt[s:s + block] @ img.T  # (b, n_images)
        true = scores.gather(1, t2i[s:s + block, None])  # (b, 1)
        out.append((scores > true).sum(1))
    return torch.cat(out)


def _ranks_i2t(img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor, block: int) -> torch.Tensor:
    """(n_images,) rank of each image's best-ranked caption among all captions."""
    out = []
    for s in range(0, img.shape[0], block):
        scores = img[s:s + block] @ txt.T  # (b, n_texts)
        own = t2i[None, :] == torch.arange(s, s + scores.shape[0], device=img.device)[:, None]
        best = scores.masked_fill(~own, float("-inf")).amax(1, keepdim=True)  # (b, 1)
        out.append((scores > best).sum(1))
    return torch.cat(out)


@torch.no_grad()
def recall_at_k(image_emb, text_emb, text_to_image, ks=KS, block: int = BLOCK) -> dict[str, float]:
    """Recall@K both ways.

    image_emb: (n_images, d); text_emb: (n_texts, d) (numpy arrays or tensors; computed on
    ``image_emb``'s device); text_to_image: (n_texts,) integer row of each caption's image.
    Returns fractions in [0, 1] under ``i2t_R@K`` and ``t2i_R@K`` for each K in ``ks``, plus
    ``mean_R``, the mean of all of them.
    """
    img = _as_tensor(image_emb)
    txt = _as_tensor(text_emb, img.device, img.dtype)
    t2i = _as_tensor(text_to_image, img.device, torch.long)
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
        raise ValueError(f"image_emb (n_images, d) and text_emb (n_texts, d) must share d; "
                         f"got {tuple(img.shape)} and {tuple(txt.shape)}.")
    if t2i.shape != (txt.shape[0],):
        raise ValueError(f"text_to_image must have shape ({txt.shape[0]},), got {tuple(t2i.shape)}.")
    if len(t2i) and (t2i.min() < 0 or t2i.max() >= img.shape[0]):
        raise ValueError(f"text_to_image values must lie in [0, {img.shape[0]}).")
    if img.shape[0] == 0 or txt.shape[0] == 0:
        raise ValueError("recall_at_k needs at least one image and one caption.")
    if torch.bincount(t2i, minlength=img.shape[0]).min() == 0:
        raise ValueError("Every image needs at least one caption (text_to_image misses some rows).")
    img, txt = _unit_rows(img, "image_emb"), _unit_rows(txt, "text_emb")
    ranks = {"i2t": _ranks_i2t(img, txt, t2i, block), "t2i": _ranks_t2i(img, txt, t2i, block)}
    out = {f"{way}_R@{k}": float((r < k).double().mean()) for way, r in ranks.items() for k in ks}
    out["mean_R"] = float(np.mean(list(out.values())))
    return out
