"""``analyze``: compare cached representations, test the Platonic hypothesis, write a report.

Each subcommand parses options into the pipeline config and calls one library function:
``cka`` -> analyze.compare.compare_entries, ``platonic`` -> analyze.platonic.platonic_test,
``layers`` -> analyze.layers.compare_layers, ``pairs`` -> analyze.pairs.rank_pairs,
``report`` -> analyze.report.build_report, ``zeroshot`` -> analyze.zeroshot.zero_shot,
``languages`` -> analyze.languages.evaluate_languages,
``matching`` -> analyze.matching.run_matching, ``benchmark`` -> analyze.benchmark.benchmark. Outputs go under ``<analyze.out>/<dataset>/<split>/``
(layout in analyze.compare's docstring).
"""

from __future__ import annotations

from typing import Callable

import click

from analyze.benchdata import OWN
from analyze.benchmark import TASK_CHOICES, benchmark
from analyze.compare import compare_entries
from analyze.languages import evaluate_languages
from analyze.layers import compare_layers
from analyze.matching import BASE_ROWS, KERNELS, QAP_ROWS, SEED_FRACTION, run_matching
from analyze.pairs import rank_pairs
from analyze.platonic import SIDES, TERMS, platonic_test
from analyze.display import interval
from analyze.report import build_report
from analyze.summary import answer_lines
from analyze.zeroshot import zero_shot
from pipeline.cli import build_config, config_option, config_options, config_values, friendly_errors
from pipeline.config import CHOICES, PipelineConfig
from similarity.metrics import METRICS

CONTEXT = {"help_option_names": ["-h", "--help"]}


def common_options(func: Callable) -> Callable:
    """Options every analyze command accepts, then --config/--set/-v from pipeline.cli."""
    func = config_options(func)
    for opt in reversed([
        config_option("data.cache", "--cache", help="Feature-cache folder."),
        config_option("data.dataset", "--dataset", help="Dataset whose cache entries are read."),
        config_option("analyze.split", "--split", help="Split the representations are compared on."),
        config_option("analyze.metrics", "--metric", "--metrics", metavar="NAME[,NAME...]",
                      help=f"Metrics, comma-separated: {', '.join(METRICS)}."),
        config_option("analyze.k", "--k", type=int, help="Neighbours for the kNN metrics."),
        config_option("analyze.max_rows", "--max-rows", type=int,
                      help="Keep a fixed random subset of this many rows (0 = all)."),
        config_option("analyze.duplicates", "--duplicates", type=click.Choice(CHOICES["analyze.duplicates"]),
                      help="Byte-identical images under different ids: drop (keep one of each group) or keep."),
        config_option("analyze.seed", "--seed", type=int, help="Seeds row subsets, bootstrap and permutations."),
        config_option("analyze.out", "--out", help="Output folder (files go under OUT/<dataset>/<split>/)."),
    ]):
        func = opt(func)
    return func


def _config(kw: dict) -> PipelineConfig:
    """Build the config from the options mirroring config keys (popped from ``kw``)."""
    path, overrides, verbose = kw.pop("config_path"), kw.pop("overrides"), kw.pop("verbose")
    return build_config(path, overrides, config_values(kw), verbose)


def _matrix(names: list[str], S) -> str:
    width = max(8, *(len(n) for n in names))
    lines = [" " * width + "".join(f"{n[:10]:>11}" for n in names)]
    for name, row in zip(names, S):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>11.3f}" if v is not None else f"{'-':>11}" for v in row))
    return "\n".join(lines)


def _tolist(S):
    return S.tolist() if hasattr(S, "tolist") else S


@click.group(context_settings=CONTEXT)
def main():
    """Compare cached representations, test the Platonic hypothesis, write reports.

    Every command reads pipeline.toml (or --config) and writes JSON/CSV tables and PNG figures
    under <analyze.out>/<dataset>/<split>/. Run `analyze COMMAND --help` for its options.
    """


