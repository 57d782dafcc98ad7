"""Training-free matching and retrieval between two frozen encoders (``analyze matching``).

Three methods that use only known pairs, no trained parameters:

* ``seeded_match``: graph matching. Rows of X and Y describe the same n samples in unknown
  order, except for s known pairs (the seeds). The permutation P maximising the kernel
  agreement tr(K_X P K_Y P') with the seeds fixed is found by quadratic assignment (scipy's
  ``quadratic_assignment``, FAQ: Vogelstein et al. 2015, as in Maniparambil et al., CVPR 2024,
  "Do Vision and Language Encoders Represent the World Similarly?"). Kernels are centred
  (H K H, as in CKA). Cost: each FAQ iteration (at most 30) solves an n x n linear assignment
  and a few n x n matrix products, O(n^3) time and O(n^2) memory (measured times: README,
  "Zero-shot, training-free matching"); each doubling of n costs about 8x, hence the row bound
  (``--max-rows``, default ``QAP_ROWS``).
* ``local_cka_scores``: retrieval by local CKA (same paper). Given a base set of known pairs
  (B_x, B_y), a query image q scores caption c by linear CKA([B_x; q], [B_y; c]) of the base-
  plus-one kernels. Computed for every (q, c) at once from the base kernels and the query
  columns (the kernel-sum identities in the function's docstring), O(b (n_q + n_c)(d + b) +
  n_q n_c b) time, no (b+1) x (b+1) kernel per pair.
* ``relative_representation``: ASIF (Norelli et al. 2023). A sample is described by its cosine
  similarities to the anchors (the train pairs' images for an image, their captions for a
  caption), keeping the top ``k`` (others 0, negatives 0), raised to the power ``p`` and
  L2-normalised (a sparse matrix, k non-zeros per row); anchors are paired, so image and caption descriptions share coordinates and
  are compared by cosine. Works for retrieval and for zero-shot classification.

Inputs are raw encoder features; the command centres them with the train (anchor) mean first.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import scipy.sparse
from scipy.optimize import quadratic_assignment

from analyze.compare import AnalyzeError, header, output_dir, subset_rows
from analyze.evalrun import open_run
from pipeline.runtime import first_nonfinite_row, write_json
from train.retrieval import ranks_from_scores, retrieval_summary, summarize_ranks

log = logging.getLogger(__name__)

KERNELS = ("linear", "cosine")  # kernels of seeded_match and local_cka_scores
QAP_ROWS = 500  # rows matched by quadratic assignment when --max-rows is 0 (cubic cost)
SEED_FRACTION = 0.1  # share of the matched rows given as known pairs
BASE_ROWS = 1000  # known pairs (train) in the local-CKA base set; a seeded subset when there are more
RELATIVE_K = 64  # ASIF: non-zero similarities kept per sample
RELATIVE_P = 8  # ASIF: exponent applied to the kept similarities
OUTPUT = "matching.json"  # in <analyze.out>/<dataset>/<split>/runs/<run>/


# ----------------------------------------------------------------------------- kernels
def _as_2d(X, name: str) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"{name} must be a finite (n, d) array; got shape {X.shape}.")
    if (row := first_nonfinite_row(X)) is not None:
        raise ValueError(f"{name} must be a finite (n, d) array; row {row} holds NaN or inf.")
    return X


def _rows(X: np.ndarray, kernel: str) -> np.ndarray:
    """Feature map of ``kernel``: the rows themselves (linear) or L2-normalised (cosine)."""
    if kernel not in KERNELS:
        raise ValueError(f"Unknown kernel {kernel!r}; use one of: {', '.join(KERNELS)}.")
    if kernel == "cosine":
        return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    return X


def centred_kernel(X, kernel: str = "linear") -> np.ndarray:
    """(n, d) -> (n, n) kernel H K H, H = I - 11'/n."""
    Z = _rows(_as_2d(X, "X"), kernel)
    Z = Z - Z.mean(axis=0, keepdims=True)  # H Z Z' H = (H Z)(H Z)'
    return Z @ Z.T


