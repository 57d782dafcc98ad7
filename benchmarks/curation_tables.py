"""The tables of docs/curation.md from finished studies (configs/study-curation.toml, configs/study-sigmoid.toml).

Curation: the cells of the curation study grouped by train set (every pair; curated-N; the random controls of
curated-N, pooled over their 3 draws), each metric's mean and 95% t-interval over the group's cells, then
curated - random per N with a Welch interval (3 curated cells, 9 random ones: the random rows vary the draw
and the training seed). Sigmoid: mean and t-interval per loss over the seeds.

Usage:
    .venv/bin/python benchmarks/curation_tables.py [--study reports/demo/imagefolder/test/studies]
    .venv/bin/python benchmarks/curation_tables.py --quick     # tables of a generated study folder
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from study.table import describe, t_quantile  # noqa: E402

METRICS = {"mean R": "mean_R", "zero-shot top-1": "zeroshot.adapters.top1",
           "zero-shot balanced": "zeroshot.adapters.balanced", "i2t R@1": "i2t_R@1", "t2i R@1": "t2i_R@1"}
SUBSET = re.compile(r"curated-(\d+)(\.random-\d+)?\.csv$")


def group_of(subset: str) -> str:
    m = SUBSET.search(subset or "")
    if not m:
        return "every train pair"
    return f"{'random' if m.group(2) else 'curated'} N={m.group(1)}"


def _cell(x: list[float]) -> str:
    d = describe(x, True)
    return f"{d['mean']:.3f} ({d['lo95']:.3f} to {d['hi95']:.3f})"


def _welch(a: np.ndarray, b: np.ndarray) -> str:
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if se > 0 else 1
    d, h = a.mean() - b.mean(), t_quantile(max(1.0, df)) * se  # type: ignore[arg-type]  (scipy takes a real df)
    return f"{d:+.3f} ({d - h:+.3f} to {d + h:+.3f})"


def read(path: Path) -> list[dict]:
    return [r for r in csv.DictReader(path.open(encoding="utf-8")) if r.get("status") == "done"]


def curation_tables(rows: list[dict]) -> list[str]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(group_of(r["train.subset"]), []).append(r)
    sizes = sorted({int(SUBSET.search(r["train.subset"]).group(1)) for r in rows if SUBSET.search(r["train.subset"])})
    order = ["every train pair"] + [f"{k} N={n}" for n in sizes for k in ("curated", "random")]
    out = ["| train set | pairs | cells | " + " | ".join(METRICS) + " |", "|---|---:|---:|" + "---:|" * len(METRICS)]
    for g in [g for g in order if g in groups]:
        rs = groups[g]
        pairs = "/".join(str(p) for p in sorted({int(float(r["run.sizes.train.pairs"])) for r in rs}))
        out.append(f"| {g} | {pairs} | {len(rs)} | " + " | ".join(_cell([float(r[c]) for r in rs])
                                                               for c in METRICS.values()) + " |")
    out += ["", "| curated - random | " + " | ".join(METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    for n in sizes:
        a, b = groups.get(f"curated N={n}", []), groups.get(f"random N={n}", [])
        if len(a) >= 2 and len(b) >= 2:
            out.append(f"| N={n} | " + " | ".join(_welch(np.array([float(r[c]) for r in a]),
                                                        np.array([float(r[c]) for r in b])) for c in METRICS.values()) + " |")
    if rows and rows[0].get("zeroshot.chance.top1"):
        out.append(f"\nzero-shot chance: top-1 {float(rows[0]['zeroshot.chance.top1']):.3f}, the majority class "
                   f"{float(rows[0]['zeroshot.chance.majority']):.3f}")
    return out


def sigmoid_table(rows: list[dict]) -> list[str]:
    out = ["| loss | cells | " + " | ".join(METRICS) + " |", "|---|---:|" + "---:|" * len(METRICS)]
    for loss in dict.fromkeys(r["train.loss"] for r in rows):
        rs = [r for r in rows if r["train.loss"] == loss]
        out.append(f"| {loss} | {len(rs)} | " + " | ".join(_cell([float(r[c]) for r in rs]) for c in METRICS.values())
                   + " |")
    return out


def _fake(folder: Path) -> None:
    """Cells of both studies with random numbers (--quick)."""
    rng = np.random.default_rng(0)
    cols = ["train.subset", "train.loss", "train.seed", "status", "run.sizes.train.pairs",
            "zeroshot.chance.top1", "zeroshot.chance.majority", *METRICS.values()]
    for study, subsets, losses in (("curation", ["", "s/curated-3.csv", "s/curated-3.random-0.csv",
                                                 "s/curated-3.random-1.csv"], ["infonce"]),
                                   ("sigmoid", [""], ["infonce", "sigmoid"])):
        (folder / study).mkdir(parents=True)
        with (folder / study / "cells.csv").open("w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, cols)
            w.writeheader()
            for s in subsets:
                for loss in losses:
                    for seed in range(3):
                        w.writerow({"train.subset": s, "train.loss": loss, "train.seed": seed, "status": "done",
                                    "run.sizes.train.pairs": 100, "zeroshot.chance.top1": 0.1,
                                    "zeroshot.chance.majority": 0.2, **{c: rng.uniform() for c in METRICS.values()}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--study", default="reports/demo/imagefolder/test/studies",
                    help="folder of the study folders [default: reports/demo/imagefolder/test/studies]")
    ap.add_argument("--quick", action="store_true", help="tables of a generated study folder")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.study)
        if args.quick:
            root = Path(tmp)
            _fake(root)
        for name, make in (("curation", curation_tables), ("sigmoid", sigmoid_table)):
            path = root / name / "cells.csv"
            if path.is_file():
                print(f"{name} ({path}):")
                print("\n".join(make(read(path))))
                print()
            else:
                print(f"{name}: no {path} (run study --config configs/study-{name}.toml)")


if __name__ == "__main__":
    main()
