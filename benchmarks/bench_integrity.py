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


def bench_parts(data_dir: Path, entries: list, tmp: Path) -> dict:
    """Content hashing cold / warm over every split, and reading the entries with / without checks."""
    splits = [D.load_split("imagefolder", data_dir, s) for s in D.available_splits("imagefolder", data_dir)]
    side = tmp / "side.json"
    cold = sum(timed(lambda s=s: D.content_hashes(s, side))[0] for s in splits)
    warm = sum(timed(lambda s=s: D.content_hashes(s, side))[0] for s in splits)
    nbytes = sum(Path(it.image).stat().st_size for s in splits for it in s.items)
    read_on = min(sum(timed(e.features)[0] for e in entries) for _ in range(3))
    with checks_bypassed():
        read_off = min(sum(timed(e.features)[0] for e in entries) for _ in range(3))
    return {"images": sum(len(s) for s in splits), "MB": nbytes / 1e6, "hash cold": cold, "hash warm": warm,
            "read on": read_on, "read off": read_off,
            "feature MB": sum(e.n * e.dim * 4 for e in entries) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(ROOT / "data" / "tuxpaint"))
    ap.add_argument("--encoders", default="tiny-resnet,mobilenet_v2")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        sys.exit(f"{data_dir} is not a folder: run `python -m demo.tuxpaint <deb> data/tuxpaint` or pass --data-dir.")
    with tempfile.TemporaryDirectory(prefix="bench-integrity-") as tmp:
        results = [bench_encoder(data_dir, e, args.repeat, args.workers, Path(tmp)) for e in args.encoders.split(",")]
        parts = bench_parts(data_dir, results[-1]["entries"], Path(tmp))
    print(f"\n{data_dir}: {parts['images']} images, {parts['MB']:.1f} MB; workers {args.workers}, "
          f"best of {args.repeat} interleaved runs")
    print(f"{'encoder':16s} {'rows':>5s} {'on s':>7s} {'off s':>7s} {'on/off':>7s} {'rerun on':>9s} {'rerun off':>10s}")
    for r in results:
        print(f"{r['encoder']:16s} {r['rows']:5d} {r['on']:7.2f} {r['off']:7.2f} {r['on'] / r['off']:7.3f} "
              f"{r['rerun on']:9.3f} {r['rerun off']:10.3f}")
    print(f"content hashing: cold {parts['hash cold']:.3f} s ({parts['MB'] / parts['hash cold']:.0f} MB/s), "
          f"from the side file {parts['hash warm']:.4f} s")
    print(f"reading {parts['feature MB']:.1f} MB of features ({results[-1]['encoder']}): checked "
          f"{parts['read on']:.4f} s, unchecked {parts['read off']:.4f} s "
          f"(ratio {parts['read on'] / max(parts['read off'], 1e-9):.2f})")


if __name__ == "__main__":
    main()