# ----------------------------------------------------------------------------- seeded matching
def seeded_match(X, Y, seeds, kernel: str = "linear", seed: int = 0) -> np.ndarray:
    """Match the rows of X: (n, d1) to the rows of Y: (n, d2) by seeded quadratic assignment.

    seeds: (s, 2) known pairs (row in X, row in Y). Returns perm: (n,) int with perm[i] = the
    row of Y matched to row i of X (perm[seeds[:, 0]] = seeds[:, 1]). FAQ from the barycentre,
    maximising tr(K_X P K_Y P') for the centred kernels; ``seed`` seeds scipy's tie-breaking.
    """
    X, Y = _as_2d(X, "X"), _as_2d(Y, "Y")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must have the same number of rows; got {X.shape[0]} and {Y.shape[0]}.")
    seeds = np.asarray(seeds, dtype=np.int64).reshape(-1, 2)
    n = X.shape[0]
    if len(seeds) and (seeds.min() < 0 or seeds.max() >= n or len(set(seeds[:, 0])) < len(seeds)
                       or len(set(seeds[:, 1])) < len(seeds)):
        raise ValueError(f"seeds must be distinct (row in X, row in Y) pairs of rows in [0, {n}).")
    res = quadratic_assignment(centred_kernel(X, kernel), centred_kernel(Y, kernel), method="faq",
                               options={"maximize": True, "partial_match": seeds,
                                        "rng": np.random.default_rng(seed)})
    return np.asarray(res.col_ind, dtype=np.int64)


def matching_accuracy(perm: np.ndarray, truth: np.ndarray, seeds) -> dict[str, float]:
    """Fraction of non-seed rows i with perm[i] == truth[i], and its chance level 1/(n - s)."""
    seeded = np.zeros(len(perm), bool)
    seeded[np.asarray(seeds, dtype=np.int64).reshape(-1, 2)[:, 0]] = True
    free = ~seeded
    n_free = int(free.sum())
    return {"accuracy": float((perm[free] == truth[free]).mean()) if n_free else float("nan"),
            "chance": 1.0 / n_free if n_free else float("nan"), "n": len(perm), "seeds": int(seeded.sum())}


