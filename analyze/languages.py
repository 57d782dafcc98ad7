"""A run evaluated per caption language (``analyze languages``; ``analyze zeroshot --language``).

Retrieval in language L uses the test images that have captions in L (the text entry
``<encoder>.lang-<L>`` that ``extract --set data.language=L`` writes), joined to the image entry
by id; images without a caption in L are left out and counted, never scored as misses ("missing"
is not "wrong"): the table reports ``n`` (test images with L) beside the split's images.

Zero-shot in language L classifies all test images with prompts in L: templates and class names
from a prompts file (TOML, one table per language)::

    [de]
    templates = ["ein Foto von {}.", "eine Zeichnung von {}."]
    classes = { animals = "Tiere", food = "Essen" }

A language without templates in the file is refused (never English templates in disguise), as
is a class without a name in L; the default language may use the built-in templates. Results:
``runs/<run>/languages.json`` (the report's per-language table) and ``zeroshot-<L>.json``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from analyze.compare import header, output_dir
from analyze.evalrun import EvalError, open_run
from analyze.prompts import PromptError
from analyze.zeroshot import zero_shot
from pipeline.cache import CacheError, find_entry
from pipeline.config import PipelineConfig
from pipeline.join import join_pairs
from pipeline.languages import LanguageError, entry_name, normalize
from pipeline.runtime import write_json
from train.retrieval import retrieval_summary

OUTPUT = "languages.json"  # in <analyze.out>/<dataset>/<split>/runs/<run>/
RETRIEVAL_KEYS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10")


def language_retrieval(cfg: PipelineConfig, rv, language: str) -> dict:
    """Retrieval of the run on ``analyze.split`` with the captions in ``language``: the figures of
    ``retrieval_summary`` plus n_images (with captions in it), n_texts and split_images."""
    split = cfg.analyze.split
    img = rv.entry(split, "image")
    name = entry_name(rv.entries["text"], language, cfg.data.default_language)
    try:
        txt = find_entry(cfg.data.cache, cfg.data.dataset, split, name, cfg.data.data_dir)
    except CacheError as exc:
        raise EvalError(f"no {language!r} captions of {rv.entries['text']} for {split} in the cache ({exc}). Extract "
                        f"them: extract --encoder {rv.entries['text']} --split {split} --set data.language={language}."
                        ) from None
    rv.run.check_entry("text", txt)
    pairs = join_pairs(img, txt)
    x = rv.embed("image", img.features(rv.layer("image"))[pairs.image_rows])
    y = rv.embed("text", txt.features(rv.layer("text"))[pairs.text_rows])
    out = retrieval_summary(x, y, pairs.text_to_image)
    return {**out, "n_images": int(len(pairs.image_rows)), "n_texts": int(len(pairs.text_rows)),
            "split_images": int(len(img.ids)), "entry": name}


def evaluate_languages(cfg: PipelineConfig, run: str | None, languages: Sequence[str],
                       prompts: str | Path | None = None, force: bool = False) -> dict:
    """``analyze languages``: retrieval and (with labels) zero-shot of a run per language; writes
    ``runs/<run>/languages.json`` and returns it (plus ``out``)."""
    t0 = time.perf_counter()
    codes = list(dict.fromkeys(normalize(code, "--language") for code in languages))
    if not codes:
        raise LanguageError("analyze languages needs at least one --language CODE.")
    rv = open_run(cfg, run)
    rows = {}
    for code in codes:
        row = {"retrieval": language_retrieval(cfg, rv, code)}
        try:
            zs = zero_shot(cfg, rv.name, None, force, language=code, prompts=prompts)
            row["zeroshot"] = {k: zs["results"]["adapters"][k] for k in ("top1", "top5", "balanced")}
            row["zeroshot"]["n"], row["zeroshot"]["chance_top1"] = zs["n"], zs["chance"]["top1"]
        except PromptError as exc:
            row["zeroshot"] = {"skipped": str(exc)}
        rows[code] = row
    doc = {**header(cfg, "languages"), "run": rv.name, "run_sha256": rv.sha256, "languages": rows,
           "default_language": normalize(cfg.data.default_language), "prompts": str(prompts) if prompts else None,
           "seconds": time.perf_counter() - t0}
    out = output_dir(cfg, "runs", rv.name)
    write_json(out / OUTPUT, doc)
    return {**doc, "out": out}


__all__ = ["OUTPUT", "evaluate_languages", "language_retrieval"]
