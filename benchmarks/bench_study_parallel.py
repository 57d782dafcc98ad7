"""Benchmark: a study's cells serial vs ``--jobs 2``, and what claims and heartbeats cost per cell.

Default: the demo study (``configs/study-demo.toml``: 36 cells, 36 trainings; needs ``make demo``
first, for its cache and the Tux Paint data) on a temporary copy of its cache (so every cell trains
afresh and the user's cache is not touched), run twice in this one process, in fresh study
folders: serial (``study.jobs = 1``) and ``study.jobs = 2``. Printed: each wall time, the ratio,
the sum of the cells' own times, and whether cells.csv and summary.csv agree (apart from the run
names, which carry the study name, and the training times).

Claims and heartbeats, on the temporary folder: a unit's claim cycle (O_EXCL create and fsync,
heartbeat thread started and stopped, release), one heartbeat (``utime``), a look over every
cell's result file (what a worker does before each claim) and a cells.csv rewrite under the
lock (after each cell), against the mean time of a cell of the serial run.

    python benchmarks/bench_study_parallel.py [--config configs/study-demo.toml] [--set KEY=VALUE ...] [--quick]

``--set``: config overrides, e.g. a smaller grid ``--set 'study.axes.train.seed=[0]'``. ``--quick``: a
generated study of 2 trainings x 2 analyses on tiny random encoders (seconds). The load average
before and after is printed: on a machine shared with other jobs the ratio says little.
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipeline.config import load_config, with_values  # noqa: E402
from pipeline.runtime import cpu_count  # noqa: E402
from study.claims import try_claim  # noqa: E402
from study.runner import run_study  # noqa: E402
from study.workers import Board, read_signatures  # noqa: E402

VARYING = "run.train_time_s"  # columns (and their summaries) that differ between two launches, besides "run"


def table(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return [{k: v for k, v in r.items() if k != "run" and not k.startswith(VARYING)} for r in csv.DictReader(fh)]


def largest_differences(a: list[dict], b: list[dict], k: int = 3) -> str:
    """The ``k`` columns whose values differ most between two tables of the same rows."""
    diffs: dict[str, float] = {}
    for ra, rb in zip(a, b):
        for col, va in ra.items():
            vb = rb.get(col)
            if va == vb:
                continue
            try:
                d = abs(float(va) - float(vb))
            except (TypeError, ValueError):
                d = float("inf")
            diffs[col] = max(diffs.get(col, 0.0), d)
    top = sorted(diffs.items(), key=lambda kv: -kv[1])[:k]
    return f"{len(diffs)} columns differ; largest: " + ", ".join(f"{c} {d:.2g}" for c, d in top) if diffs else "none"


def quick_config(root: Path):
    from extract.run import extract
    from tests.fixtures import make_flickr30k
    from tests.test_study import BASE

    data = make_flickr30k(root / "data", n_per_split=(16, 6, 6))
    path = root / "base.toml"
    path.write_text(BASE.format(data=data, cache=root / "cache"))
    extract(load_config(path))
    return with_values(load_config(path), {"study.axes": {"train.seed": [0, 1], "analyze.k": [2, 3]},
                                           "analyze.metrics": ["cka", "mutual_knn"], "train.track_metrics": ["cka"]})


def demo_config(path: str, overrides: list[str], root: Path):
    cfg = load_config(path, overrides)
    cache = Path(cfg.data.cache)
    if not cache.is_dir():
        sys.exit(f"{cache} is missing: run `make demo` first (the study reads its cached features).")
    copy = root / "cache"
    shutil.copytree(cache, copy, ignore=shutil.ignore_patterns("runs"))  # entries only: every cell trains
    return with_values(cfg, {"data.cache": str(copy)})


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its ended children (the spawned workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(n: int, fn) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def claim_costs(cfg, folder: Path, n: int) -> dict[str, float]:
    """Seconds per claim cycle, heartbeat, look over the result files and cells.csv rewrite."""
    counter = iter(range(10 ** 9))

    def cycle():
        with try_claim(folder, f"bench-{next(counter)}", {"cells": ["x"]}, 300):
            pass

    fd = os.open(folder / "heartbeat-probe", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        beat = timed(n * 10, lambda: os.utime(fd))
    finally:
        os.close(fd)
    board = Board(cfg, folder, read_signatures(folder))
    return {"claim": timed(n, cycle), "heartbeat": beat,
            "look": timed(n, lambda: [board.settled(c, "bench") for c in board.cells]),
            "table": timed(max(1, n // 4), board.write_table)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "study-demo.toml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override (repeatable), e.g. --set 'study.axes.train.seed=[0]'")
    ap.add_argument("--quick", action="store_true", help="a tiny generated study (seconds)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = quick_config(root) if args.quick else demo_config(args.config, args.overrides, root)
        load = os.getloadavg()[0]
        base = with_values(base, {"analyze.out": str(root / "out")})
        results = {}
        for jobs in (1, 2):
            cfg = with_values(base, {"study.name": f"bench-jobs{jobs}", "study.jobs": jobs})
            t0, c0 = time.perf_counter(), cpu_seconds()
            result = run_study(cfg, progress=False)
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
            cells = sum(d.get("seconds", 0.0) for d in (Board(cfg, result.folder, {}).doc(c) or {}
                                                         for c in result.cells))
            results[jobs] = (cfg, result, wall, cells)
            print(f"study.jobs = {jobs}: {len(result.cells)} cells ({result.trained} trainings, {result.failed} failed) "
                  f"in {wall:.1f} s wall, {cpu:.1f} s CPU (this process and its workers); the cells' own times sum "
                  f"to {cells:.1f} s")
        (c1, r1, w1, s1), (_, r2, w2, _) = results[1], results[2]
        t1, t2 = table(r1.folder / "cells.csv"), table(r2.folder / "cells.csv")
        same = t1 == t2 and table(r1.folder / "summary.csv") == table(r2.folder / "summary.csv")
        print(f"speed-up of --jobs 2 over serial: {w1 / w2:.2f}x ({os.cpu_count()} CPU cores, load average "
              f"{load:.1f} before, {os.getloadavg()[0]:.1f} after); cells.csv and summary.csv equal: {same}")
        threads = (torch.get_num_threads(), max(1, cpu_count() // 2))  # per cell: serial, each of 2 workers
        if not same:  # other torch thread counts (serial: all cores; workers: cores / jobs) round differently
            print(f"cells.csv differences: {largest_differences(t1, t2)} (torch threads per cell: serial "
                  f"{threads[0]}, workers {threads[1]}" + ("" if threads[0] == threads[1] else
                  "; equal tables need equal thread counts: OMP_NUM_THREADS=1") + ")")
        costs = claim_costs(c1, r1.folder, 20 if args.quick else 200)
        per_cell = s1 / len(r1.cells)
        overhead = costs["claim"] + costs["look"] + costs["table"]  # a unit per cell at worst; heartbeats aside
        print(f"claims: {costs['claim'] * 1e3:.2f} ms per claim cycle, {costs['heartbeat'] * 1e6:.0f} us per "
              f"heartbeat (one every claim_timeout / 10 s), {costs['look'] * 1e3:.2f} ms per look over "
              f"{len(r1.cells)} result files, {costs['table'] * 1e3:.1f} ms per cells.csv rewrite")
        print(f"overhead per cell: {overhead * 1e3:.1f} ms = {100 * overhead / per_cell:.3f}% of the mean cell "
              f"({per_cell:.2f} s)")
        differ = not same and threads[0] == threads[1]  # a real difference, not the thread counts' rounding
        return 1 if differ or r1.failed or r2.failed else 0


if __name__ == "__main__":
    sys.exit(main())
