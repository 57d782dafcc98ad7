"""Cost of the Platonic test's controls: hypothesis_test on synthetic features with and without the
default controls (3 untrained-adapter seeds, CCA, Procrustes: 10 more representations scored on the
same resamples and permutations), 200 resamples + 200 permutations, cka + unbiased_cka + mutual_knn.
Prints both times and their ratio (measured within one run).

    python benchmarks/bench_platonic_controls.py [--n 1000] [--bootstrap 200] [--permutations 200]
    python benchmarks/bench_platonic_controls.py --quick     # n = 120, 20 + 20 draws: seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analyze.metrics import METRICS  # noqa: E402
from analyze.platonic import hypothesis_test  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="rows")
    ap.add_argument("--bootstrap", type=int, default=200, help="resamples")
    ap.add_argument("--permutations", type=int, default=200, help="permutations")
    ap.add_argument("--quick", action="store_true", help="smoke run: --n 120 --bootstrap 20 --permutations 20")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.bootstrap, args.permutations = 120, 20, 20
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(args.n, 8))

    def rep(d: int, noise: float) -> np.ndarray:
        return Z @ rng.normal(size=(8, d)) + noise * rng.normal(size=(args.n, d))

    X, Y, RX, RY, ref = rep(512, 1), rep(768, 2), rep(768, 1), rep(768, 1.5), rep(768, 0.5)
    controls = {"random": [(rep(768, 3), rep(768, 3)) for _ in range(3)], "cca": [(rep(768, 2), rep(768, 2))],
                "procrustes": [(rep(768, 2), rep(768, 2))]}
    metrics = {m: METRICS[m] for m in ("cka", "unbiased_cka", "mutual_knn")}
    times = {}
    for label, c in (("without controls", None), ("with controls", controls)):
        t0 = time.perf_counter()
        hypothesis_test(X, Y, RX, RY, ref, metrics, 10, args.bootstrap, args.permutations, controls=c)
        times[label] = time.perf_counter() - t0
        print(f"n = {args.n}, {args.bootstrap} resamples + {args.permutations} permutations, {label}: "
              f"{times[label]:.1f} s")
    print(f"ratio: {times['with controls'] / times['without controls']:.1f}x")


if __name__ == "__main__":
    main()
