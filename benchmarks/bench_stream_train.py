"""Benchmark: fit-adapters streaming a train split 4x larger than its memory cap, vs in memory.

Setup: a synthetic HDF5 cache with ``--pairs`` train pairs (default 100,000; one caption per
image) of 512-d "image" and 768-d "text" features (text = image @ A + noise), plus 1,000 val and
1,000 test pairs; 512 MB of train features. Each mode runs ``fit_adapters`` (linear adapters,
d_e = 768, batch 64, ``--epochs`` epochs, validation only after the last one) in a fresh
child process, so that each process's peak memory is its own:

* ``memory``: ``train.max_rows_in_memory = 0`` (everything loaded);
* ``stream``: ``train.max_rows_in_memory = --cap`` (default 25,000 = pairs / 4): windows of
  cap / 2 pairs, one training and one being read in the background.

Reported per mode: resident memory after imports, peak resident memory (VmHWM, which also
counts file-backed pages: the memory-mapped file through which the streamed run writes its
aligned train entries), the peak of anonymous resident memory (RssAnon, sampled every 20 ms),
training throughput in steps/s (epochs without evaluation; for streaming including any wait
for the reader), and the whole fit's wall time (data loading, statistics, training, baselines,
aligned entries). The cache files sit in the page cache (a second read is not a disk read).

The machine may be shared: the fit's CPU time (user + sys) next to its wall time shows when a
run was starved; ``--repeats`` alternates the modes and the summary uses each mode's best run.

Usage: python benchmarks/bench_stream_train.py [--pairs 100000] [--cap 25000] [--epochs 3] [--repeats 1]
       python benchmarks/bench_stream_train.py --quick   # 2,000 pairs, cap 500, 2 epochs: seconds
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
D_IMAGE, D_TEXT = 512, 768  # ResNet-18 and GPT-2 feature widths
EVAL_PAIRS = 1000  # val and test pairs (100 with --quick)
SAMPLE_S = 0.02  # RssAnon sampling period, seconds


def status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_cache(root: Path, pairs: int, eval_pairs: int = EVAL_PAIRS, seed: int = 0, block: int = 10_000) -> None:
    """Synthetic image/text entries with a noisy linear relation text = image @ A + noise (each
    split generated in this process, written with ``write_entry``, then dropped)."""
    import numpy as np

    from pipeline.cache import entry_path, write_entry

    rng = np.random.default_rng(seed)
    a = rng.normal(size=(D_IMAGE, D_TEXT)).astype(np.float32) / np.sqrt(D_IMAGE)
    for split, n in (("train", pairs), ("val", eval_pairs), ("test", eval_pairs)):
        ids = [f"{split}{i:07d}" for i in range(n)]
        x = np.empty((n, D_IMAGE), np.float32)
        y = np.empty((n, D_TEXT), np.float32)
        for s in range(0, n, block):
            k = min(block, n - s)
            x[s:s + k] = rng.normal(size=(k, D_IMAGE))
            y[s:s + k] = x[s:s + k] @ a + 2.0 * rng.normal(size=(k, D_TEXT)).astype(np.float32)
        for name, f in (("image", x), ("text", y)):
            write_entry(entry_path(root, "synth", split, name), name, ids, f, {"entry": name, "split": split}, {},
                        chunk_rows=1024)
        del x, y


def child(args) -> None:
    """One fit in this process; prints a JSON line with its measurements."""
    import torch

    from pipeline.config import load_config
    from train.fit import fit_adapters

    logging.basicConfig(level=logging.ERROR)
    rss_import, anon_import = status_mb("VmRSS"), status_mb("RssAnon")
    peak_anon, done = [status_mb("RssAnon")], threading.Event()

    def sample():
        while not done.wait(SAMPLE_S):
            peak_anon[0] = max(peak_anon[0], status_mb("RssAnon"))

    threading.Thread(target=sample, daemon=True).start()
    cfg = load_config(None, options={
        "data.cache": args.cache, "data.dataset": "synth", "train.image": "image", "train.text": "text",
        "train.epochs": args.epochs, "train.eval_every": args.epochs, "train.reference": "", "train.device": "cpu",
        "train.max_rows_in_memory": args.cap if args.child == "stream" else 0, "train.name": args.child})
    t, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    res = fit_adapters(cfg, progress=False)
    wall = time.perf_counter() - t
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    done.set()
    steps = args.pairs // cfg.train.batch_size
    train_s = [r["time_s"] for r in res.history[:-1]] or [res.history[-1]["time_s"]]
    print(json.dumps({
        "mode": args.child, "streamed": res.metrics.streamed, "threads": torch.get_num_threads(),
        "rss_after_import_mb": rss_import, "anon_after_import_mb": anon_import, "peak_rss_mb": status_mb("VmHWM"),
        "peak_rss_anon_mb": max(peak_anon[0], status_mb("RssAnon")),
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "steps_per_s": steps / (sum(train_s) / len(train_s)), "epoch_s": sum(train_s) / len(train_s),
        "fit_wall_s": wall, "fit_cpu_s": cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime,
        "test_mean_R": res.metrics.adapters["mean_R"], "cca_mean_R": res.metrics.test["cca"]["mean_R"]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=100_000, help="train pairs in the synthetic cache")
    p.add_argument("--cap", type=int, default=25_000, help="train.max_rows_in_memory of the streaming run")
    p.add_argument("--epochs", type=int, default=3, help="epochs per fit (validation only after the last)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each mode, alternating (machine noise)")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run: --pairs 2000 --cap 500 "
                   "--epochs 2, 100 val and test pairs")
    p.add_argument("--child", choices=["memory", "stream"], help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    eval_pairs = EVAL_PAIRS
    if args.quick:
        args.pairs, args.cap, args.epochs, eval_pairs = 2000, 500, 2, 100
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        make_cache(Path(tmp), args.pairs, eval_pairs)
        print(f"cache: {args.pairs} train pairs ({D_IMAGE}-d + {D_TEXT}-d float32 = "
              f"{args.pairs * (D_IMAGE + D_TEXT) * 4 / 2**20:.0f} MB of train features), written in "
              f"{time.perf_counter() - t:.1f} s; cap {args.cap} pairs ({args.pairs / args.cap:.1f}x smaller); "
              f"{args.epochs} epochs, batch 64, linear adapters -> 768, CPU ({os.cpu_count()} cores)")
        results = []
        for mode in ("stream", "memory") * args.repeats:
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--cache", tmp, "--pairs",
                                  str(args.pairs), "--cap", str(args.cap), "--epochs", str(args.epochs)],
                                 env=env, capture_output=True, text=True, check=False)
            if out.returncode:
                sys.exit(f"{mode} run failed:\n{out.stdout}\n{out.stderr}")
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'mode':<8}{'after import':>14}{'peak RSS':>10}{'peak anon':>11}{'steps/s':>9}{'epoch s':>9}"
          f"{'fit s':>8}{'fit CPU s':>10}{'test R':>8}{'CCA R':>7}")
    for r in results:
        print(f"{r['mode']:<8}{r['rss_after_import_mb']:>11.0f} MB{r['peak_rss_mb']:>7.0f} MB"
              f"{r['peak_rss_anon_mb']:>8.0f} MB{r['steps_per_s']:>9.1f}{r['epoch_s']:>9.2f}{r['fit_wall_s']:>8.1f}"
              f"{r['fit_cpu_s']:>10.1f}{r['test_mean_R']:>8.3f}{r['cca_mean_R']:>7.3f}")
    best = {mode: max((r for r in results if r["mode"] == mode), key=lambda r: r["steps_per_s"])
            for mode in ("stream", "memory")}
    s, m = best["stream"], best["memory"]
    features = args.pairs * (D_IMAGE + D_TEXT) * 4 / 2**20
    print(f"peak anonymous memory above imports: stream {s['peak_rss_anon_mb'] - s['anon_after_import_mb']:.0f} MB, "
          f"memory {m['peak_rss_anon_mb'] - m['anon_after_import_mb']:.0f} MB (train features: {features:.0f} MB; "
          f"two stream windows: {args.cap * (D_IMAGE + D_TEXT) * 4 / 2**20:.0f} MB); "
          f"streaming throughput = {100 * s['steps_per_s'] / m['steps_per_s']:.0f}% of in-memory (best run of each)")


if __name__ == "__main__":
    main()
