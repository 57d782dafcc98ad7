"""Extraction throughput: the whole pipeline against the model's bare forward pass.

For image and text encoders, in fp32 and bf16, and (images) per decoder, in ONE run:
  pipeline  items/s of `extract` on a generated imagefolder dataset of --images JPEGs (500 x 375)
            with 5 captions each (decoding, resizing, tokenisation in DataLoader workers -- or,
            with decode=gpu, JPEG bytes from the workers decoded and resized on the GPU --
            forward, chunked cache writes; model loading excluded, worker start-up included)
  bare      items/s of the same model's forward on ready-made tensors of the same batch size
  ratio     pipeline / bare; "steady" excludes the first batch (worker start-up), as the bare
            loop excludes its warm-up batch
and the agreement of bf16 with fp32 features and of GPU- with CPU-decoded features (linear CKA,
smallest per-row cosine).

    .venv/bin/python benchmarks/bench_extract.py [--images 256] [--batch-size 32]
    .venv/bin/python benchmarks/bench_extract.py --device cuda      # the GPU table (docs/performance.md)
    .venv/bin/python benchmarks/bench_extract.py --quick            # seconds: tiny encoders, 16 images

CPU defaults use the real offline weights (mobilenet_v2; all-minilm-l6-v2, use-multilingual-v3 and
smollm2-135m; see README), and report each encoder's load time and peak memory in a fresh process; pass
--image tiny-resnet --text tiny-gpt2 to run without them. --device cuda defaults to random-weight
models of real sizes (ResNet-18, MobileNetV2, DINOv2-small/base; GPT-2 small, MiniLM-L6 with the
byte tokenizer), 2048 images, batch 256, decode cpu and gpu. --quick (a smoke run, any device):
tiny-resnet and tiny-gpt2, 16 images, batch 8, one repetition, and every random-* model above
built on the meta device (so that a GPU run does not fail on them). Timings on shared
machines are noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
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
from pipeline.runtime import autocast, cpu_count, resolve_device  # noqa: E402

WORDS = ("a man woman dog child red blue ball street running sitting near the water with two young "
         "people playing grass bike white black shirt park beach snow").split()


def _write_jpeg(job: tuple[Path, int, int]) -> None:
    """One 500 x 375 JPEG: a random colour, a horizontal gradient and pixel noise (seeded per image)."""
    path, seed, i = job
    rng = np.random.default_rng([seed, i])
    base = rng.integers(0, 255, size=(1, 1, 3))
    grad = np.linspace(0, 120, 500)[None, :, None]
    pixels = np.clip(base + grad + rng.normal(0, 25, size=(375, 500, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def make_dataset(root: Path, n: int, seed: int = 0, captions: int = 5) -> Path:
    """n JPEGs of Flickr-like size (500 x 375), each with ``captions`` captions of 8-20 words
    (imagefolder layout; the text encoder sees all n * captions of them). Written by a process
    pool (a few seconds for thousands on a many-core machine)."""
    words = random.Random(seed)
    folder = root / "test"
    folder.mkdir(parents=True)
    with multiprocessing.Pool(max(1, min(8, cpu_count()))) as pool:
        pool.map(_write_jpeg, [(folder / f"{i:06d}.jpg", seed, i) for i in range(n)], chunksize=16)
    lines = []
    for i in range(n):
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
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in enc.tokenize(captions[:batch_size]).items()}
    steps = max(1, n // batch_size) if enc.spec.modality == "image" else max(1, 5 * n // batch_size)
    with torch.inference_mode(), autocast(device, precision):
        enc(batch).float().cpu()
        start = time.perf_counter()
        for _ in range(steps):
            enc(batch).float().cpu()
        seconds = time.perf_counter() - start
    return steps * batch_size / seconds


def pipeline(name: str, data_dir: Path, cache: Path, batch_size: int, precision: str, workers: int,
             device: torch.device, decode: str = "cpu"):
    """((items/s, steady items/s), features, provenance) of one `extract` run."""
    cfg = load_config(None, options={
        "data.dataset": "imagefolder", "data.data_dir": str(data_dir), "data.cache": str(cache),
        "data.captions": "all", "extract.encoders": (name,), "extract.split": "test",
        "extract.batch_size": batch_size, "extract.precision": precision, "extract.workers": workers,
        "extract.chunk_rows": batch_size * 8, "extract.device": str(device), "extract.decode": decode})
    (entry,) = extract(cfg, force=True)
    p = entry.provenance
    return (p["items_per_s"], p["steady_items_per_s"]), entry.features(), p


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


def register_random_dinov2_small() -> str:
    """``random-dinov2-small``: DINOv2-small's size (384-d, 12 layers, 6 heads, patch 14, 224 px), random."""
    import dataclasses

    tiny = REGISTRY["tiny-dinov2"]
    register(dataclasses.replace(
        tiny, name="random-dinov2-small", dim=384,
        prep=ImagePrep(256, 224, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
        config=(("model_config_class", "Dinov2Config"),
                ("model_config", (("hidden_size", 384), ("num_hidden_layers", 12), ("num_attention_heads", 6),
                                  ("image_size", 224), ("patch_size", 14)))),
        description="benchmark only: DINOv2-small architecture, random weights"))
    return "random-dinov2-small"


def register_random_minilm() -> str:
    """``random-minilm``: all-MiniLM-L6-v2's size (BERT, 384-d, 6 layers, 12 heads; mean + L2 norm)
    with random weights and the test byte tokenizer, truncated at 128 tokens. For timing only."""
    import dataclasses

    tiny = REGISTRY["tiny-bert"]
    config = dict(tiny.config)
    config["model_config"] = tuple({**dict(config["model_config"]), "hidden_size": 384, "num_hidden_layers": 6,
                                    "num_attention_heads": 12, "intermediate_size": 1536,
                                    "max_position_embeddings": 512}.items())
    config["max_positions"] = 512
    register(dataclasses.replace(tiny, name="random-minilm", dim=384, prep=TextPrep(128),
                                 config=tuple(config.items()),
                                 description="benchmark only: MiniLM-L6 architecture, random weights"))
    return "random-minilm"


def register_random_torchvision(name: str) -> str:
    """``random-<name>``: a registered torchvision entry (resnet18, mobilenet_v2) with random weights."""
    import dataclasses

    register(dataclasses.replace(REGISTRY[name], name=f"random-{name}", weights="random",
                                 config=tuple((k, v) for k, v in REGISTRY[name].config if k == "arch"),
                                 description=f"benchmark only: {name} architecture, random weights"))
    return f"random-{name}"


RANDOM_MODELS = {"random-dinov2-base": register_random_dinov2_base, "random-gpt2": register_random_gpt2,
                 "random-dinov2-small": register_random_dinov2_small, "random-minilm": register_random_minilm,
                 "random-resnet18": lambda: register_random_torchvision("resnet18"),
                 "random-mobilenet_v2": lambda: register_random_torchvision("mobilenet_v2")}
# --device cuda defaults (the models): (image encoders, text encoders, images, batch size)
CUDA_DEFAULTS = ("random-resnet18,random-mobilenet_v2,random-dinov2-small,random-dinov2-base",
                 "random-gpt2,random-minilm", 2048, 256)
CPU_DEFAULTS = ("mobilenet_v2", "all-minilm-l6-v2,use-multilingual-v3,smollm2-135m", 256, 32)
QUICK_DEFAULTS = ("tiny-resnet", "tiny-gpt2,tiny-numpy-sentence,tiny-llama", 16, 8)
LOAD_PROBE = """import json, resource, sys, time
def peak():  # VmHWM: this process's own peak (ru_maxrss survives execve, so it would report the parent's)
    try:
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
from extract.encoders import load_encoder
t1, imported = time.perf_counter(), peak()
enc = load_encoder(sys.argv[1], sys.argv[2])
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "import_rss_mib": imported, "peak_rss_mib": peak()}))
"""  # run in a fresh process per encoder: its load time and peak memory, apart from every other model


def load_cost(name: str, device) -> dict:
    """{"import_s", "load_s", "peak_rss_mib"} of loading ``name`` in a fresh Python process."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", LOAD_PROBE, name, str(device)], capture_output=True, text=True,
                         cwd=root, env={**__import__("os").environ, "PYTHONPATH": str(root)}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _options() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", help="image encoders, comma list (CPU default: mobilenet_v2; random-resnet18, "
                                    "random-mobilenet_v2, random-dinov2-small/-base = real sizes, random weights)")
    ap.add_argument("--text", help="text encoders, comma list (CPU default: all-minilm-l6-v2; random-gpt2, "
                                   "random-minilm = real sizes, random weights)")
    ap.add_argument("--images", type=int, help="dataset size (default: 256; 2048 on CUDA)")
    ap.add_argument("--batch-size", type=int, help="batch size (default: 32; 256 on CUDA)")
    ap.add_argument("--workers", type=int, default=-1, help="DataLoader workers (default: -1 = auto)")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma list (default: fp32,bf16)")
    ap.add_argument("--decodes", help="image decoders, comma list of cpu, gpu (default: cpu; cpu,gpu on CUDA)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved repetitions, best kept (default: 3)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny-resnet, tiny-gpt2, 16 images, batch 8, "
                    "--repeat 1; and every random-* model built on the meta device")
    args = ap.parse_args()
    args.device = resolve_device(args.device)
    defaults = QUICK_DEFAULTS if args.quick else CUDA_DEFAULTS if args.device.type == "cuda" else CPU_DEFAULTS
    if args.quick:
        args.repeat = 1
    for key, value in zip(("image", "text", "images", "batch_size"), defaults):
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.decodes = args.decodes or ("cpu,gpu" if args.device.type == "cuda" else "cpu")
    return args


def _measure(args, data: Path, tmp: Path):
    """Every (encoder, precision, decode): best-of-repeat pipeline and bare rates, features, provenance."""
    rows, feats = [], {}
    jobs = [(n, "image", d) for n in args.image.split(",") if n for d in args.decodes.split(",")]
    jobs += [(n, "text", "-") for n in args.text.split(",") if n]
    for name, modality, decode in jobs:
        items = args.images * (1 if modality == "image" else 5)
        for precision in args.precisions.split(","):
            piped, bare = [], []
            for _ in range(args.repeat):  # interleaved, best of --repeat: the machine is shared
                p, features, prov = pipeline(name, data, tmp / f"cache-{precision}-{decode}", args.batch_size,
                                             precision, args.workers, args.device, "cpu" if decode == "-" else decode)
                piped.append(p)
                bare.append(bare_forward(name, data, args.images, args.batch_size, precision, args.device))
            feats[name, precision, decode] = features
            rows.append((name, precision, decode, items, max(p[0] for p in piped), max(p[1] for p in piped),
                         max(bare), prov.get("decoder_fallbacks", 0)))
            print(f"measured {_row(rows[-1])}", flush=True)  # partial results survive a time limit
    return rows, feats


def _row(row: tuple) -> str:
    name, precision, decode, items, piped, steady, bare, fallbacks = row
    note = f"  ({fallbacks} JPEGs fell back to PIL)" if fallbacks else ""
    return (f"{name:22s} {precision:9s} {decode:6s} {items:6d} {piped:11.1f} {steady:9.1f} {bare:9.1f} "
            f"{piped / bare:6.2f} {steady / bare:12.2f}{note}")


def _agreement(a: np.ndarray, b: np.ndarray) -> str:
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return f"linear CKA = {cka(a, b):.5f}; min row cosine = {cos.min():.5f}; max |diff| = {np.abs(a - b).max():.3g}"


def check_random_models() -> None:
    """Register and build every random-* model (what --device cuda times) on the meta device:
    configurations and parameter shapes only, no memory or compute, so that a smoke run catches
    a registry change that would break a GPU run."""
    meta = torch.device("meta")
    sizes = []
    for name, make in RANDOM_MODELS.items():
        if name not in REGISTRY:
            make()
        with meta:
            enc = load_encoder(get_spec(name), meta)
        sizes.append(f"{name} {sum(p.numel() for p in enc.parameters()) / 1e6:.1f}M")
    print(f"random models build (meta device): {', '.join(sizes)} parameters")


def main() -> None:
    args = _options()
    for name in (args.image + "," + args.text).split(","):
        if name in RANDOM_MODELS:
            RANDOM_MODELS[name]()
    print(f"device={args.device} threads={torch.get_num_threads()} images={args.images} (x5 captions, 500x375 "
          f"JPEGs) batch={args.batch_size} workers={args.workers} decodes={args.decodes} best of {args.repeat}")
    if args.quick:
        check_random_models()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        data = make_dataset(Path(tmp) / "data", args.images)
        print(f"dataset generated in {time.perf_counter() - started:.0f}s")
        rows, feats = _measure(args, data, Path(tmp))
        print(f"\n{'encoder':22s} {'precision':9s} {'decode':6s} {'items':>6s} {'pipeline/s':>11s} {'steady/s':>9s} "
              f"{'bare/s':>9s} {'ratio':>6s} {'steady ratio':>12s}")
        for row in rows:
            print(_row(row))
        print("pipeline = whole loop incl. DataLoader start-up; steady = after the first batch "
              "(as bare, which excludes a warm-up batch); decode - = text (tokenised in the workers)")
        names = [n for n in (args.image + "," + args.text).split(",") if n and n not in RANDOM_MODELS]
        print(f"\n{'encoder':22s} {'load s':>7s} {'peak RSS MiB':>12s} {'after import':>12s}  (fresh process each; "
              f"load s excludes the imports)")
        for name in names[-2:] if args.quick else names:
            cost = load_cost(name, args.device)
            print(f"{name:22s} {cost['load_s']:7.1f} {cost['peak_rss_mib']:12.0f} {cost['import_rss_mib']:12.0f}")
        for (name, precision, decode), a in feats.items():
            if precision == "bf16" and (name, "fp32", decode) in feats:
                print(f"{name} decode {decode}: bf16 vs fp32: {_agreement(feats[name, 'fp32', decode], a)}")
            if decode == "gpu" and (name, precision, "cpu") in feats:
                print(f"{name} {precision}: decode gpu vs cpu: {_agreement(feats[name, precision, 'cpu'], a)}")


if __name__ == "__main__":
    main()
