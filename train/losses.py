"""Contrastive losses between paired embeddings: InfoNCE (the CLIP loss, the default), the
VSE++ hinge loss with the hardest negative (each symmetric or one-directional) and SigLIP's
pairwise sigmoid loss (symmetric by construction), on L2-normalised embeddings (default) or on
raw inner products.

Options (``[train]``): ``loss`` ("infonce" | "vsepp" | "sigmoid"), ``loss_direction`` ("symmetric" |
"image_to_text", the proposal's one-directional sum: image queries, caption candidates),
``normalize`` (false = the proposal's raw inner products <W_x x, W_y y> / tau) and ``margin``
(VSE++), ``sigmoid_scale`` / ``sigmoid_bias`` (the sigmoid loss's initial scale and bias, both
learnt: ``train.adapters.AlignModel``). ``pair_loss(tc, bias)`` turns them into one function; ``multi_info_nce`` averages it over
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

LOSSES = CHOICES["train.loss"]  # infonce, vsepp, sigmoid
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
    name = {"infonce": "InfoNCE", "vsepp": "VSE++", "sigmoid": "sigmoid (SigLIP)"}.get(loss, loss)
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


def sigmoid_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor | float,
                 logit_bias: torch.Tensor | float, normalize: bool = True) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023, eq. 1 and Algorithm 1).

    a, b: (batch, dim), row i of ``a`` paired with row i of ``b``; logits_ij = t <a_i, b_j> + bias
    with t = ``logit_scale`` (rows L2-normalised first when ``normalize``), label z_ij = +1 on the
    diagonal, -1 elsewhere. Returns the scalar -1/batch sum_ij log sigmoid(z_ij logits_ij): every
    (image, caption) pair is its own binary problem, so the loss has no direction (it is the same
    with a and b swapped). SigLIP starts at t = 10, bias = -10 (``train.sigmoid_scale``,
    ``train.sigmoid_bias``): the heavy negative bias offsets the batch - 1 negatives per row.
    """
    logits = logit_scale * _similarities(a, b, normalize) + logit_bias  # (batch, batch)
    labels = 2.0 * torch.eye(a.shape[0], dtype=logits.dtype, device=logits.device) - 1.0
    return -F.logsigmoid(labels * logits).sum() / a.shape[0]


def check_loss(loss: str, direction: str) -> None:
    """ValueError for an unknown loss or direction, or a direction the loss cannot take."""
    if loss not in LOSSES:
        raise ValueError(f"Unknown loss {loss!r}.{did_you_mean(str(loss), LOSSES)} Use one of: {', '.join(LOSSES)}.")
    _check_direction(direction)
    if loss == "sigmoid" and direction != "symmetric":
        raise ValueError(f"train.loss = \"sigmoid\" with train.loss_direction = {direction!r}: the sigmoid loss scores "
                         f"every (image, caption) pair on its own, so it has no query direction. Drop "
                         f"train.loss_direction (symmetric), or use train.loss = \"infonce\" for a one-directional loss.")


def pair_loss(tc, logit_bias: torch.Tensor | float | None = None) -> PairLoss:
    """The configured loss as ``f(a, b, logit_scale)`` from a TrainConfig (``loss``,
    ``loss_direction``, ``normalize``, ``margin``); VSE++ ignores the logit scale. The sigmoid
    loss adds ``logit_bias`` (the model's learnt ``AlignModel.logit_bias``; default: the config's
    ``sigmoid_bias``)."""
    check_loss(tc.loss, tc.loss_direction)
    if tc.loss == "sigmoid":
        bias = tc.sigmoid_bias if logit_bias is None else logit_bias
        return partial(sigmoid_loss, logit_bias=bias, normalize=tc.normalize)
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
