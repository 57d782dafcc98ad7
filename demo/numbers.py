"""The numbers the README and docs quote from the demo, regenerated from the demo's own files.

    make readme-numbers          # = python -m demo.numbers: rewrite every block from the files
    python -m demo.numbers --check   # exit 1 when a block differs from the files (CI, after the demo)

A block is the text between ``<!-- numbers: NAME -->`` and ``<!-- /numbers: NAME -->`` in
README.md or a docs/ page; ``BLOCKS`` maps NAME to the function that renders it from the files of
``configs/demo.toml``'s run (``cache/demo/runs/demo/metrics.json``, ``reports/demo/.../platonic.json``,
``zeroshot.json``, ``matching.json``), of ``make study`` (its ``summary.csv``, ``study.json`` and
cell files) and of the timing records of ``demo.timing``; ``FIGURES`` are copied from the study's
folder. Run from the repository root (the
configs' paths are relative to it). A block whose files do not exist is left as it is (and named). ``--check`` compares numbers to the last digit shown (plus half a digit, for
another machine's rounding) and skips the timing blocks, which differ by machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Callable

from analyze.compare import output_dir
from analyze.display import interval, method_label, number
from analyze.summary import answer_lines, chance_row
from demo import timing
from pipeline.config import PipelineConfig, load_config
from pipeline.errors import PipelineError
from pipeline.progress import clock_text
from pipeline.runs import ADAPTERS_METHOD, read_run, run_dir
from study.runner import study_dir

DEMO_CONFIG = "configs/demo.toml"
STUDY_CONFIG = "configs/study-demo.toml"
FILES = ("README.md", "docs/aligned-model.md", "docs/analyze.md", "docs/studies.md")  # where blocks may be
FIGURES = {"docs/figures/demo-study-fraction.png": "fraction.png"}  # copied from the study's folder
MARK = re.compile(r"(<!-- numbers: ([a-z-]+) -->\n)(.*?)(<!-- /numbers: \2 -->)", re.S)
NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")


class Missing(PipelineError):
    """The files a block is made from do not exist (yet)."""


def _json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError:
        raise Missing(str(path)) from None


# ----------------------------------------------------------------------------- blocks
def demo_results(cfg: PipelineConfig) -> str:
    """The README's demo answer: the Platonic summary and the headline table."""
    platonic = _json(output_dir(cfg, "runs", cfg.train.name) / "platonic.json")
    zs = _json(output_dir(cfg, "runs", cfg.train.name) / "zeroshot.json")
    metrics = read_run(run_dir(cfg.data.cache, cfg.train.name)).metrics
    if metrics is None:
        raise Missing(str(run_dir(cfg.data.cache, cfg.train.name) / "metrics.json"))
    sizes = metrics.sizes
    lines = answer_lines(platonic)
    out = [f"Split by image: {sizes['train']['pairs']:,} / {sizes['val']['pairs']:,} / {sizes['test']['pairs']:,} "
           f"train / val / test pairs. The Platonic test on the {sizes['test']['image']:,} test images "
           f"(reference {platonic['entries']['reference']}):", "", f"**{lines[0]}**", ""]
    out += [f"- {line}" for line in lines[1:4]] + [""]
    chance = chance_row(sizes["test"]["image"], sizes["test"]["text"])
    head = ["method", "mean recall", "image→text R@10", "text→image R@10", f"zero-shot top-1 ({len(zs['classes'])} classes)"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, zkey in ((ADAPTERS_METHOD, "adapters"), ("cca", "cca"), ("procrustes", "procrustes")):
        r, z = metrics.test.get(key, {}), zs["results"].get(zkey, {})
        out.append(f"| {method_label(key)} | {number(r.get('mean_R'))} | {number(r.get('i2t_R@10'))} | "
                   f"{number(r.get('t2i_R@10'))} | {number(z.get('top1'))} |")
    out.append(f"| chance | {number(chance['mean_R'])} | {number(chance['i2t_R@10'])} | {number(chance['t2i_R@10'])} | "
               f"{number(zs['chance']['top1'])} (majority class {number(zs['chance']['majority'])}) |")
    return "\n".join(out) + "\n"


def demo_time(cfg: PipelineConfig) -> str:
    """How long the install and the demo took where they were last run in full."""
    run = timing.read(timing.demo_record(cfg))
    if run is None:
        raise Missing(str(timing.demo_record(cfg)))
    inst = timing.read(timing.INSTALL_RECORD)
    text = (f"`make demo` took {clock_text(run['seconds'])} (min:s) after the install on {run['cpus']} CPU cores "
            f"(load average {run['load_average']:.1f} when it finished)")
    if inst is not None:
        text += (f"; `make install` took {clock_text(inst['seconds'])} and made a {inst['venv_bytes'] / 1e9:.1f} GB "
                 f".venv (torch with its CUDA libraries)")
    return text + ".\n"


def demo_evaluations(cfg: PipelineConfig) -> str:
    """docs/analyze.md: zero-shot, retrieval and matching of every method on the demo."""
    folder = output_dir(cfg, "runs", cfg.train.name)
    zs, mt = _json(folder / "zeroshot.json"), _json(folder / "matching.json")
    metrics = read_run(run_dir(cfg.data.cache, cfg.train.name)).metrics
    if metrics is None:
        raise Missing(str(run_dir(cfg.data.cache, cfg.train.name) / "metrics.json"))
    retrieval = {**{("adapters" if k == ADAPTERS_METHOD else k): v for k, v in metrics.test.items()},
                 **{k: mt["retrieval"][k] for k in mt.get("training_free", [])}}
    out = [f"On the demo ({zs['n']:,} test stamps, {len(zs['classes'])} top-level categories as classes, "
           f"{len(zs['templates'])} templates; seed 0):", "",
           "| method | zero-shot top-1 | top-5 | balanced | retrieval RSUM | i2t R@1 | t2i R@1 |", "|---|---|---|---|---|---|---|"]
    for m in dict.fromkeys([*zs["results"], *retrieval]):
        z, r = zs["results"].get(m, {}), retrieval.get(m, {})
        out.append(f"| {method_label(m)} | {number(z.get('top1'))} | {number(z.get('top5'))} | "
                   f"{number(z.get('balanced'))} | {number(r.get('rsum'), 1)} | {number(r.get('i2t_R@1'))} | "
                   f"{number(r.get('t2i_R@1'))} |")
    ch = chance_row(metrics.sizes["test"]["image"], metrics.sizes["test"]["text"])
    out.append(f"| chance (majority class) | {number(zs['chance']['top1'])} ({number(zs['chance']['majority'])}) | "
               f"{number(zs['chance']['top5'])} | {number(zs['chance']['balanced'])} | {number(ch['rsum'], 1)} | "
               f"{number(ch['i2t_R@1'])} | {number(ch['t2i_R@1'])} |")
    raw, ad = mt["matching"]["raw"], mt["matching"].get("adapters", {})
    out += ["", f"Seeded matching from {raw['seeds']} known pairs finds the caption of {100 * raw['accuracy']:.1f}% "
            f"of the other {raw['n'] - raw['seeds']} images with raw features"
            + (f" and {100 * ad['accuracy']:.1f}% with the adapters' embeddings" if ad else "")
            + f" (chance {100 * raw['chance']:.1f}%)."]
    return "\n".join(out) + "\n"


def demo_benchmark(cfg: PipelineConfig) -> str:
    """docs/aligned-model.md: CLIP_benchmark's figures beside the project's on the demo's test split."""
    bench = _json(output_dir(cfg, "runs", cfg.train.name) / f"benchmark-own-{cfg.analyze.split}.json")
    out = ["| CLIP_benchmark figure | CLIP_benchmark | project (`metrics.json`, `analyze zeroshot`) | close calls |",
           "|---|---|---|---|"]
    for task in ("zeroshot_retrieval", "zeroshot_classification"):
        for c in bench["results"].get(task, {}).get("compare", []):
            out.append(f"| {c['figure']} ({c['project_figure']}) | {c['clip_benchmark']:.4f} | {c['project']:.4f} | "
                       f"{c['close_calls']} |")
    return "\n".join(out) + "\n"


def _study() -> tuple[PipelineConfig, Path]:
    cfg = load_config(STUDY_CONFIG)
    return cfg, study_dir(cfg)


STUDY_COLUMNS = ("unbiased_cka.delta_image", "mutual_knn.delta_image", "cka.delta_image", "unbiased_cka.delta_text")


def study_results(_: PipelineConfig) -> str:
    """docs/studies.md: the demo study's table and answers, from summary.csv and study.json."""
    cfg, folder = _study()
    doc = _json(folder / "study.json")
    try:
        with open(folder / "summary.csv", newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError:
        raise Missing(str(folder / "summary.csv")) from None
    f = lambda r, c: float(r[c]) if r.get(c) not in (None, "") else float("nan")  # noqa: E731
    recipe = "variant" if cfg.study.variants else "train.adapter"  # the study's leading axis
    head = ["recipe" if cfg.study.variants else "adapter", "fraction", "mean recall", "Δ unbiased CKA, image", "Δ mutual kNN, image", "Δ linear CKA, image",
            "Δ unbiased CKA, text"]
    out = [f"Mean (95% t-interval over {len(cfg.study.axes.get(cfg.study.repeat, [])) or 'the'} "
           f"{cfg.study.repeat.split('.')[-1]}s) per setting; Δ = after − mean(before image, before text) on the test "
           f"split; chance mean recall {number(f(rows[0], 'chance.mean_R.mean'))}:", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [interval(f(r, f"{c}.mean"), f(r, f"{c}.lo95"), f(r, f"{c}.hi95"), signed=".delta_" in c)
                 for c in ("mean_R", *STUDY_COLUMNS)]
        out.append(f"| {r[recipe]} | {float(r['train.train_fraction']):g} | " + " | ".join(cells) + " |")
    out += ["", "Its answers (study.html):", ""] + [f"> {line}  " for a in doc.get("answers", []) for line in a.split("\n")]
    return "\n".join(out) + "\n"


def study_time(_: PipelineConfig) -> str:
    cfg, folder = _study()
    current = {c["cell_id"] for c in _json(folder / "study.json").get("cells", [])}  # not a changed grid's old cells
    cells = [_json(p) for p in sorted((folder / "cells").glob("*.json")) if p.stem in current]
    if not cells:
        raise Missing(str(folder / "cells"))
    seconds = sum(c.get("seconds", 0.0) for c in cells)
    return (f"The {len(cells)} cells' own times sum to {clock_text(seconds)} (min:s; training and the per-cell tests, "
            f"features cached by `make demo`).\n")


BLOCKS: dict[str, tuple[Callable[[PipelineConfig], str], bool]] = {  # name: (renderer, compared by --check)
    "demo-results": (demo_results, True), "demo-time": (demo_time, False),
    "demo-evaluations": (demo_evaluations, True), "demo-benchmark": (demo_benchmark, True), "study-results": (study_results, True),
    "study-time": (study_time, False)}


# ----------------------------------------------------------------------------- files
def _shape(text: str) -> tuple[str, list[str]]:
    return NUMBER.sub("#", text), NUMBER.findall(text)


def same_numbers(a: str, b: str) -> bool:
    """Same text with numbers equal to the last digit shown (half a digit of slack)."""
    (sa, na), (sb, nb) = _shape(a), _shape(b)
    if sa != sb or len(na) != len(nb):
        return False
    for x, y in zip(na, nb):
        digits = len(x.split(".")[1]) if "." in x else 0
        if abs(float(x.replace(",", "")) - float(y.replace(",", ""))) > 1.5 * 10 ** -digits:
            return False
    return True


def regenerate(text: str, cfg: PipelineConfig, check: bool = False) -> tuple[str, list[str], list[str]]:
    """(new text, stale blocks, skipped blocks) of one file's text."""
    stale, skipped = [], []

    def one(m: re.Match) -> str:
        name = m.group(2)
        render, compared = BLOCKS[name]
        try:
            new = render(cfg)
        except Missing as exc:
            skipped.append(f"{name} (no {exc})")
            return m.group(0)
        if (compared or not check) and not same_numbers(m.group(3), new):
            stale.append(name)
        return m.group(1) + new + m.group(4)

    return MARK.sub(one, text), stale, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.numbers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="Change nothing; exit 1 when a block is stale.")
    args = parser.parse_args(argv)
    cfg = load_config(DEMO_CONFIG)
    status = 0
    for rel in FILES:
        path = Path(rel)
        text = path.read_text(encoding="utf-8")
        new, stale, skipped = regenerate(text, cfg, args.check)
        for s in skipped:
            print(f"{rel}: block {s}: left as it is")
        if args.check and stale:
            print(f"{rel}: blocks {', '.join(stale)} differ from the demo's files: run `make readme-numbers`")
            status = 1
        elif not args.check and new != text:
            path.write_text(new, encoding="utf-8")
            print(f"{rel}: rewrote {', '.join(stale) or 'blocks'}")
    if not args.check:
        folder = _study()[1]
        for dest, name in FIGURES.items():
            if (folder / name).is_file():
                shutil.copyfile(folder / name, dest)
    return status


if __name__ == "__main__":
    sys.exit(main())
