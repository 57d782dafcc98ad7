"""``fit-adapters``: parse options, build the configuration, call ``train.fit.fit_adapters``."""

from __future__ import annotations

import os

import click

from pipeline.cli import build_config, config_options, friendly_errors
from pipeline.runs import ADAPTERS_METHOD
from train.adapters import ADAPTERS
from train.fit import fit_adapters
from train.losses import loss_label
from train.outputs import summary_table


def _modalities(values: tuple[str, ...]) -> dict | None:
    out = {}
    for v in values:
        name, sep, entry = v.partition("=")
        if not sep or not name.strip() or not entry.strip():
            raise click.BadParameter(f"{v!r} must look like NAME=ENTRY (e.g. audio=clap).", param_hint="--modality")
        out[name.strip()] = entry.strip()
    return out or None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--cache", help="Feature-cache folder written by `extract` [config: data.cache].")
@click.option("--dataset", help="Dataset name inside the cache, e.g. flickr30k [config: data.dataset].")
@click.option("--image", help="Cache entry of the image modality, e.g. resnet18 [config: train.image].")
@click.option("--text", help="Cache entry of the text modality, e.g. gpt2 [config: train.text].")
@click.option("--modality", "modalities", multiple=True, metavar="NAME=ENTRY",
              help="An extra modality trained into the same space (repeatable); with more than two "
                   "modalities the loss is the mean pairwise InfoNCE on one row per image.")
@click.option("--adapter", type=click.Choice(list(ADAPTERS)),
              help="Adapter kind: linear (d->dim), mlp (d->train.hidden->dim), bottleneck "
                   "(d->train.bottleneck->dim), residual (train.depth residual MLP blocks) [config: train.adapter].")
@click.option("--dim", type=int, help="Shared space dimension d_e [config: train.dim].")
@click.option("--epochs", type=int, help="Passes over the train split [config: train.epochs].")
@click.option("--batch-size", type=int, help="Pairs per step; InfoNCE negatives = batch - 1 [config: train.batch_size].")
@click.option("--lr", type=float, help="Peak AdamW learning rate [config: train.lr].")
@click.option("--schedule", type=click.Choice(["constant", "cosine"]),
              help="Learning-rate shape after warm-up [config: train.schedule].")
@click.option("--warmup-epochs", type=float, help="Linear warm-up length in epochs [config: train.warmup_epochs].")
@click.option("--temperature", type=float, help="InfoNCE temperature tau, or its initial value [config: train.temperature].")
@click.option("--learnable-temperature/--fixed-temperature", default=None,
              help="Learn 1/tau (clamped at 100, as CLIP) or keep tau fixed [config: train.learnable_temperature].")
@click.option("--mixup", type=float, metavar="ALPHA",
              help="Latent mixup with lambda ~ Beta(ALPHA, ALPHA) shared by all modalities; 0 = off [config: train.mixup].")
@click.option("--seed", type=int, help="Seed of initialisation, batch order and mixup [config: train.seed].")
@click.option("--device", help="auto (cuda when present) | cpu | cuda | cuda:N [config: train.device].")
@click.option("--name", help="Run name; default <image>-<text>-<adapter>. Output: <cache>/runs/<name> [config: train.name].")
@click.option("--reference", help="Cache entry for the per-epoch val CKA curve ('' = none); an explicit entry "
                                   "must exist, the default is skipped with a warning when absent [config: train.reference].")
@click.option("--max-rows-in-memory", type=int, metavar="PAIRS",
              help="Train pairs held in memory at once; a larger train split is streamed from the cache in "
                   "shuffled windows of PAIRS/2 (0 = load everything) [config: train.max_rows_in_memory].")
@click.option("--progress/--no-progress", default=None, help="Show a progress bar (default: only on a terminal).")
@config_options
@friendly_errors
def main(cache, dataset, image, text, modalities, adapter, dim, epochs, batch_size, lr, schedule, warmup_epochs,
         temperature, learnable_temperature, mixup, seed, device, name, reference, max_rows_in_memory, progress,
         config_path, overrides, verbose):
    """Train adapters that align cached image and text features with symmetric InfoNCE,
    pick the epoch with the best val recall, and report test recall next to CCA and
    Procrustes baselines. Writes <cache>/runs/<name> and aligned cache entries <entry>@<name>.

    Several GPUs (or CPU processes): torchrun --nproc-per-node N -m train.cli [OPTIONS]
    (DistributedDataParallel; --batch-size is the global batch, a multiple of N)."""
    options = {"data.cache": cache, "data.dataset": dataset, "train.image": image, "train.text": text,
               "train.modalities": _modalities(modalities), "train.adapter": adapter, "train.dim": dim,
               "train.epochs": epochs, "train.batch_size": batch_size, "train.lr": lr,
               "train.schedule": schedule, "train.warmup_epochs": warmup_epochs,
               "train.temperature": temperature, "train.learnable_temperature": learnable_temperature,
               "train.mixup": mixup, "train.seed": seed, "train.device": device, "train.name": name,
               "train.reference": reference, "train.max_rows_in_memory": max_rows_in_memory}
    cfg = build_config(config_path, overrides, options, verbose)
    result = fit_adapters(cfg, require_reference=True if reference else None, progress=progress)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return
    tc = cfg.train
    click.echo(f"test retrieval (%), best epoch {result.best_epoch} of {result.metrics.epochs_run} "
               f"(row {ADAPTERS_METHOD} = the trained adapters, loss: {loss_label(tc.loss, tc.loss_direction, tc.normalize)}):")
    click.echo(summary_table(result.metrics.test))
    click.echo(f"run folder: {result.run_dir}")


if __name__ == "__main__":  # pragma: no cover
    main()
