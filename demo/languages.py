"""English-only adapters on the Tux Paint stamps, evaluated in other languages (docs/languages.md).

For each text encoder and seed: adapters trained on the English captions (``fit-adapters`` with
``train.seed``), then retrieval on the test stamps in every language asked for (the images with a
caption in it) and zero-shot with the prompts file's templates (``analyze.languages``). The
languages' test captions are extracted first (``extract --split test --set data.language=L``),
once per language, every text encoder in the same pass. Prints one table per figure: the mean over
seeds with the 95% t-interval (``study.table.describe``).

    python -m demo.languages --config configs/languages.toml --text all-minilm-l6-v2,use-multilingual-v3 \\
        --seeds 0,1,2 --languages en,de,fr,es,ja,ru --prompts configs/prompts-tuxpaint.toml [--json out.json]

``--languages coverage:0.8`` means every language with captions for >= 80% of the stamps.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from analyze.languages import evaluate_languages
from extract import datasets as D
from extract.run import extract
from pipeline.config import load_config, with_values
from pipeline.languages import normalize
from study.table import describe
from train.fit import fit_adapters

log = logging.getLogger(__name__)
FIGURES = ("i2t_R@1", "i2t_R@10", "t2i_R@1", "t2i_R@10", "zs_top1")  # columns of the tables
USE_LANGUAGES = ("ar", "de", "en", "es", "fr", "it", "ja", "ko", "nl", "pl", "pt", "pt-br", "ru", "th", "tr", "zh-cn",
                 "zh-tw")  # use-multilingual-v3's 16 training languages, in Tux Paint's codes (pt-br counted as pt)


def languages_of(cfg, spec: str) -> list[str]:
    """The codes of ``spec``: a comma list, or ``coverage:F`` = every language with captions for at
    least a fraction F of the images (all splits), the default language first."""
    if not spec.startswith("coverage:"):
        return [normalize(c) for c in spec.split(",") if c.strip()]
    least = float(spec.partition(":")[2])
    counts: dict[str, int] = {}
    total = 0
    for split in D.available_splits(cfg.data.dataset, cfg.data.data_dir, **D.config_options(cfg.data)):
        cov = D.load_split(cfg.data.dataset, cfg.data.data_dir, split,
                           **D.config_options(cfg.data)).language_coverage(cfg.data.default_language)
        for lang, (n, t) in cov.items():
            counts[lang] = counts.get(lang, 0) + n
        total += next(iter(cov.values()))[1]
    return sorted((c for c, n in counts.items() if n >= least * total), key=lambda c: (-counts[c], c))


def run(cfg, texts: list[str], seeds: list[int], languages: list[str], prompts: str | None) -> dict:
    """{text encoder: {language: {figure: [value per seed]}}} plus "n": {language: test images}."""
    for lang in languages:  # the languages' test captions (finished entries are reused)
        extract(with_values(cfg, {"extract.encoders": texts, "extract.split": "test", "data.language": lang}))
    out: dict = {"n": {}}
    for text in texts:
        per = out.setdefault(text, {})
        for seed in seeds:
            name = f"lang-{text}-s{seed}"
            c = with_values(cfg, {"train.text": text, "train.seed": seed, "train.name": name})
            fit_adapters(c, progress=False)
            doc = evaluate_languages(c, name, languages, prompts)
            for lang, row in doc["languages"].items():
                r, z = row["retrieval"], row["zeroshot"]
                out["n"][lang] = r["n_images"]
                figs = per.setdefault(lang, {f: [] for f in FIGURES})
                for f in FIGURES[:4]:
                    figs[f].append(r[f])
                figs["zs_top1"].append(z.get("top1", float("nan")))
    return out


def tables(result: dict, texts: list[str]) -> str:
    """Markdown: one row per language, one column per (encoder, figure): mean [lo, hi] over seeds."""
    lines = []
    for fig in FIGURES:
        lines += [f"\n{fig} (mean over seeds, 95% t-interval)\n",
                  "| language | test images | " + " | ".join(texts) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in texts) + " |"]
        for lang, n in result["n"].items():
            cells = []
            for text in texts:
                d = describe(result[text][lang][fig], interval=True)
                cells.append("-" if d["mean"] != d["mean"] else f"{d['mean']:.3f} [{d['lo95']:.3f}, {d['hi95']:.3f}]")
            lines.append(f"| {lang} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(result: dict, texts: list[str]) -> str:
    """Markdown: per encoder, the mean over languages (and seeds) of each retrieval figure, for
    the languages use-multilingual-v3 was trained on and for the others."""
    groups = {"USE-m3 languages": [l for l in result["n"] if l in USE_LANGUAGES],
              "other languages": [l for l in result["n"] if l not in USE_LANGUAGES]}
    lines = ["\n| languages | count | " + " | ".join(f"{t} {f}" for t in texts for f in ("i2t_R@10", "t2i_R@10")) + " |",
             "| --- | --- | " + " | ".join("---" for _ in texts for _ in range(2)) + " |"]
    for group, langs in groups.items():
        if not langs:
            continue
        cells = [f"{sum(sum(result[t][l][f]) / len(result[t][l][f]) for l in langs) / len(langs):.3f}"
                 for t in texts for f in ("i2t_R@10", "t2i_R@10")]
        lines.append(f"| {group} | {len(langs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/languages.toml", help="pipeline config (default: %(default)s)")
    ap.add_argument("--text", default="all-minilm-l6-v2,use-multilingual-v3", help="text encoders (default: %(default)s)")
    ap.add_argument("--seeds", default="0,1,2", help="train.seed values (default: %(default)s)")
    ap.add_argument("--languages", default="en,de,fr,es,ja,ru", help="codes, or coverage:F (default: %(default)s)")
    ap.add_argument("--prompts", default=None, help="zero-shot prompts file (default: none)")
    ap.add_argument("--json", default=None, help="also write the per-seed values here (default: none)")
    ap.add_argument("--from-json", default=None, help="only print the tables of a saved --json file (default: none)")
    args = ap.parse_args(argv)
    texts = [t for t in args.text.split(",") if t]
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text(encoding="utf-8"))
        print(tables(result, texts))
        print(summary(result, texts))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config)
    langs = languages_of(cfg, args.languages)
    result = run(cfg, texts, [int(s) for s in args.seeds.split(",")], langs, args.prompts)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(tables(result, texts))
    print(summary(result, texts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
