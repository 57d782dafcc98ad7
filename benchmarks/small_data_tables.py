"""Tables of the small-data studies (configs/study-small-data*.toml) for the README, and the
recipe chosen on validation recall only.

    study --config configs/study-small-data.toml
    study --config configs/study-small-data-pair2.toml
    python benchmarks/small_data_tables.py reports/small-data/imagefolder/test/studies/small-data \
        reports/small-data-pair2/imagefolder/test/studies/small-data-pair2
    python benchmarks/small_data_tables.py --quick    # the tables of a generated study folder

Per study, recipe (the ``variant`` axis) and train fraction, over the seeds (mean and the 95%
t-interval, mean +- t(0.975, m-1) * sd / sqrt(m)): val mean recall of the kept epoch, test mean
recall, zero-shot top-1 accuracy of the adapters; the paired difference to the ``plain`` recipe
(same fraction and seed, hence the same train subset) for test recall and zero-shot top-1; the
closed-form PCA + Procrustes map's test recall and zero-shot top-1 on the same subsets (refitted
on each run's own train pairs); then each recipe's zero-shot top-1 paired against that closed
form in the same cell, and ASIF's zero-shot top-1 with the same pairs as anchors.

The selection rule, fixed before the test columns were read: the recipe with the highest val
mean recall averaged over every study and fraction (each setting weighs the same).
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from pathlib import Path

import sys
import tempfile

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.runs import RunMetrics  # noqa: E402
from study.table import describe, flat_zeroshot, retrieval_columns  # noqa: E402

BASE = "plain"  # the recipe the paired differences are taken against


def interval(values) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval) of the finite values (``study.table.describe``)."""
    d = describe(values, interval=True)
    return d["mean"], (d["hi95"] - d["lo95"]) / 2


def fmt(mean_hw: tuple[float, float], scale: float = 100.0, signed: bool = False) -> str:
    mean, hw = mean_hw
    if not math.isfinite(mean):
        return "-"
    text = f"{mean * scale:+.1f}" if signed else f"{mean * scale:.1f}"
    return text + (f" ± {hw * scale:.1f}" if math.isfinite(hw) else "")