def match_experiment(X, Y, n_seeds: int, kernel: str = "linear", seed: int = 0) -> dict:
    """Shuffle the rows of Y (seeded), give ``n_seeds`` random pairs as known, run
    ``seeded_match`` and score it. X, Y: (n, d) with row i of both describing sample i."""
    X, Y = _as_2d(X, "X"), _as_2d(Y, "Y")
    n = X.shape[0]
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)  # Y row j holds sample order[j]
    truth = np.argsort(order)  # sample i sits at Y row truth[i]
    known = rng.choice(n, size=min(n_seeds, n), replace=False)
    seeds = np.stack([known, truth[known]], axis=1)
    t0 = time.perf_counter()
    perm = seeded_match(X, Y[order], seeds, kernel, seed)
    return {**matching_accuracy(perm, truth, seeds), "kernel": kernel, "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- local CKA retrieval
def local_cka_scores(base_x, base_y, query_x, cand_y, kernel: str = "linear") -> np.ndarray:
    """(n_q, n_c) biased linear CKA of [B_x; q] and [B_y; c] for every query q and candidate c.

    base_x: (b, d1), base_y: (b, d2) known pairs; query_x: (n_q, d1); cand_y: (n_c, d2).
    With m = b + 1, K = [[K_BB, k], [k', k_qq]] and L likewise (l, l_cc), HSIC(K, L) is
    proportional to sum(K*L) - 2/m (K1).(L1) + (1'K1)(1'L1)/m^2, where
    sum(K*L) = sum(K_BB*L_BB) + 2 k.l + k_qq l_cc,
    (K1).(L1) = (r_K + k).(r_L + l) + (1'k + k_qq)(1'l + l_cc) with r_K = K_BB 1,
    1'K1 = 1'K_BB 1 + 2 1'k + k_qq; the self terms HSIC(K, K) use the same identities.
    """
    Bx, By = _rows(_as_2d(base_x, "base_x"), kernel), _rows(_as_2d(base_y, "base_y"), kernel)
    Q, C = _rows(_as_2d(query_x, "query_x"), kernel), _rows(_as_2d(cand_y, "cand_y"), kernel)
    if Bx.shape[0] != By.shape[0] or Bx.shape[1] != Q.shape[1] or By.shape[1] != C.shape[1]:
        raise ValueError(f"base pairs and queries do not fit: base_x {Bx.shape}, base_y {By.shape}, "
                         f"query_x {Q.shape}, cand_y {C.shape}.")
    m = Bx.shape[0] + 1

    def side(B: np.ndarray, Z: np.ndarray):
        """Terms of one side for every added row z of Z: the base kernel K_BB (b, b), the cross
        kernel k (b, n), r_K (b,), k_zz (n,), 1'k (n,), 1'K1 (n,) and the self-HSIC of [B; z] (n,)."""
        K_BB = B @ B.T
        k, r, kzz = B @ Z.T, K_BB.sum(1), (Z * Z).sum(1)
        sk = k.sum(0)
        row_dot = r @ r + 2 * (r @ k) + (k * k).sum(0) + (sk + kzz) ** 2  # ||K1||^2
        total = r.sum() + 2 * sk + kzz  # 1'K1
        self_hsic = (K_BB * K_BB).sum() + 2 * (k * k).sum(0) + kzz**2 - 2 / m * row_dot + total**2 / m**2
        return K_BB, k, r, kzz, sk, total, self_hsic

    Kx, kx, rx, kqq, skx, tot_x, hxx = side(Bx, Q)
    Ly, ly, ry, lcc, sly, tot_y, hyy = side(By, C)
    cross = float((Kx * Ly).sum()) + 2 * (kx.T @ ly) + np.outer(kqq, lcc)  # sum(K*L), (n_q, n_c)
    dots = (rx @ ry + (rx @ ly)[None, :] + (kx.T @ ry)[:, None] + kx.T @ ly
            + np.outer(skx + kqq, sly + lcc))  # (K1).(L1)
    hxy = cross - 2 / m * dots + np.outer(tot_x, tot_y) / m**2
    denom = np.sqrt(np.clip(np.outer(hxx, hyy), 0, None))
    return np.where(denom > 0, hxy / np.where(denom > 0, denom, 1.0), 0.0)


# ----------------------------------------------------------------------------- relative representations
def relative_representation(Z, anchors, k: int = RELATIVE_K, p: float = RELATIVE_P,
                            block: int = 1024) -> scipy.sparse.csr_matrix:
    """(n, d) samples -> (n, m) ASIF descriptions against (m, d) anchors (module docstring), as a
    sparse matrix with at most ``k`` non-zeros per row, unit rows. Rows are processed ``block``
    at a time, so memory is O(block m + n k) even for many anchors."""
    Z, A = _rows(_as_2d(Z, "Z"), "cosine"), _rows(_as_2d(anchors, "anchors"), "cosine")
    if Z.shape[1] != A.shape[1]:
        raise ValueError(f"Z {Z.shape} and anchors {A.shape} must have the same number of columns.")
    m, k = A.shape[0], min(k, A.shape[0])
    parts = []
    for s in range(0, Z.shape[0], block):
        S = np.clip(Z[s:s + block] @ A.T, 0, None)
        cols = np.argpartition(-S, k - 1, axis=1)[:, :k]  # the k largest per row (ties: any k of them)
        vals = np.take_along_axis(S, cols, axis=1) ** p
        vals /= np.maximum(np.linalg.norm(vals, axis=1, keepdims=True), 1e-300)
        rows = np.repeat(np.arange(len(S)), k)
        parts.append(scipy.sparse.csr_matrix((vals.ravel(), (rows, cols.ravel())), shape=(len(S), m)))
    return scipy.sparse.vstack(parts, format="csr") if parts else scipy.sparse.csr_matrix((0, m))


def relative_scores(image, text, anchor_image, anchor_text, k: int = RELATIVE_K,
                    p: float = RELATIVE_P) -> np.ndarray:
    """(n_images, n_texts) cosine similarity of the ASIF descriptions; anchor rows paired."""
    if len(anchor_image) != len(anchor_text):
        raise ValueError(f"anchor_image and anchor_text must be paired; got {len(anchor_image)} and {len(anchor_text)} rows.")
    R_img = relative_representation(image, anchor_image, k, p)
    R_txt = relative_representation(text, anchor_text, k, p)
    return (R_img @ R_txt.T).toarray()


def retrieval_from_scores(scores: np.ndarray, text_to_image: np.ndarray) -> dict[str, float]:
    """Recall@1/5/10, RSUM and median / mean ranks of a (n_images, n_texts) score matrix."""
    return summarize_ranks(ranks_from_scores(scores, text_to_image))


# ----------------------------------------------------------------------------- the command
def _subset_test(test, max_rows: int, seed: int):
    """(image rows, caption rows, text_to_image) of a seeded subset of ``max_rows`` test images
    with all their captions (every image when max_rows is 0)."""
    keep = subset_rows(len(test.image_ids), max_rows, seed)
    where = np.full(len(test.image_ids), -1)
    where[keep] = np.arange(len(keep))
    caps = np.flatnonzero(where[test.text_to_image] >= 0)
    return keep, caps, where[test.text_to_image[caps]]


def _baseline_retrieval(rv, method: str, X: np.ndarray, T: np.ndarray, t2i: np.ndarray) -> dict | None:
    """The retrieval figures of one refitted baseline, or None (with a warning) when it maps a row
    to zero (degenerate train pairs), which has no cosine ranking; fit-adapters leaves it out too."""
    zi, zt = rv.baseline_embed(method, "image", X), rv.baseline_embed(method, "text", T)
    zero = int((zi == 0).all(1).sum() + (zt == 0).all(1).sum())
    if zero:
        log.warning("baseline %s left out: it maps %d test rows to zero (degenerate train pairs)", method, zero)
        return None
    return retrieval_summary(zi, zt, t2i)


def run_matching(cfg, run: str | None = None, seeds: float = SEED_FRACTION, kernel: str = "linear",
                 base_rows: int = BASE_ROWS) -> dict:
    """``analyze matching``: training-free retrieval (local CKA, ASIF) next to the run's adapters
    and the baselines on the same rows of ``analyze.split``, and seeded matching of images to
    captions (raw features and, for comparison, the adapters' embeddings).

    Rows: ``analyze.max_rows`` test images (0 = all) with their captions; the matching uses one
    caption per image and at most ``QAP_ROWS`` images when max_rows is 0. seeds: known pairs,
    a fraction of the matched rows (< 1) or a count. base_rows: local-CKA base pairs from train.
    Writes ``runs/<run>/matching.json``; returns the document (plus ``out``)."""
    a = cfg.analyze
    if not (math.isfinite(seeds) and seeds >= 0):  # inf would overflow int(); nan fails every comparison
        raise AnalyzeError(f"analyze matching --seeds {seeds}: give a fraction of the matched rows (0 <= f < 1) "
                           "or a count of known pairs (>= 1).")
    if base_rows < 0:
        raise AnalyzeError(f"analyze matching --base-rows {base_rows}: use a count >= 0 (0 = all train pairs).")
    rv = open_run(cfg, run)
    test = rv.split(a.split)
    img_rows, cap_rows, t2i = _subset_test(test, a.max_rows, a.seed)
    qap = img_rows[subset_rows(len(img_rows), a.max_rows or QAP_ROWS, a.seed)]  # matched images
    n_seeds = int(round(seeds * len(qap))) if seeds < 1 else int(seeds)
    if n_seeds >= len(qap):
        raise AnalyzeError(f"analyze matching --seeds {seeds:g}: {n_seeds} known pairs of the {len(qap)} matched rows "
                           f"leave none to match. Give fewer: a count below {len(qap)}, or a fraction below "
                           f"{(len(qap) - 0.5) / len(qap):.3g}.")
    train = rv.split("train")  # the run's train pairs: anchors and base set
    X, T = test.image[img_rows], test.text[cap_rows]
    mx, my = train.image.mean(0), train.text.mean(0)
    ax, ay = train.image[train.text_to_image] - mx, train.text - my  # train pairs: anchors and base set
    base = subset_rows(len(ay), base_rows, a.seed)
    retrieval, seconds = {}, {}
    methods = {
        "local_cka": lambda: retrieval_from_scores(local_cka_scores(ax[base], ay[base], X - mx, T - my, kernel), t2i),
        "relative": lambda: retrieval_from_scores(relative_scores(X - mx, T - my, ax, ay), t2i),
        "adapters": lambda: retrieval_summary(rv.embed("image", X), rv.embed("text", T), t2i),
        **{m: (lambda m=m: _baseline_retrieval(rv, m, X, T, t2i)) for m in rv.baselines},
    }
    for name, compute in methods.items():
        t0 = time.perf_counter()
        result = compute()
        if result is not None:
            retrieval[name], seconds[name] = result, time.perf_counter() - t0
    Xq, Tq = test.image[qap], test.text[test.first_caption[qap]]  # one caption per image, rows paired
    matching = {"raw": match_experiment(Xq - mx, Tq - my, n_seeds, kernel, a.seed),
                "adapters": match_experiment(rv.embed("image", Xq), rv.embed("text", Tq), n_seeds, kernel, a.seed)}
    out = output_dir(cfg, "runs", rv.name)
    doc = {**header(cfg, "matching"), "run": rv.name, "run_sha256": rv.sha256, "n_images": int(len(img_rows)),
           "n_texts": int(len(cap_rows)), "n_test_images": len(test.image_ids), "kernel": kernel,
           "base_rows": int(len(base)), "anchors": int(len(ay)), "relative": {"k": RELATIVE_K, "p": RELATIVE_P},
           "retrieval": retrieval, "retrieval_seconds": seconds, "matching": matching,
           "seconds": sum(seconds.values()) + sum(m["seconds"] for m in matching.values()),
           "training_free": ["local_cka", "relative"]}
    write_json(out / OUTPUT, doc)
    return {**doc, "out": out}
