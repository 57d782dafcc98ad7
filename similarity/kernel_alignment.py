"""Uncentred kernel alignment (Cristianini et al. 2002), the proposal's similarity measure.

A(K, L) = <K, L>_F / (||K||_F ||L||_F) for the linear kernels K = X X' and L = Y Y' of paired
representations X: (n, d1), Y: (n, d2). Computed in feature space, O(n d^2), no n x n matrix:
<K, L>_F = tr(X X' Y Y') = ||X' Y||_F^2 and ||K||_F = ||X' X||_F.

Unlike CKA the kernels are not centred: A is invariant to orthogonal transforms (X Q) and
isotropic scaling (c X) of either side, but not to translating the features (a shared offset
makes every kernel entry large and pushes A towards 1). It lies in [0, 1] (K, L are positive
semi-definite) and is 0.0 when a side is all zeros.
"""

from __future__ import annotations

import torch

from similarity.kernels import MetricError, as_features


def kernel_alignment(X, Y, *, device: str = "auto") -> float:
    """Uncentred alignment of the linear kernels of X: (n, d1) and Y: (n, d2), rows paired;
    see the module docstring. Numpy arrays or torch tensors; float64 on ``device``."""
    X, Y = as_features(X, "X", device), as_features(Y, "Y", device)
    if X.shape[0] != Y.shape[0]:
        raise MetricError(
            f"X and Y must have the same number of rows (paired samples); got {X.shape[0]} and {Y.shape[0]}."
            " Join the two representations by sample id first.")
    Y = Y.to(X.device)
    cross = torch.linalg.matrix_norm(X.T @ Y) ** 2
    norm_k, norm_l = torch.linalg.matrix_norm(X.T @ X), torch.linalg.matrix_norm(Y.T @ Y)
    if norm_k == 0 or norm_l == 0:
        return 0.0
    return min(1.0, float(cross / (norm_k * norm_l)))
