"""``study``: parse options, build the configuration, call ``study.runner`` (run, summarise or status)."""

from __future__ import annotations

import click

from pipeline.cli import build_config, config_option, config_options, config_values, friendly_errors
from study.runner import StudyResult, run_study, status_of, summarize_study


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@config_option("study.name", "--name", help="Study name (its folder under <analyze.out>/<dataset>/<split>/studies/).")
@config_option("study.repeat", "--repeat", metavar="KEY", help="The axis averaged over in the summary.")
@config_option("study.jobs", "--jobs", type=int, help="Cells run at once on this machine (worker processes; on CUDA "
               "worker i takes GPU i mod count, on CPU each gets cores / jobs threads).")
@config_option("study.launcher", "--launcher", help="Where the cells run: this machine, or a SLURM job array "
               "(settings: the study.slurm table of the config; needs submitit).")
@click.option("--dry-run", is_flag=True, help="List the cells and which are finished; run nothing.")
@click.option("--status", "show_status", is_flag=True,
              help="Show what is done, failed, running (who holds each claim) and left; run nothing.")
@click.option("--summarize", is_flag=True, help="Write cells.csv, summary.csv, the figures and the report from the "
              "cells' result files (e.g. after a SLURM array); run nothing.")
@click.option("--progress/--no-progress", default=None,
              help="A progress bar over cells / nothing. [default: a bar on a terminal, plain lines in a log]")
@config_options
@friendly_errors
def main(dry_run, show_status, summarize, progress, config_path, overrides, verbose, **kwargs):
    """Run a grid of cells defined by [study.axes] (dotted config key -> list of values; the grid is
    their product) and [study.variants] (named recipes, a leading axis "variant"): each cell
    extracts what is missing, trains adapters (fit-adapters) and measures study.evaluations (the
    Platonic test, zero-shot accuracy), then the study writes cells.csv, summary.csv, figures,
    study.md and study.html. Finished cells are skipped, a killed study resumes, a failing cell is
    recorded and skipped (the exit status is then 1). Cells run --jobs at a time on this machine,
    or as a SLURM job array (--launcher slurm; then --status and --summarize).

    Example: study --config configs/study-demo.toml --jobs 2
    """
    cfg = build_config(config_path, overrides, config_values(kwargs), verbose)
    if show_status:
        for line in status_of(cfg):
            click.echo(line)
        return
    result = summarize_study(cfg) if summarize else run_study(cfg, progress=progress, dry_run=dry_run)
    if dry_run:
        for cell in result.cells:
            click.echo(f"{result.status[cell.cell_id]:<8} {cell.cell_id}  (run {cell.run})")
        click.echo(f"{len(result.cells)} cells; folder {result.folder}")
        return
    if result.submission is not None:
        sub = result.submission
        click.echo(f"submitted to SLURM: extraction job {sub.prep_job}, then training array {sub.array_job} "
                   f"({sub.tasks} tasks); logs in {sub.logs}")
        click.echo("follow it with `study --status` (same options); when the array has ended, `study --summarize` "
                   "writes the tables and the report")
        return
    _report(result)


def _report(result: StudyResult) -> None:
    done = len(result.cells) - result.failed - result.pending
    click.echo(f"{len(result.cells)} cells: {done} done, {result.failed} failed"
               + (f", {result.pending} not run (study --status)" if result.pending else "")
               + f"; this launch ran {result.ran} ({result.trained} trainings) in {result.seconds:.0f} s")
    for answer in result.answers:
        click.echo(answer)
    click.echo(f"tables: {result.folder / 'cells.csv'}, {result.folder / 'summary.csv'}")
    click.echo(f"report: {result.html}")
    if result.failed:
        first, error = next(iter(result.errors.items()))
        raise click.ClickException(f"{result.failed} of {len(result.cells)} cells failed (first: {first}: {error}); "
                                   "the tables and the report are written. A rerun retries the failed cells.")


if __name__ == "__main__":  # pragma: no cover
    main()
