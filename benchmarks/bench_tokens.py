"""Token features: what they cost to extract, to store and to train on, against pooled features.

In ONE run, on one dataset (default: the Tux Paint demo data, data/tuxpaint, the train split):

  extract   items/s of `extract` of the image encoder with --tokens none vs --tokens grid:K (model
            loading excluded, steady rate after the first batch; the goal is a ratio >= 0.8: the
            token writes must not dominate), and the entry's bytes per row on disk (pooled entry
            vs token entry; the token part is rows x tokens x width x 2 bytes at float16)
  train     step time and pairs/s of the training loop (train.fit.Trainer, no evaluation) at the
            same batch size: a pooled mlp adapter on pooled features vs the token projectors
            (train.adapter = "token", the defaults) on the token rows of the same entries

    .venv/bin/python benchmarks/bench_tokens.py [--data-dir data/tuxpaint] [--grid 4] [--epochs 5]
    .venv/bin/python benchmarks/bench_tokens.py --quick     # seconds: tiny encoders, 24 generated images

Defaults use the demo's real offline weights (mobilenet_v2, all-minilm-l6-v2). The machine may be
shared: compare within one run (--repeats alternates the two modes and keeps each one's best).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from extract.run import extract  # noqa: E402
from pipeline.config import load_config, with_values  # noqa: E402
from train.adapters import AlignModel  # noqa: E402
from train.data import load_data  # noqa: E402
from train.fit import Trainer  # noqa: E402
from train.tokens import token_info  # noqa: E402


def size_on_disk(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def base_config(data_dir: Path, cache: Path, image: str, text: str, batch: int, split: str):
    return load_config(None, options={
        "data.dataset": "imagefolder", "data.data_dir": str(data_dir), "data.cache": str(cache),
        "data.captions": "first", "extract.encoders": (image, text), "extract.split": split, "extract.workers": 1,
        "extract.batch_size": batch, "extract.device": "cpu", "train.image": image, "train.text": text,
        "train.reference": "", "train.dim": 256, "train.batch_size": batch, "train.device": "cpu",
        "train.track_metrics": ()})


def time_extract(cfg, tokens: str, cache: Path, image: str) -> tuple[float, int, int]:
    """(steady items/s, bytes on disk, rows) of the image entry extracted with ``tokens``."""
    cfg = with_values(cfg, {"extract.tokens": tokens, "extract.encoders": (image,), "data.cache": str(cache)})
    entry = next(e for e in extract(cfg, force=True) if e.name == image)
    rate = entry.provenance.get("steady_items_per_s") or entry.provenance["items_per_s"]
    return float(rate), size_on_disk(entry.path), entry.n


def time_training(cfg, epochs: int) -> tuple[float, float, int]:
    """(seconds per step, pairs/s, input width) of ``epochs`` epochs after one warm-up epoch."""
    device = torch.device("cpu")
    data = load_data(cfg, device, splits=("train", "val", "test"))
    torch.manual_seed(0)
    split = data.splits["train"]
    model = AlignModel(data.dims, cfg.train, token_info(split.entries)).to(device)
    trainer = Trainer(model, split, cfg.train, graph=False, stats=data.stats)
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    trainer.epoch(gen, rng)
    t0 = time.perf_counter()
    for _ in range(epochs):
        float(trainer.epoch(gen, rng))
    dt = time.perf_counter() - t0
    steps = trainer.steps_per_epoch * epochs
    data.close()
    return dt / steps, steps * trainer.batch / dt, data.dims["image"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="data/tuxpaint")
    p.add_argument("--image", default="mobilenet_v2")
    p.add_argument("--text", default="all-minilm-l6-v2")
    p.add_argument("--split", default="train")
    p.add_argument("--grid", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny encoders on 24 generated images, 2 epochs")
    a = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_dir = Path(a.data_dir)
        if a.quick:
            from tests.fixtures import make_imagefolder

            a.image, a.text, a.grid, a.batch_size, a.epochs, a.split = "tiny-dinov2", "tiny-gpt2", 2, 8, 2, "train"
            data_dir = make_imagefolder(tmp / "data", n=24, size=64)
        cfg = base_config(data_dir, tmp / "cache", a.image, a.text, a.batch_size, a.split)
        tokens = f"grid:{a.grid}"
        best: dict[str, tuple] = {}
        for _ in range(a.repeats):
            for mode in ("none", tokens):
                got = time_extract(cfg, mode, tmp / f"x-{mode.replace(':', '')}", a.image)
                if mode not in best or got[0] > best[mode][0]:
                    best[mode] = got
        print(f"extraction of {a.image} on {data_dir} ({a.split}, batch {a.batch_size}, CPU, "
              f"{torch.get_num_threads()} threads)")
        print(f"{'tokens':10s} {'rows':>6s} {'items/s':>9s} {'bytes/row':>10s} {'ratio':>6s}  goal")
        for mode, (rate, size, n) in best.items():
            ratio = rate / best["none"][0]
            print(f"{mode:10s} {n:6d} {rate:9.1f} {size / max(n, 1):10.0f} {ratio:6.2f}  "
                  f"{'>= 0.8 ' + ('met' if ratio >= 0.8 else 'NOT met') if mode != 'none' else ''}")
        extract(with_values(cfg, {"extract.tokens": tokens, "extract.split": "all"}))  # every split, for training
        pooled = with_values(cfg, {"train.adapter": "mlp", "extract.tokens": tokens})
        token = with_values(cfg, {"train.adapter": "token", "extract.tokens": tokens})
        rows = []
        for name, c in (("pooled mlp", pooled), ("token (defaults)", token)):
            rows.append((name, *time_training(c, a.epochs)))
        print(f"\ntraining loop, batch {a.batch_size}, {a.epochs} epochs after a warm-up epoch (no evaluation)")
        print(f"{'adapter':18s} {'input width':>11s} {'ms/step':>8s} {'pairs/s':>9s} {'slowdown':>8s}")
        for name, step, rate, width in rows:
            print(f"{name:18s} {width:11d} {step * 1e3:8.2f} {rate:9.0f} {step / rows[0][1]:7.1f}x")


if __name__ == "__main__":
    main()
