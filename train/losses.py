"""Symmetric InfoNCE (the CLIP loss) on L2-normalised embeddings."""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
import torch.nn.functional as F


def info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE between paired rows.

    a, b: (batch, dim) embeddings, row i of ``a`` paired with row i of ``b`` (normalised here).
    logit_scale: 1/tau (scalar).
    Returns a scalar: (CE(a -> b) + CE(b -> a)) / 2, where row i's target is column i.
    Random pairs give about log(batch); identical pairs at a low temperature give about 0.
    """
    a = F.normalize(a, dim=-1)
    b = F.normalize(b, dim=-1)
    logits = logit_scale * (a @ b.T)  # (batch, batch)
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def multi_info_nce(embeddings: Sequence[torch.Tensor], logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Mean of ``info_nce`` over every pair of modalities.

    embeddings: M >= 2 tensors of shape (batch, dim), rows aligned across modalities.
    """
    pairs = list(itertools.combinations(range(len(embeddings)), 2))
    if not pairs:
        raise ValueError("InfoNCE needs at least two modalities.")
    return sum(info_nce(embeddings[i], embeddings[j], logit_scale) for i, j in pairs) / len(pairs)
