"""Benchmark of similarity.metrics.

1. Linear CKA (biased and unbiased) by the feature-space path, O(n d^2), against the naive
   n x n kernel formulas, O(n^2 d) time and O(n^2) memory, at n = --n (default 8,000), d = 768:
   times, speed ratio, absolute difference of the values.
2. Every registered metric at Flickr30k scale (n = --full-n, default 31,783, d = 768) on random
   paired data: value, wall time and peak memory.

Peak memory is what the block adds on top of the memory in use when it starts:
  * CUDA: torch.cuda.max_memory_allocated (live tensors of the caching allocator).
  * CPU on Linux: the process's peak resident set size (VmHWM), reset before each block by
    writing 5 to /proc/self/clear_refs, minus VmRSS at the start: all memory of the process
    (torch, numpy, Python), including the float64 copies of the inputs the metrics make.
  * elsewhere: the ru_maxrss increase, a lower bound (0 unless the block beats earlier peaks).

Usage:
    .venv/bin/python benchmarks/bench_metrics.py [--n 8000] [--full-n 31783] [--d 768]
        [--quick] [--device auto] [--metrics cka,mutual_knn] [--skip-naive] [--skip-full]
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.runtime import resolve_device  # noqa: E402
from similarity.metrics import METRICS, cka  # noqa: E402

MIB = 2**20


# ----------------------------------------------------------------------------- measurement
def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@contextmanager
def measure(device: torch.device):
    """Yields a dict filled with 'seconds' and 'peak_mib' (see module docstring) on exit."""
    out: dict = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out["how"] = "torch.cuda.max_memory_allocated"
    elif _reset_peak_rss() and _proc_status_kib("VmRSS") is not None:
        base = _proc_status_kib("VmRSS") * 1024
        out["how"] = "process VmHWM after clear_refs"
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out["how"] = "ru_maxrss increase (lower bound)"
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
        elif out["how"].startswith("process"):
            peak = _proc_status_kib("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out["seconds"] = time.perf_counter() - t0
        out["peak_mib"] = max(0, peak - base) / MIB


def best_times(fns, repeats: int) -> list[tuple[float, float]]:
    """(minimum wall seconds over ``repeats`` calls, value) for each function. The calls are
    interleaved (f1, f2, f1, f2, ...) so that a noisy, shared machine slows all of them alike."""
    times, values = [[] for _ in fns], [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            values[i] = fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[i].append(time.perf_counter() - t0)
    return [(min(t), v) for t, v in zip(times, values)]


# ----------------------------------------------------------------------------- data and baseline
def paired_data(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """X: (n, d) float32 Gaussian; Y = X W / sqrt(d) + noise, so the pair is related but not equal."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d), dtype=np.float32)
    W = rng.standard_normal((d, d), dtype=np.float32) / np.float32(math.sqrt(d))
    return X, X @ W + rng.standard_normal((n, d), dtype=np.float32)


def naive_linear_cka(X, Y, unbiased: bool, device: torch.device) -> float:
    """The textbook n x n form: K = X X', L = Y Y' (float64), then tr(KHLH) (via row/column
    means) or Song et al.'s eq. 5 on the zero-diagonal kernels."""
    def gram(A):
        A = torch.as_tensor(A, device=device, dtype=torch.float64)
        return A @ A.T

    def hsic(K, L):
        n = K.shape[0]
        if not unbiased:
            Kc = K - K.mean(0, keepdim=True) - K.mean(1, keepdim=True) + K.mean()
            return (Kc * L).sum() / (n - 1) ** 2
        Kt, Lt = K - torch.diag(K.diagonal()), L - torch.diag(L.diagonal())
        r_k, r_l = Kt.sum(1), Lt.sum(1)
        return ((Kt * Lt).sum() + r_k.sum() * r_l.sum() / ((n - 1) * (n - 2))
                - 2 * (r_k @ r_l) / (n - 2)) / (n * (n - 3))

    K, L = gram(X), gram(Y)
    return float(hsic(K, L) / torch.sqrt(hsic(K, K) * hsic(L, L)))


# ----------------------------------------------------------------------------- the two parts
def bench_linear(n: int, d: int, device: torch.device, repeats: int) -> None:
    X, Y = paired_data(n, d, seed=1)
    print(f"\n[1] linear CKA, feature space vs naive n x n kernels: n={n}, d={d}, device={device}, "
          f"best of {repeats}")
    print(f"{'estimator':<10} {'feature s':>10} {'naive s':>10} {'speed-up':>9} {'|diff|':>10} {'value':>10}")
    for unbiased in (False, True):
        (t_fast, v_fast), (t_naive, v_naive) = best_times(
            [lambda: cka(X, Y, unbiased=unbiased, device=device),
             lambda: naive_linear_cka(X, Y, unbiased, device)], repeats)
        name = "unbiased" if unbiased else "biased"
        print(f"{name:<10} {t_fast:>10.3f} {t_naive:>10.3f} {t_naive / t_fast:>8.1f}x "
              f"{abs(v_fast - v_naive):>10.1e} {v_fast:>10.6f}")


def bench_all(n: int, d: int, device: torch.device, names: list[str]) -> None:
    X, Y = paired_data(n, d, seed=2)
    dense = n * n * 8 / 2**30
    print(f"\n[2] all metrics: n={n}, d={d}, device={device}; inputs 2 x {X.nbytes / MIB:.0f} MiB "
          f"float32 (a dense n x n float64 matrix would be {dense:.1f} GiB)")
    how = None
    rows = []
    for name in names:
        with measure(device) as m:
            value = METRICS[name](X, Y, device=device)
        how = m["how"]
        rows.append((name, value, m["seconds"], m["peak_mib"]))
        print(f"  {name:<18} {value:>9.5f} {m['seconds']:>9.2f} s {m['peak_mib']:>9.0f} MiB", flush=True)
    print(f"\n{'metric':<18} {'value':>9} {'time s':>9} {'peak MiB':>9}")
    for name, value, seconds, peak in rows:
        print(f"{name:<18} {value:>9.5f} {seconds:>9.2f} {peak:>9.0f}")
    print(f"{'total':<18} {'':>9} {sum(r[2] for r in rows):>9.1f} {max(r[3] for r in rows):>9.0f} (max)")
    print(f"peak memory = {how}, above the level at the start of each metric")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8000, help="rows for part 1 (default 8000)")
    p.add_argument("--full-n", type=int, default=31783, help="rows for part 2 (default 31783, Flickr30k)")
    p.add_argument("--d", type=int, default=768, help="feature dimension of both sides (default 768)")
    p.add_argument("--quick", action="store_true", help="smoke run: --n 300 --full-n 400 --d 64 --repeats 2")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--metrics", default=",".join(METRICS), help="comma-separated registry names")
    p.add_argument("--repeats", type=int, default=5, help="timing repeats in part 1 (best is shown)")
    p.add_argument("--skip-naive", action="store_true", help="skip part 1")
    p.add_argument("--skip-full", action="store_true", help="skip part 2")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.full_n, args.d, args.repeats = 300, 400, 64, 2
    device = resolve_device(args.device)
    names = [s for s in args.metrics.split(",") if s]
    unknown = [s for s in names if s not in METRICS]
    if unknown:
        p.error(f"unknown metrics {unknown}; choose from {', '.join(METRICS)}")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, GPU: {gpu}, "
          f"load average {os.getloadavg()[0]:.1f}; all computation in float64")
    if not args.skip_naive:
        bench_linear(args.n, args.d, device, args.repeats)
    if not args.skip_full:
        bench_all(args.full_n, args.d, device, names)


if __name__ == "__main__":
    main()