@main.command(context_settings=CONTEXT)
@config_option("analyze.entries", "--entries", metavar="NAME[,NAME...]",
               help="Cache entries to compare ([] = every entry of the split).")
@click.option("--kernels", is_flag=True, help="Also draw the kernels themselves on a sample of rows (kernels.png).")
@config_option("analyze.kernel_rows", "--kernel-rows", type=int, help="Rows in the kernel heatmaps.")
@config_option("analyze.reference", "--reference", help="Entry whose clustering orders the kernel heatmaps' rows.")
@config_option("analyze.calibrate", "--calibrate/--no-calibrate", default=None,
               help="Also calibrate every score against a shuffled-pairing null.")
@config_option("analyze.permutations", "--permutations", type=int, help="Shuffled-pairing draws for --calibrate.")
@common_options
@friendly_errors
def cka(kernels, **kw):
    """Pairwise scores between cache entries (rows joined by sample id), as JSON/CSV and heatmaps.

    Example: analyze cka --entries resnet18,gpt2,dinov2 --metric cka,mutual_knn --kernels --calibrate
    """
    cfg = _config(kw)
    res = compare_entries(cfg, kernels=kernels)
    for m, S in res["scores"].items():
        click.echo(f"{m} (n={res['n']}, {res['seconds'][m]:.1f} s)\n{_matrix(res['entries'], _tolist(S))}\n")
        if "calibrated" in res:
            click.echo(f"{m}, calibrated against {res['permutations']} shuffled pairings\n"
                       f"{_matrix(res['entries'], _tolist(res['calibrated'][m]))}\n")
    click.echo(f"wrote {res['out']}/scores.json, scores.csv and {len(res['figures'])} figures")


@main.command(context_settings=CONTEXT)
@config_option("analyze.reference", "--reference", help="Reference model's cache entry (K_ref).")
@config_option("train.image", "--image", help="Image encoder entry (K_X); the run's aligned entry is IMAGE@RUN.")
@config_option("train.text", "--text", help="Text encoder entry (K_Y); the run's aligned entry is TEXT@RUN.")
@click.option("--run", help="fit-adapters run name. [default: train.name, else <image>-<text>-<adapter>]")
@config_option("analyze.bootstrap", "--bootstrap", type=int, help="Resamples for the 95% confidence intervals.")
@config_option("analyze.permutations", "--permutations", type=int, help="Shuffled-pairing draws for the null.")
@config_option("analyze.kernel_rows", "--kernel-rows", type=int, help="Rows in the kernel heatmaps.")
@common_options
@friendly_errors
def platonic(run, **kw):
    """The hypothesis test: is m(K_repr, K_ref) > mean(m(K_X, K_ref), m(K_Y, K_ref)) by more than chance?

    Bootstrap CIs (mutual kNN: neighbours among the distinct drawn rows; other kNN metrics: 80%
    subsamples without replacement), a shuffled-pairing null with calibrated scores, controls
    (untrained adapters, CCA, Procrustes; analyze.controls) and a verdict per metric and side. Example:
    analyze platonic --reference dinov2 --image resnet18 --text gpt2 --run RUN
    """
    cfg = _config(kw)
    res = platonic_test(cfg, run)
    click.echo(f"run {res['run']}, n={res['n']:,}, reference {res['entries']['reference']} "
               f"({res['bootstrap']} resamples, {res['permutations']} permutations, {res['seconds']:.1f} s)")
    for line in answer_lines(res):
        click.echo(line)
    click.echo("")
    click.echo(f"{'metric':<16}" + "".join(f"{t:>14}" for t in TERMS) + "".join(f"{'delta ' + s:>28}" for s in SIDES))
    for m, r in res["results"].items():
        d = r["delta"]
        click.echo(f"{m:<16}" + "".join(f"{r['terms'][t]['score']:>14.3f}" for t in TERMS)
                   + "".join(f"{interval(d[s]['delta'], d[s]['ci_lo'], d[s]['ci_hi'], signed=True):>28}" for s in SIDES))
    click.echo(f"wrote {res['out']}/platonic.json (every sentence, interval and control), platonic.csv, platonic.png")


