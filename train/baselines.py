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


def _moments(xa: torch.Tensor, xb: torch.Tensor, ia: torch.Tensor, ib: torch.Tensor):
    """Means and covariances of the paired rows (xa[ia[p]], xb[ib[p]]), in float64.

    xa: (n_a, d_a), xb: (n_b, d_b), ia, ib: (n_pairs,). Returns mean_a (d_a,), mean_b (d_b,),
    C_aa (d_a, d_a), C_bb (d_b, d_b), C_ab (d_a, d_b).
    """
    n = ia.shape[0]
    kw = {"dtype": torch.float64, "device": xa.device}
    sa, sb = torch.zeros(xa.shape[1], **kw), torch.zeros(xb.shape[1], **kw)
    saa = torch.zeros(xa.shape[1], xa.shape[1], **kw)
    sbb = torch.zeros(xb.shape[1], xb.shape[1], **kw)
    sab = torch.zeros(xa.shape[1], xb.shape[1], **kw)
    for s in range(0, n, MOMENT_BLOCK):
        a, b = xa[ia[s:s + MOMENT_BLOCK]].double(), xb[ib[s:s + MOMENT_BLOCK]].double()
        sa += a.sum(0)
        sb += b.sum(0)
        saa += a.T @ a
        sbb += b.T @ b
        sab += a.T @ b
    ma, mb = sa / n, sb / n
    denom = max(n - 1, 1)
    return (ma, mb, (saa - n * torch.outer(ma, ma)) / denom, (sbb - n * torch.outer(mb, mb)) / denom,
            (sab - n * torch.outer(ma, mb)) / denom)


def _inv_sqrt(c: torch.Tensor) -> torch.Tensor:
    """C^{-1/2} of a symmetric positive definite (d, d) matrix."""
    w, v = torch.linalg.eigh(c)
    return (v * w.clamp_min(1e-12).rsqrt()) @ v.T


def _ridge(c: torch.Tensor) -> torch.Tensor:
    return c + CCA_RIDGE * c.diagonal().mean().clamp_min(1e-12) * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)


def fit_cca(xa, xb, ia, ib, dim: int) -> Alignment:
    """Regularised CCA on the pairs (xa[ia], xb[ib]); see the module docstring."""
    ma, mb, caa, cbb, cab = _moments(xa, xb, ia, ib)
    wa, wb = _inv_sqrt(_ridge(caa)), _inv_sqrt(_ridge(cbb))
    u, rho, vh = torch.linalg.svd(wa @ cab @ wb)
    k = min(dim, xa.shape[1], xb.shape[1], max(ia.shape[0] - 1, 1))
    scale = rho[:k]
    return Alignment("cca", LinearMap(ma, wa @ u[:, :k] * scale), LinearMap(mb, wb @ vh[:k].T * scale))


def _pca(c: torch.Tensor, p: int) -> torch.Tensor:
    """(d, p) top-p principal directions of a covariance (d, d)."""
    w, v = torch.linalg.eigh(c)
    return v[:, torch.argsort(w, descending=True)[:p]]


def fit_procrustes(xa, xb, ia, ib, dim: int) -> Alignment:
    """PCA to a common dimension, then orthogonal Procrustes from side a to side b."""
    ma, mb, caa, cbb, cab = _moments(xa, xb, ia, ib)
    p = min(dim, xa.shape[1], xb.shape[1], max(ia.shape[0] - 1, 1))
    pa, pb = _pca(caa, p), _pca(cbb, p)
    u, _, vh = torch.linalg.svd(pa.T @ cab @ pb)  # cross-covariance of the PCA coordinates
    return Alignment("procrustes", LinearMap(ma, pa @ u @ vh), LinearMap(mb, pb))


BASELINES = {"cca": fit_cca, "procrustes": fit_procrustes}  # name -> fit(xa, xb, ia, ib, dim)
