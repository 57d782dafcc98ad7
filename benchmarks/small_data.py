"""Small-data sweep: which training options help InfoNCE adapters on a few hundred pairs?

For one cache (extracted with ``--layers all``) and one encoder pair it trains, for every
variant and every seed, ``fit_adapters`` with the config file's [train] section plus the
variant's overrides, and prints one table per train fraction:

    variant | val mean R (best epoch) | test mean R | test - plain      (mean ± std over seeds)

plus the closed-form baselines on the same split (Procrustes and CCA, fitted on the same train
pairs of the last-layer features; deterministic, so no interval). Train fractions < 1 keep a
fixed random subset of the train images (seed 0, the same for every variant and seed) in a
copy of the cache; val and test are untouched. Choose settings on the val column only.

Variants (``VARIANTS``): plain; +mixup (FuseMix latent mixup, alpha 1); +structure (STRUCTURE
regulariser); +layers (image/text layer "auto" by mutual k-NN on train); +procrustes (closed-form
start); all (every option). ``--structure-weights`` adds one +structure variant per weight.

Usage (the demo's Tux Paint data, extracted with --layers all):
    python benchmarks/small_data.py --config configs/demo.toml --cache /tmp/cache_demo \
        --seeds 0 1 2 --fractions 1.0 0.5
    python benchmarks/small_data.py ... --image efficientnet_lite0 --text all-mpnet-base-v2
Output: the tables on stdout, every run's numbers as JSON lines in ``--out`` (default
<cache>/small_data.jsonl). Runs are written to <cache>/runs/small-* (aligned entries too).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from pipeline.cache import find_entry, list_entries, write_entry
from pipeline.config import load_config
from train.fit import fit_adapters

VARIANTS: dict[str, list[str]] = {
    "plain": [],
    "+mixup": ["train.mixup=1.0"],
    "+structure": ["train.structure_weight=1.0", "train.structure_temperature=0.1"],  # best on val of a small grid
    "+layers": ["train.image_layer=auto", "train.text_layer=auto"],
    "+procrustes": ["train.init=procrustes"],
    "all": ["train.mixup=1.0", "train.structure_weight=1.0", "train.structure_temperature=0.1",
            "train.image_layer=auto", "train.text_layer=auto", "train.init=procrustes"],
}
SUBSET_SEED = 0  # train images kept for fractions < 1


def subsample(cache: Path, dataset: str, fraction: float, work: Path) -> Path:
    """A copy of ``cache`` whose train entries keep a fixed ``fraction`` of the images (every
    layer), val/test copied unchanged. Entries are written with the cache writer."""
    if fraction >= 1.0:
        return cache
    dst = work / f"frac{fraction:g}"
    for split in ("val", "test"):
        shutil.copytree(cache / dataset / split, dst / dataset / split, dirs_exist_ok=True)
    for name in list_entries(cache, dataset, "train"):
        if "@" in name:
            continue  # aligned entries of earlier runs
        e = find_entry(cache, dataset, "train", name)
        images = sorted({i.split("#")[0] for i in e.ids})
        keep = set(np.random.default_rng(SUBSET_SEED).choice(images, size=max(2, round(fraction * len(images))),
                                                             replace=False))
        rows = np.array([r for r, i in enumerate(e.ids) if i.split("#")[0] in keep])
        write_entry(dst / dataset / "train" / e.path.name, e.name, e.ids[rows], e.features()[rows], e.key,
                    {**e.provenance, "subsample": {"fraction": fraction, "seed": SUBSET_SEED}},
                    layers=[e.features(k)[rows] for k in e.layers])
    return dst


def run_one(args, cache: Path, variant: str, seed: int, frac: float) -> dict:
    name = f"small-{args.image}-{args.text}-{variant.strip('+')}-f{frac:g}-s{seed}"
    overrides = [f"data.cache={cache}", f"train.image={args.image}", f"train.text={args.text}",
                 f"train.seed={seed}", "train.reference=", f"train.name={name}", f"train.device={args.device}",
                 *VARIANTS[variant], *args.set]
    result = fit_adapters(load_config(args.config, overrides), progress=False)
    m = result.metrics
    layers = json.loads((result.run_dir / "adapters.json").read_text())["layers"]["layers"]
    return {"variant": variant, "seed": seed, "fraction": frac, "image": args.image, "text": args.text,
            "train_pairs": m.sizes["train"]["pairs"], "best_epoch": m.best_epoch,
            "val_mean_R": m.val_best["mean_R"], "test_mean_R": m.test["infonce"]["mean_R"],
            "procrustes_test_mean_R": m.test["procrustes"]["mean_R"], "cca_test_mean_R": m.test["cca"]["mean_R"],
            "layers": layers, "run_dir": str(result.run_dir)}


def _ms(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):6.2f} ± {100 * sd:4.2f}"


def table(rows: list[dict], frac: float) -> str:
    """One fraction's table (recall in percent, mean ± std over seeds)."""
    mine = [r for r in rows if r["fraction"] == frac]
    plain = {r["seed"]: r["test_mean_R"] for r in mine if r["variant"] == "plain"}
    out = [f"train fraction {frac:g} ({mine[0]['train_pairs']} train pairs), {mine[0]['image']} + {mine[0]['text']}, "
           f"seeds {sorted(plain)}; recall in %:",
           f"{'variant':<22}{'val mean R':>16}{'test mean R':>16}{'test - plain':>16}"]
    for v in dict.fromkeys(r["variant"] for r in mine):
        rs = [r for r in mine if r["variant"] == v]
        delta = [r["test_mean_R"] - plain[r["seed"]] for r in rs if r["seed"] in plain]
        out.append(f"{v:<22}{_ms([r['val_mean_R'] for r in rs]):>16}{_ms([r['test_mean_R'] for r in rs]):>16}"
                   f"{_ms(delta) if delta else '':>16}")
    base = [r for r in mine if r["variant"] == "plain"] or mine
    out.append(f"{'procrustes (last)':<22}{'':>16}{100 * base[0]['procrustes_test_mean_R']:>9.2f}")
    out.append(f"{'cca (last)':<22}{'':>16}{100 * base[0]['cca_test_mean_R']:>9.2f}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/demo.toml")
    ap.add_argument("--cache", required=True, type=Path, help="cache extracted with --layers all")
    ap.add_argument("--dataset", default="imagefolder")
    ap.add_argument("--image", default="mobilenet_v2")
    ap.add_argument("--text", default="all-minilm-l6-v2")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), help="names in VARIANTS, or NAME=k=v,k=v")
    ap.add_argument("--set", nargs="*", default=[], help="extra overrides for every run, e.g. train.epochs=30")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: runs this small are "
                    "overhead-bound, and more threads than free cores slow them down several-fold)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    for v in args.variants:  # NAME=key=value,key=value defines an ad-hoc variant
        if "=" in v:
            name, spec = v.split("=", 1)
            VARIANTS[name] = [f"train.{s}" if not s.startswith("train.") else s for s in spec.split(",")]
    variants = [v.split("=", 1)[0] for v in args.variants]
    out = args.out or args.cache / "small_data.jsonl"
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="small-data-") as work:
        for frac in args.fractions:
            cache = subsample(args.cache, args.dataset, frac, Path(work))
            for v in variants:
                for seed in args.seeds:
                    row = run_one(args, cache, v, seed, frac)
                    rows.append(row)
                    with out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(f"  {v} f={frac:g} seed={seed}: val {100 * row['val_mean_R']:.2f} "
                          f"test {100 * row['test_mean_R']:.2f} (best epoch {row['best_epoch']})", flush=True)
            print(table(rows, frac), flush=True)


if __name__ == "__main__":
    main()