@main.command(context_settings=CONTEXT)
@click.option("--pair", metavar="IMAGE_ENTRY,TEXT_ENTRY",
              help="The two entries to compare layer by layer. [default: train.image,train.text]")
@config_option("analyze.permutations", "--permutations", type=int,
               help="Shuffled-pairing draws that calibrate the best and last layer pairs (0 = none).")
@common_options
@friendly_errors
def layers(pair, **kw):
    """Layer x layer heatmap of each metric for two entries extracted with `extract --layers all`."""
    cfg = _config(kw)
    names = tuple(p.strip() for p in pair.split(",")) if pair else None
    res = compare_layers(cfg, names)
    for m, d in res["metrics"].items():
        b, last = d["best"], d["last"]
        cal = (f" (calibrated {b['calibrated']:.3f}, p = {b['p_value']:.3g}; last calibrated "
               f"{last['calibrated']:.3f})") if "calibrated" in b else ""
        click.echo(f"{m}: best layer pair ({b['layer_a']}, {b['layer_b']}) = {b['score']:.3f}; "
                   f"last layer pair ({last['layer_a']}, {last['layer_b']}) = {last['score']:.3f}{cal}")
    click.echo(next(iter(res["metrics"].values()))["note"])
    click.echo(f"wrote {res['out']}")


@main.command(context_settings=CONTEXT)
@common_options
@friendly_errors
def pairs(**kw):
    """Rank every (image, text) encoder pair of the split by the first metric, before training;
    show test retrieval of existing fit-adapters runs next to it."""
    cfg = _config(kw)
    res = rank_pairs(cfg)
    metrics = res["metrics"]
    click.echo(f"{'rank':<5}{'image':<22}{'text':<22}" + "".join(f"{m:>14}" for m in metrics) + f"{'test mean_R':>13}")
    for r in res["pairs"]:
        best = r["best_test_mean_R"]
        click.echo(f"{r['rank']:<5}{r['image']:<22}{r['text']:<22}" + "".join(f"{r[m]:>14.3f}" for m in metrics)
                   + (f"{best:>13.3f}" if best is not None else f"{'-':>13}"))
    click.echo(res["spearman_note"] + (f": rho = {res['spearman_rho']:.3f}" if res["spearman_rho"] is not None else ""))
    click.echo(f"wrote {res['out']}")


@main.command(context_settings=CONTEXT)
@click.option("--run", help="fit-adapters run name. [default: train.name, else <image>-<text>-<adapter>]")
@config_option("analyze.reference", "--reference", help="Reference model's cache entry.")
@config_option("train.image", "--image", help="Image encoder entry of the run.")
@config_option("train.text", "--text", help="Text encoder entry of the run.")
@config_option("analyze.bootstrap", "--bootstrap", type=int, help="Resamples for the 95% confidence intervals.")
@config_option("analyze.permutations", "--permutations", type=int, help="Shuffled-pairing draws for the null.")
@common_options
@friendly_errors
def report(run, **kw):
    """One Markdown and one self-contained HTML report of an experiment (runs analyze cka and
    analyze platonic when their outputs are missing or were made with other settings)."""
    cfg = _config(kw)
    files = build_report(cfg, run)
    for line in files.summary[:4]:  # the answer at the top of the report; the rest is in the files
        click.echo(line)
    click.echo(f"report: {files.md}")
    click.echo(f"report: {files.html}")


def _table(rows: dict, columns: list[str], first: str = "method") -> str:
    lines = [f"{first:<12}" + "".join(f"{c:>10}" for c in columns)]
    for name, r in rows.items():
        lines.append(f"{name:<12}" + "".join(f"{r[c]:>10.3f}" if isinstance(r.get(c), (int, float)) else f"{'-':>10}"
                                             for c in columns))
    return "\n".join(lines)


@main.command(context_settings=CONTEXT)
@click.option("--run", help="fit-adapters run name. [default: train.name, else <image>-<text>-<adapter>]")
@click.option("--templates", type=click.Path(exists=True, dir_okay=False),
              help="Prompt templates, one per line with {} for the class name. [default: a short CLIP-style set]")
