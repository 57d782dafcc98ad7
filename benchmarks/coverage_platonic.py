"""Coverage of the Platonic test's 95% intervals (analyze.platonic.hypothesis_test) on synthetic
representations with a known population value of each delta.

Population: a latent Z ~ N(0, I_q) and five representations of it with independent Gaussian
noise (an image encoder X, a text encoder Y, aligned embeddings RX, RY, and a nonlinear
reference). One "sample" is n rows drawn independently from it.

Population value of each delta, AT THE SAME n: biased CKA and the kNN scores depend on the
number of rows (biased HSIC is inflated by O(1/n) terms; a neighbourhood among n rows is not
one among 10 n rows), so the quantity a sample of n rows estimates is defined as

    theta_n = E[ delta_hat(n rows) ],

the mean of the estimator over ``--population`` independent samples of n rows (a very large
sample of population x n rows, cut into samples of n; its Monte Carlo error is printed).
Unbiased CKA is nearly free of this (a ratio of unbiased estimators), and its n -> infinity
value (one sample of ``--large`` rows) is printed next to theta_n.

Coverage: ``--samples`` further independent samples of n rows go through
``hypothesis_test`` (bootstrap / subsample intervals exactly as ``analyze platonic`` computes
them, ``--bootstrap`` draws, no permutations); the fraction of delta intervals that contain
theta_n is the coverage (target 93-97%, binomial standard error printed).

    python benchmarks/coverage_platonic.py                    # defaults: a few minutes on 2 cores
    python benchmarks/coverage_platonic.py --samples 1000     # tighter coverage estimates
    python benchmarks/coverage_platonic.py --quick            # seconds; the numbers mean nothing

Samples are spread over ``--workers`` processes with one thread each (the problems are small:
threads only contend); sample i uses the random stream (seed, i), so results do not depend
on the number of workers.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one thread per worker process
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analyze.metrics import METRICS  # noqa: E402
from analyze.platonic import SIDES, hypothesis_test  # noqa: E402

METRIC_NAMES = ("cka", "unbiased_cka", "mutual_knn")
K = 10  # neighbours for mutual kNN (the analyze default)


class Population:
    """Five representations of a shared latent: X (image), Y (text), RX, RY (aligned), ref."""

    def __init__(self, seed: int = 0, q: int = 6):
        rng = np.random.default_rng(seed)
        self.q = q
        self.maps = {"X": rng.normal(size=(q, 32)), "Y": rng.normal(size=(q, 24)), "RX": rng.normal(size=(q, 16)),
                     "RY": rng.normal(size=(q, 16)), "ref": rng.normal(size=(q, 24)) / math.sqrt(q)}
        self.noise = {"X": 1.2, "Y": 2.0, "RX": 0.9, "RY": 1.4, "ref": 0.4}

    def sample(self, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        Z = rng.normal(size=(n, self.q))
        out = {}
        for name, W in self.maps.items():
            signal = np.tanh(Z @ W) if name == "ref" else Z @ W
            out[name] = signal + self.noise[name] * rng.normal(size=(n, W.shape[1]))
        return out


def deltas(reps: dict[str, np.ndarray], name: str) -> np.ndarray:
    """(2,) point deltas (image, text) of one metric on one sample, from the library metric."""
    fn = METRICS[name]
    kw = {"k": K} if name == "mutual_knn" else {}
    s = [fn(reps[r], reps["ref"], device="cpu", **kw) for r in ("X", "Y", "RX", "RY")]
    before = (s[0] + s[1]) / 2
    return np.array([s[2] - before, s[3] - before])


def _point(job: tuple) -> np.ndarray:
    """(metrics, 2) point deltas of sample i (random stream (seed, i))."""
    pop, n, seed, i = job
    reps = pop.sample(n, np.random.default_rng([seed, i]))
    return np.stack([deltas(reps, m) for m in METRIC_NAMES])


def _intervals(job: tuple) -> np.ndarray:
    """(metrics, 2 sides, 2) delta intervals (lo, hi) of sample i from hypothesis_test."""
    pop, n, seed, i, bootstrap = job
    reps = pop.sample(n, np.random.default_rng([seed, i]))
    res = hypothesis_test(reps["X"], reps["Y"], reps["RX"], reps["RY"], reps["ref"],
                          {m: METRICS[m] for m in METRIC_NAMES}, K, bootstrap, 0, seed=i)
    return np.array([[[res[m]["delta"][s]["ci_lo"], res[m]["delta"][s]["ci_hi"]] for s in SIDES]
                     for m in METRIC_NAMES])


def _map(fn, jobs: list, workers: int) -> list:
    if workers <= 1:
        return [fn(j) for j in jobs]
    with ProcessPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        return list(pool.map(fn, jobs, chunksize=max(1, len(jobs) // (8 * workers))))


def population_values(pop: Population, n: int, draws: int, seed: int, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """theta_n: (metrics, 2) mean deltas over ``draws`` samples of n rows, and their Monte Carlo error."""
    vals = np.stack(_map(_point, [(pop, n, seed, i) for i in range(draws)], workers))  # (draws, metrics, 2)
    return vals.mean(axis=0), vals.std(axis=0, ddof=1) / math.sqrt(draws)


def coverage(pop: Population, n: int, samples: int, bootstrap: int, theta: np.ndarray, seed: int,
             workers: int) -> tuple[np.ndarray, np.ndarray]:
    """(metrics, 2) fraction of delta intervals containing theta_n, and (metrics, 2) mean width."""
    ci = np.stack(_map(_intervals, [(pop, n, seed, i, bootstrap) for i in range(samples)], workers))
    hit = (ci[..., 0] <= theta) & (theta <= ci[..., 1])  # (samples, metrics, 2)
    return hit.mean(axis=0), (ci[..., 1] - ci[..., 0]).mean(axis=0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300, help="rows per sample")
    ap.add_argument("--samples", type=int, default=400, help="independent samples whose intervals are checked")
    ap.add_argument("--population", type=int, default=1000, help="samples of n rows averaged for theta_n")
    ap.add_argument("--large", type=int, default=200_000, help="rows of the one large sample (unbiased CKA limit)")
    ap.add_argument("--bootstrap", type=int, default=200, help="resamples per interval")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (one thread each)")
    ap.add_argument("--quick", action="store_true", help="smoke run: --n 60 --samples 6 --population 8 "
                    "--large 2000 --bootstrap 10 --workers 2")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.samples, args.population, args.large, args.bootstrap, args.workers = 60, 6, 8, 2000, 10, 2
    torch.set_num_threads(1)
    pop = Population(args.seed)
    t0 = time.perf_counter()
    theta, err = population_values(pop, args.n, args.population, args.seed + 1, args.workers)
    big = pop.sample(args.large, np.random.default_rng(args.seed + 2))
    limit = deltas(big, "unbiased_cka")
    t1 = time.perf_counter()
    cov, width = coverage(pop, args.n, args.samples, args.bootstrap, theta, args.seed + 3, args.workers)
    t2 = time.perf_counter()
    se = math.sqrt(0.95 * 0.05 / args.samples)
    print(f"n = {args.n} rows per sample, {args.samples} samples, {args.bootstrap} resamples per interval, "
          f"theta_n from {args.population} samples ({args.population * args.n} rows); "
          f"binomial SE of a 95% coverage: {100 * se:.1f} points")
    print(f"{'metric':<14}{'side':<7}{'theta_n':>10}{'MC err':>9}{'coverage':>10}{'mean width':>12}")
    for j, m in enumerate(METRIC_NAMES):
        for s, side in enumerate(SIDES):
            print(f"{m:<14}{side:<7}{theta[j, s]:>+10.4f}{err[j, s]:>9.4f}{100 * cov[j, s]:>9.1f}%{width[j, s]:>12.4f}")
    print(f"unbiased_cka n -> infinity ({args.large} rows): image {limit[0]:+.4f}, text {limit[1]:+.4f}")
    print(f"time: population {t1 - t0:.0f} s, coverage {t2 - t1:.0f} s")


if __name__ == "__main__":
    main()
