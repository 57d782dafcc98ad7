"""Contrastive losses between paired embeddings: InfoNCE (the CLIP loss, the default) and the
VSE++ hinge loss with the hardest negative, each symmetric or one-directional, on
L2-normalised embeddings (default) or on raw inner products.

Options (``[train]``): ``loss`` ("infonce" | "vsepp"), ``loss_direction`` ("symmetric" |
"image_to_text", the proposal's one-directional sum: image queries, caption candidates),
``normalize`` (false = the proposal's raw inner products <W_x x, W_y y> / tau) and ``margin``
(VSE++). ``pair_loss(tc)`` turns them into one function; ``multi_info_nce`` averages it over
every pair of modalities (the first of a pair plays the image).
"""

from __future__ import annotations

import itertools
from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from pipeline.config import CHOICES
from pipeline.errors import did_you_mean

LOSSES = CHOICES["train.loss"]  # infonce, vsepp
DIRECTIONS = CHOICES["train.loss_direction"]  # symmetric, image_to_text

PairLoss = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | float"], torch.Tensor]  # (a, b, logit_scale)


def _similarities(a: torch.Tensor, b: torch.Tensor, normalize: bool) -> torch.Tensor:
    """(batch, batch) inner products a_i . b_j, of L2-normalised rows when ``normalize``."""
    if normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    return a @ b.T


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"Unknown loss direction {direction!r}.{did_you_mean(str(direction), DIRECTIONS)} "
                         f"Use one of: {', '.join(DIRECTIONS)}.")


def loss_label(loss: str = "infonce", direction: str = "symmetric", normalize: bool = True) -> str:
    """How tables and figures name a training objective, e.g. "symmetric InfoNCE" (the default),
    "image_to_text VSE++ on raw inner products"."""
    name = {"infonce": "InfoNCE", "vsepp": "VSE++"}.get(loss, loss)
    return f"{direction} {name}" + ("" if normalize else " on raw inner products")


def info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor | float, normalize: bool = True,
             direction: str = "symmetric") -> torch.Tensor:
    """InfoNCE between paired rows.

    a, b: (batch, dim) embeddings, row i of ``a`` paired with row i of ``b``.
    logit_scale: 1/tau (scalar). logits_ij = logit_scale * <a_i, b_j> (rows L2-normalised first
    when ``normalize``; raw inner products otherwise, as the proposal writes it).
    Returns a scalar: symmetric: (CE(a -> b) + CE(b -> a)) / 2; image_to_text: CE(a -> b), the
    mean over i of -log softmax_j(logits_ij) at j = i.
    Random pairs give about log(batch); identical pairs at a low temperature give about 0.
    """
    _check_direction(direction)
    logits = logit_scale * _similarities(a, b, normalize)  # (batch, batch)
    target = torch.arange(a.shape[0], device=a.device)
    forward = F.cross_entropy(logits, target)
    if direction == "image_to_text":
        return forward
    return 0.5 * (forward + F.cross_entropy(logits.T, target))


def vsepp(a: torch.Tensor, b: torch.Tensor, margin: float = 0.2, normalize: bool = True,
          direction: str = "symmetric") -> torch.Tensor:
    """VSE++ max-of-hinges loss (Faghri et al. 2018): only the hardest negative counts.

    With s_ij = <a_i, b_j> (a, b: (batch, dim), rows L2-normalised when ``normalize``):
    image_to_text: mean over i of max_{j != i} [margin - s_ii + s_ij]_+ ;
    symmetric: adds the caption-query term max_{j != i} [margin - s_ii + s_ji]_+ (the sum of
    both, as VSE++ defines it; averaged over the batch instead of summed).
    """
    _check_direction(direction)
    s = _similarities(a, b, normalize)
    pos = s.diagonal()
    eye = torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
    hinge = (margin - pos[:, None] + s).clamp_min(0).masked_fill(eye, 0.0)  # row i: caption j for image i
    loss = hinge.amax(1)
    if direction == "symmetric":
        loss = loss + (margin - pos[None, :] + s).clamp_min(0).masked_fill(eye, 0.0).amax(0)  # column j: images for caption j
    return loss.mean()


def pair_loss(tc) -> PairLoss:
    """The configured loss as ``f(a, b, logit_scale)`` from a TrainConfig (``loss``,
    ``loss_direction``, ``normalize``, ``margin``); VSE++ ignores the logit scale."""
    _check_direction(tc.loss_direction)
    if tc.loss == "infonce":
        return partial(info_nce, normalize=tc.normalize, direction=tc.loss_direction)
    if tc.loss == "vsepp":
        def hinge(a, b, logit_scale):
            return vsepp(a, b, tc.margin, normalize=tc.normalize, direction=tc.loss_direction)
        return hinge
    raise ValueError(f"Unknown loss {tc.loss!r}.{did_you_mean(str(tc.loss), LOSSES)} Use one of: {', '.join(LOSSES)}.")


def multi_info_nce(embeddings: Sequence[torch.Tensor], logit_scale: torch.Tensor | float,
                   loss: PairLoss = info_nce) -> torch.Tensor:
    """Mean of ``loss`` (default: symmetric InfoNCE) over every pair of modalities (i < j, the
    earlier modality as ``a``).

    embeddings: M >= 2 tensors of shape (batch, dim), rows aligned across modalities.
    """
    pairs = list(itertools.combinations(range(len(embeddings)), 2))
    if not pairs:
        raise ValueError("InfoNCE needs at least two modalities.")
    return sum(loss(embeddings[i], embeddings[j], logit_scale) for i, j in pairs) / len(pairs)