@click.option("--language", "languages", help="Prompt language(s), comma-separated (pt_BR = pt-br); other than "
              "data.default_language they need --prompts. [default: data.default_language]")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False),
              help="TOML file of templates and class names per language (docs/languages.md). [default: none]")
@config_option("data.label_from", "--label-from",
               help="Class labels: a metadata column, or dir (first folder of file_name).")
@click.option("--force", is_flag=True, help="Recompute the cached prompt features (needed when they are stale).")
@common_options
@friendly_errors
def zeroshot(run, templates, languages, prompts, force, **kw):
    """Zero-shot classification of the split's images by class prompts through the run's text
    adapter, next to the CCA / Procrustes baselines and the training-free ASIF method.

    Example: analyze zeroshot --config configs/demo.toml --label-from dir
    """
    cfg = _config(kw)
    for language in (languages.split(",") if languages else [None]):
        res = zero_shot(cfg, run, templates, force, language.strip() if language else None, prompts)
        click.echo(f"run {res['run']}: {res['n']} {cfg.analyze.split} images, {len(res['classes'])} classes, "
                   f"{len(res['templates'])} templates in {res['language']} ({res['seconds']:.1f} s)")
        cols = ["top1", "top5", "balanced"]
        click.echo(_table({**res["results"], "chance": res["chance"]}, cols))
        click.echo(f"majority class: {res['chance']['majority']:.3f}")
    click.echo(f"wrote {res['out']}/zeroshot*.json")


@main.command(context_settings=CONTEXT)
@click.option("--run", help="fit-adapters run name. [default: train.name, else <image>-<text>-<adapter>]")
@click.option("--language", "languages",
              help="Caption languages, comma-separated, e.g. de,fr,ja (each extracted with --set data.language=CODE). "
                   "[default: data.language]")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False),
              help="TOML file of zero-shot templates and class names per language (docs/languages.md); without it, "
                   "zero-shot is left out for languages other than the default. [default: none]")
@click.option("--force", is_flag=True, help="Recompute the cached prompt features (needed when they are stale).")
@common_options
@friendly_errors
def languages(run, languages, prompts, force, **kw):
    """Retrieval and zero-shot of a run per caption language: the test images with captions in
    each language (counted), the run's adapters trained on whichever language it was trained on.

    Example: analyze languages --config configs/demo.toml --language en,de,fr --prompts configs/prompts-tuxpaint.toml
    """
    cfg = _config(kw)
    codes = [c for c in (languages or cfg.data.language).split(",") if c.strip()]
    res = evaluate_languages(cfg, run, codes, prompts, force)
    rows = {code: {**{k: r["retrieval"][k] for k in ("i2t_R@1", "i2t_R@10", "t2i_R@1", "t2i_R@10")},
                   "n": r["retrieval"]["n_images"], "zs_top1": r["zeroshot"].get("top1")}
            for code, r in res["languages"].items()}
    click.echo(f"run {res['run']} ({cfg.analyze.split}):")
    click.echo(_table(rows, ["n", "i2t_R@1", "i2t_R@10", "t2i_R@1", "t2i_R@10", "zs_top1"], first="language"))
    click.echo(f"wrote {res['out']}/languages.json")


@main.command(context_settings=CONTEXT, help=f"""Training-free matching and retrieval: seeded quadratic
assignment of images to captions, local-CKA retrieval and ASIF relative representations, next to the
run's adapters and the CCA / Procrustes baselines on the same rows.

Quadratic assignment is cubic in the rows: it matches --max-rows images ({QAP_ROWS} when --max-rows is 0).

Example: analyze matching --config configs/demo.toml""")
@click.option("--run", help="fit-adapters run name. [default: train.name, else <image>-<text>-<adapter>]")
@click.option("--seeds", type=float, default=SEED_FRACTION, show_default=True,
              help="Known pairs for seeded matching: a fraction of the matched rows (< 1) or a count.")
