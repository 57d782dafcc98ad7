"""``analyze``: compare cached representations, test the Platonic hypothesis, write a report.

Each subcommand parses options into the pipeline config and calls one library function:
``cka`` -> analyze.compare.compare_entries, ``platonic`` -> analyze.platonic.platonic_test,
``layers`` -> analyze.layers.compare_layers, ``pairs`` -> analyze.pairs.rank_pairs,
``report`` -> analyze.report.build_report, ``zeroshot`` -> analyze.zeroshot.zero_shot,
``matching`` -> analyze.matching.run_matching. Outputs go under ``<analyze.out>/<dataset>/<split>/``
(layout in analyze.compare's docstring).
"""

from __future__ import annotations

from typing import Callable

import click

from analyze.compare import compare_entries
from analyze.layers import compare_layers
from analyze.matching import BASE_ROWS, KERNELS, QAP_ROWS, SEED_FRACTION, run_matching
from analyze.pairs import rank_pairs
from analyze.platonic import SIDES, TERMS, platonic_test
from analyze.report import build_report
from analyze.zeroshot import zero_shot
from pipeline.cli import build_config, config_options, friendly_errors
from pipeline.config import CHOICES, PipelineConfig
from similarity.metrics import METRICS

CONTEXT = {"help_option_names": ["-h", "--help"]}


def _default(key: str) -> str:
    """``"[analyze.k: 10]"``: the config key and its built-in default, for --help."""
    section, name = key.split(".")
    value = getattr(getattr(PipelineConfig(), section), name)
    if isinstance(value, tuple):
        value = ",".join(value) or "all"
    return f"[{key}: {value}]"


def _option(*decls: str, key: str, text: str, **kw) -> Callable:
    return click.option(*decls, help=f"{text} {_default(key)}", **kw)


def common_options(func: Callable) -> Callable:
    """Options every analyze command accepts, then --config/--set/-v from pipeline.cli."""
    func = config_options(func)
    for opt in reversed([
        _option("--cache", key="data.cache", text="Feature-cache folder."),
        _option("--dataset", key="data.dataset", text="Dataset whose cache entries are read."),
        _option("--split", key="analyze.split", text="Split the representations are compared on."),
        _option("--metric", "--metrics", "metrics", metavar="NAME[,NAME...]", key="analyze.metrics",
                text=f"Metrics, comma-separated: {', '.join(METRICS)}."),
        _option("--k", type=int, key="analyze.k", text="Neighbours for the kNN metrics."),
        _option("--max-rows", type=int, key="analyze.max_rows", text="Keep a fixed random subset of this many rows (0 = all)."),
        _option("--duplicates", type=click.Choice(CHOICES["analyze.duplicates"]), key="analyze.duplicates",
                text="Byte-identical images under different ids: drop (keep one of each group) or keep."),
        _option("--seed", type=int, key="analyze.seed", text="Seeds row subsets, bootstrap and permutations."),
        _option("--out", key="analyze.out", text="Output folder (files go under OUT/<dataset>/<split>/)."),
    ]):
        func = opt(func)
    return func


def _config(kw: dict, extra: dict) -> PipelineConfig:
    """Build the config from the common options (popped from ``kw``) and command-specific ones."""
    options = {"data.cache": kw.pop("cache"), "data.dataset": kw.pop("dataset"), "analyze.split": kw.pop("split"),
               "analyze.metrics": kw.pop("metrics"), "analyze.k": kw.pop("k"), "analyze.max_rows": kw.pop("max_rows"),
               "analyze.duplicates": kw.pop("duplicates"),
               "analyze.seed": kw.pop("seed"), "analyze.out": kw.pop("out"), **extra}
    return build_config(kw.pop("config_path"), kw.pop("overrides"), options, kw.pop("verbose"))


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
@click.option("--entries", metavar="NAME[,NAME...]",
              help=f"Cache entries to compare (default: every entry of the split). {_default('analyze.entries')}")
@click.option("--kernels", is_flag=True, help="Also draw the kernels themselves on a sample of rows (kernels.png).")
@_option("--kernel-rows", type=int, key="analyze.kernel_rows", text="Rows in the kernel heatmaps.")
@_option("--reference", key="analyze.reference", text="Entry whose clustering orders the kernel heatmaps' rows.")
@click.option("--calibrate/--no-calibrate", default=None,
              help=f"Also calibrate every score against a shuffled-pairing null. {_default('analyze.calibrate')}")
