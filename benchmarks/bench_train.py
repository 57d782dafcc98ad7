"""Benchmark of the training loop (fit-adapters) against a naive HDF5 + DataLoader loop.

What it measures, on synthetic features (29,000 train pairs of 512-d "image" and 768-d
"text" features, one caption per image, plus 1,014 val and 1,000 test rows):

1. ``fit_adapters`` with the default experiment (linear adapters, d_e = 768, batch 64,
   lr 1e-4, tau 0.07, 50 epochs): total wall time and mean epoch time (training + val eval).
2. The training step alone (``train.fit.train_epoch`` on device-resident features): epoch
   time, and the FLOP rate it reaches as a fraction of this machine's measured float32
   matmul peak (forward + backward FLOPs of the adapters and the logits matmuls).
3. A naive loop: the same model, loss and optimizer, but every batch is read from the HDF5
   cache files through a torch DataLoader (files opened lazily in each worker, one row per
   ``__getitem__``) and copied to the device each step. It runs ``--naive-steps`` steps and
   its epoch time is EXTRAPOLATED from the mean step time (labelled as such).

Usage: python benchmarks/bench_train.py [--epochs 50] [--naive-steps 300] [--device auto]
       python benchmarks/bench_train.py --quick     # 1,000 pairs, 2 epochs, 20 naive steps: seconds
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cache import entry_path, write_entry  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.runtime import resolve_device  # noqa: E402
from train.adapters import AlignModel  # noqa: E402
from train.data import load_data  # noqa: E402
from train.fit import Trainer, fit_adapters  # noqa: E402
from train.optim import make_optimizer  # noqa: E402
from train.losses import multi_info_nce  # noqa: E402

SIZES = {"train": 29_000, "val": 1_014, "test": 1_000}  # Flickr30k Karpathy split, one caption per image
QUICK_SIZES = {"train": 1_000, "val": 100, "test": 100}
D_IMAGE, D_TEXT = 512, 768  # ResNet-18 and GPT-2 feature widths


def make_cache(root: Path, sizes: dict[str, int], seed: int = 0) -> None:
    """Synthetic image/text entries (split -> pairs) with a noisy linear relation text = image @ A + noise."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(D_IMAGE, D_TEXT)).astype(np.float32) / np.sqrt(D_IMAGE)
    for split, n in sizes.items():
        ids = [f"{split}{i:06d}" for i in range(n)]
        x = rng.normal(size=(n, D_IMAGE)).astype(np.float32)
        y = x @ a + 2.0 * rng.normal(size=(n, D_TEXT)).astype(np.float32)
        for name, f in (("image", x), ("text", y)):
            write_entry(entry_path(root, "synth", split, name), name, ids, f, {"entry": name, "split": split}, {})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, n: int | None = None) -> float:
    """Measured float32 matmul rate (FLOP/s) of a large square (n x n) matmul."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    sync(device)
    reps, t = 10, time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def step_flops(batch: int, dims: list[int], d_e: int) -> float:
    """Forward + backward FLOPs of one step with linear adapters.

    Adapters: forward 2*B*d*d_e each; backward only the weight gradient (inputs need no grad),
    another 2*B*d*d_e. Logits: forward 2*B*B*d_e, backward two matmuls of the same size.
    """
    adapters = sum(2 * 2 * batch * d * d_e for d in dims)
    logits = 3 * 2 * batch * batch * d_e
    return float(adapters + logits)


class H5Pairs(Dataset):
    """Row i of the image and text HDF5 files; handles opened lazily in each worker."""

    def __init__(self, image_path: Path, text_path: Path):
        self.paths = (str(image_path), str(text_path))
        self.files = None
        with h5py.File(self.paths[0], "r") as f:
            self.n = f["features"].shape[0]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if self.files is None:  # first call in this worker process
            self.files = [h5py.File(p, "r")["features"] for p in self.paths]
        return tuple(torch.from_numpy(np.asarray(f[i], dtype=np.float32)) for f in self.files)


def naive_loop(cache: Path, cfg, device: torch.device, steps: int, workers: int, warm: int = 20) -> float:
    """Mean seconds per step of the naive loop (after ``warm`` warm-up steps)."""
    ds = H5Pairs(entry_path(cache, "synth", "train", "image"), entry_path(cache, "synth", "train", "text"))
    loader = DataLoader(ds, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=device.type == "cuda")
    torch.manual_seed(0)
    model = AlignModel({"image": D_IMAGE, "text": D_TEXT}, cfg.train).to(device)
    opt = make_optimizer(model, cfg.train)
    done, t0 = 0, None
    while done < steps + warm:
        for x, y in loader:
            if done == warm:
                sync(device)
                t0 = time.perf_counter()
            x, y = x.to(device), y.to(device)
            loss = multi_info_nce([model("image", x), model("text", y)], model.logit_scale())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done == steps + warm:
                break
    sync(device)
    return (time.perf_counter() - t0) / steps


def fast_epoch_time(cfg, device: torch.device, graph: bool | None, epochs: int = 3) -> float:
    """Mean seconds of ``Trainer.epoch`` (device-resident data), after one warm-up epoch.
    graph: None = the default (CUDA graph on CUDA), False = eager steps."""
    data = load_data(cfg, device)
    torch.manual_seed(0)
    model = AlignModel(data.dims, cfg.train).to(device)
    trainer = Trainer(model, data.splits["train"], cfg.train, graph=graph)
    gen = torch.Generator(device=device).manual_seed(0)
    rng = np.random.default_rng(0)
    trainer.epoch(gen, rng)
    sync(device)
    t = time.perf_counter()
    for _ in range(epochs):
        trainer.epoch(gen, rng)
    sync(device)
    return (time.perf_counter() - t) / epochs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=50, help="epochs of the full fit_adapters run")
    p.add_argument("--naive-steps", type=int, default=300, help="timed steps of the naive loop (extrapolated)")
    p.add_argument("--workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) - 1)),
                   help="DataLoader workers of the naive loop")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes for a smoke run: 1,000 train pairs, --epochs 2, --naive-steps 20, 1 worker")
    args = p.parse_args()
    sizes, warm, side = SIZES, 20, None
    if args.quick:
        sizes, warm, side = QUICK_SIZES, 2, 256
        args.epochs, args.naive_steps, args.workers = 2, 20, 1
    logging.basicConfig(level=logging.ERROR)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        make_cache(cache, sizes)
        cfg = load_config(None, options={"data.cache": str(cache), "data.dataset": "synth", "train.image": "image",
                                         "train.text": "text", "train.epochs": args.epochs, "train.reference": "",
                                         "train.device": str(device)})
        tc = cfg.train
        steps = sizes["train"] // tc.batch_size
        peak = matmul_peak(device, side)
        t = time.perf_counter()
        res = fit_adapters(cfg, progress=False)
        fit_s = time.perf_counter() - t
        epoch_s = float(np.mean([r["time_s"] for r in res.history]))
        fast_s = fast_epoch_time(cfg, device, None)
        eager_s = fast_epoch_time(cfg, device, False) if device.type == "cuda" else fast_s
        naive_step = naive_loop(cache, cfg, device, args.naive_steps, args.workers, warm)
    naive_epoch = naive_step * steps
    rate = step_flops(tc.batch_size, [D_IMAGE, D_TEXT], tc.dim) * steps / fast_s
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; {sizes['train']} train pairs ({D_IMAGE}-d / {D_TEXT}-d), batch {tc.batch_size}, "
          f"{steps} steps/epoch, linear adapters -> {tc.dim}")
    print(f"fit_adapters, {args.epochs} epochs: {fit_s:.1f} s total; {epoch_s:.3f} s/epoch incl. val eval; "
          f"test mean_R {res.metrics.adapters['mean_R']:.3f} (CCA {res.metrics.test['cca']['mean_R']:.3f})")
    print(f"training step only (device-resident): {fast_s:.3f} s/epoch = {1e3 * fast_s / steps:.3f} ms/step"
          + (f" (CUDA graph; eager steps: {1e3 * eager_s / steps:.3f} ms/step)" if device.type == "cuda" else ""))
    print(f"naive HDF5 DataLoader loop ({args.workers} workers): {1e3 * naive_step:.2f} ms/step, "
          f"EXTRAPOLATED {naive_epoch:.2f} s/epoch ({naive_epoch * args.epochs:.0f} s for {args.epochs} epochs; "
          f"timed {args.naive_steps} steps)")
    print(f"speed-up: {naive_epoch / fast_s:.1f}x (training steps), {naive_epoch / epoch_s:.1f}x "
          f"(vs fit epoch incl. eval)")
    print(f"matmul peak (float32, measured): {peak / 1e12:.2f} TFLOP/s; training loop: {rate / 1e12:.3f} TFLOP/s "
          f"= {100 * rate / peak:.2f}% of peak ({step_flops(tc.batch_size, [D_IMAGE, D_TEXT], tc.dim) / 1e6:.0f} MFLOP/step)")


if __name__ == "__main__":
    main()
