"""Kernel (Gram) matrices and the shared low-level helpers of the metrics.

Two kinds of functions live here:

* **Kernel builders** — ``linear_kernel``, ``cosine_kernel``, ``polynomial_kernel``,
  ``rbf_kernel`` — return a dense (n, n) float64 numpy array. They are meant for small n
  (figures, ``metrics.kernel_cka``, tests) and refuse n > ``KERNEL_MAX_ROWS``; the metrics in
  ``similarity.metrics`` never build an n x n matrix.
* **Helpers shared with ``similarity.metrics``** — input conversion/validation
  (``as_features``, devices by ``pipeline.runtime.resolve_device``), the b x b tiling of a symmetric n x n matrix
  (``upper_tiles``), squared-distance tiles, and the exact, streamed median pairwise
  distance (``median_pairwise_distance``, the RBF bandwidth heuristic).

All computation is float64 torch on the resolved device ("auto": CUDA when present, else CPU).
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Iterator

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.runtime import finite_rows, resolve_device

KERNEL_MAX_ROWS = 16_384  # largest n for which a dense (n, n) kernel is built (2 GiB in float64)
BLOCK_ELEMENTS = 2**24  # entries in one similarity/kernel tile (128 MiB in float64); bounds the
#                         peak memory of every blockwise computation to a few tiles
MEDIAN_BINS = 2**16  # max histogram bins in the first pass of the streamed exact median


class MetricError(PipelineError, ValueError):
    """Input a metric or kernel cannot score (wrong shape, NaN, too few rows, unknown name)."""


# ----------------------------------------------------------------------------- conversion
def as_features(X, name: str = "X", device: str | torch.device = "auto") -> torch.Tensor:
    """Validate one representation and return it as a float64 tensor on ``device``.

    X: numpy array, torch tensor (any real dtype, any device; gradients are detached) or
    nested sequence, of shape (n, d) with one row per sample. Raises MetricError (a ValueError) for non-2-D,
    empty, complex/non-numeric or non-finite input, naming ``name`` and the offending row.
    """
    if isinstance(X, torch.Tensor):
        t = X.detach()
        if t.is_complex() or t.dtype == torch.bool:
            raise MetricError(f"{name} must be real-valued; got a tensor of dtype {t.dtype}")
    else:
        arr = np.asarray(X)
        if arr.dtype.kind not in "iuf":
            raise MetricError(f"{name} must be a real numeric array; got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.ndim != 2:
        raise MetricError(
            f"{name} must be 2-D with shape (n_samples, n_features); got shape {tuple(t.shape)}."
            " Flatten extra axes first, e.g. X.reshape(len(X), -1)."
        )
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise MetricError(f"{name} is empty: shape {tuple(t.shape)}")
    t = t.to(device=resolve_device(device), dtype=torch.float64)
    # One reduction, no (n, d) temporary: the sum is finite when every entry is (the row-wise
    # check below runs only if it is not, which overflow alone can also cause).
    if not torch.isfinite(t.sum()) and (bad := np.flatnonzero(~finite_rows(t))).size:
        raise MetricError(
            f"{name} contains NaN or inf in {bad.size} row(s), first at row {int(bad[0])};"
            " drop or impute those rows (in both representations) before comparing."
        )
    return t


# ----------------------------------------------------------------------------- tiling
def tile_size(block_rows: int | None) -> int:
    """Side b of the b x b tiles: ``block_rows`` if given, else sqrt(BLOCK_ELEMENTS)."""
    if block_rows is None:
        return math.isqrt(BLOCK_ELEMENTS)
    if isinstance(block_rows, bool) or not isinstance(block_rows, numbers.Integral) or block_rows < 1:
        raise MetricError(f"block_rows must be a positive integer or None; got {block_rows!r}")
    return int(block_rows)


def upper_tiles(n: int, b: int) -> Iterator[tuple[slice, slice]]:
    """Row/column slices (I, J) of the b x b tiles of a symmetric (n, n) matrix with I <= J.

    Each unordered pair of tiles is visited once; a tile with I != J stands for itself and
    its transpose.
    """
    starts = range(0, n, b)
    for i in starts:
        for j in starts:
            if j >= i:
                yield slice(i, min(i + b, n)), slice(j, min(j + b, n))


class ScaledSqDist:
    """Tiles of ``scale * ||x_i - x_j||^2`` of X: (n, d), each from a single matmul.

    With augmented features P = [X, |x|^2, 1] and Q = scale * [-2X, 1, |x|^2], both (n, d+2),
    P[i].Q[j] = scale * (|x_i|^2 + |x_j|^2 - 2 x_i.x_j): no broadcast adds, no extra n x n
    temporaries (centre X first to limit cancellation). A tile is clamped to the sign of
    ``scale`` and a diagonal tile (I == J) gets an exact 0 diagonal.
    """

    def __init__(self, X: torch.Tensor, scale: float = 1.0):
        sq = sq_row_norms(X)[:, None]
        one = torch.ones_like(sq)
        self.sq_norms = sq[:, 0]  # (n,) squared row norms
        self.P = torch.cat([X, sq, one], dim=1)
        self.Q = scale * torch.cat([-2.0 * X, one, sq], dim=1)
        self.scale = scale

    def tile(self, I: slice, J: slice) -> torch.Tensor:
        """scale * squared distances for rows I, columns J: shape (|I|, |J|)."""
        D = self.P[I] @ self.Q[J].T
        D.clamp_(min=0.0) if self.scale > 0 else D.clamp_(max=0.0)
        if I == J:
            D.fill_diagonal_(0.0)
        return D


def sq_row_norms(X: torch.Tensor) -> torch.Tensor:
    """(n,) squared row norms of X: (n, d), without an (n, d) temporary."""
    return torch.linalg.vector_norm(X, dim=1) ** 2


def centered(X: torch.Tensor) -> torch.Tensor:
    """X minus its column means, shape (n, d). Distances and HSIC are shift-invariant, and
    centring first avoids cancellation in float64 sums."""
    return X - X.mean(dim=0, keepdim=True)


# ----------------------------------------------------------------------------- median heuristic
def _order_statistics(stream: Callable[[], Iterator[torch.Tensor]], ranks: list[int],
                      upper: float, bins: int = MEDIAN_BINS) -> list[float]:
    """Exact order statistics (0-based ``ranks``) of non-negative values in [0, upper].

    ``stream()`` yields the values as 1-D tensors and must give the same values each call.
    Pass 1 builds a histogram; pass 2 keeps only the values in the bins around the wanted
    ranks (plus one guard bin each side against rounding at bin edges) and sorts them.
    Memory: the histogram plus the kept values, never the whole stream.
    """
    scale = bins / upper
    hist = torch.zeros(bins, dtype=torch.float64)  # counts, exact in float64 up to 2^53
    for v in stream():
        hist += torch.histc(v, bins, 0.0, upper).cpu()  # bin = floor(v * scale)
    cum = torch.cumsum(hist, 0)
    lo_bin = int(torch.searchsorted(cum, min(ranks), right=True)) - 1
    hi_bin = int(torch.searchsorted(cum, max(ranks), right=True)) + 2
    lo, hi = max(lo_bin, 0) / scale, (math.inf if hi_bin >= bins else hi_bin / scale)
    below, kept = 0, []
    for v in stream():
        below += int((v < lo).sum())
        kept.append(v[(v >= lo) & (v < hi)])
    window = torch.sort(torch.cat(kept)).values
    if not all(0 <= r - below < window.numel() for r in ranks):  # cannot happen unless the
        raise RuntimeError("streamed order statistic: passes disagree")  # stream is unstable
    return [float(window[r - below]) for r in ranks]


def median_pairwise_distance(X, *, device: str | torch.device = "auto",
                             block_rows: int | None = None) -> float:
    """Exact median of the n(n-1)/2 Euclidean distances ||x_i - x_j||, i < j.

    X: (n, d), n >= 2. This is the RBF bandwidth heuristic used by ``rbf_kernel`` and
    ``metrics.cka(kernel="rbf", sigma=None)`` (factor 1 x the median; Kornblith et al. 2019
    used fractions of it). Computed in two streamed passes over b x b tiles of the upper
    triangle (``_order_statistics``): O(n^2 d) time, O(b^2) memory, no n x n matrix. For an
    even number of pairs it is the mean of the two middle distances, as ``numpy.median``.
    """
    X = centered(as_features(X, device=device))
    n = X.shape[0]
    if n < 2:
        raise MetricError(f"the median pairwise distance needs n >= 2 rows; got n={n}")
    dist, b = ScaledSqDist(X), tile_size(block_rows)

    def stream() -> Iterator[torch.Tensor]:
        for I, J in upper_tiles(n, b):
            D = dist.tile(I, J)
            if I == J:  # strict upper triangle of a diagonal tile
                D = D[torch.triu(torch.ones_like(D, dtype=torch.bool), diagonal=1)]
            yield D.reshape(-1)

    m = n * (n - 1) // 2
    ranks = [(m - 1) // 2, m // 2]
    upper = 4.0 * float(dist.sq_norms.max()) * (1 + 1e-9) + 1e-300  # ||a-b||^2 <= 2|a|^2 + 2|b|^2
    bins = min(MEDIAN_BINS, max(64, m // 256))  # ~256 values per bin on average
    return sum(math.sqrt(v) for v in _order_statistics(stream, ranks, upper, bins)) / 2


def resolve_sigma(X: torch.Tensor, sigma: float | None, block_rows: int | None = None) -> float:
    """RBF bandwidth: ``sigma`` if given (must be > 0), else the median pairwise distance."""
    if sigma is None:
        sigma = median_pairwise_distance(X, device=X.device, block_rows=block_rows)
        if sigma <= 0:
            raise MetricError(
                "the median pairwise distance is 0 (most rows are identical), so the median"
                " heuristic gives no RBF bandwidth; deduplicate rows or pass sigma explicitly")
        return sigma
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not 0 < sigma < math.inf:
        raise MetricError(f"sigma must be a positive finite number or None (median); got {sigma!r}")
    return float(sigma)


# ----------------------------------------------------------------------------- kernel builders
def _small(X, name: str = "X") -> torch.Tensor:
    X = as_features(X, name)
    if X.shape[0] > KERNEL_MAX_ROWS:
        raise MetricError(
            f"{name} has n={X.shape[0]} rows; a dense kernel is built only for n <= "
            f"{KERNEL_MAX_ROWS} (similarity.kernels.KERNEL_MAX_ROWS). Use the blockwise metrics in"
            " similarity.metrics, or subsample rows, for larger n.")
    return X


def linear_kernel(X) -> np.ndarray:
    """K_ij = <x_i, x_j>. X: (n, d) -> (n, n) float64."""
    X = _small(X)
    return (X @ X.T).cpu().numpy()


def cosine_kernel(X) -> np.ndarray:
    """K_ij = <x_i, x_j> / (||x_i|| ||x_j||); an all-zero row has similarity 0 to every row.
    X: (n, d) -> (n, n) float64."""
    X = torch.nn.functional.normalize(_small(X), dim=1)
    return (X @ X.T).cpu().numpy()


def polynomial_kernel(X, degree: int = 3, gamma: float | None = None,
                      coef0: float = 1.0) -> np.ndarray:
    """K_ij = (gamma <x_i, x_j> + coef0)^degree, gamma=None -> 1/d (as scikit-learn).
    X: (n, d) -> (n, n) float64."""
    X = _small(X)
    gamma = 1.0 / X.shape[1] if gamma is None else gamma
    return ((gamma * (X @ X.T) + coef0) ** degree).cpu().numpy()


def rbf_kernel(X, sigma: float | None = None) -> np.ndarray:
    """K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2)); sigma=None -> median pairwise distance
    (``median_pairwise_distance``). X: (n, d) -> (n, n) float64."""
    X = centered(_small(X))
    s = resolve_sigma(X, sigma)
    everything = slice(0, X.shape[0])
    return ScaledSqDist(X, -0.5 / s**2).tile(everything, everything).exp_().cpu().numpy()
