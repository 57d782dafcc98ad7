"""Benchmark of the search engines (search.engine): exact blockwise cosine vs faiss IVF.

For galleries of 10k, 100k and 1M synthetic L2-normalised vectors of width 512 (--sizes, --dim):
  * build: faiss training + adding, CPU seconds (exact search needs none);
  * memory: resident memory the engine holds (exact: the gallery array; faiss: its index, built
    from the array, which is then dropped), and the peak added while answering queries;
  * latency: one query at a time (what `search serve` does) over the first 50 queries: median CPU
    milliseconds of the process, median and 95th percentile wall milliseconds, and the CPU-time
    ratio exact / faiss. On a shared machine run it with OMP_NUM_THREADS=1: one-thread CPU time is
    what other processes do not inflate (OpenMP threads spinning for busy cores would);
  * recall@10 of faiss against exact search over the same queries, for each nprobe of --nprobe
    (the lists visited per query; by default search.nprobe doubled up to 128, the values
    `search index` tries until its measured recall@10 reaches 0.95), and the speed at each.

Data: a Gaussian mixture, so that neighbourhoods exist as they do in real embeddings: n / 100
centres drawn uniformly on the sphere, each row = centre + noise of the same norm, normalised
(a row's cosine with its centre ~0.71, two rows of one centre ~0.5). Queries are fresh draws
from the same mixture, not gallery rows. --isotropic draws plain Gaussian rows instead (no
structure: the worst case for any inverted-file index).

Memory is the process's resident set size (VmRSS) on Linux, the peak (VmHWM) reset by writing 5
to /proc/self/clear_refs before each block; elsewhere the numbers are missing.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_search.py [--quick] [--sizes 10000,100000,1000000] [--dim 512]
        [--queries 200] [--nprobe 8,16,32,64] [--isotropic] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.config import SearchConfig  # noqa: E402
from search.engine import (ExactIndex, FaissIndex, exact_topk, faiss_available, nlist_for,  # noqa: E402
                           recall_at_k)

MIB = 2**20
BLOCK = 65536  # rows generated at once (keeps temporaries small at 1M rows)
LATENCY_QUERIES = 50  # one-at-a-time queries timed per engine (recall uses every query, in one batch)


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def rss_mib() -> float | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


def peak_mib() -> float | None:
    kib = _status_kib("VmHWM")
    return None if kib is None else kib / 1024


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def mixture(n: int, d: int, centres: np.ndarray | None, rng: np.random.Generator, spread: float = 1.0) -> np.ndarray:
    """n normalised float32 rows: a random centre + noise of ``spread`` times its norm (no centres: noise alone)."""
    out = np.empty((n, d), np.float32)
    for lo in range(0, n, BLOCK):
        m = min(BLOCK, n - lo)
        x = rng.standard_normal((m, d), dtype=np.float32) * np.float32(spread / np.sqrt(d))
        if centres is not None:
            x += centres[rng.integers(0, len(centres), m)]
        out[lo:lo + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def latency_ms(search, queries: np.ndarray, k: int) -> dict:
    """One-query searches: median and 95th percentile wall milliseconds, and the median CPU
    milliseconds of this process (all its threads), which other processes on a shared machine do
    not inflate when the search runs on one thread."""
    wall, cpu = [], []
    for q in queries:
        t, c = time.perf_counter(), time.process_time()
        search(q[None], k)
        wall.append(1000 * (time.perf_counter() - t))
        cpu.append(1000 * (time.process_time() - c))
    return {"latency_ms": float(np.median(wall)), "p95_ms": float(np.percentile(wall, 95)),
            "cpu_ms": float(np.median(cpu))}


def bench_size(n: int, d: int, n_queries: int, nprobes: list[int], isotropic: bool, spread: float,
               k: int = 10) -> dict:
    rng = np.random.default_rng(n)
    centres = None if isotropic else mixture(max(1, n // 100), d, None, rng)
    gc.collect()
    before = rss_mib()
    gallery = mixture(n, d, centres, rng, spread)
    queries = mixture(n_queries, d, centres, rng, spread)
    exact_mem = _diff(rss_mib(), before)  # the gallery array (and the queries: n_queries x d)
    exact = ExactIndex(gallery)
    _reset_peak()
    base = rss_mib()
    exact_s, exact_r = exact_topk(gallery, queries, k)
    exact_query_peak = _diff(peak_mib(), base)
    lat = latency_ms(exact.search, queries[:LATENCY_QUERIES], k)
    row = {"n": n, "dim": d, "queries": n_queries, "k": k, "data": "isotropic" if isotropic else f"mixture, spread {spread:g}",
           "exact": {"memory_mib": exact_mem, "query_peak_mib": exact_query_peak, **lat, "gallery_mib": gallery.nbytes / MIB}}
    if not faiss_available():
        row["faiss"] = None
        return row
    gc.collect()
    before = rss_mib()
    t, c = time.perf_counter(), time.process_time()
    index = FaissIndex.build(gallery, nprobe=nprobes[0])
    build_s, build_cpu_s = time.perf_counter() - t, time.process_time() - c
    del gallery, exact
    gc.collect()
    faiss_mem = _diff(rss_mib(), before)
    faiss_mem = None if faiss_mem is None or exact_mem is None else faiss_mem + exact_mem  # the array was dropped
    sweep = []
    for nprobe in nprobes:
        index.nprobe = nprobe
        _reset_peak()
        base = rss_mib()
        _, rows = index.search(queries, k)
        peak = _diff(peak_mib(), base)
        flat = latency_ms(index.search, queries[:LATENCY_QUERIES], k)
        sweep.append({"nprobe": nprobe, "recall@10": recall_at_k(rows, exact_r, k), **flat, "query_peak_mib": peak,
                      "speedup": lat["cpu_ms"] / flat["cpu_ms"] if flat["cpu_ms"] else None})
    row["faiss"] = {"nlist": index.nlist, "build_s": build_s, "build_cpu_s": build_cpu_s, "memory_mib": faiss_mem,
                    "sweep": sweep}
    return row


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (seconds): 2,000 and 10,000 rows, 20 queries")
    ap.add_argument("--sizes", default="10000,100000,1000000", help="gallery sizes, comma-separated")
    ap.add_argument("--dim", type=int, default=512, help="vector width")
    ap.add_argument("--queries", type=int, default=200, help="queries per size (latency and recall)")
    ap.add_argument("--nprobe", default=None, help="faiss lists visited per query, comma-separated (default: "
                    f"search.nprobe = {SearchConfig().nprobe} doubled up to 128, the values `search index` tries)")
    ap.add_argument("--spread", type=float, default=1.0, help="noise norm / centre norm of the mixture rows")
    ap.add_argument("--isotropic", action="store_true", help="plain Gaussian rows (no neighbourhood structure)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    sizes = [2000, 10000] if args.quick else [int(s) for s in args.sizes.split(",")]
    n_queries = 20 if args.quick else args.queries
    default = SearchConfig().nprobe
    nprobes = [int(p) for p in args.nprobe.split(",")] if args.nprobe else [default * 2**i for i in range(8)
                                                                          if default * 2**i <= 128]
    if not faiss_available():
        print("faiss-cpu is not installed: exact search only (pip install 'platonic-align[search]')")
    print(f"{'n':>9} {'engine':>14} {'nlist':>6} {'build s':>8} {'memory MiB':>11} {'query peak':>11} "
          f"{'cpu ms':>8} {'wall ms':>8} {'p95 ms':>8} {'speedup':>8} {'recall@10':>10}")
    results = []
    for n in sizes:
        r = bench_size(n, args.dim, n_queries, nprobes, args.isotropic, args.spread)
        results.append(r)
        e = r["exact"]
        print(f"{n:>9} {'exact':>14} {'':>6} {'':>8} {_fmt(e['memory_mib'], '11.1f')} "
              f"{_fmt(e['query_peak_mib'], '11.1f')} {e['cpu_ms']:>8.2f} {e['latency_ms']:>8.2f} {e['p95_ms']:>8.2f} "
              f"{'1.00':>8} {'1.000':>10}")
        f = r["faiss"]
        for s in (f or {}).get("sweep", []):
            print(f"{n:>9} {'faiss np=' + str(s['nprobe']):>14} {f['nlist']:>6} {f['build_cpu_s']:>8.1f} "
                  f"{_fmt(f['memory_mib'], '11.1f')} {_fmt(s['query_peak_mib'], '11.1f')} {s['cpu_ms']:>8.2f} "
                  f"{s['latency_ms']:>8.2f} {s['p95_ms']:>8.2f} {_fmt(s['speedup'], '8.2f')} {s['recall@10']:>10.3f}")
        sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(f"data: {results[0]['data']}; nlist = round(sqrt(n)) (search.engine.nlist_for); build s and cpu ms are CPU "
          f"time of this process, speedup = exact cpu ms / faiss cpu ms; one query at a time, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {len(os.sched_getaffinity(0))} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
