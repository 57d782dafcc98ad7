"""Every command-line option that mirrors a config key says so in its help, and what it says
(key, default, choices) is what pipeline/config.py holds: help texts cannot drift from the config."""

from __future__ import annotations

import re

import click
import pytest

from aligned.cli import main as export_cli
from analyze.cli import main as analyze_cli
from extract.cli import main as extract_cli
from pipeline.config import CHOICES, ConfigError, config_default
from train.cli import main as fit_cli

# "[config: train.lr]", "[config: train.lr; default: 0.0001]", "[analyze.k: 10]", "[data.dataset]"
KEY = re.compile(r"\[(?:config: )?([a-z_]+\.[a-z_]+)(?:(?::|; default:) ([^\]]*))?\]")


def _options():
    commands = [("extract", extract_cli), ("fit-adapters", fit_cli), ("export", export_cli)]
    commands += [(f"analyze {n}", c) for n, c in analyze_cli.commands.items()]
    for name, command in commands:
        for param in command.params:
            if isinstance(param, click.Option) and param.help:
                for key, shown in KEY.findall(param.help):
                    yield pytest.param(param, key, shown, id=f"{name} {param.opts[0]} {key}")


def _shown(value) -> str:
    if isinstance(value, tuple):
        return ",".join(value) or "all"
    return str(value)


@pytest.mark.parametrize("param, key, shown", list(_options()))
def test_option_help_matches_the_config(param, key, shown):
    try:
        default = config_default(key)
    except ConfigError as exc:
        pytest.fail(f"{param.opts[0]} names config key {key!r}, which does not exist: {exc}")
    if shown:
        assert shown.strip("'\"") in (_shown(default), repr(default)), \
            f"{param.opts[0]} says the default of {key} is {shown}, the config says {default!r}"
    if isinstance(param.type, click.Choice) and key in CHOICES:
        assert set(param.type.choices) == set(CHOICES[key]), f"{param.opts[0]} choices differ from CHOICES[{key!r}]"


def test_options_that_mirror_config_keys_exist():
    assert len(list(_options())) >= 30