@click.option("--kernel", type=click.Choice(KERNELS), default="linear", show_default=True,
              help="Kernel of the matching and of local CKA (on train-mean-centred features).")
@click.option("--base-rows", type=int, default=BASE_ROWS, show_default=True,
              help="Train pairs in the local-CKA base set (cost grows with it).")
@common_options
@friendly_errors
def matching(run, seeds, kernel, base_rows, **kw):
    cfg = _config(kw)
    res = run_matching(cfg, run, seeds, kernel, base_rows)
    click.echo(f"run {res['run']}: retrieval on {res['n_images']} images, {res['n_texts']} captions "
               f"(training-free: {', '.join(res['training_free'])})")
    click.echo(_table(res["retrieval"], ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum"]))
    for name, m in res["matching"].items():
        click.echo(f"seeded matching ({name}): {m['accuracy']:.3f} of {m['n'] - m['seeds']} unseeded rows "
                   f"(chance {m['chance']:.3f}, {m['seeds']} seeds, {m['seconds']:.1f} s)")
    click.echo(f"wrote {res['out']}/matching.json")


@main.command(name="benchmark", context_settings=CONTEXT)
@click.argument("name", default=OWN, required=False, metavar="[DATASET]")
@click.option("--run", help="fit-adapters run name. [default: train.name, else <image>-<text>-<adapter>]")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False),
              help="An exported model folder (aligned-export) instead of a run; CLIP_benchmark datasets only. [default: the run]")
@click.option("--dataset-root", type=click.Path(),
              help="Folder holding a CLIP_benchmark dataset's files ({dataset} is replaced by its name); never "
                   "downloaded. [default: none: needed for CLIP_benchmark's datasets]")
@click.option("--task", type=click.Choice(TASK_CHOICES), default="auto",
              help="auto: own split = retrieval, plus classification when the images have labels; "
                   "a CLIP_benchmark dataset = its own task. [default: auto]")
@click.option("--templates", type=click.Path(exists=True, dir_okay=False),
              help="Prompt templates, one per line with {} for the class name. [default: analyze zeroshot's set on "
                   "the own split, CLIP_benchmark's on its datasets]")
@config_option("data.label_from", "--label-from",
               help="Class labels: a metadata column, or dir (first folder of file_name).")
@click.option("--force", is_flag=True, help="Recompute the cached prompt features (needed when they are stale).")
@common_options
@friendly_errors
def benchmark_command(name, run, model_dir, dataset_root, task, templates, force, **kw):
    """LAION's CLIP_benchmark on the run's aligned model: DATASET is `own` (default: the run's
    --split, its figures shown beside the project's on the same rows) or any dataset CLIP_benchmark
    knows (cifar10, flickr30k, mscoco_captions, imagenet1k, wds/..., split --split) read from
    --dataset-root. Needs the [benchmark] extra (pip install clip-benchmark).

    Example: analyze benchmark --config configs/demo.toml
    """
    cfg = _config(kw)
    res = benchmark(cfg, run, name, dataset_root, task, templates, model_dir, force)
    who = res.get("run") or res.get("model")
    click.echo(f"CLIP_benchmark {res['clip_benchmark']} on {name} ({cfg.analyze.split}), model {who} "
               f"({res['seconds']:.1f} s)")
    for task_name, r in res["results"].items():
        click.echo(f"{task_name}:")
        click.echo(f"  {'figure':<30}{'CLIP_benchmark':>16}{'project':>10}{'close calls':>13}")
        for c in r["compare"]:
            ours = f"{c['project']:>10.4f}" if isinstance(c["project"], float) else f"{'-':>10}"
            close = c["close_calls"] if c["close_calls"] is not None else "-"
            click.echo(f"  {c['figure']:<30}{c['clip_benchmark']:>16.4f}{ours}{close:>13}")
    for task_name, why in res["skipped"].items():
        click.echo(f"{task_name} skipped: {why}")
    click.echo(f"wrote {res['path']}")