@_option("--permutations", type=int, key="analyze.permutations", text="Shuffled-pairing draws for --calibrate.")
@common_options
@friendly_errors
def cka(entries, kernels, kernel_rows, reference, calibrate, permutations, **kw):
    """Pairwise scores between cache entries (rows joined by sample id), as JSON/CSV and heatmaps.

    Example: analyze cka --entries resnet18,gpt2,dinov2 --metric cka,mutual_knn --kernels --calibrate
    """
    cfg = _config(kw, {"analyze.entries": entries, "analyze.kernel_rows": kernel_rows,
                       "analyze.reference": reference, "analyze.calibrate": calibrate,
                       "analyze.permutations": permutations})
    res = compare_entries(cfg, kernels=kernels)
    for m, S in res["scores"].items():
        click.echo(f"{m} (n={res['n']}, {res['seconds'][m]:.1f} s)\n{_matrix(res['entries'], _tolist(S))}\n")
        if "calibrated" in res:
            click.echo(f"{m}, calibrated against {res['permutations']} shuffled pairings\n"
                       f"{_matrix(res['entries'], _tolist(res['calibrated'][m]))}\n")
    click.echo(f"wrote {res['out']}/scores.json, scores.csv and {len(res['figures'])} figures")


@main.command(context_settings=CONTEXT)
@_option("--reference", key="analyze.reference", text="Reference model's cache entry (K_ref).")
@_option("--image", key="train.image", text="Image encoder entry (K_X); the run's aligned entry is IMAGE@RUN.")
@_option("--text", key="train.text", text="Text encoder entry (K_Y); the run's aligned entry is TEXT@RUN.")
@click.option("--run", help="fit-adapters run name (default: train.name, else <image>-<text>-<adapter>).")
@_option("--bootstrap", type=int, key="analyze.bootstrap", text="Resamples for the 95% confidence intervals.")
@_option("--permutations", type=int, key="analyze.permutations", text="Shuffled-pairing draws for the null.")
@_option("--kernel-rows", type=int, key="analyze.kernel_rows", text="Rows in the kernel heatmaps.")
@common_options
@friendly_errors
def platonic(reference, image, text, run, bootstrap, permutations, kernel_rows, **kw):
    """The hypothesis test: is m(K_repr, K_ref) > mean(m(K_X, K_ref), m(K_Y, K_ref)) by more than chance?

    Bootstrap CIs (mutual kNN: neighbours among the distinct drawn rows; other kNN metrics: 80%
    subsamples without replacement), a shuffled-pairing null with calibrated scores, controls
    (untrained adapters, CCA, Procrustes; analyze.controls) and a verdict per metric and side. Example:
    analyze platonic --reference dinov2 --image resnet18 --text gpt2 --run RUN
    """
    cfg = _config(kw, {"analyze.reference": reference, "train.image": image, "train.text": text,
                       "analyze.bootstrap": bootstrap, "analyze.permutations": permutations,
                       "analyze.kernel_rows": kernel_rows})
    res = platonic_test(cfg, run)
    click.echo(f"run {res['run']}, n={res['n']}, reference {res['entries']['reference']} "
               f"({res['bootstrap']} resamples, {res['permutations']} permutations, {res['seconds']:.1f} s)")
    click.echo(f"{'metric':<16}" + "".join(f"{t:>14}" for t in TERMS) + "".join(f"{'delta ' + s:>14}" for s in SIDES))
    for m, r in res["results"].items():
        click.echo(f"{m:<16}" + "".join(f"{r['terms'][t]['score']:>14.3f}" for t in TERMS)
                   + "".join(f"{r['delta'][s]['delta']:>+14.3f}" for s in SIDES))
    for m, per_side in res["sentences"].items():
        for s in SIDES:
            click.echo(per_side[s])
    click.echo(res["headline"])
    click.echo(f"wrote {res['out']}/platonic.json, platonic.csv, platonic.png")


@main.command(context_settings=CONTEXT)
@click.option("--pair", metavar="IMAGE_ENTRY,TEXT_ENTRY",
              help="The two entries to compare layer by layer (default: train.image,train.text).")
@_option("--permutations", type=int, key="analyze.permutations",
         text="Shuffled-pairing draws that calibrate the best and last layer pairs (0 = none).")
