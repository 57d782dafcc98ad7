"""Shared command-line plumbing: --config / --set / logging, and errors shown as one clean line."""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Mapping

import click

from pipeline.config import ConfigError, PipelineConfig, load_config


def config_options(func: Callable) -> Callable:
    """Add ``--config PATH``, ``--set section.key=value`` (repeatable) and ``-v`` to a command."""
    func = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                        help="Override any pipeline.toml key, e.g. --set train.lr=3e-4 (repeatable).")(func)
    func = click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                        help="Config file (default: ./pipeline.toml if present, else built-in defaults).")(func)
    func = click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")(func)
    return func


def build_config(config_path: str | None, overrides: tuple[str, ...], options: Mapping[str, Any],
                 verbose: int = 0) -> PipelineConfig:
    """Configure logging, then load the config; config errors become click usage errors."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)
    try:
        return load_config(config_path, overrides, options)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


def friendly_errors(*types: type[BaseException]) -> Callable:
    """Turn the library's expected errors (bad input, stale cache, missing weights) into a
    one-line ``Error: ...`` and exit status 1 instead of a traceback."""
    def decorate(func: Callable) -> Callable:
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            try:
                return func(*args, **kwargs)
            except types as exc:
                raise click.ClickException(str(exc)) from None
        return wrapper
    return decorate
