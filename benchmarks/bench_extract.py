"""Extraction throughput: the whole pipeline against the model's bare forward pass.

For one image and one text encoder, in fp32 and bf16, in ONE run:
  pipeline  items/s of `extract` on a generated imagefolder dataset of --images JPEGs with 5
            captions each (JPEG decoding, resizing, tokenisation in DataLoader workers, forward,
            chunked cache writes; model loading excluded, worker start-up included)
  bare      items/s of the same model's forward on ready-made tensors of the same batch size
  ratio     pipeline / bare (target >= 0.85); "steady" excludes the first batch (worker start-up),
            as the bare loop excludes its warm-up batch
and the agreement of bf16 with fp32 features (linear CKA over the dataset).

    .venv/bin/python benchmarks/bench_extract.py [--images 256] [--batch-size 32]

Defaults use the real offline weights (mobilenet_v2, all-minilm-l6-v2; see README); pass
--image tiny-resnet --text tiny-gpt2 to run without them. Timings on shared machines are noisy:
compare within one run.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analyze.metrics import cka  # noqa: E402
from extract.encoders import (REGISTRY, ImagePrep, TextPrep, get_spec, load_encoder, register,  # noqa: E402
                              IMAGENET_MEAN, IMAGENET_STD)
from extract.run import extract  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.runtime import autocast, resolve_device  # noqa: E402

WORDS = ("a man woman dog child red blue ball street running sitting near the water with two young "
         "people playing grass bike white black shirt park beach snow").split()


def make_dataset(root: Path, n: int, seed: int = 0, captions: int = 5) -> Path:
    """n JPEGs of Flickr-like size (500 x 375), each with ``captions`` captions of 8-20 words
    (imagefolder layout; the text encoder sees all n * captions of them)."""
    rng = np.random.default_rng(seed)
    words = random.Random(seed)
    folder = root / "test"
    folder.mkdir(parents=True)
    lines = []
    for i in range(n):
        base = rng.integers(0, 255, size=(1, 1, 3))
        grad = np.linspace(0, 120, 500)[None, :, None]
        pixels = np.clip(base + grad + rng.normal(0, 25, size=(375, 500, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)
        texts = [" ".join(words.choice(WORDS) for _ in range(words.randint(8, 20))) for _ in range(captions)]
        lines.append(json.dumps({"file_name": f"{i:06d}.jpg", "caption": texts}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def bare_forward(name: str, data_dir: Path, n: int, batch_size: int, precision: str, device) -> float:
    """Items/s of the encoder alone on ready-made inputs (one warm-up batch untimed)."""
    enc = load_encoder(get_spec(name), device)
    if enc.spec.modality == "image":
        size = enc.spec.prep.crop
        batch = torch.randn(batch_size, 3, size, size, device=device)
    else:
        captions = [c for line in (data_dir / "test" / "metadata.jsonl").open() for c in json.loads(line)["caption"]]
        batch = {k: v.to(device) for k, v in enc.tokenize(captions[:batch_size]).items()}
    steps = max(1, n // batch_size) if enc.spec.modality == "image" else max(1, 5 * n // batch_size)
    with torch.inference_mode(), autocast(device, precision):
        enc(batch).float().cpu()
        start = time.perf_counter()
        for _ in range(steps):
            enc(batch).float().cpu()
        seconds = time.perf_counter() - start
    return steps * batch_size / seconds


def pipeline(name: str, data_dir: Path, cache: Path, batch_size: int, precision: str, workers: int):
    cfg = load_config(None, options={
        "data.dataset": "imagefolder", "data.data_dir": str(data_dir), "data.cache": str(cache),
        "data.captions": "all", "extract.encoders": (name,), "extract.split": "test",
        "extract.batch_size": batch_size, "extract.precision": precision, "extract.workers": workers,
        "extract.chunk_rows": batch_size * 8})
    (entry,) = extract(cfg, force=True)
    return (entry.provenance["items_per_s"], entry.provenance["steady_items_per_s"]), entry.features()


def register_random_dinov2_base() -> str:
    """``random-dinov2-base``: DINOv2-base's architecture and preprocessing (768-d, 12 layers,
    patch 14, 224 px) with random weights, for timing a realistically sized model without a
    download. Features are meaningless; throughput is what it measures."""
    import dataclasses

    tiny = REGISTRY["tiny-dinov2"]
    register(dataclasses.replace(
        tiny, name="random-dinov2-base", dim=768,
        prep=ImagePrep(256, 224, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
        config=(("model_config_class", "Dinov2Config"),
                ("model_config", (("hidden_size", 768), ("num_hidden_layers", 12), ("num_attention_heads", 12),
                                  ("image_size", 224), ("patch_size", 14)))),
        description="benchmark only: DINOv2-base architecture, random weights"))
    return "random-dinov2-base"


def register_random_gpt2() -> str:
    """``random-gpt2``: GPT-2 small's architecture (768-d, 12 layers) with random weights and the
    test byte tokenizer (about 4x more tokens per caption than GPT-2's BPE), truncated at 128
    tokens. For timing only."""
    import dataclasses

    tiny = REGISTRY["tiny-gpt2"]
    config = dict(tiny.config)
    config["model_config"] = tuple({**dict(config["model_config"]), "n_layer": 12, "n_embd": 768, "n_head": 12,
                                    "n_positions": 1024}.items())
    config["max_positions"] = 1024
    register(dataclasses.replace(tiny, name="random-gpt2", dim=768, prep=TextPrep(128),
                                 config=tuple(config.items()),
                                 description="benchmark only: GPT-2 small architecture, random weights"))
    return "random-gpt2"


RANDOM_MODELS = {"random-dinov2-base": register_random_dinov2_base, "random-gpt2": register_random_gpt2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default="mobilenet_v2",
                    help="image encoder (default: mobilenet_v2; random-dinov2-base = DINOv2-base size, random weights)")
    ap.add_argument("--text", default="all-minilm-l6-v2",
                    help="text encoder (default: all-minilm-l6-v2; random-gpt2 = GPT-2 small size, random weights)")
    ap.add_argument("--images", type=int, default=256, help="dataset size (default: 256)")
    ap.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    ap.add_argument("--workers", type=int, default=-1, help="DataLoader workers (default: -1 = auto)")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma list (default: fp32,bf16)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved repetitions, best kept (default: 3)")
    args = ap.parse_args()
    for name in (args.image, args.text):
        if name in RANDOM_MODELS:
            RANDOM_MODELS[name]()
    device = resolve_device(args.device)
    print(f"device={device} threads={torch.get_num_threads()} images={args.images} (x5 captions) "
          f"batch={args.batch_size} workers={args.workers} best of {args.repeat}")
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp) / "data", args.images)
        rows, feats = [], {}
        for name in (args.image, args.text):
            for precision in args.precisions.split(","):
                piped, bare = [], []
                for _ in range(args.repeat):  # interleaved, best of --repeat: the machine is shared
                    p, features = pipeline(name, data, Path(tmp) / f"cache-{precision}", args.batch_size,
                                           precision, args.workers)
                    piped.append(p)
                    bare.append(bare_forward(name, data, args.images, args.batch_size, precision, device))
                feats[name, precision] = features
                rows.append((name, precision, max(p[0] for p in piped), max(p[1] for p in piped), max(bare)))
        print(f"\n{'encoder':20s} {'precision':9s} {'pipeline/s':>11s} {'steady/s':>9s} {'bare/s':>9s} "
              f"{'ratio':>6s} {'steady ratio':>12s}")
        for name, precision, piped, steady, bare in rows:
            print(f"{name:20s} {precision:9s} {piped:11.1f} {steady:9.1f} {bare:9.1f} {piped / bare:6.2f} "
                  f"{steady / bare:12.2f}")
        print("pipeline = whole loop incl. DataLoader start-up; steady = after the first batch "
              "(as bare, which excludes a warm-up batch)")
        for name in (args.image, args.text):
            if (name, "bf16") in feats and (name, "fp32") in feats:
                a, b = feats[name, "fp32"], feats[name, "bf16"]
                print(f"{name}: linear CKA(bf16, fp32) = {cka(a, b):.5f}; "
                      f"max |diff| = {np.abs(a - b).max():.3g}")


if __name__ == "__main__":
    main()