@common_options
@friendly_errors
def layers(pair, permutations, **kw):
    """Layer x layer heatmap of each metric for two entries extracted with `extract --layers all`."""
    cfg = _config(kw, {"analyze.permutations": permutations})
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
    cfg = _config(kw, {})
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
@click.option("--run", help="fit-adapters run name (default: train.name, else <image>-<text>-<adapter>).")
@_option("--reference", key="analyze.reference", text="Reference model's cache entry.")
@_option("--image", key="train.image", text="Image encoder entry of the run.")
@_option("--text", key="train.text", text="Text encoder entry of the run.")
@_option("--bootstrap", type=int, key="analyze.bootstrap", text="Resamples for the 95% confidence intervals.")
@_option("--permutations", type=int, key="analyze.permutations", text="Shuffled-pairing draws for the null.")
@common_options
@friendly_errors
def report(run, reference, image, text, bootstrap, permutations, **kw):
    """One Markdown and one self-contained HTML report of an experiment (runs analyze cka and
    analyze platonic when their outputs are missing or were made with other settings)."""
    cfg = _config(kw, {"analyze.reference": reference, "train.image": image, "train.text": text,
                       "analyze.bootstrap": bootstrap, "analyze.permutations": permutations})
    md = build_report(cfg, run)
    click.echo(f"report: {md}")
    click.echo(f"report: {md.with_suffix('.html')}")



def _table(rows: dict, columns: list[str], first: str = "method") -> str:
    lines = [f"{first:<12}" + "".join(f"{c:>10}" for c in columns)]
    for name, r in rows.items():
        lines.append(f"{name:<12}" + "".join(f"{r[c]:>10.3f}" if isinstance(r.get(c), (int, float)) else f"{'-':>10}"
                                             for c in columns))
    return "\n".join(lines)


@main.command(context_settings=CONTEXT)
@click.option("--run", help="fit-adapters run name (default: train.name, else <image>-<text>-<adapter>).")
@click.option("--templates", type=click.Path(exists=True, dir_okay=False),
              help="Prompt templates, one per line with {} for the class name (default: a short CLIP-style set).")
@_option("--label-from", key="data.label_from", text="Class labels: a metadata column, or dir (first folder of file_name).")
@click.option("--force", is_flag=True, help="Recompute the cached prompt features (needed when they are stale).")
@common_options
@friendly_errors
def zeroshot(run, templates, label_from, force, **kw):
    """Zero-shot classification of the split's images by class prompts through the run's text
    adapter, next to the CCA / Procrustes baselines and the training-free ASIF method.

    Example: analyze zeroshot --config configs/demo.toml --label-from dir
    """
    cfg = _config(kw, {"data.label_from": label_from})
    res = zero_shot(cfg, run, templates, force)
    click.echo(f"run {res['run']}: {res['n']} {cfg.analyze.split} images, {len(res['classes'])} classes, "
               f"{len(res['templates'])} templates ({res['seconds']:.1f} s)")
    cols = ["top1", "top5", "balanced"]
    click.echo(_table({**res["results"], "chance": res["chance"]}, cols))
    click.echo(f"majority class: {res['chance']['majority']:.3f}")
    click.echo(f"wrote {res['out']}/zeroshot.json")


@main.command(context_settings=CONTEXT, help=f"""Training-free matching and retrieval: seeded quadratic
assignment of images to captions, local-CKA retrieval and ASIF relative representations, next to the
run's adapters and the CCA / Procrustes baselines on the same rows.

Quadratic assignment is cubic in the rows: it matches --max-rows images ({QAP_ROWS} when --max-rows is 0).

Example: analyze matching --config configs/demo.toml""")
@click.option("--run", help="fit-adapters run name (default: train.name, else <image>-<text>-<adapter>).")
@click.option("--seeds", type=float, default=SEED_FRACTION, show_default=True,
              help="Known pairs for seeded matching: a fraction of the matched rows (< 1) or a count.")
@click.option("--kernel", type=click.Choice(KERNELS), default="linear", show_default=True,
              help="Kernel of the matching and of local CKA (on train-mean-centred features).")
@click.option("--base-rows", type=int, default=BASE_ROWS, show_default=True,
              help="Train pairs in the local-CKA base set (cost grows with it).")
@common_options
@friendly_errors
def matching(run, seeds, kernel, base_rows, **kw):
    cfg = _config(kw, {})
    res = run_matching(cfg, run, seeds, kernel, base_rows)
    click.echo(f"run {res['run']}: retrieval on {res['n_images']} images, {res['n_texts']} captions "
               f"(training-free: {', '.join(res['training_free'])})")
    click.echo(_table(res["retrieval"], ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum"]))
    for name, m in res["matching"].items():
        click.echo(f"seeded matching ({name}): {m['accuracy']:.3f} of {m['n'] - m['seeds']} unseeded rows "
                   f"(chance {m['chance']:.3f}, {m['seeds']} seeds, {m['seconds']:.1f} s)")
    click.echo(f"wrote {res['out']}/matching.json")
