"""Shared command-line plumbing: --config / --set / logging, and errors shown as one clean line."""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Mapping

import click

from pipeline.errors import PipelineError
from pipeline.config import CHOICES, PipelineConfig, config_default, load_config


def config_options(func: Callable) -> Callable:
    """Add ``--config PATH``, ``--set section.key=value`` (repeatable) and ``-v`` to a command."""
    func = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                        help="Override any pipeline.toml key, e.g. --set train.lr=3e-4 (repeatable).")(func)
    func = click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                        help="Config file. [default: ./pipeline.toml if present, else built-in defaults]")(func)
    func = click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")(func)
    return func


def config_option(key: str, *param_decls: str, help: str, **kwargs) -> Callable:
    """A click option that overrides the config key ``key`` (``"section.name"``).

    Its help text ends with ``[config: key; default: D]`` read from ``pipeline/config.py``, its
    choices are ``pipeline.config.CHOICES[key]`` when the key has fixed choices, and its value
    reaches the command as the keyword ``section__name``: :func:`config_values` turns those
    back into ``{"section.name": value}`` for :func:`build_config`. So help texts, choices and
    defaults cannot drift from the config.
    """
    if key in CHOICES and "type" not in kwargs:
        kwargs["type"] = click.Choice(CHOICES[key])
    name = key.replace(".", "__")
    return click.option(*param_decls, name, help=f"{help} {config_tag(key)}", **kwargs)


def config_tag(key: str) -> str:
    """``[config: KEY; default: VALUE]``, the one format every option's help ends with: the
    value from pipeline/config.py, strings quoted, lists comma-joined (``[]`` when empty)."""
    default = config_default(key)  # raises for a key the config does not have
    if isinstance(default, tuple):
        shown = repr(",".join(map(str, default))) if default else "[]"
    elif isinstance(default, Mapping):
        shown = "{}" if not default else repr(dict(default))
    else:
        shown = repr(default)
    return f"[config: {key}; default: {shown}]"


def config_values(kwargs: dict) -> dict[str, Any]:
    """Pop the ``section__name`` keywords of :func:`config_option` options into ``{"section.name": v}``."""
    return {k.replace("__", "."): kwargs.pop(k) for k in [k for k in kwargs if "__" in k]}


def build_config(config_path: str | None, overrides: tuple[str, ...], options: Mapping[str, Any],
                 verbose: int = 0) -> PipelineConfig:
    """Configure logging, then load the config (errors are ConfigError, shown as one line)."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)
    return load_config(config_path, overrides, options)  # a ConfigError is a PipelineError: one line


def friendly_errors(func: Callable) -> Callable:
    """Show the library's expected errors (every :class:`PipelineError`: bad input, stale cache,
    missing weights, bad config values) as one line ``Error: ...`` with exit status 1. Anything
    else is a bug and raises with its traceback."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except PipelineError as exc:
            raise click.ClickException(str(exc)) from None
    return wrapper
