"""Benchmark: the mutual-kNN fast path of ``analyze platonic`` on data with duplicate rows.

Duplicate captions give identical text rows, hence exactly tied similarities. Before the fix,
the fast path broke such ties differently from ``similarity.metrics.mutual_knn``, its check
against the library failed and the test fell back to one library call per draw (143 s at
n = 400 on a real 1,500-pair dataset). This script times, in one run and on the same data:

  slow  hypothesis_test(use_fast=False): the library path that was the fallback
  fast  hypothesis_test(use_fast=True):  the path used now (the engine chosen is printed)

and checks that both give the same scores, deltas and permutation nulls (exactly; the intervals
differ by design: the fast path takes distinct-neighbour bootstrap draws, the library path
subsamples, see analyze.engines). Data: n paired rows; the image-side
representations have distinct rows, the text-side ones repeat ``--unique`` caption vectors.

Usage:
    .venv/bin/python benchmarks/bench_platonic_ties.py [--n 400] [--unique 250] [--bootstrap 200]
        [--permutations 200] [--k 10]
    .venv/bin/python benchmarks/bench_platonic_ties.py --quick   # n = 80, 10 + 10 draws: seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analyze import platonic  # noqa: E402
from analyze.engines import build_engine  # noqa: E402
from similarity.metrics import mutual_knn  # noqa: E402


def data(n: int, unique: int, seed: int = 0) -> list[np.ndarray]:
    """X (n, 512), Y (n, 768) with ``unique`` distinct rows, RX (n, 256), RY (n, 256) following
    Y's duplicates, ref (n, 768): float32, sharing a latent signal."""
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n, 16))
    caption = rng.integers(0, unique, size=n)  # row i's caption; equal captions give equal text rows
    C = rng.normal(size=(unique, 16))  # caption latents
    mix = lambda A, d, s: (A @ rng.normal(size=(A.shape[1], d)) + s * rng.normal(size=(len(A), d)))  # noqa: E731
    X = mix(Z, 512, 1.0)
    Y = mix(C, 768, 0.5)[caption]
    RX, RY = mix(Z, 256, 0.5), mix(C, 256, 0.2)[caption]
    ref = mix(Z, 768, 0.5)
    return [a.astype(np.float32) for a in (X, Y, RX, RY, ref)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--unique", type=int, default=250, help="distinct caption rows among the n text rows")
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--permutations", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: --n 80 --unique 50 --bootstrap 10 --permutations 10")
    args = ap.parse_args()
    if args.quick:
        args.n, args.unique, args.bootstrap, args.permutations = 80, 50, 10, 10
    X, Y, RX, RY, ref = data(args.n, args.unique)
    dup = args.n - len(np.unique(Y, axis=0))
    print(f"n={args.n}, text rows repeating another: {dup}, k={args.k}, "
          f"{args.bootstrap} resamples + {args.permutations} permutations, metric mutual_knn")
    engine = build_engine("mutual_knn", mutual_knn, {"k": args.k}, [X, Y, RX, RY], ref, True)
    print(f"engine chosen after the check against the library: {type(engine).__name__.lstrip('_')}")
    out, seconds = {}, {}
    for name, fast in (("slow", False), ("fast", True)):
        t0 = time.perf_counter()
        out[name] = platonic.hypothesis_test(X, Y, RX, RY, ref, {"mutual_knn": mutual_knn}, args.k,
                                             args.bootstrap, args.permutations, seed=0, use_fast=fast)["mutual_knn"]
        seconds[name] = time.perf_counter() - t0
        print(f"{name}: {seconds[name]:8.2f} s  (engine {out[name]['engine']})")
    same = all(out["slow"]["terms"][t][key] == out["fast"]["terms"][t][key]
               for t in platonic.TERMS for key in ("score", "null_mean", "p_value")) and \
        all(out["slow"]["delta"][s]["delta"] == out["fast"]["delta"][s]["delta"] for s in platonic.SIDES)
    print(f"speed-up slow/fast: {seconds['slow'] / seconds['fast']:.1f}x; identical scores, deltas and "
          f"permutation p-values: {same}")
    for name in ("slow", "fast"):
        print(f"{name} intervals: {out[name]['resampling']}")
    return 0 if same else 1  # the fast path must not change the test's numbers


if __name__ == "__main__":
    sys.exit(main())
