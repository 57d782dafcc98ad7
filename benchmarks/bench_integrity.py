"""Cost of the integrity checks: content hashing of the images and checksums of the cache entries.

On the demo data (Tux Paint, 538 images; or any imagefolder via --data-dir), in ONE run, per encoder:

  extract on     a full extraction into a fresh cache, every check on (images hashed cold: no side
                 file yet; checksums computed while writing)
  extract off    the same with the checks bypassed (a monkeypatched no-op, here only: no content
                 hashes, no checksums computed or verified)
  rerun on/off   extract again over the finished cache (nothing to compute: the entry is verified,
                 the images only stat'ed against the side file)
and, separately, the parts: hashing every image cold / from the side file, and reading every
entry's features with and without the checksum check.

    .venv/bin/python benchmarks/bench_integrity.py [--data-dir data/tuxpaint] [--encoders tiny-resnet,mobilenet_v2]
    .venv/bin/python benchmarks/bench_integrity.py --quick   # 12 generated JPEGs, tiny-resnet, 1 repeat

Interleaved repeats (best of --repeat). Timings on shared machines are noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import extract.datasets as D  # noqa: E402
from benchmarks.bench_extract import make_dataset  # noqa: E402
import pipeline.entry as entry_mod  # noqa: E402
from extract.run import extract  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.integrity import Checksums  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def checks_bypassed():
    """No content hashes, no checksums computed or verified (for this measurement only)."""
    saved = (D.content_hashes, entry_mod.block_digests, Checksums.check_blocks, entry_mod.Entry.verify)
    D.content_hashes = lambda split, side=None, workers=None: ["-"] * len(split.items)
    entry_mod.block_digests = lambda array, block_rows=0: ["-"]
    Checksums.check_blocks = lambda self, *args, **kwargs: None
    entry_mod.Entry.verify = lambda self: None
    try:
        yield
    finally:
        D.content_hashes, entry_mod.block_digests, Checksums.check_blocks, entry_mod.Entry.verify = saved


def config(data_dir: Path, cache: Path, encoder: str, workers: int):
    return load_config(None, options={
        "data.dataset": "imagefolder", "data.data_dir": str(data_dir), "data.cache": str(cache),
        "data.captions": "first", "extract.encoders": (encoder,), "extract.split": "all",
        "extract.batch_size": 32, "extract.workers": workers, "extract.device": "cpu"})


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def bench_encoder(data_dir: Path, encoder: str, repeat: int, workers: int, tmp: Path) -> dict:
    best = {k: float("inf") for k in ("on", "off", "rerun on", "rerun off")}
    entries = []
    for r in range(repeat):
        for mode in ("on", "off"):
            cfg = config(data_dir, tmp / f"{encoder}-{mode}-{r}", encoder, workers)
            with checks_bypassed() if mode == "off" else contextlib.nullcontext():
                seconds, out = timed(lambda: extract(cfg))
                best[mode] = min(best[mode], seconds)
                best[f"rerun {mode}"] = min(best[f"rerun {mode}"], timed(lambda: extract(cfg))[0])
            if mode == "on":
                entries = out
    rows = sum(e.n for e in entries)
    return {"encoder": encoder, "rows": rows, **best, "entries": entries}


def bench_hashing(data_dir: Path, tmp: Path) -> dict:
    """Content hashing of every image, cold (no side file) and from the side file (best of 3)."""
    splits = [D.load_split("imagefolder", data_dir, s) for s in D.available_splits("imagefolder", data_dir)]
    cold = min(sum(timed(lambda s=s: D.content_hashes(s, tmp / f"side-{k}.json"))[0] for s in splits)
               for k in range(3))
    warm = min(sum(timed(lambda s=s: D.content_hashes(s, tmp / "side-0.json"))[0] for s in splits)
               for _ in range(3))
    nbytes = sum(Path(it.image).stat().st_size for s in splits for it in s.items)
    return {"images": sum(len(s) for s in splits), "MB": nbytes / 1e6, "cold": cold, "warm": warm}


def bench_checksums(entries: list) -> dict:
    """Each timed alone (best of 3): computing the checksums of the entries' features, verifying
    the entries, and a whole read with / without the check."""
    arrays = [e.features() for e in entries]
    sums = min(sum(timed(lambda x=x: entry_mod.block_digests(x))[0] for x in arrays) for _ in range(3))
    verify = min(sum(timed(e.verify)[0] for e in entries) for _ in range(3))
    read_on = min(sum(timed(e.features)[0] for e in entries) for _ in range(3))
    with checks_bypassed():
        read_off = min(sum(timed(e.features)[0] for e in entries) for _ in range(3))
    return {"MB": sum(x.nbytes for x in arrays) / 1e6, "compute": sums, "verify": verify,
            "read on": read_on, "read off": read_off}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(ROOT / "data" / "tuxpaint"), help="imagefolder dataset "
                    "(default: data/tuxpaint, made by `make demo`)")
    ap.add_argument("--encoders", default="tiny-resnet,mobilenet_v2", help="comma list")
    ap.add_argument("--repeat", type=int, default=2, help="interleaved repetitions, best kept")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    ap.add_argument("--quick", action="store_true", help="smoke run: 12 generated JPEGs instead of --data-dir, "
                    "--encoders tiny-resnet --repeat 1")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-integrity-") as tmp:
        if args.quick:
            args.data_dir, args.encoders, args.repeat = str(make_dataset(Path(tmp) / "data", 12)), "tiny-resnet", 1
        data_dir = Path(args.data_dir)
        if not data_dir.is_dir():
            sys.exit(f"{data_dir} is not a folder: run `python -m demo.tuxpaint <deb> data/tuxpaint` or pass "
                     "--data-dir.")
        results = [bench_encoder(data_dir, e, args.repeat, args.workers, Path(tmp)) for e in args.encoders.split(",")]
        hashing = bench_hashing(data_dir, Path(tmp))
        for r in results:
            r["sums"] = bench_checksums(r["entries"])
    print(f"\n{data_dir}: {hashing['images']} images, {hashing['MB']:.1f} MB; workers {args.workers}, "
          f"best of {args.repeat} interleaved runs")
    print(f"content hashing: cold {hashing['cold']:.3f} s ({hashing['MB'] / hashing['cold']:.0f} MB/s), "
          f"from the side file {hashing['warm']:.4f} s\n")
    print(f"{'encoder':16s} {'rows':>5s} {'on s':>7s} {'off s':>7s} {'on/off':>7s} {'rerun on':>9s} {'rerun off':>10s}"
          f" {'MB':>6s} {'sums s':>7s} {'verify s':>9s} {'read chk':>9s} {'read raw':>9s} {'own work':>9s}")
    for r in results:
        c = r["sums"]
        own = hashing["cold"] + c["compute"]
        print(f"{r['encoder']:16s} {r['rows']:5d} {r['on']:7.2f} {r['off']:7.2f} {r['on'] / r['off']:7.3f} "
              f"{r['rerun on']:9.3f} {r['rerun off']:10.3f} {c['MB']:6.2f} {c['compute']:7.4f} {c['verify']:9.4f} "
              f"{c['read on']:9.4f} {c['read off']:9.4f} {100 * own / r['off']:8.2f}%")
    print("own work = (cold content hashing + computing the checksums) / the unchecked extraction time")


if __name__ == "__main__":
    main()
