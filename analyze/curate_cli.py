"""``curate``: a concept-balanced subset of a cached pool (``analyze.curate``), written as a
subset file that ``fit-adapters --set train.subset=FILE`` trains on.

    curate --config configs/demo.toml --concepts configs/concepts/tuxpaint.txt --per-concept 5 \\
        --out subsets/demo-5.csv

prints the coverage table (the answer first) and writes SUBSET.csv (``train.subset``'s format:
id, concept, score, after a ``# curate:`` provenance line) and SUBSET.png (pairs per concept in
the pool and in the subset).
"""

from __future__ import annotations

from pathlib import Path

import click

from analyze.curate import BLOCK, CurateError, CurateRequest, coverage_lines, curate, random_subset, read_concepts
from analyze.plots import concept_counts
from analyze.prompts import read_templates
from pipeline.cli import build_config, config_option, config_options, config_values, friendly_errors
from train.subset import write_subset

CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.command(context_settings=CONTEXT)
@click.option("--concepts", "concepts_path", type=click.Path(dir_okay=False),
              help="Concept list: one name per line ('#' lines are comments; blank lines and repeats are "
                   "refused). Required. [default: none]")
@click.option("--concept-images", type=click.Path(file_okay=False),
              help="Folder with one subfolder of example images per concept (named as the concept); a "
                   "concept's image prototype is their mean embedding. [default: none: text prototypes only]")
@click.option("--per-concept", type=int, help="Most pairs chosen per concept (N). Required. [default: none]")
@click.option("--total", type=int, default=0, help="Most pairs chosen in all (M), rarest concepts first. "
                                                   "[default: 0 = no total]")
@click.option("--floor", type=float, default=None,
              help="Smallest cosine similarity a pair may have to count for a concept. [default: none]")
@click.option("--top-k", type=int, default=1,
              help="A pair is a candidate of its K best-scoring concepts. [default: 1]")
@click.option("--split", default="train", help="Cached split the pool is. [default: train]")
@click.option("--run", default=None, help="Score in this fit-adapters run's shared space (captions, prompts and "
                                          "example images through its adapters). [default: none: the frozen "
                                          "encoders' own spaces]")
@click.option("--templates", type=click.Path(exists=True, dir_okay=False),
              help="Prompt templates, one per line with {} for the concept. [default: a short CLIP-style set]")
@click.option("--out", "out_path", type=click.Path(dir_okay=False),
              help="Subset file to write (CSV: id, concept, score); the figure goes next to it as .png. "
                   "Required. [default: none]")
@click.option("--random-seeds", default="", metavar="S[,S...]",
              help="Also write the control: as many pool pairs drawn at random, one file per seed, "
                   "<out>.random-<S>.csv. [default: none]")
@config_option("data.cache", "--cache", help="Feature-cache folder.")
@config_option("data.dataset", "--dataset", help="Dataset whose cached split is the pool.")
@config_options
@friendly_errors
def main(concepts_path, concept_images, per_concept, total, floor, top_k, split, run, templates, out_path,
         random_seeds, **kw):
    """Choose up to N pairs per concept from a cached split, rarest concepts first (Freeze-Align's
    concept-balanced curation), and write them as a subset file for train.subset."""
    missing = [o for o, v in (("--concepts", concepts_path), ("--per-concept", per_concept), ("--out", out_path))
               if v is None]
    if missing:
        raise CurateError(f"curate needs {', '.join(missing)}: curate --config CFG --concepts FILE --per-concept N "
                          f"--out SUBSET.csv.")
    try:
        seeds = [int(x) for x in random_seeds.split(",") if x.strip()]
    except ValueError:
        raise CurateError(f"--random-seeds {random_seeds!r}: give integers separated by commas, e.g. 0,1,2.") from None
    path, overrides, verbose = kw.pop("config_path"), kw.pop("overrides"), kw.pop("verbose")
    cfg = build_config(path, overrides, config_values(kw), verbose)
    req = CurateRequest(read_concepts(concepts_path), per_concept, total, floor, top_k, split, run, concept_images,
                        read_templates(templates), BLOCK)
    result = curate(cfg, req)
    for line in coverage_lines(result, per_concept):
        click.echo(line)
    out = write_subset(out_path, result.rows, result.source)
    figure = concept_counts(result.before, result.after, f"pairs per concept: pool vs curated "
                            f"(N = {per_concept}{f', M = {total}' if total else ''})", Path(out).with_suffix(".png"))
    click.echo(f"subset: {out}")
    for seed in seeds:
        rows, source = random_subset(cfg, len(result.rows), seed, split)
        click.echo(f"random subset: {write_subset(Path(out).with_suffix(f'.random-{seed}.csv'), rows, source)}")
    click.echo(f"figure: {figure}")


if __name__ == "__main__":
    main()
