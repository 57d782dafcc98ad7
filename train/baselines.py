"""Closed-form alignment baselines, fitted on the train pairs and evaluated with the same
retrieval protocol as the adapters.

* ``cca``: regularised CCA. Covariances get a ridge of ``CCA_RIDGE`` times their mean
  variance; both sides are projected onto the top k = min(dim, d_x, d_y, n - 1) canonical
  directions, each weighted by its canonical correlation (so directions with near-zero
  correlation, which are noise for retrieval, do not dominate the cosine similarity).
* ``procrustes``: PCA of each side to p = min(dim, d_x, d_y, n - 1) dimensions, then the
  orthogonal map R (image PCA -> text PCA) minimising ||X_p R - Y_p||_F over the paired train
  rows (R = U V^T from the SVD of X_p^T Y_p).

All fits run in float64 on the features' device and stream the pairs in blocks, so the
memory is O(d^2) beyond the features themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

CCA_RIDGE = 1e-3  # covariance ridge, relative to the mean variance (stabilises the whitening)
MOMENT_BLOCK = 16384  # pairs accumulated at once


@dataclass(frozen=True)
class LinearMap:
    """z -> (z - mean) @ weight; mean (d,), weight (d, k)."""

    mean: torch.Tensor
    weight: torch.Tensor

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """(n, d) -> (n, k) float64."""
        return (z.double() - self.mean) @ self.weight


@dataclass(frozen=True)
class Alignment:
    """A fitted baseline: one LinearMap per side (image-like ``a`` and text-like ``b``)."""

    name: str
    a: LinearMap
    b: LinearMap


@dataclass(frozen=True)
class Moments:
    """First and second moments of paired rows (a_p, b_p), float64: n pairs, mean_a (d_a,),
    mean_b (d_b,), covariances c_aa (d_a, d_a), c_bb (d_b, d_b), c_ab (d_a, d_b) (divisor n - 1)."""

    n: int
    mean_a: torch.Tensor
    mean_b: torch.Tensor
    c_aa: torch.Tensor
    c_bb: torch.Tensor
    c_ab: torch.Tensor


def accumulate_moments(blocks: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Moments:
    """Moments from blocks of paired rows (a (k, d_a), b (k, d_b)), summed in float64; the
    blocks may come from memory or be streamed from the cache."""
    n, sums = 0, None
    for a, b in blocks:
        a, b = a.double(), b.double()
        if sums is None:
            sums = [torch.zeros(a.shape[1], dtype=a.dtype, device=a.device),
                    torch.zeros(b.shape[1], dtype=a.dtype, device=a.device),
                    torch.zeros(a.shape[1], a.shape[1], dtype=a.dtype, device=a.device),
                    torch.zeros(b.shape[1], b.shape[1], dtype=a.dtype, device=a.device),
                    torch.zeros(a.shape[1], b.shape[1], dtype=a.dtype, device=a.device)]
        for acc, term in zip(sums, (a.sum(0), b.sum(0), a.T @ a, b.T @ b, a.T @ b)):
            acc += term
        n += a.shape[0]
    if sums is None:
        raise ValueError("The baselines need at least one train pair.")
    sa, sb, saa, sbb, sab = sums
    ma, mb = sa / n, sb / n
    denom = max(n - 1, 1)
    return Moments(n, ma, mb, (saa - n * torch.outer(ma, ma)) / denom, (sbb - n * torch.outer(mb, mb)) / denom,
                   (sab - n * torch.outer(ma, mb)) / denom)


def pair_moments(xa: torch.Tensor, xb: torch.Tensor, ia: torch.Tensor, ib: torch.Tensor) -> Moments:
    """Moments of the pairs (xa[ia[p]], xb[ib[p]]); xa: (n_a, d_a), xb: (n_b, d_b), ia, ib: (n_pairs,)."""
    n = ia.shape[0]
    return accumulate_moments((xa[ia[s:s + MOMENT_BLOCK]], xb[ib[s:s + MOMENT_BLOCK]])
                              for s in range(0, n, MOMENT_BLOCK))


def _inv_sqrt(c: torch.Tensor) -> torch.Tensor:
    """C^{-1/2} of a symmetric positive definite (d, d) matrix."""
    w, v = torch.linalg.eigh(c)
    return (v * w.clamp_min(1e-12).rsqrt()) @ v.T


def _ridge(c: torch.Tensor) -> torch.Tensor:
    return c + CCA_RIDGE * c.diagonal().mean().clamp_min(1e-12) * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)


def cca_from_moments(mom: Moments, dim: int) -> Alignment:
    """Regularised CCA from the train moments; see the module docstring."""
    wa, wb = _inv_sqrt(_ridge(mom.c_aa)), _inv_sqrt(_ridge(mom.c_bb))
    u, rho, vh = torch.linalg.svd(wa @ mom.c_ab @ wb)
    k = min(dim, mom.c_aa.shape[0], mom.c_bb.shape[0], max(mom.n - 1, 1))
    scale = rho[:k]
    return Alignment("cca", LinearMap(mom.mean_a, wa @ u[:, :k] * scale), LinearMap(mom.mean_b, wb @ vh[:k].T * scale))


def _pca(c: torch.Tensor, p: int) -> torch.Tensor:
    """(d, p) top-p principal directions of a covariance (d, d)."""
    w, v = torch.linalg.eigh(c)
    return v[:, torch.argsort(w, descending=True)[:p]]


def procrustes_from_moments(mom: Moments, dim: int) -> Alignment:
    """PCA to a common dimension, then orthogonal Procrustes from side a to side b."""
    p = min(dim, mom.c_aa.shape[0], mom.c_bb.shape[0], max(mom.n - 1, 1))
    pa, pb = _pca(mom.c_aa, p), _pca(mom.c_bb, p)
    u, _, vh = torch.linalg.svd(pa.T @ mom.c_ab @ pb)  # cross-covariance of the PCA coordinates
    return Alignment("procrustes", LinearMap(mom.mean_a, pa @ u @ vh), LinearMap(mom.mean_b, pb))


FROM_MOMENTS = {"cca": cca_from_moments, "procrustes": procrustes_from_moments}  # name -> fit(Moments, dim)
