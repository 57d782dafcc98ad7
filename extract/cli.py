"""``extract``: run frozen encoders once over a dataset and write their features to the cache.

Multi-process: ``torchrun --nproc-per-node 8 -m extract.cli ...`` (ranks share the chunks, rank 0
assembles), or independent jobs ``extract --shard K/N ...`` then ``extract --merge ...``.
"""

from __future__ import annotations

import click

from extract import datasets as D
from extract import encoders as E
from extract.run import Shard, extract, merge, torchrun_shard
from extract.sharding import ShardError
from pipeline.cli import build_config, config_option, config_options, config_values, friendly_errors
from pipeline.config import parse_override


def _list_encoders() -> None:
    for name in E.list_encoders():
        spec = E.REGISTRY[name]
        click.echo(f"{name:24s} {spec.modality:5s} {spec.dim:5d}  {spec.pooling:5s} {spec.weights}")
    for alias, target in sorted(E.ALIASES.items()):
        click.echo(f"{alias:24s} -> {target}")
    click.echo("Generic: hf-text:<hub id or path>, hf-image:<hub id or path>, torchvision:<model name>")


def _encoder_options(values: tuple[str, ...]) -> dict | None:
    """``("gpt2.pooling=last",)`` -> {"gpt2": {"pooling": "last"}}."""
    if not values:
        return None
    out: dict = {}
    for text in values:
        keys, value = parse_override(text)
        if len(keys) != 2:
            raise click.UsageError(f"--encoder-option {text!r} must look like ENCODER.KEY=VALUE.")
        out.setdefault(keys[0], {})[keys[1]] = value
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@config_option("extract.encoders", "--encoder", metavar="NAME[,NAME...]",
               help="Encoders to run (registry names, see --list-encoders).")
@config_option("data.dataset", "--dataset", help=f"Dataset format: {' | '.join(D.DATASETS)}.")
@config_option("data.data_dir", "--data-dir", help="Folder holding the dataset files.")
@config_option("extract.split", "--split", metavar="NAME",
               help="Split to extract: any split the dataset has (train, val, test, restval, an imagefolder's own "
                    "folder names; checked at run time), or all = every split it has.")
@config_option("data.captions", "--captions", type=click.Choice(D.CAPTION_POLICIES),
               help="Caption policy: longest | first (one row per image) | all (ids <image>#k).")
@config_option("data.cache", "--cache", help="Feature-cache folder.")
@config_option("extract.format", "--format", help="Format of new entries.")
@config_option("extract.batch_size", "--batch-size", type=int, help="Items per forward pass.")
@config_option("extract.precision", "--precision", help="Autocast precision; features are stored as float32.")
@config_option("extract.device", "--device", help="auto (CUDA when present) | cpu | cuda | cuda:N.")
@config_option("extract.workers", "--workers", type=int, help="DataLoader workers; -1 = min(8, cores - 1), 0 for text on CPU.")
@config_option("extract.layers", "--layers", help="all also stores every hidden layer's pooled features.")
@config_option("extract.tokens", "--tokens", metavar="none|all|grid:K",
               help="Also store token features: every token (all) or image token grids average-pooled to K x K "
                    "(grid:K, plus CLS for ViTs; texts keep every real token); the estimated size is printed first "
                    "and refused beyond extract.max_token_bytes (docs/tokens.md).")
@config_option("extract.on_error", "--on-error", help="Unreadable image: stop, or skip it (logged and recorded in the cache).")
@config_option("extract.decode", "--decode",
               help="Image decoding: auto (JPEGs on the GPU when the model runs on CUDA, else CPU) | cpu (PIL in "
                    "the workers) | gpu (nvJPEG; the decoder is part of the cache key).")
@config_option("extract.encoder_options", "--encoder-option", multiple=True, metavar="ENCODER.KEY=VALUE",
               help="Per-encoder option: pooling, image_size, max_tokens, weights (local path or hub id), "
                    "revision; e.g. gpt2.pooling=last (repeatable).")
@click.option("--force", is_flag=True, help="Recompute entries whose cached request or data differ (stale), and "
              "discard partial extractions of other requests.")
@click.option("--repair", is_flag=True, help="Recompute finished entries that fail their checksums (damaged: a lost "
              "Zarr chunk, a changed byte, a truncated file); the intact ones are kept.")
@click.option("--shard", "shard_text", metavar="K/N",
              help="Compute only shard K of N (0-based): chunks c with c % N == K of every entry; the last "
                   "shard to finish (or --merge) assembles the entries. SLURM arrays: "
                   "--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT (array 0-(N-1)). Not under torchrun. "
                   "[default: every chunk]")
@click.option("--merge", "merge_only", is_flag=True,
              help="Compute nothing: assemble the entries staged by --shard runs (same options otherwise); "
                   "fails naming the missing chunks and the shard to rerun.")
@click.option("--list-encoders", is_flag=True, help="List the registered encoders and exit.")
@config_options
@friendly_errors
def main(force, repair, shard_text, merge_only, list_encoders, config_path, overrides, verbose, **kwargs):
    """Run frozen encoders over an image-caption dataset and write features to the cache.

    Example: extract --encoder resnet18,gpt2,dinov2 --data-dir data/flickr30k --split test

    On 8 GPUs: torchrun --nproc-per-node 8 -m extract.cli --encoder ... (each rank takes every 8th
    chunk on cuda:LOCAL_RANK; rank 0 assembles the entries).
    """
    if list_encoders:
        _list_encoders()
        return
    if merge_only and (shard_text or force or repair):
        raise click.UsageError("--merge computes nothing: drop --shard/--force/--repair (run the shards first).")
    try:
        shard = Shard.parse(shard_text) if shard_text else None
    except ShardError as exc:
        raise click.BadParameter(str(exc), param_hint="--shard") from None
    options = config_values(kwargs)
    options["extract.encoder_options"] = _encoder_options(options["extract.encoder_options"])
    cfg = build_config(config_path, overrides, options, verbose)
    entries = merge(cfg) if merge_only else extract(cfg, force=force, shard=shard, repair=repair)
    ranked = torchrun_shard()
    if ranked is not None and ranked.index != 0:
        return  # torchrun: rank 0 prints the table
    for entry in entries:
        skipped = f", {len(entry.skipped)} skipped" if entry.skipped else ""
        tokens = f"  {entry.token_lengths().sum()} tokens x {entry.token_width}" if entry.has_tokens else ""
        click.echo(f"{entry.name:24s} {entry.n:7d} x {entry.dim:<5d}{skipped}{tokens}  {entry.path}")
    if shard is not None and shard.count > 1:
        click.echo(f"shard {shard}: its chunks are staged; {len(entries)} entries were finished here. The last "
                   "shard to finish assembles the rest; `extract --merge` (same options) checks and finishes.")


if __name__ == "__main__":
    main()
