"""``study``: parse options, build the configuration, call ``study.runner.run_study``."""

from __future__ import annotations

import click

from pipeline.cli import build_config, config_option, config_options, config_values, friendly_errors
from study.runner import run_study


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@config_option("study.name", "--name", help="Study name (its folder under <analyze.out>/<dataset>/<split>/studies/).")
@config_option("study.repeat", "--repeat", metavar="KEY", help="The axis averaged over in the summary.")
@click.option("--dry-run", is_flag=True, help="List the cells and which are finished; run nothing.")
@click.option("--progress/--no-progress", default=None, help="Show a progress bar over cells (default: on a terminal).")
@config_options
@friendly_errors
def main(dry_run, progress, config_path, overrides, verbose, **kwargs):
    """Run a grid of cells defined by [study.axes] (dotted config key -> list of values; the grid is
    their product) and [study.variants] (named recipes, a leading axis "variant"): each cell
    extracts what is missing, trains adapters (fit-adapters) and measures study.evaluations (the
    Platonic test, zero-shot accuracy), then the study writes cells.csv, summary.csv, figures,
    study.md and study.html. Finished cells are skipped, a killed study resumes, a failing cell is
    recorded and skipped.

    Example: study --config configs/study-demo.toml
    """
    cfg = build_config(config_path, overrides, config_values(kwargs), verbose)
    result = run_study(cfg, progress=progress, dry_run=dry_run)
    if dry_run:
        for cell in result.cells:
            click.echo(f"{result.status[cell.cell_id]:<8} {cell.cell_id}  (run {cell.run})")
        click.echo(f"{len(result.cells)} cells; folder {result.folder}")
        return
    done = len(result.cells) - result.failed
    click.echo(f"{len(result.cells)} cells: {done} done, {result.failed} failed; this call ran {result.ran} "
               f"({result.trained} trainings) in {result.seconds:.0f} s")
    for answer in result.answers:
        click.echo(answer)
    click.echo(f"tables: {result.folder / 'cells.csv'}, {result.folder / 'summary.csv'}")
    click.echo(f"report: {result.html}")


if __name__ == "__main__":  # pragma: no cover
    main()
