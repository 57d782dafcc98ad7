"""``fit-adapters``: parse options, build the configuration, call ``train.fit.fit_adapters``."""

from __future__ import annotations

import os

import click

from pipeline.cli import build_config, config_option, config_options, config_values, friendly_errors
from pipeline.runs import ADAPTERS_METHOD
from train.adapters import ADAPTERS, JOINT_ADAPTERS
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
@config_option("data.cache", "--cache", help="Feature-cache folder written by `extract`.")
@config_option("data.dataset", "--dataset", help="Dataset name inside the cache, e.g. flickr30k.")
@config_option("train.image", "--image", help="Cache entry of the image modality, e.g. resnet18.")
@config_option("train.text", "--text", help="Cache entry of the text modality, e.g. gpt2.")
@config_option("train.modalities", "--modality", multiple=True, metavar="NAME=ENTRY",
               help="An extra modality trained into the same space (repeatable); with more than two "
                    "modalities the loss is the mean pairwise InfoNCE on one row per image.")
@config_option("train.adapter", "--adapter", type=click.Choice([*ADAPTERS, *JOINT_ADAPTERS]),
               help="Adapter kind: linear (d->dim), mlp (d->train.hidden->dim), bottleneck "
                   "(d->train.bottleneck->dim), residual (train.depth residual MLP blocks), token (token projectors on "
                    "token entries, train.token.*: docs/tokens.md).")
@config_option("train.dim", "--dim", type=int, help="Shared space dimension d_e.")
@config_option("train.epochs", "--epochs", type=int, help="Passes over the train split.")
@config_option("train.batch_size", "--batch-size", type=int, help="Pairs per step; InfoNCE negatives = batch - 1.")
@config_option("train.lr", "--lr", type=float, help="Peak AdamW learning rate.")
@config_option("train.schedule", "--schedule",
               help="Learning-rate shape after warm-up.")
@config_option("train.warmup_epochs", "--warmup-epochs", type=float, help="Linear warm-up length in epochs.")
@config_option("train.temperature", "--temperature", type=float, help="InfoNCE temperature tau, or its initial value.")
@config_option("train.learnable_temperature", "--learnable-temperature/--fixed-temperature", default=None,
               help="Learn 1/tau (clamped at 100, as CLIP) or keep tau fixed.")
@config_option("train.mixup", "--mixup", type=float, metavar="ALPHA",
               help="Latent mixup with lambda ~ Beta(ALPHA, ALPHA) shared by all modalities; 0 = off.")
@config_option("train.seed", "--seed", type=int, help="Seed of initialisation, batch order and mixup.")
@config_option("train.device", "--device", help="auto (cuda when present) | cpu | cuda | cuda:N.")
@config_option("train.name", "--name", help="Run name; default <image>-<text>-<adapter>. Output: <cache>/runs/<name>.")
@config_option("train.reference", "--reference",
               help="Cache entry for the per-epoch val CKA curve ('' = none); an explicit entry must exist, the "
                    "default is skipped with a warning when absent.")
@config_option("train.max_rows_in_memory", "--max-rows-in-memory", type=int, metavar="PAIRS",
               help="Train pairs held in memory at once; a larger train split is streamed from the cache in "
                   "shuffled windows of PAIRS/2 (0 = load everything).")
@click.option("--progress/--no-progress", default=None, help="Show a progress bar, or plain progress lines. [default: a bar on a terminal, lines in a log]")
@config_options
@friendly_errors
def main(progress, config_path, overrides, verbose, **kwargs):
    """Train adapters that align cached image and text features with symmetric InfoNCE,
    pick the epoch with the best val recall, and report test recall next to CCA and
    Procrustes baselines. Writes <cache>/runs/<name> and aligned cache entries <entry>@<name>.

    Several GPUs (or CPU processes): torchrun --nproc-per-node N -m train.cli [OPTIONS]
    (DistributedDataParallel; --batch-size is the global batch, a multiple of N)."""
    options = config_values(kwargs)
    options["train.modalities"] = _modalities(options["train.modalities"])
    cfg = build_config(config_path, overrides, options, verbose)
    result = fit_adapters(cfg, require_reference=True if options["train.reference"] else None, progress=progress)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return
    tc = cfg.train
    click.echo(f"test retrieval (%), best epoch {result.best_epoch} of {result.metrics.epochs_run} "
               f"(row {ADAPTERS_METHOD} = the trained adapters, loss: {loss_label(tc.loss, tc.loss_direction, tc.normalize)}):")
    click.echo(summary_table(result.metrics.test))
    click.echo(f"run folder: {result.run_dir}")


if __name__ == "__main__":  # pragma: no cover
    main()