def load(folder: Path) -> dict:
    """{(variant, fraction): {seed: row}} of the finished cells of a study folder."""
    with open(folder / "cells.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["status"] == "done"]
    out: dict = defaultdict(dict)
    for r in rows:
        out[(r["variant"], float(r["train.train_fraction"]))][int(r["train.seed"])] = r
    return out


def num(row: dict, col: str) -> float:
    try:
        return float(row[col])
    except (KeyError, ValueError):
        return math.nan


def table(folder: Path) -> tuple[list[str], dict[str, list[float]]]:
    """Markdown lines of one study, and {variant: [val mean recall per fraction]}."""
    cells = load(folder)
    variants = list(dict.fromkeys(v for v, _ in cells))
    fractions = sorted({f for _, f in cells})
    pairs = {f: int(round(np.mean([num(r, "run.sizes.train.pairs") for r in cells[(variants[0], f)].values()])))
             for f in fractions}
    lines = [f"**{folder.name}** (test mean recall and zero-shot top-1 in %; mean ± 95% t-interval half-width over "
             f"{len(next(iter(cells.values())))} seeds; Δ = paired difference to `{BASE}`, same subset and seed)", "",
             "| recipe | train pairs | val mean_R | test mean_R | Δ test mean_R | zero-shot top-1 | Δ zero-shot |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    val: dict[str, list[float]] = defaultdict(list)
    for v in variants:
        for f in fractions:
            seeds = cells[(v, f)]
            base = cells.get((BASE, f), {})
            col = {c: [num(r, c) for r in seeds.values()] for c in ("run.val_best.mean_R", "mean_R",
                                                                   "zeroshot.adapters.top1")}
            diff = {c: [num(r, c) - num(base[s], c) for s, r in seeds.items() if s in base]
                    for c in ("mean_R", "zeroshot.adapters.top1")}
            val[v].append(interval(col["run.val_best.mean_R"])[0])
            lines.append(f"| {v} | {pairs[f]} | {fmt(interval(col['run.val_best.mean_R']))} | "
                         f"{fmt(interval(col['mean_R']))} | "
                         f"{'-' if v == BASE else fmt(interval(diff['mean_R']), signed=True)} | "
                         f"{fmt(interval(col['zeroshot.adapters.top1']))} | "
                         f"{'-' if v == BASE else fmt(interval(diff['zeroshot.adapters.top1']), signed=True)} |")
    for f in fractions:
        seeds = cells[(variants[0], f)]
        lines.append(f"| Procrustes (closed form) | {pairs[f]} | - | "
                     f"{fmt(interval([num(r, 'procrustes.mean_R') for r in seeds.values()]))} | - | "
                     f"{fmt(interval([num(r, 'zeroshot.procrustes.top1') for r in seeds.values()]))} | - |")
    chance = [num(r, "zeroshot.chance.top1") for r in next(iter(cells.values())).values()]
    majority = [num(r, "zeroshot.chance.majority") for r in next(iter(cells.values())).values()]
    lines += ["", f"Zero-shot chance {np.mean(chance) * 100:.1f}% (majority class {np.mean(majority) * 100:.1f}%).",
              versus_closed_form(cells, pairs), asif(cells, pairs), ""]
    return lines, val


def versus_closed_form(cells: dict, pairs: dict) -> str:
    """Zero-shot top-1 of each recipe minus the closed-form Procrustes map's in the same cell (same
    train pairs and, for layer-choosing recipes, the same layers), paired over seeds."""
    above, below, n = [], [], 0
    for (v, f), seeds in cells.items():
        d = interval([num(r, "zeroshot.adapters.top1") - num(r, "zeroshot.procrustes.top1") for r in seeds.values()])
        n += 1
        if d[0] - d[1] > 0:
            above.append(f"{v} at {pairs[f]} pairs {fmt(d, signed=True)}")
        elif d[0] + d[1] < 0:
            below.append(f"{v} at {pairs[f]} pairs {fmt(d, signed=True)}")
    return (f"Zero-shot top-1 minus the closed-form Procrustes map's on the same pairs and layers, paired: above in "
            f"{len(above)} ({'; '.join(above) or '-'}), below in {len(below)} ({'; '.join(below) or '-'}), within "
            f"the interval in {n - len(above) - len(below)} of {n} settings.")


def asif(cells: dict, pairs: dict) -> str:
    """ASIF's zero-shot top-1 (training-free; the run's train pairs as anchors), mean over every cell of a fraction."""
    means = {f: np.mean([num(r, "zeroshot.relative.top1") for (_, g), seeds in cells.items() if g == f
                         for r in seeds.values()]) for f in pairs}
    return ("ASIF zero-shot top-1 (its anchors: the same train pairs): " +
            ", ".join(f"{m * 100:.1f}% at {pairs[f]} pairs" for f, m in sorted(means.items())) + ".")


def fake_study(folder: Path, seed: int = 0) -> Path:
    """A study folder whose cells.csv has the columns a real study writes (made by study.table from
    generated run metrics and zero-shot results): 2 recipes x 2 train fractions x 3 seeds."""
    rng = np.random.default_rng(seed)
    rows = []
    for variant in (BASE, "other"):
        for fraction in (0.25, 1.0):
            for s in range(3):
                recall = {"mean_R": rng.uniform(0.2, 0.6)}
                metrics = RunMetrics(run=f"{variant}-{fraction}-{s}", test={"infonce": recall, "procrustes": recall},
                                     val_best={"mean_R": rng.uniform(0.2, 0.6)},
                                     sizes={"train": {"pairs": int(400 * fraction)}, "test": {"pairs": 100}})
                zeroshot = {"results": {m: {"top1": rng.uniform(0.1, 0.5)} for m in ("adapters", "procrustes", "relative")},
                            "chance": {"top1": 0.1, "majority": 0.2}}
                rows.append({"variant": variant, "train.train_fraction": fraction, "train.seed": s, "status": "done",
                             **retrieval_columns(metrics), **flat_zeroshot(zeroshot)})
    folder.mkdir(parents=True)
    with open(folder / "cells.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("studies", nargs="*", type=Path, help="study folders (with cells.csv)")
    ap.add_argument("--quick", action="store_true", help="tables of a generated study folder (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        with tempfile.TemporaryDirectory() as tmp:
            args.studies = [fake_study(Path(tmp) / "generated")]
            return tables(args.studies)
    if not args.studies:
        ap.error("name at least one study folder (or pass --quick)")
    tables(args.studies)


def tables(studies: list[Path]) -> None:
    """Print every study's table, then the recipe chosen on validation recall."""
    by_variant: dict[str, list[float]] = defaultdict(list)
    for folder in studies:
        lines, val = table(folder)
        print("\n".join(lines))
        for v, values in val.items():
            by_variant[v] += values
    ranking = sorted(by_variant.items(), key=lambda kv: -np.mean(kv[1]))
    print("Val mean recall averaged over every study and fraction (the selection rule):")
    for v, values in ranking:
        print(f"  {v:<12} {np.mean(values) * 100:.2f}%  ({len(values)} settings)")
    print(f"chosen on val: {ranking[0][0]}")


if __name__ == "__main__":
    main()
