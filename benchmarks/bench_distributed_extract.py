"""Multi-process extraction: throughput of N torchrun ranks against one process.

Each configuration runs the real command in a fresh cache on a generated imagefolder dataset
(benchmarks/bench_extract.py's make_dataset: 500 x 375 JPEGs):

    1 process   python -m extract.cli ...
    N processes python -m torch.distributed.run --standalone --nproc-per-node N -m extract.cli ...

For fairness every process gets cores / N torch threads (OMP_NUM_THREADS), so all configurations
use the same cores; DataLoader workers are `--workers` per process (-1 = auto, which divides
min(8, cores - 1) among the ranks of a machine). Reported per run:

    compute s     extraction time from the entry's provenance (the slowest rank; model loading,
                  imports and process start-up excluded)
    items/s       rows / compute s
    wall s        the whole command, start-up included
    max |diff|    largest difference from the 1-process features (0 when the kernels match; CPU
                  kernels may differ in the last bits between thread counts)

    .venv/bin/python benchmarks/bench_distributed_extract.py [--images 384] [--nprocs 1,2] [--repeats 2]
    .venv/bin/python benchmarks/bench_distributed_extract.py --quick   # tiny-resnet, 8 images, 1 repeat

On a CPU-only machine expect little or no gain: one process already keeps every core busy with
threads. The point of multi-process extraction is one process per GPU. Timings on shared machines
are noisy: compare within one run (the load average is printed).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_extract import make_dataset  # noqa: E402
from pipeline.cache import find_entry  # noqa: E402


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run(nproc: int, data: Path, cache: Path, args) -> dict:
    """One extraction with ``nproc`` processes; returns timing facts and the features."""
    threads = max(1, cores() // nproc)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd = [*launcher, "-m", "extract.cli", "--encoder", args.encoder, "--dataset", "imagefolder",
           "--data-dir", str(data), "--cache", str(cache), "--split", "test", "--captions", "first",
           "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--device", "cpu",
           "--set", f"extract.chunk_rows={args.chunk_rows}"]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    entry = find_entry(cache, "imagefolder", "test", args.encoder)
    prov = entry.provenance
    return {"nproc": nproc, "threads": threads, "rows": prov["rows_computed"], "compute": prov["extract_seconds"],
            "wall": wall, "features": entry.features()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="mobilenet_v2", help="image encoder (default: mobilenet_v2; "
                    "tiny-resnet runs without real weights)")
    ap.add_argument("--images", type=int, default=384, help="dataset size (default: 384)")
    ap.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    ap.add_argument("--chunk-rows", type=int, default=64, help="rows per cache chunk (default: 64)")
    ap.add_argument("--workers", type=int, default=-1, help="DataLoader workers per process (default: -1 = auto)")
    ap.add_argument("--nprocs", default="1,2", help="process counts to compare (default: 1,2)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per process count (default: 2)")
    ap.add_argument("--quick", action="store_true", help="smoke run: --encoder tiny-resnet --images 8 "
                    "--batch-size 4 --chunk-rows 4 --workers 0 --repeats 1")
    args = ap.parse_args()
    if args.quick:
        args.encoder, args.images, args.batch_size, args.chunk_rows, args.workers, args.repeats = \
            "tiny-resnet", 8, 4, 4, 0, 1
    nprocs = [int(n) for n in args.nprocs.split(",")]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"encoder={args.encoder} images={args.images} batch={args.batch_size} chunk_rows={args.chunk_rows} "
          f"cores={cores()} workers/proc={args.workers} load average before: {load}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp) / "data", args.images)
        for repeat in range(args.repeats):
            for nproc in nprocs:
                results.append(run(nproc, data, Path(tmp) / f"cache-{nproc}-{repeat}", args))
    reference = next(r["features"] for r in results if r["nproc"] == min(nprocs))
    print(f"\n{'procs':>5s} {'threads/proc':>12s} {'rows':>5s} {'compute s':>9s} {'items/s':>8s} "
          f"{'wall s':>7s} {'max |diff|':>10s}")
    for r in results:
        diff = float(np.abs(r["features"] - reference).max())
        print(f"{r['nproc']:5d} {r['threads']:12d} {r['rows']:5d} {r['compute']:9.2f} "
              f"{r['rows'] / r['compute']:8.1f} {r['wall']:7.1f} {diff:10.3g}")
    base = max(r["rows"] / r["compute"] for r in results if r["nproc"] == min(nprocs))
    for nproc in nprocs:
        best = max(r["rows"] / r["compute"] for r in results if r["nproc"] == nproc)
        print(f"best of {args.repeats}: {nproc} process(es) {best:.1f} items/s = {best / base:.2f}x")
    print(f"load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
