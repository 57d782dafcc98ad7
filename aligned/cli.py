"""``aligned-export`` (also installed as ``export``, which a shell shadows with its builtin): parse
options, build the configuration, call ``aligned.export``."""

from __future__ import annotations

import click

from aligned.export import export
from aligned.folder import SUMS
from aligned.sources import locate_run
from pipeline.cli import build_config, config_option, config_options, config_values, friendly_errors
from pipeline.runs import read_run, report_dir, run_name


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--run", help="Run name in the cache, or a run folder <cache>/runs/<name>. [default: train.name, else "
                            "<image>-<text>-<adapter>]")
@config_option("data.cache", "--cache", help="Feature-cache folder holding the run.")
@config_option("analyze.out", "--reports",
               help="Folder of analyze outputs; the model card quotes the run's zero-shot and Platonic results "
                    "from OUT/<dataset>/<split>/runs/<run>/ when present.")
@config_option("analyze.split", "--split", help="Split those analysis results were computed on.")
@click.option("--include-weights", is_flag=True, default=False,
              help="Copy the encoder weights into the folder as safetensors, so it works on a machine without "
                   "them (config.json records where they come from otherwise).")
@config_options
@friendly_errors
def main(out_dir, run, include_weights, config_path, overrides, verbose, **kw):
    """Export a run's aligned model (frozen encoders + adapters) to OUT_DIR in the Hugging Face
    convention: config.json, adapters.safetensors, README.md (model card), SHA256SUMS. Load it
    anywhere with AlignedModel.from_pretrained(OUT_DIR); no cache is needed."""
    cfg = build_config(config_path, overrides, config_values(kw), verbose)
    folder = locate_run(run or run_name(cfg.train), cfg.data.cache)
    dataset = read_run(folder).dataset or cfg.data.dataset
    reports = report_dir(cfg.analyze.out, dataset, cfg.analyze.split, "runs", folder.name)
    out = export(folder, out_dir, cfg.data.cache, include_weights, reports if reports.is_dir() else None)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    click.echo(f"exported run {folder.name!r} to {out} ({size / 2**20:.1f} MiB; encoder weights "
               f"{'included' if include_weights else 'not included: config.json says where they come from'}; "
               f"checksums in {SUMS})")
    click.echo(f"load it with: AlignedModel.from_pretrained({str(out)!r})")


if __name__ == "__main__":  # pragma: no cover
    main()
